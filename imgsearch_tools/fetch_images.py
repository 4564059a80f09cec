"""Download thumbnails of an Unsplash Lite folder: concurrent, resumable, retried, verified."""

from __future__ import annotations

import csv
import io
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from imgsearch.files import write_temporary
from imgsearch.unsplash import find_shards

USER_AGENT = "imgsearch-fetch-images/0.1"
# Only web addresses are fetched (a file:, ftp: or data: URL in a photos table is refused),
# also after a redirect; a thumbnail larger than this is refused rather than held in memory.
URL_SCHEMES = ("http", "https")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


def read_photo_urls(data_dir: str | Path) -> list[tuple[str, str]]:
    """``(photo_id, photo_image_url)`` of every row of ``photos.tsv*`` (all shards, in order).

    Reads the two columns directly with :mod:`csv` so downloading does not depend on the full
    catalogue reader; rows with an empty id or URL are skipped.

    Raises
    ------
    FileNotFoundError
        No ``photos.tsv*`` in ``data_dir``.
    ValueError
        A shard lacks the ``photo_id`` or ``photo_image_url`` column.
    """
    data_dir = Path(data_dir)
    shards = find_shards(data_dir, "photos")
    if not shards:
        raise FileNotFoundError(f"{data_dir}: no photos.tsv or photos.tsv000 shards")
    csv.field_size_limit(sys.maxsize)
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for shard in shards:
        with open(shard, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, [])
            missing = [c for c in ("photo_id", "photo_image_url") if c not in header]
            if missing:
                raise ValueError(f"{shard}: missing column(s) {', '.join(missing)}")
            id_col, url_col = header.index("photo_id"), header.index("photo_image_url")
            for fields in reader:
                if len(fields) <= max(id_col, url_col):
                    continue
                photo_id, url = fields[id_col].strip(), fields[url_col].strip()
                if photo_id and url and photo_id not in seen:
                    seen.add(photo_id)
                    rows.append((photo_id, url))
    return rows


def _safe_file_name(photo_id: str) -> bool:
    """Whether ``<photo_id>.jpg`` names a file inside images/ (no separators, no "..")."""
    separators = any(c in photo_id for c in "/\\\0")
    return bool(photo_id) and not separators and photo_id not in (".", "..")


def sized_url(url: str, width: int) -> str:
    """The image URL with Unsplash's ``w=`` resize parameter appended."""
    return f"{url}{'&' if '?' in url else '?'}w={int(width)}"


class _Permanent(Exception):
    """A failure that retrying will not fix (404, undecodable bytes...)."""


def _check_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise _Permanent(f"URL scheme {scheme or '(none)'!r} is not fetched (http, https only)")


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https addresses only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_scheme(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# No file:, ftp: or data: handler at all: only what the web needs.
_OPENER = urllib.request.OpenerDirector()
for _handler in (
    urllib.request.ProxyHandler(),
    urllib.request.HTTPHandler(),
    urllib.request.HTTPSHandler(),
    urllib.request.HTTPDefaultErrorHandler(),
    urllib.request.HTTPErrorProcessor(),
    _WebOnlyRedirects(),
):
    _OPENER.add_handler(_handler)


def _read_bounded(response) -> bytes:
    data = response.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise _Permanent(f"larger than {MAX_IMAGE_BYTES:,} bytes")
    return data


def _verify_image(data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise _Permanent(f"not an image ({type(exc).__name__})") from exc


def _download_one(
    url: str, target: Path, retries: int, timeout: float, sleep=time.sleep
) -> tuple[str, str]:
    """Fetch one image into ``target`` atomically; returns ("downloaded"|"failed", reason)."""
    attempt = 0
    while True:
        try:
            _check_scheme(url)
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with _OPENER.open(request, timeout=timeout) as response:
                data = _read_bounded(response)
            _verify_image(data)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            write_temporary(tmp, data)
            try:
                # A link, unlike a rename, never replaces a file that appeared meanwhile.
                os.link(tmp, target)
            except FileExistsError:
                return "skipped", ""
            finally:
                tmp.unlink()
            return "downloaded", ""
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            retryable = exc.code in RETRY_STATUSES
        except _Permanent as exc:
            return "failed", str(exc)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            cause = getattr(exc, "reason", exc)
            reason = f"network: {type(cause).__name__}"
            retryable = True
        if not retryable or attempt >= retries:
            return "failed", reason
        # Exponential backoff with jitter, so many workers do not hit a struggling server
        # at the same instant.
        sleep(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2))
        attempt += 1


def fetch_images(
    data_dir: str | Path,
    width: int = 400,
    workers: int = 16,
    retries: int = 3,
    timeout: float = 20,
    show_progress: bool = True,
    limit: int | None = None,
) -> dict:
    """Download ``images/<photo_id>.jpg`` for every photo of ``photos.tsv*``.

    Files already present are skipped, so an interrupted run resumes, and never replaced. Each
    file is written to a temporary name and linked into place, so a partial download never
    looks complete. A ``photo_id`` that is not a plain file name (a path separator, "..") is
    counted as failed and nothing is written for it. 5xx, 429 and
    network errors are retried with exponential backoff; 404 and bytes that do not decode as an
    image fail at once.

    Parameters
    ----------
    data_dir:
        The Unsplash Lite folder.
    width:
        Requested width in pixels (``?w=``).
    workers:
        Concurrent downloads.
    retries:
        Retries after the first attempt, for retryable failures.
    timeout:
        Per-request timeout in seconds.
    show_progress:
        Show a tqdm bar.
    limit:
        Fetch only the first ``limit`` photos (a trial run).

    Returns
    -------
    dict
        ``total``, ``downloaded``, ``skipped``, ``failed`` (counts), ``failures`` (count per
        reason), ``failed_examples`` (up to 10 ``photo_id: reason``), ``seconds``.
    """
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    images_dir = data_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    photos = read_photo_urls(data_dir)
    if limit is not None:
        photos = photos[:limit]
    unsafe = [pid for pid, _ in photos if not _safe_file_name(pid)]
    todo = [
        (pid, url)
        for pid, url in photos
        if _safe_file_name(pid) and not (images_dir / f"{pid}.jpg").exists()
    ]
    counts: Counter[str] = Counter(skipped=len(photos) - len(todo) - len(unsafe))
    counts["failed"] = len(unsafe)
    reasons: Counter[str] = Counter({"photo_id is not a file name": len(unsafe)} if unsafe else {})
    examples: list[str] = [f"{pid!r}: photo_id is not a file name" for pid in unsafe[:10]]
    started = time.perf_counter()
    with (
        tqdm(
            total=len(photos),
            initial=counts["skipped"] + counts["failed"],
            unit="img",
            desc="fetch images",
            disable=not show_progress,
            file=sys.stderr,
        ) as bar,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures = {
            pool.submit(
                _download_one,
                sized_url(url, width),
                images_dir / f"{pid}.jpg",
                retries,
                timeout,
            ): pid
            for pid, url in todo
        }
        try:
            for future in as_completed(futures):
                outcome, reason = future.result()
                counts[outcome] += 1
                if outcome == "failed":
                    reasons[reason] += 1
                    if len(examples) < 10:
                        examples.append(f"{futures[future]}: {reason}")
                    bar.set_postfix(failed=counts["failed"])
                bar.update(1)
        except BaseException:
            # Ctrl-C: drop queued downloads instead of waiting for them; files already
            # renamed into place are kept and skipped by the next run.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {
        "total": len(photos),
        "downloaded": counts["downloaded"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "failures": dict(reasons),
        "failed_examples": examples,
        "seconds": round(time.perf_counter() - started, 2),
    }
