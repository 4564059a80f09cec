"""The served CLIP's image tower in a child process at a lower CPU priority.

Images written to the live catalogue are embedded once, by a retrieval server (the gateway asks
it with ``EmbedImages``). In the server's own process an image batch competes with searches for
the interpreter and the cores: on 2 cores, ingesting 20 photos/s raised search p99 eightfold.
The embedder runs the image tower in one child process instead, at a lower scheduling priority
(``nice`` +10), so the cores go to searches first and image batches take what is left. The
child is spawned (not forked: the server runs gRPC threads) at the first use or at
:meth:`ImageEmbedder.start`, loads each set's CLIP once, and is killed by the kernel if the
server dies (``PR_SET_PDEATHSIG``, Linux).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

# The child's niceness above the server's: it runs when searches leave the cores idle.
NICENESS = 10
PR_SET_PDEATHSIG = 1
# In the child: the CLIP of the last set that embedded, by set folder.
_LOADED: dict[str, tuple[object, str]] = {}


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
    import retrieval_service.clip_model  # noqa: F401 - torch and open_clip load now, not later


def _embed(set_dir: str, images: list[bytes]) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    from imgsearch.artifacts import CLIP_DIR
    from retrieval_service.clip_model import ClipSpec, load_clip, weights_fingerprint

    decoded = []
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                decoded.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise ValueError(f"images[{i}] is not a readable JPEG or PNG ({exc})") from exc
    if set_dir not in _LOADED:
        bundle = load_clip(ClipSpec.from_dir(Path(set_dir) / CLIP_DIR))
        _LOADED.clear()  # one set's CLIP at a time: a reload's replaces the last one's
        _LOADED[set_dir] = (bundle, weights_fingerprint(bundle.model))
    bundle, fingerprint = _LOADED[set_dir]
    return bundle.encode_images(decoded), fingerprint


class ImageEmbedder:
    """Embeds images with a set's CLIP image tower in the child process (module docstring)."""

    def __init__(self):
        self.pool: ProcessPoolExecutor | None = None

    def start(self) -> Future:
        """Spawn the child now (it imports torch and open_clip); the future is done once it has."""
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
        return self.pool.submit(int)

    def embed(self, set_dir: str | Path, images: list[bytes]) -> tuple[np.ndarray, str]:
        """L2-normalised embeddings of JPEG/PNG images (one row each, one batch) and the CLIP
        weights' fingerprint; blocks until the child answers.

        Raises
        ------
        ValueError
            Naming the position of an image that does not decode.
        """
        self.start()
        return self.pool.submit(_embed, str(set_dir), list(images)).result()

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
