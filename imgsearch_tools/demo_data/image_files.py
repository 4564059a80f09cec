"""The demo's image files: drawn by a pool of processes, resumably, each file complete or absent.

Every photo's image has its own random stream (``[seed, 7, photo index]``), so an image does
not depend on which process draws it or in what order: the pool writes the same bytes as one
process. Images are drawn into a folder beside the catalogue's (``.<name>.images.partial``)
that outlives an interrupted run; each file is written under a temporary name and renamed, so
a file with its final name is complete, and a run of the same catalogue (seed, photos, image
size) skips the files already there. The folder moves into the catalogue when it is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from imgsearch_tools.demo_data.drawing import JPEG_QUALITY, draw_image

# Photos one task of the pool draws: large enough that sending the task costs little beside
# drawing it, small enough that the progress bar moves and an interruption loses little.
CHUNK_PHOTOS = 500
# What an image needs of the photos' facts (see drawing.draw_image).
DRAWN_FACTS = (
    "photo_id",
    "scene",
    "shape",
    "centre_x",
    "centre_y",
    "radius",
    "angle",
    "colour",
    "colour_jitter",
)
# The record of what a resumable images folder holds, written before its first image.
RECORD = ".images.json"
# Fields every record holds (write_images adds the catalogue's own beside them).
RECORD_FIELDS = frozenset({"seed", "n_photos", "image_size"})
PARTIAL = ".images.partial"
TEMPORARY = ".tmp"


def resumable_folder(out_dir: Path) -> Path:
    """Where the images of the catalogue to be written at ``out_dir`` are drawn."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f".{out_dir.name}{PARTIAL}"


def image_workers(requested: int | None, todo: int) -> int:
    """Processes to draw ``todo`` images with: ``requested`` (None: the cores other processes
    leave idle), no more than there are chunks of work, at least 1."""
    if requested is not None and requested < 1:
        raise ValueError(f"image workers must be at least 1, got {requested}")
    chunks = math.ceil(todo / CHUNK_PHOTOS)
    if chunks <= 1:
        return 1
    if requested is None:
        from imgsearch.cpu import auto_threads

        requested = auto_threads()
    return max(1, min(requested, chunks))


def open_folder(folder: Path, record: dict) -> None:
    """Make ``folder`` ready to draw the images ``record`` describes.

    A folder of the same catalogue is kept (its complete images are skipped); one this module
    made for another catalogue is emptied; anything else at that path is refused, never
    deleted.
    """
    marker = folder / RECORD
    if folder.exists():
        try:
            found = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        # Only a record holding the fields this module always writes marks a folder it made.
        if not isinstance(found, dict) or not RECORD_FIELDS <= found.keys():
            raise ValueError(
                f"{folder} exists and was not left by demo-data's image drawing "
                f"(no {RECORD} of its fields); move it away to draw the images there"
            )
        if found == record:
            return
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")


def written_images(folder: Path) -> set[str]:
    """File names of the complete images in ``folder`` (temporary files are not)."""
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.name.endswith(".jpg")}


def write_images(
    photos: dict,
    images_dir: Path,
    seed: int,
    image_size: int,
    show_progress: bool,
    workers: int | None = None,
    resume_dir: Path | None = None,
    catalogue: dict | None = None,
) -> dict:
    """Draw every photo's image into ``images_dir`` as ``<photo_id>.jpg``.

    Parameters
    ----------
    photos
        The photos' facts (:func:`~imgsearch_tools.demo_data.photos.make_photos`).
    images_dir
        The folder the images end in (created; it must not exist yet when ``resume_dir`` is
        given: the drawn folder is renamed to it).
    seed, image_size
        The catalogue's seed and the images' side in pixels.
    show_progress
        A tqdm progress bar on stderr.
    workers
        Processes to draw with (None: :func:`image_workers` picks); 1 draws in this process.
    resume_dir
        Draw into this folder first (kept when the run is interrupted, reused by the next run
        of the same catalogue), then move it to ``images_dir``. None: draw in place.
    catalogue
        What the images depend on beyond the seed, photos and size (the generator's
        version), recorded in ``resume_dir``: a folder left by another catalogue is redrawn.

    Returns
    -------
    dict
        ``drawn`` (images drawn now), ``kept`` (complete images found from an earlier run),
        ``workers``.
    """
    from tqdm import tqdm

    n = len(photos["photo_id"])
    folder = resume_dir or images_dir
    if resume_dir is not None:
        record = {**(catalogue or {}), "seed": seed, "n_photos": n, "image_size": image_size}
        record |= {"first_photo_id": str(photos["photo_id"][0]) if n else ""}
        open_folder(resume_dir, record)
    else:
        folder.mkdir(parents=True, exist_ok=True)
    done = written_images(folder)
    todo = [i for i in range(n) if f"{photos['photo_id'][i]}.jpg" not in done]
    n_workers = image_workers(workers, len(todo))
    chunks = [todo[s : s + CHUNK_PHOTOS] for s in range(0, len(todo), CHUNK_PHOTOS)]
    bar = tqdm(
        total=n,
        initial=n - len(todo),
        desc="images",
        unit="img",
        file=sys.stderr,
        disable=not show_progress,
    )
    with bar:
        if n_workers == 1:
            for chunk in chunks:
                bar.update(draw_chunk(_facts(photos, chunk), chunk, folder, seed, image_size))
        else:
            _draw_in_pool(photos, chunks, folder, seed, image_size, n_workers, bar)
    if resume_dir is not None:
        (resume_dir / RECORD).unlink()
        images_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(resume_dir, images_dir)
    return {"drawn": len(todo), "kept": n - len(todo), "workers": n_workers}


def _draw_in_pool(photos, chunks, folder, seed, image_size, n_workers, bar) -> None:
    # Spawned, not forked: the caller may hold threads (Arrow's, torch's) a fork would copy
    # in whatever state they were in. At most two chunks per process are in flight, so the
    # photos' facts are sent a chunk at a time rather than all at once.
    context = get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
        pending = set()
        queued = iter(chunks)
        for chunk in queued:
            pending.add(
                pool.submit(draw_chunk, _facts(photos, chunk), chunk, folder, seed, image_size)
            )
            if len(pending) >= 2 * n_workers:
                break
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                bar.update(future.result())
                chunk = next(queued, None)
                if chunk is not None:
                    facts = _facts(photos, chunk)
                    pending.add(pool.submit(draw_chunk, facts, chunk, folder, seed, image_size))


def _facts(photos: dict, chunk: list[int]) -> dict:
    """The facts of the photos of ``chunk`` an image needs, in chunk order."""
    rows = np.asarray(chunk, np.int64)
    return {key: np.asarray(photos[key])[rows] for key in DRAWN_FACTS}


def draw_chunk(facts: dict, chunk: list[int], folder: Path, seed: int, image_size: int) -> int:
    """Draw the photos of ``chunk`` (catalogue indexes; ``facts`` in the same order) into
    ``folder``, each under a temporary name renamed when complete; how many were drawn."""
    for row, i in enumerate(chunk):
        # One stream per photo: an image does not depend on how many photos precede it.
        rng = np.random.default_rng([seed, 7, i])
        image = draw_image(facts, row, image_size, rng)
        final = folder / f"{facts['photo_id'][row]}.jpg"
        partial = final.with_name(final.name + TEMPORARY)
        image.save(partial, "JPEG", quality=JPEG_QUALITY)
        os.replace(partial, final)
    return len(chunk)
