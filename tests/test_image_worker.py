"""The live catalogue's image embedder: concurrent requests share calls to its child process,
and an image that does not decode fails only the request that sent it."""

from __future__ import annotations

import asyncio
import io

import numpy as np


def _image(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def test_concurrent_requests_share_batches_and_a_bad_image_fails_only_its_own(tmp_path):
    from imgsearch.artifacts import CLIP_DIR
    from retrieval_service.clip_model import ClipSpec, load_clip, save_clip
    from retrieval_service.image_worker import ImageEmbedder

    save_clip(load_clip(ClipSpec()), tmp_path / CLIP_DIR)
    images = [_image((40 * i, 255 - 30 * i, 90), "JPEG" if i % 2 else "PNG") for i in range(8)]
    embedder = ImageEmbedder()
    try:
        alone, fingerprint = embedder.embed(tmp_path, images)
        assert np.isfinite(alone).all() and alone.shape[0] == len(images)

        async def concurrently():
            calls = [embedder.embed_batched(tmp_path, [image]) for image in images]
            calls.append(embedder.embed_batched(tmp_path, [images[0], b"not an image"]))
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(concurrently())
        for row, result in zip(alone, results[:-1]):
            vectors, used = result
            assert used == fingerprint
            np.testing.assert_allclose(vectors[0], row, rtol=1e-4, atol=1e-5)
        assert isinstance(results[-1], ValueError)
        assert "images[1]" in str(results[-1])
        # Nine requests, the first alone while the child was idle, the rest sharing calls.
        assert embedder.batcher.batches < len(results)
    finally:
        embedder.close()
