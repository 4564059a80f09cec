"""The served CLIP's image tower in a child process at a lower CPU priority.

Images written to the live catalogue are embedded once, by a retrieval server (the gateway asks
it with ``EmbedImages``). In the server's own process an image batch competes with searches for
the interpreter and the cores: on 2 cores, ingesting 20 photos/s raised search p99 eightfold.
The embedder runs the image tower in one child process instead, at a lower scheduling priority
(``nice`` +10), so the cores go to searches first and image batches take what is left. The
child is spawned (not forked: the server runs gRPC threads) at the first use or at
:meth:`ImageEmbedder.start`, loads each set's CLIP once, and is killed by the kernel if the
server dies (``PR_SET_PDEATHSIG``, Linux).

Images are micro-batched (:class:`~retrieval_service.batching.MicroBatcher`, queue "images"):
every image that arrives while the child embeds a batch goes into the next one, so concurrent
single-photo writes share one call to the child instead of queueing one call each (at 20
single-photo writes a second on two busy cores, one call per write fell behind and the gateway
shed most writes). Nothing waits for a batch to fill: an idle child takes the first image at once.
The child runs the tower on one thread (:data:`CHILD_THREADS`): preempted threads of a
low-priority process wait for each other at every barrier.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retrieval_service.batching import MicroBatcher

# The child's niceness above the server's: it runs when searches leave the cores idle.
NICENESS = 10
# Threads of the image tower in the child.
CHILD_THREADS = 1
# Images per call to the child at most (a gateway batch holds up to 64 photos).
MAX_BATCH = 64
PR_SET_PDEATHSIG = 1
# In the child: the CLIP of the last set that embedded, by set folder.
_LOADED: dict[str, tuple[object, str]] = {}
# In the server's process: the one image-tower child that its embedders share, and the thread
# that spawned it (module docstring).
_TOWER: ProcessPoolExecutor | None = None
_TOWER_LOCK = threading.Lock()
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-tower")


def _start_child(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the server died before the call above
        os._exit(0)
    os.nice(NICENESS)
    if hasattr(os, "sched_setscheduler"):
        # SCHED_BATCH: a waking image batch never preempts a search thread (Linux).
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
    import torch

    import retrieval_service.clip_model  # noqa: F401 - torch and open_clip load now, not later

    # One thread: a low-priority process whose threads meet at barriers stalls whenever one of
    # them is preempted (on two busy cores, 2 threads took 110 ms per image, 1 thread 10 ms).
    torch.set_num_threads(CHILD_THREADS)


def _embed(set_dir: str, images: list[bytes]) -> tuple[np.ndarray, str]:
    """In the child: one row per image, NaN for an image that does not decode."""
    from PIL import Image, UnidentifiedImageError

    from imgsearch.artifacts import CLIP_DIR
    from retrieval_service.clip_model import ClipSpec, load_clip, weights_fingerprint

    decoded, unreadable = [], []
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                decoded.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            unreadable.append(i)
            decoded.append(Image.new("RGB", (1, 1)))  # a placeholder: its row becomes NaN
    if set_dir not in _LOADED:
        bundle = load_clip(ClipSpec.from_dir(Path(set_dir) / CLIP_DIR))
        _LOADED.clear()  # one set's CLIP at a time: a reload's replaces the last one's
        _LOADED[set_dir] = (bundle, weights_fingerprint(bundle.model))
    bundle, fingerprint = _LOADED[set_dir]
    vectors = np.array(bundle.encode_images(decoded), dtype=np.float32)
    vectors[unreadable] = np.nan
    return vectors, fingerprint


def _tower() -> ProcessPoolExecutor:
    """The process's image-tower child (spawned at the first call, on :data:`_SPAWNER`)."""
    global _TOWER
    with _TOWER_LOCK:
        if _TOWER is None:
            pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
            # A spawn-context pool starts its child inside the first submit, on the caller's
            # thread: submitted from the spawner, the child outlives every server's threads.
            _SPAWNER.submit(pool.submit, int).result()
            _TOWER = pool
        return _TOWER


class ImageEmbedder:
    """Embeds images with a set's CLIP image tower in the child process (module docstring)."""

    def __init__(self, max_batch: int = MAX_BATCH):
        self.batcher = MicroBatcher(self._embed_keys, max_batch, 0.0, queue="images")
        # Set folder -> the fingerprint of the CLIP weights its images were embedded with.
        self.fingerprints: dict[str, str] = {}

    def start(self) -> Future:
        """Spawn the process's child now unless it runs (it imports torch and open_clip); the
        future is done once it has."""
        return _tower().submit(int)

    def embed(self, set_dir: str | Path, images: list[bytes]) -> tuple[np.ndarray, str]:
        """L2-normalised embeddings of JPEG/PNG images (one row each, one call to the child,
        NaN rows for images that do not decode) and the CLIP weights' fingerprint; blocks
        until the child answers."""
        vectors, fingerprint = _tower().submit(_embed, str(set_dir), list(images)).result()
        self.fingerprints[str(set_dir)] = fingerprint
        return vectors, fingerprint

    def _embed_keys(self, keys: list[tuple[str, bytes]]) -> np.ndarray:
        """The batcher's encoder: ``(set folder, image)`` keys, one call per set folder."""
        rows: list[np.ndarray | None] = [None] * len(keys)
        by_set: dict[str, list[int]] = {}
        for i, (set_dir, _) in enumerate(keys):
            by_set.setdefault(set_dir, []).append(i)
        for set_dir, positions in by_set.items():
            vectors, _ = self.embed(set_dir, [keys[i][1] for i in positions])
            for i, row in zip(positions, vectors):
                rows[i] = row
        return np.stack(rows)

    async def embed_batched(
        self, set_dir: str | Path, images: list[bytes], deadline: float | None = None
    ) -> tuple[np.ndarray, str]:
        """:meth:`embed` from the event loop, the images sharing calls to the child with every
        other request's that arrive meanwhile.

        Raises
        ------
        ValueError
            Naming the position of an image that does not decode.
        DeadlineExpired
            When ``deadline`` (``time.monotonic()``) passed before the images' batch began.
        """
        key = str(set_dir)
        rows = await asyncio.gather(*(self.batcher.submit((key, i), deadline) for i in images))
        vectors = np.stack(rows)
        unreadable = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(unreadable):
            raise ValueError(f"images[{unreadable[0]}] is not a readable JPEG or PNG")
        return vectors, self.fingerprints[key]

    def close(self) -> None:
        """Stop batching; the process's child stays for the process's other embedders."""
        self.batcher.close()
