"""Serving text encoders: real tokens equal encode_text, ONNX export, fallbacks, tokenizer bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from retrieval_service.clip_model import (  # noqa: E402
    TINY_CLIP_CONFIG,
    ClipSpec,
    load_clip,
    save_clip,
    update_clip_json,
)
from retrieval_service.onnx_export import export_text_onnx  # noqa: E402
from retrieval_service.text_encoder import (  # noqa: E402
    ONNX_FP32,
    ONNX_INT8,
    TORCH_FP32,
    TORCH_INT8,
    BoundedTokenizer,
    OnnxTextEncoder,
    TorchTextEncoder,
    causal_text_tower,
    load_text_encoder,
    real_token_inputs,
)

# Short and long queries, one past the tiny CLIP's 16-token context (truncated), one empty.
TEXTS = [
    "red",
    "red circle at night",
    "a blue square in the snow next to a yellow star",
    "a much longer caption " * 6,
    "",
    "beach 42",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(ClipSpec())


def padded_reference(bundle, texts):
    with torch.inference_mode():
        return bundle.model.encode_text(bundle.tokenizer(texts), normalize=True).numpy()


def test_real_tokens_equal_encode_text_on_the_tiny_clip(tiny):
    encoder = TorchTextEncoder(tiny.model, tiny.tokenizer, tiny.embed_dim)
    assert encoder.real_tokens and encoder.describe() == "torch-fp32 (real tokens)"
    expected = padded_reference(tiny, TEXTS)
    for batch_size in (1, 2, len(TEXTS)):
        got = encoder.encode_text(TEXTS, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    assert encoder.encode_text([]).shape == (0, tiny.embed_dim)


def test_real_tokens_equal_encode_text_on_vit_b_32():
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32")  # random weights: the real model's compute
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    texts = ["red circle", "a photo of a dog running on the beach at sunset"]
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(texts), normalize=True).numpy()
    encoder = TorchTextEncoder(model, tokenizer, 512)
    assert encoder.real_tokens
    assert np.abs(encoder.encode_text(texts) - expected).max() <= 1e-4


def test_real_token_inputs_cut_at_the_longest_end_of_text(tiny):
    tokens = tiny.tokenizer(["red", "red circle at night"]).numpy()
    cut, eot = real_token_inputs(tokens, "argmax", None)
    assert cut.shape == (2, int(eot.max()) + 1) and cut.shape[1] < tokens.shape[1]
    assert (cut[np.arange(2), eot] == tokens.max(axis=1)).all()  # the end-of-text token
    np.testing.assert_array_equal(real_token_inputs(tokens, "eos", int(tokens.max()))[1], eot)


@pytest.fixture(scope="module")
def bidirectional():
    """A SigLIP-like text tower built from open_clip's parts: no causal mask, last-token pool."""
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["text_cfg"].update({"no_causal_mask": True, "pool_type": "last"})
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**config)
    model.eval()
    return model, open_clip.get_tokenizer("imgsearch-tiny-clip")


def test_other_towers_keep_the_padded_path(bidirectional, tmp_path):
    model, tokenizer = bidirectional
    tower, why_not = causal_text_tower(model)
    assert tower is None and "pooling 'last'" in why_not
    encoder = TorchTextEncoder(model, tokenizer, 128)
    assert not encoder.real_tokens and "padded" in encoder.describe()
    with torch.inference_mode():
        expected = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(encoder.encode_text(TEXTS), expected, atol=1e-6)
    with pytest.raises(ValueError, match="causal"):
        export_text_onnx(model, tmp_path / "text.onnx")


def test_onnx_export_is_dynamic_in_batch_and_length(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    fp32_path = export_text_onnx(tiny.model, tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    tower, _ = causal_text_tower(tiny.model)
    expected = padded_reference(tiny, TEXTS)
    fp32 = OnnxTextEncoder(
        fp32_path, tiny.tokenizer, tiny.embed_dim, tower.pool_type, tower.eos_id, ONNX_FP32
    )
    int8 = OnnxTextEncoder(
        tmp_path / "int8.onnx", tiny.tokenizer, 128, tower.pool_type, tower.eos_id, ONNX_INT8
    )
    # Exported at batch 2, length 4: every other batch size and length must run.
    for batch_size in (1, 3, len(TEXTS)):
        assert np.abs(fp32.encode_text(TEXTS, batch_size=batch_size) - expected).max() <= 1e-4
        cosine = np.sum(int8.encode_text(TEXTS, batch_size=batch_size) * expected, axis=1)
        assert cosine.min() > 0.98
    assert (tmp_path / "int8.onnx").stat().st_size < fp32_path.stat().st_size / 2


def test_load_text_encoder_follows_the_build_and_falls_back_to_torch(tiny, tmp_path):
    clip_dir = tmp_path / "clip"
    save_clip(tiny, clip_dir)
    encoder, note = load_text_encoder(clip_dir, tiny)  # no choice recorded: torch FP32
    assert encoder.runtime == TORCH_FP32 and note == ""
    update_clip_json(clip_dir, text_encoder="int8")  # written by builds before ONNX
    assert load_text_encoder(clip_dir, tiny)[0].runtime == TORCH_INT8
    update_clip_json(clip_dir, text_encoder=ONNX_INT8)
    encoder, note = load_text_encoder(clip_dir, tiny)
    assert encoder.runtime == TORCH_FP32 and "text_int8.onnx is missing" in note
    with pytest.raises(ValueError, match="unknown text runtime"):
        load_text_encoder(clip_dir, tiny, runtime="tensorrt")


def test_tokenizer_word_cache_stays_bounded(tiny):
    tokenizer = BoundedTokenizer(open_clip.get_tokenizer("imgsearch-tiny-clip"), max_words=50)
    start = tokenizer.cached_words
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    queries = [" ".join("".join(rng.choice(letters, 7)) for _ in range(3)) for _ in range(200)]
    fresh = open_clip.get_tokenizer("imgsearch-tiny-clip")
    for query in queries:
        np.testing.assert_array_equal(tokenizer([query]).numpy(), fresh([query]).numpy())
        assert tokenizer.cached_words <= 50
    assert tokenizer.resets > 0 and len(fresh.cache) == 600 + start  # the unbounded one grew


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status: RSS is not measurable here")


def test_a_hundred_thousand_unseen_queries_leave_memory_flat(tiny):
    import gc

    # What serving tokenizes: a query that misses the stored keywords and the LRU goes through
    # the encoder's tokenizer. Unbounded (open_clip's own cache) these queries grow RSS by
    # about 55 MB; bounded, by a few.
    tokenizer = TorchTextEncoder(tiny.model, tiny.tokenizer, tiny.embed_dim).tokenizer
    assert isinstance(tokenizer, BoundedTokenizer)
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(w) for w in rng.choice(letters, (300_000, 10))]
    queries = [" ".join(words[3 * i : 3 * i + 3]) for i in range(100_000)]
    tokenizer(queries[:1000])
    gc.collect()
    before = _rss_mb()
    for start in range(0, len(queries), 1000):
        tokenizer(queries[start : start + 1000])
    gc.collect()
    assert _rss_mb() - before < 50
    assert tokenizer.cached_words <= tokenizer.max_words and tokenizer.resets > 0
