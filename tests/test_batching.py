"""Micro-batching of query encodings with the tiny CLIP's real text encoder."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retrieval_service.batching import DeadlineExpired, MicroBatcher  # noqa: E402
from retrieval_service.clip_model import ClipSpec, load_clip  # noqa: E402
from retrieval_service.text_encoder import TorchTextEncoder  # noqa: E402


class RecordingEncoder:
    """The tiny CLIP's text encoder, remembering the batches it was given."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.batches: list[list[str]] = []

    def encode_text(self, texts):
        self.batches.append(list(texts))
        return self.encoder.encode_text(texts)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    bundle = load_clip(ClipSpec())
    return TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)


@pytest.fixture
def recording(text_encoder):
    return RecordingEncoder(text_encoder)


async def submit_all(batcher, texts, deadlines=None):
    deadlines = deadlines or [None] * len(texts)
    return await asyncio.gather(
        *(batcher.submit(t, d) for t, d in zip(texts, deadlines)), return_exceptions=True
    )


def test_concurrent_queries_share_forward_passes(recording, text_encoder):
    batcher = MicroBatcher(recording.encode_text, max_batch=4, max_wait_ms=50)
    texts = ["red circle 0"] + [f"red circle {i}" for i in range(10)]  # one asked twice
    results = asyncio.run(submit_all(batcher, texts))
    expected = text_encoder.encode_text(texts)
    for row, want in zip(results, expected):
        np.testing.assert_allclose(row, want, atol=1e-5)
        assert not row.flags.writeable
    assert sum(len(b) for b in recording.batches) == 10  # the repeated text is encoded once
    assert all(len(b) <= 4 for b in recording.batches)
    assert len(recording.batches) == batcher.batches == 3
    assert batcher.largest_batch == 4 and batcher.encoded == 10
    batcher.close()


def test_a_lone_query_is_encoded_without_waiting_for_company(recording):
    batcher = MicroBatcher(recording.encode_text, max_batch=16, max_wait_ms=0)
    (row,) = asyncio.run(submit_all(batcher, ["blue star"]))
    assert row.shape == (128,) and recording.batches == [["blue star"]]
    batcher.close()


def test_expired_queries_are_dropped_before_encoding(recording):
    batcher = MicroBatcher(recording.encode_text, max_batch=8, max_wait_ms=5)
    now = time.monotonic()
    texts = ["late", "on time", "no deadline"]
    results = asyncio.run(submit_all(batcher, texts, [now - 0.01, now + 60, None]))
    assert isinstance(results[0], DeadlineExpired)
    assert results[1].shape == results[2].shape == (128,)
    assert recording.batches == [["on time", "no deadline"]]
    assert batcher.expired == 1
    batcher.close()


def test_cancelled_callers_are_not_encoded(recording):
    batcher = MicroBatcher(recording.encode_text, max_batch=8, max_wait_ms=300)

    async def scenario():
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0)  # both are queued; the batch waits for more
        gone.cancel()
        return await kept

    assert asyncio.run(scenario()).shape == (128,)
    assert recording.batches == [["kept"]]
    batcher.close()


def test_an_encoder_error_reaches_every_waiter_and_the_batcher_recovers(text_encoder):
    def encode(texts):
        if "boom" in texts:
            raise RuntimeError("encoder failed")
        return text_encoder.encode_text(texts)

    batcher = MicroBatcher(encode, max_batch=8, max_wait_ms=20)

    async def scenario():
        failed = await submit_all(batcher, ["boom", "red"])
        recovered = await batcher.submit("red")
        return failed, recovered

    failed, recovered = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert recovered.shape == (128,)
    batcher.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda texts: texts, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda texts: texts, max_wait_ms=-1)


def test_a_cheap_encoder_leaves_a_lone_text_to_its_caller_while_the_batcher_is_idle(recording):
    async def scenario(batcher):
        seen = [batcher.inline()]  # unknown cost: never before one text was encoded alone
        await batcher.submit("red circle")
        seen.append(batcher.inline())  # idle, and the encoding was cheap enough
        waiting = asyncio.ensure_future(batcher.submit("blue star"))
        await asyncio.sleep(0)
        seen.append(batcher.inline())  # a batch is forming: the text joins it instead
        await waiting
        return seen

    cheap = MicroBatcher(recording.encode_text, max_wait_ms=20, inline_max_cpu_ms=float("inf"))
    assert asyncio.run(scenario(cheap)) == [False, True, False]
    assert cheap.inlined == 1 and cheap.one_text_cpu_ms > 0
    row = cheap.encode_now(["green"])[0]  # what the caller then runs in its own job
    np.testing.assert_allclose(row, recording.encoder.encode_text(["green"])[0], atol=1e-5)
    cheap.close()
    # An encoder dearer than the limit is always batched.
    dear = MicroBatcher(recording.encode_text, max_wait_ms=20, inline_max_cpu_ms=0.0)
    assert asyncio.run(scenario(dear)) == [False, False, False] and dear.inlined == 0
    dear.close()
