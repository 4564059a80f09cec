"""Image embeddings: batched and resumable with an ETA, and precomputed ones checked for a build."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgsearch.image_embeddings import ImageEmbeddings

# A folder of precomputed embeddings (``imgsearch embed --ray``): shards, then the summary.
EMBEDDING_SET_JSON = "embeddings.json"
SHARD_NAME = "embeddings-{:05d}.npz"
SHARD_GLOB = "embeddings-[0-9][0-9][0-9][0-9][0-9].npz"


def partial_path(out_path: str | Path) -> Path:
    """Where progress of an unfinished run is kept: ``<out>.partial.npz`` beside the output."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".npz") + ".partial.npz")


def _signature(model_name: str, pretrained: str | None, photo_idx: np.ndarray) -> str:
    """Identifies a run: resuming is only allowed with the same model and the same photos."""
    digest = hashlib.sha256(f"{model_name}|{pretrained}|".encode())
    digest.update(np.ascontiguousarray(photo_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an embeddings file: ``photo_idx`` (int64) and ``embeddings`` (float32)."""
    stored = ImageEmbeddings.load(path)
    return stored.photo_idx, stored.vectors


def clip_identity(bundle: Any) -> dict:
    """What embeddings record of the CLIP that made them: name, weights digest, size."""
    from retrieval_service.clip_model import weights_fingerprint

    return {
        "model_name": bundle.spec.model_name,
        "weights_sha256": weights_fingerprint(bundle.model),
        "embed_dim": int(bundle.embed_dim),
    }


def _id_array(photo_ids: Any) -> np.ndarray:
    # Fixed-width unicode, so the file loads with allow_pickle=False.
    return np.asarray(list(photo_ids), dtype=str)


def save_embeddings(
    path: str | Path,
    clip: dict,
    photo_ids: Any,
    embeddings: np.ndarray,
    missing: Any = (),
    corrupt: Any = (),
    photo_idx: np.ndarray | None = None,
) -> None:
    """Write one embeddings ``.npz`` (atomically) with what a later build checks it against.

    Parameters
    ----------
    path:
        The file to write.
    clip:
        :func:`clip_identity` of the CLIP that made the embeddings.
    photo_ids:
        One photo id per embedding row.
    embeddings:
        ``(n, dim)`` float32, L2-normalised.
    missing, corrupt:
        Photo ids whose image file was missing or could not be decoded.
    photo_idx:
        Catalogue indexes of the rows (what servers read), when known.
    """
    arrays = {
        "photo_id": _id_array(photo_ids),
        "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
        "missing_photo_id": _id_array(missing),
        "corrupt_photo_id": _id_array(corrupt),
        "clip": np.array(json.dumps(clip, sort_keys=True)),
    }
    if photo_idx is not None:
        arrays["photo_idx"] = np.asarray(photo_idx, dtype=np.int64)
    _save_npz(Path(path), **arrays)


class EmbeddingMismatch(ValueError):
    """Precomputed embeddings that do not fit the catalogue or the CLIP of a build."""


class EmbeddingShardWriter:
    """Writes embeddings as they arrive into numbered ``.npz`` shards plus ``embeddings.json``.

    The folder is what ``imgsearch build --embeddings`` reads. ``embeddings.json`` is written
    last, by :meth:`close`: a folder without it is an unfinished run.

    Parameters
    ----------
    out_dir:
        The folder to write (created).
    clip:
        :func:`clip_identity` of the CLIP that makes the embeddings.
    rows_per_shard:
        Photos per shard file: a shard is closed by the first batch that brings it there.

    Raises
    ------
    FileExistsError
        When the folder already holds shards or a summary.
    """

    def __init__(self, out_dir: str | Path, clip: dict, rows_per_shard: int = 50_000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        earlier = sorted(self.out_dir.glob(SHARD_GLOB)) + sorted(
            self.out_dir.glob(EMBEDDING_SET_JSON)
        )
        if earlier:
            # Mixing shards of two runs would corrupt both; deleting files is not ours to do.
            raise FileExistsError(
                f"{self.out_dir} already holds embeddings ({earlier[0].name}); give a new folder"
            )
        self.clip = clip
        self.rows_per_shard = rows_per_shard
        self.shards: list[str] = []
        self.counts = {"embedded": 0, "missing": 0, "corrupt": 0}
        self._pending: dict[str, list] = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        self._pending_rows = 0

    def add(
        self, photo_ids: Any, embeddings: np.ndarray, missing: Any = (), corrupt: Any = ()
    ) -> None:
        """Queue one batch: its embedded photos and those whose image was missing or corrupt."""
        photo_ids, missing, corrupt = list(photo_ids), list(missing), list(corrupt)
        self._pending["ids"] += photo_ids
        self._pending["emb"].append(np.asarray(embeddings, np.float32))
        self._pending["missing"] += missing
        self._pending["corrupt"] += corrupt
        self._pending_rows += len(photo_ids) + len(missing) + len(corrupt)
        self.counts["embedded"] += len(photo_ids)
        self.counts["missing"] += len(missing)
        self.counts["corrupt"] += len(corrupt)
        if self._pending_rows >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        name = SHARD_NAME.format(len(self.shards))
        dim = int(self.clip["embed_dim"])
        embeddings = np.concatenate([np.zeros((0, dim), np.float32), *self._pending["emb"]])
        save_embeddings(
            self.out_dir / name,
            self.clip,
            self._pending["ids"],
            embeddings,
            self._pending["missing"],
            self._pending["corrupt"],
        )
        self.shards.append(name)
        self._pending = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        self._pending_rows = 0

    def close(self, **figures: Any) -> dict:
        """Write the last shard and ``embeddings.json`` (counts, shards, ``figures``)."""
        self._flush()
        summary = {"clip": self.clip, **self.counts, "shards": self.shards, **figures}
        path = self.out_dir / EMBEDDING_SET_JSON
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, path)
        return summary


@dataclass
class PrecomputedEmbeddings:
    """Embeddings made outside a build (``imgsearch embed``, with or without ``--ray``).

    Attributes
    ----------
    source:
        The file or shard folder they were read from.
    clip:
        :func:`clip_identity` of the CLIP that made them.
    photo_ids:
        One photo id per row of ``embeddings``.
    embeddings:
        ``(n, dim)`` float32.
    missing, corrupt:
        Photo ids whose image was missing or could not be decoded.
    """

    source: str
    clip: dict
    photo_ids: np.ndarray
    embeddings: np.ndarray
    missing: np.ndarray
    corrupt: np.ndarray

    @classmethod
    def read(cls, path: str | Path) -> PrecomputedEmbeddings:
        """Read an ``imgsearch embed`` output: one ``.npz`` or a folder of shards.

        Raises
        ------
        EmbeddingMismatch
            When the path holds no finished embeddings or they record no CLIP.
        """
        path = Path(path)
        if path.is_dir():
            summary_path = path / EMBEDDING_SET_JSON
            if not summary_path.exists():
                raise EmbeddingMismatch(
                    f"{path}: no {EMBEDDING_SET_JSON}; the embedding run did not finish"
                )
            summary = json.loads(summary_path.read_text())
            files = [path / name for name in summary["shards"]]
        elif path.exists():
            summary, files = None, [path]
        else:
            raise EmbeddingMismatch(f"{path}: no such file or folder")
        parts: dict[str, list[np.ndarray]] = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        clip = summary["clip"] if summary else None
        for file in files:
            if not file.exists():
                raise EmbeddingMismatch(f"{file}: shard listed in {EMBEDDING_SET_JSON} is missing")
            with np.load(file, allow_pickle=False) as data:
                if "clip" not in data or "photo_id" not in data:
                    raise EmbeddingMismatch(
                        f"{file}: records no CLIP model or photo ids (written by an older "
                        "imgsearch embed); embed the catalogue again"
                    )
                shard_clip = json.loads(str(data["clip"]))
                if clip is not None and shard_clip != clip:
                    raise EmbeddingMismatch(f"{file}: made by another CLIP than the other shards")
                clip = shard_clip
                parts["ids"].append(data["photo_id"].astype(str))
                parts["emb"].append(data["embeddings"].astype(np.float32))
                parts["missing"].append(data["missing_photo_id"].astype(str))
                parts["corrupt"].append(data["corrupt_photo_id"].astype(str))
        dim = int(clip["embed_dim"]) if clip else 0
        return cls(
            source=str(path),
            clip=clip or {},
            photo_ids=np.concatenate([np.zeros(0, str), *parts["ids"]]),
            embeddings=np.concatenate([np.zeros((0, dim), np.float32), *parts["emb"]]),
            missing=np.concatenate([np.zeros(0, str), *parts["missing"]]),
            corrupt=np.concatenate([np.zeros(0, str), *parts["corrupt"]]),
        )

    def for_catalogue(self, catalogue: Any, clip: dict) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the catalogue's photos, in ``photo_idx`` order, after checking they fit.

        Parameters
        ----------
        catalogue:
            The catalogue being built.
        clip:
            :func:`clip_identity` of the CLIP the build serves.

        Returns
        -------
        tuple
            ``photo_idx`` (int64, ascending) and ``embeddings`` (float32) in that order.

        Raises
        ------
        EmbeddingMismatch
            Another CLIP (name or weights), photos the catalogue has no image for, photos with
            an image that were neither embedded nor found missing or corrupt, duplicate photo
            ids, or rows that are not finite unit vectors.
        """
        if self.clip != clip:
            raise EmbeddingMismatch(
                f"{self.source} was embedded with {_describe_clip(self.clip)}, but the build "
                f"uses {_describe_clip(clip)}: give the build the CLIP the embeddings were "
                "made with (--clip-model NAME --clip-pretrained PATH), or embed again"
            )
        ids = self.photo_ids.tolist()
        if len(set(ids)) != len(ids):
            raise EmbeddingMismatch(f"{self.source}: some photos are embedded more than once")
        photos = catalogue.photos
        with_image = set(photos.loc[photos["has_image"].astype(bool), "photo_id"].astype(str))
        failed = set(self.missing.tolist()) | set(self.corrupt.tolist())
        # A photo whose image was missing then may still be missing now (no has_image).
        foreign = sorted((set(ids) - with_image) | (failed - set(photos["photo_id"].astype(str))))
        seen = set(ids) | failed
        if foreign:
            raise EmbeddingMismatch(
                f"{self.source}: {len(foreign):,} photo(s) are not photos with an image in this "
                f"catalogue (e.g. {', '.join(foreign[:3])}): embeddings of another catalogue?"
            )
        uncovered = sorted(with_image - seen)
        if uncovered:
            raise EmbeddingMismatch(
                f"{self.source}: {len(uncovered):,} of the catalogue's {len(with_image):,} "
                f"photos with an image were not embedded (e.g. {', '.join(uncovered[:3])}): "
                "embed this catalogue again"
            )
        norms = np.linalg.norm(self.embeddings, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(np.abs(norms - 1) > 1e-3):
            raise EmbeddingMismatch(f"{self.source}: rows that are not finite unit vectors")
        photo_idx = np.array([catalogue.photo_idx(pid) for pid in ids], dtype=np.int64)
        order = np.argsort(photo_idx, kind="stable")
        return photo_idx[order], self.embeddings[order]


def _describe_clip(clip: dict) -> str:
    if not clip:
        return "an unknown CLIP"
    return f"{clip.get('model_name')} (weights {clip.get('weights_sha256')})"


def import_embeddings(
    source: str | Path, bundle: Any, catalogue: Any, out_path: str | Path
) -> dict:
    """Check precomputed embeddings against a build's catalogue and CLIP, and write them.

    Parameters
    ----------
    source:
        An ``imgsearch embed`` output: an ``.npz`` or a folder of shards (``--ray``).
    bundle:
        The build's :class:`~retrieval_service.clip_model.ClipBundle`.
    catalogue:
        The catalogue being built.
    out_path:
        The artifact set's embeddings file, written like :func:`embed_catalogue` writes it.

    Returns
    -------
    dict
        ``precomputed`` (the source), ``embedded``, ``missing``, ``corrupt``, ``dim``,
        ``path`` and, for a shard folder, the run's figures from its ``embeddings.json``.

    Raises
    ------
    EmbeddingMismatch
        When they do not fit (see :meth:`PrecomputedEmbeddings.for_catalogue`).
    """
    clip = clip_identity(bundle)
    precomputed = PrecomputedEmbeddings.read(source)
    photo_idx, embeddings = precomputed.for_catalogue(catalogue, clip)
    save_embeddings(
        out_path,
        clip,
        catalogue.photo_ids(photo_idx),
        embeddings,
        precomputed.missing,
        precomputed.corrupt,
        photo_idx=photo_idx,
    )
    figures = {
        "precomputed": str(source),
        "embedded": int(len(photo_idx)),
        "missing": int(len(precomputed.missing)),
        "corrupt": int(len(precomputed.corrupt)),
        "dim": int(clip["embed_dim"]),
        "path": str(out_path),
    }
    summary = Path(source) / EMBEDDING_SET_JSON
    if summary.exists():
        run = json.loads(summary.read_text())
        figures["run"] = {k: v for k, v in run.items() if k not in ("clip", "shards")}
    return figures


def load_image(path: Path) -> tuple[Any, str]:
    """Open one image fully decoded; returns (image or None, "" | "missing" | "corrupt")."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return None, "missing"
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), ""
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None, "corrupt"


def embed_catalogue(
    bundle: Any,
    catalogue: Any,
    out_path: str | Path,
    batch_size: int = 64,
    show_progress: bool = True,
    checkpoint_every: int = 20,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Embed every photo that has an image and write ``photo_idx`` + ``embeddings`` to an npz.

    Progress is saved to ``<out>.partial.npz`` every ``checkpoint_every`` batches; a rerun with
    the same model and photos resumes from there (an interrupted ViT-B-32 run over 25k photos
    loses minutes, not the half hour done so far). Images are decoded one batch ahead in a
    thread while the model runs on the current one.

    Parameters
    ----------
    bundle:
        A :class:`~retrieval_service.clip_model.ClipBundle`.
    catalogue:
        The catalogue; photos with ``has_image`` are embedded, in ``photo_idx`` order.
    out_path:
        The ``.npz`` to write (``photo_idx`` int64, ``embeddings`` float32 L2-normalised).
    batch_size:
        Images per forward pass.
    show_progress:
        Show a tqdm bar with rate and ETA.
    checkpoint_every:
        Save progress every this many batches.
    max_batches:
        Stop (saving progress) after this many batches of this call: the run is then left
        incomplete, as after an interruption.
    on_batch:
        Called with the number of batches done in this call after each batch. An exception
        (or Ctrl-C) interrupts the run; progress up to the last finished batch is saved first.
    threads:
        Torch intra-op threads; None takes the idle cores (``auto_threads``). Restored after.

    Returns
    -------
    dict
        ``complete``, ``embedded``, ``missing``, ``corrupt`` (counts), ``resumed_from`` (photos
        already done by an earlier run), ``seconds``, ``images_per_s``, ``dim``, ``path`` and
        ``threads``.
    """
    from imgsearch.cpu import torch_threads

    with torch_threads(threads) as used_threads:
        result = _embed(
            bundle, catalogue, out_path, batch_size, show_progress, checkpoint_every,
            max_batches, on_batch,
        )  # fmt: skip
    result["threads"] = used_threads
    return result


def _embed(
    bundle: Any,
    catalogue: Any,
    out_path: str | Path,
    batch_size: int,
    show_progress: bool,
    checkpoint_every: int,
    max_batches: int | None,
    on_batch: Callable[[int], None] | None,
) -> dict:
    import torch
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    progress_path = partial_path(out_path)
    photos = catalogue.photos
    todo = photos.loc[photos["has_image"].astype(bool), ["photo_idx", "photo_id"]]
    todo_idx = todo["photo_idx"].to_numpy(np.int64)
    todo_ids = todo["photo_id"].astype(str).tolist()
    signature = _signature(bundle.spec.model_name, bundle.spec.pretrained, todo_idx)

    done_idx = np.zeros(0, np.int64)
    done_emb = np.zeros((0, bundle.embed_dim), np.float32)
    missing = np.zeros(0, np.int64)
    corrupt = np.zeros(0, np.int64)
    position = 0
    if progress_path.exists():
        with np.load(progress_path, allow_pickle=False) as data:
            if str(data["signature"]) == signature:
                position = int(data["position"])
                done_idx, done_emb = data["photo_idx"], data["embeddings"]
                missing, corrupt = data["missing"], data["corrupt"]
    resumed_from = position
    idx_parts, emb_parts = [done_idx], [done_emb]
    missing_parts, corrupt_parts = [missing], [corrupt]

    def save_progress() -> None:
        _save_npz(
            progress_path,
            signature=np.array(signature),
            position=np.array(position),
            photo_idx=np.concatenate(idx_parts),
            embeddings=np.concatenate(emb_parts),
            missing=np.concatenate(missing_parts),
            corrupt=np.concatenate(corrupt_parts),
        )

    def load_batch(start: int) -> list[tuple[Any, str]]:
        ids = todo_ids[start : start + batch_size]
        return [load_image(catalogue.image_path(pid)) for pid in ids]

    starts = list(range(position, len(todo_ids), batch_size))
    started = time.perf_counter()
    embedded_now = 0
    batches = 0
    bar = tqdm(
        total=len(todo_ids),
        initial=position,
        unit="img",
        desc="embed",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=1) as loader:
            pending = loader.submit(load_batch, starts[0]) if starts else None
            for i, start in enumerate(starts):
                if max_batches is not None and batches >= max_batches:
                    break
                loaded = pending.result()
                nxt = i + 1
                pending = loader.submit(load_batch, starts[nxt]) if nxt < len(starts) else None
                batch_idx = todo_idx[start : start + len(loaded)]
                keep = [j for j, (image, _) in enumerate(loaded) if image is not None]
                why = np.array([w for _, w in loaded])
                if keep:
                    tensor = torch.stack([bundle.preprocess(loaded[j][0]) for j in keep])
                    batch_emb = bundle.encode_image_tensor(tensor).astype(np.float32)
                else:
                    batch_emb = np.zeros((0, bundle.embed_dim), np.float32)
                # Append only once the batch is fully computed, so progress saved after an
                # interruption never holds half a batch.
                emb_parts.append(batch_emb)
                idx_parts.append(batch_idx[keep])
                missing_parts.append(batch_idx[why == "missing"])
                corrupt_parts.append(batch_idx[why == "corrupt"])
                position = start + len(loaded)
                embedded_now += len(keep)
                batches += 1
                bar.update(len(loaded))
                if batches % checkpoint_every == 0:
                    save_progress()
                if on_batch is not None:
                    on_batch(batches)
    except BaseException:
        save_progress()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    complete = position >= len(todo_ids)
    photo_idx = np.concatenate(idx_parts).astype(np.int64)
    embeddings = np.concatenate(emb_parts).astype(np.float32)
    if complete:
        save_embeddings(
            out_path,
            clip_identity(bundle),
            catalogue.photo_ids(photo_idx),
            embeddings,
            missing=catalogue.photo_ids(np.concatenate(missing_parts)),
            corrupt=catalogue.photo_ids(np.concatenate(corrupt_parts)),
            photo_idx=photo_idx,
        )
        progress_path.unlink(missing_ok=True)
    else:
        save_progress()
    return {
        "complete": complete,
        "embedded": int(len(photo_idx)),
        "missing": int(sum(len(m) for m in missing_parts)),
        "corrupt": int(sum(len(c) for c in corrupt_parts)),
        "resumed_from": int(resumed_from),
        "seconds": round(seconds, 3),
        "images_per_s": round(embedded_now / seconds, 1) if seconds > 0 else 0.0,
        "dim": int(bundle.embed_dim),
        "path": str(out_path if complete else progress_path),
    }
