"""CLIP: project config, checkpoints through open_clip, INT8 gate, resumable embedding, build."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from imgsearch.artifacts import CLIP_DIR, EMBEDDINGS, VECTOR_INDEX  # noqa: E402
from imgsearch.catalogue import Catalogue  # noqa: E402
from retrieval_service.clip_model import (  # noqa: E402
    KEYWORD_EMBEDDINGS,
    TINY_CLIP_NAME,
    ClipSpec,
    load_clip,
    read_clip_json,
    register_configs,
    save_clip,
)
from retrieval_service.embedding import embed_catalogue, load_embeddings, partial_path  # noqa: E402
from retrieval_service.onnx_export import export_text_onnx  # noqa: E402
from retrieval_service.quantization import (  # noqa: E402
    count_quantized_linears,
    quantize_text_encoder,
)
from retrieval_service.semantic import KnownQueries  # noqa: E402
from retrieval_service.text_encoder import (  # noqa: E402
    ONNX_FILES,
    ONNX_INT8,
    RUNTIMES,
    TORCH_FP32,
    TORCH_INT8,
    OnnxTextEncoder,
    TorchTextEncoder,
    causal_text_tower,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 80, 240), "yellow": (255, 225, 0)}
SCENES = {"night": (16, 22, 58), "snow": (205, 212, 224)}
SHAPES = ("circle", "square")


def draw(colour: str, shape: str, scene: str, jitter: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), SCENES[scene])
    pen = ImageDraw.Draw(image)
    box = (14 + jitter, 14, 50 + jitter, 50)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    else:
        pen.rectangle(box, fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    """48 drawn photos (colour x shape x scene x 4), one image missing, one corrupt."""
    data_dir = tmp_path_factory.mktemp("clipdata")
    (data_dir / "images").mkdir()
    photos, keywords = [], []
    i = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for scene in SCENES:
                for jitter in range(4):
                    photo_id = f"p{i:03d}"
                    photos.append(
                        {
                            "photo_idx": i,
                            "photo_id": photo_id,
                            "photo_image_url": f"https://example.invalid/{photo_id}",
                            "photo_description": f"a {colour} {shape} at {scene}",
                            "ai_description": "" if jitter else f"{colour} {shape} {scene}",
                            "photographer_username": "ann",
                            "stats_views": 10,
                            "stats_downloads": 1,
                            "has_image": True,
                        }
                    )
                    for keyword, confidence in ((colour, 0.9), (shape, 0.8), (scene, 0.95)):
                        keywords.append((i, keyword, confidence))
                    keywords.append((i, "abstract", 0.1))
                    if photo_id == "p005":
                        (data_dir / "images" / f"{photo_id}.jpg").write_bytes(b"not a jpeg")
                    elif photo_id != "p007":  # p007's image is missing
                        draw(colour, shape, scene, jitter - 2).save(
                            data_dir / "images" / f"{photo_id}.jpg"
                        )
                    i += 1
    photos.append({**photos[0], "photo_idx": i, "photo_id": "zz-noimage", "has_image": False})
    keyword_frame = pd.DataFrame(keywords, columns=["photo_idx", "keyword", "confidence"])
    return Catalogue(
        photos=pd.DataFrame(photos),
        keywords=keyword_frame.astype({"photo_idx": "int32", "confidence": "float32"}),
        users=pd.DataFrame({"user_idx": [], "anonymous_user_id": []}),
        conversions=pd.DataFrame(),
        data_dir=str(data_dir),
    )


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip(ClipSpec())


def test_register_configs_is_idempotent():
    register_configs()
    register_configs()
    assert open_clip.list_models().count(TINY_CLIP_NAME) == 1
    config = open_clip.get_model_config(TINY_CLIP_NAME)
    assert config["embed_dim"] == 128 and config["text_cfg"]["context_length"] == 16


def test_encoders_return_normalised_float32(bundle):
    text = bundle.encode_text(["red circle", "a much longer caption " * 10])
    assert text.shape == (2, 128) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    images = bundle.encode_images([draw("red", "circle", "night", 0), Image.new("L", (90, 70))])
    assert images.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert bundle.encode_text([]).shape == (0, 128)


def test_checkpoint_round_trip_through_open_clip(tmp_path, bundle):
    checkpoint = save_clip(bundle, tmp_path / "clip", note="test")
    meta = read_clip_json(tmp_path / "clip")
    assert meta["model_name"] == TINY_CLIP_NAME and meta["note"] == "test"
    texts = ["red circle", "snow"]
    images = [draw("blue", "square", "snow", 1)]

    # The same path users take: a registered name plus pretrained=PATH.
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_CLIP_NAME, pretrained=str(checkpoint)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    with torch.inference_mode():
        text = model.encode_text(tokenizer(texts), normalize=True).numpy()
        # Laid out channels last, as the bundle runs images (the same weights give the same bits).
        pixels = preprocess(images[0])[None].contiguous(memory_format=torch.channels_last)
        image = model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_array_equal(text, bundle.encode_text(texts))
    np.testing.assert_array_equal(image, bundle.encode_images(images))

    # load_clip accepts the folder, and the folder also works as open_clip's local-dir:.
    reloaded = load_clip(ClipSpec(pretrained=str(tmp_path / "clip")))
    np.testing.assert_array_equal(reloaded.encode_text(texts), text)
    np.testing.assert_array_equal(reloaded.encode_images(images), image)
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    local.eval()
    with torch.inference_mode():
        np.testing.assert_array_equal(
            local.encode_text(tokenizer(texts), normalize=True).numpy(), text
        )


def test_int8_text_encoder_works(bundle):
    int8_model = quantize_text_encoder(bundle.model)
    assert count_quantized_linears(int8_model) == 4  # c_fc and c_proj of the 2 text blocks
    assert count_quantized_linears(bundle.model) == 0  # the FP32 model is untouched
    assert count_quantized_linears(int8_model.visual) == 0
    vocabulary = ["red", "blue", "yellow", "circle", "square", "night", "snow", "red circle"]
    embedded = bundle.with_model(int8_model).encode_text(vocabulary)  # raised AttributeError
    assert embedded.shape == (8, 128)  # before the int8_original_dtype workaround
    # Over real tokens only, INT8 is not bit-equal to INT8 over the padded context (dynamic
    # quantization scales activations by the whole batch, padding included), but as close.
    real_tokens = TorchTextEncoder(int8_model, bundle.tokenizer, 128, TORCH_INT8)
    assert np.sum(real_tokens.encode_text(vocabulary) * embedded, axis=1).min() > 0.99


def test_runtime_gate_picks_the_fastest_accurate_runtime(tmp_path, bundle):
    from retrieval_service.quantization import select_text_runtime

    export_text_onnx(bundle.model, tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    tower, _ = causal_text_tower(bundle.model)
    reference = TorchTextEncoder(bundle.model, bundle.tokenizer, 128)
    candidates = {
        TORCH_INT8: TorchTextEncoder(
            quantize_text_encoder(bundle.model), bundle.tokenizer, 128, TORCH_INT8
        ),
        ONNX_INT8: OnnxTextEncoder(
            tmp_path / "int8.onnx", bundle.tokenizer, 128, tower.pool_type, tower.eos_id, ONNX_INT8
        ),
    }
    queries = ["red circle", "blue square at night", "a yellow star in the snow", "snow night"]
    images = np.random.default_rng(0).standard_normal((40, 128)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    timing = {"timing_queries": 4, "timing_rounds": 1, "batch": 2}

    lax = select_text_runtime(
        reference, candidates, queries, images, min_cosine=0.9, min_overlap=0.5,
        min_speedup=0.0, **timing,
    )  # fmt: skip
    assert [c.runtime for c in lax.candidates] == [TORCH_FP32, TORCH_INT8, ONNX_INT8]
    assert all(c.passed for c in lax.candidates) and lax.queries == 4
    fastest = max(lax.candidates, key=lambda c: c.speedup)
    assert lax.runtime == fastest.runtime
    assert lax.figures(TORCH_FP32).mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert all(c.mean_cosine > 0.99 and c.batch1_ms > 0 and c.batch_ms > 0 for c in lax.candidates)
    assert lax.runtime in lax.summary()

    strict = select_text_runtime(
        reference, candidates, queries, images, min_cosine=1.01, min_speedup=0.0, **timing
    )
    assert strict.runtime == TORCH_FP32  # the reference always passes: it is the fallback
    assert all("cosine" in c.reason for c in strict.candidates[1:])
    slow = select_text_runtime(reference, candidates, queries, images, min_speedup=100.0, **timing)
    assert slow.runtime == TORCH_FP32 and "speed-up" in slow.figures(ONNX_INT8).reason
    assert json.loads(json.dumps(slow.as_dict()))["runtime"] == TORCH_FP32


def test_batched_image_pixels_equal_the_per_image_transform(bundle):
    """64 px RGB photos skip the per-image transform; the batch holds the same floats, bit for
    bit, and other sizes and modes in the same batch still go through the transform."""
    photos = [draw(c, s, "night", j) for c in COLOURS for s in SHAPES for j in (-3, 0, 5)]
    others = [Image.new("L", (90, 70), 128), draw("red", "circle", "snow", 0).resize((80, 64))]
    for images in (photos, photos[:3] + others + photos[3:5]):
        expected = torch.stack([bundle.preprocess(image) for image in images])
        pixels = bundle.image_pixels(images)
        assert pixels.dtype == torch.float32 and torch.equal(pixels, expected)
        assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert bundle._checked_normaliser() is not False  # the batched path was the one checked


def test_batched_image_pixels_fall_back_when_the_transform_is_another(bundle):
    """A transform the batched path would not reproduce (here other normalising constants than
    the model's config) is applied image by image."""
    from torchvision import transforms

    other = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)]
    )
    custom = bundle.with_model(bundle.model)
    custom.preprocess = other
    images = [draw("blue", "square", "snow", 1), draw("yellow", "circle", "night", -2)]
    assert torch.equal(custom.image_pixels(images), torch.stack([other(im) for im in images]))
    assert custom._checked_normaliser() is False


def test_channels_last_embeddings_differ_from_channels_first_by_rounding_only(bundle):
    """Image embeddings run channels last in memory; against open_clip's own channels-first
    forward of the same batch they differ by float32 rounding, far below any score gap."""
    images = [draw(c, s, sc, j) for c in COLOURS for s in SHAPES for sc in SCENES for j in (-2, 2)]
    for batch_size in (len(images), 5):
        got = bundle.encode_images(images, batch_size=batch_size)
        reference = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pixels = torch.stack([bundle.preprocess(image) for image in chunk])
                reference.append(bundle.model.encode_image(pixels, normalize=True).numpy())
        reference = np.concatenate(reference)
        assert got.shape == reference.shape == (len(images), 128)
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6)
    cosine = np.sum(got * reference, axis=1)
    assert cosine.min() > 1 - 1e-6


def test_embedding_skips_missing_and_corrupt_images(tmp_path, bundle, catalogue):
    result = embed_catalogue(
        bundle, catalogue, tmp_path / "e.npz", batch_size=8, show_progress=False
    )
    assert result["complete"] and result["embedded"] == 46
    assert result["missing"] == 1 and result["corrupt"] == 1
    photo_idx, embeddings = load_embeddings(tmp_path / "e.npz")
    assert photo_idx.dtype == np.int64 and embeddings.dtype == np.float32
    assert 5 not in photo_idx and 7 not in photo_idx and 48 not in photo_idx
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    with Image.open(catalogue.image_path("p000")) as image:
        expected = bundle.encode_images([image.convert("RGB")])
    np.testing.assert_allclose(embeddings[0], expected[0], atol=1e-5)


def test_embedding_resumes_after_interruption(tmp_path, bundle, catalogue):
    whole = embed_catalogue(
        bundle, catalogue, tmp_path / "whole.npz", batch_size=8, show_progress=False
    )
    out = tmp_path / "resumed.npz"
    first = embed_catalogue(
        bundle, catalogue, out, batch_size=8, show_progress=False, checkpoint_every=1,
        max_batches=2,
    )  # fmt: skip
    assert not first["complete"] and not out.exists() and partial_path(out).exists()

    def crash(batches):
        if batches == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_catalogue(
            bundle, catalogue, out, batch_size=8, show_progress=False, checkpoint_every=100,
            on_batch=crash,
        )  # fmt: skip
    last = embed_catalogue(bundle, catalogue, out, batch_size=8, show_progress=False)
    assert last["complete"] and last["resumed_from"] == 32  # 2 batches, then 2 more
    assert not partial_path(out).exists()
    assert (last["embedded"], last["missing"], last["corrupt"]) == (
        whole["embedded"],
        whole["missing"],
        whole["corrupt"],
    )
    for a, b in zip(load_embeddings(out), load_embeddings(tmp_path / "whole.npz")):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_embedding_checkpoints_less_often_when_a_save_is_slow(tmp_path, bundle, catalogue,
                                                               monkeypatch):  # fmt: skip
    """A save that takes long (a large catalogue's progress file) is not repeated every batch:
    the next waits until the run has worked ten times as long as the save took."""
    from retrieval_service import embedding

    saves = []
    real_save = embedding._save_npz

    def slow_save(path, **arrays):
        saves.append(len(arrays["photo_idx"]))
        time.sleep(0.3)  # the run's 6 batches of tiny images then take far less than 3 s
        real_save(path, **arrays)

    monkeypatch.setattr(embedding, "_save_npz", slow_save)
    out = tmp_path / "e.npz"
    result = embed_catalogue(
        bundle, catalogue, out, batch_size=8, show_progress=False, checkpoint_every=1
    )
    assert result["complete"] and load_embeddings(out)[0].size == result["embedded"]
    # Every batch was due (checkpoint_every=1); the first batch's save was taken, then none of
    # the other five, then the final file (every embedding).
    assert len(saves) == 2 and saves[0] < saves[1] == result["embedded"]


def test_embedding_ignores_progress_of_another_model(tmp_path, bundle, catalogue):
    out = tmp_path / "e.npz"
    embed_catalogue(bundle, catalogue, out, batch_size=8, show_progress=False, max_batches=1)
    other = bundle.with_model(bundle.model)
    other.spec = ClipSpec(TINY_CLIP_NAME, "some-other-weights")
    result = embed_catalogue(other, catalogue, out, batch_size=8, show_progress=False)
    assert result["resumed_from"] == 0 and result["complete"]


def test_training_is_deterministic_and_saves_a_loadable_clip(tmp_path, catalogue):
    from retrieval_service.clip_training import train_clip

    runs = [
        train_clip(catalogue, tmp_path / name, steps=3, batch_size=16, seed=1, show_progress=False)
        for name in ("a", "b")
    ]
    assert runs[0]["train_photos"] == 41 and runs[0]["heldout_photos"] == 5
    assert runs[0]["skipped_images"] == 2
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    a = load_clip(ClipSpec(pretrained=str(tmp_path / "a")))
    b = load_clip(ClipSpec(pretrained=str(tmp_path / "b")))
    np.testing.assert_array_equal(a.encode_text(["red"]), b.encode_text(["red"]))
    assert read_clip_json(tmp_path / "a")["training"]["steps"] == 3
    assert isinstance(runs[0]["heldout"], dict)
    assert "sampled_from" not in runs[0]  # under the cap: every photo with an image


def test_training_beyond_its_photo_cap_draws_a_seeded_sample(tmp_path, catalogue):
    from retrieval_service.clip_training import train_clip

    with_images = int(catalogue.photos["has_image"].astype(bool).sum())
    runs = [
        train_clip(
            catalogue,
            tmp_path / name,
            steps=2,
            batch_size=8,
            seed=1,
            show_progress=False,
            max_photos=20,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    assert with_images > 20 and runs[0]["sampled_from"] == with_images
    # 20 photos drawn (of which the unreadable images drop out), split 90/10.
    assert runs[0]["train_photos"] + runs[0]["heldout_photos"] + runs[0]["skipped_images"] == 20
    assert runs[0]["final_loss"] == runs[1]["final_loss"]


def test_positives_match_keyword_subsets():
    from retrieval_service.clip_training import _positives

    captions = [("red", frozenset({"red"})), ("red circle", frozenset({"red", "circle"})),
                ("a blue square", None), ("a blue square", None)]  # fmt: skip
    tags = [frozenset({"red", "circle"}), frozenset({"red", "square"}),
            frozenset({"blue", "square"}), frozenset({"blue", "square"})]  # fmt: skip
    positive = _positives(captions, tags)
    expected = np.array(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool
    )  # [i, j]: caption j describes image i; the diagonal pairs are positive by construction
    np.testing.assert_array_equal(positive, expected)


def test_heldout_figures_on_perfect_embeddings():
    from retrieval_service.clip_heldout import heldout_figures

    class OneHot:
        words = ["red", "blue", "circle", "square"]

        def encode_text(self, texts):
            out = np.zeros((len(texts), 4), np.float32)
            for i, text in enumerate(texts):
                for word in text.split():
                    out[i, self.words.index(word)] = 1
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    tags = [{"red", "circle"}, {"red", "square"}, {"blue", "circle"}, {"blue", "square"}] * 5
    images = OneHot().encode_text([" ".join(sorted(t)) for t in tags])
    figures = heldout_figures(
        OneHot(), images, tags, {"colour": ["red", "blue"], "shape": ["circle", "square"]},
        ("colour", "shape"),
    )  # fmt: skip
    assert figures["colour"]["p@10"] == 1.0 and figures["colour"]["ceiling"] == 1.0
    assert figures["colour+shape"]["p@10"] == pytest.approx(0.5)  # only 5 relevant of 20
    assert figures["colour+shape"]["ceiling"] == pytest.approx(0.5)


def test_build_clip_artifacts_and_load_retrievers(tmp_path, catalogue):
    from imgsearch_tools.build_steps import BuildSteps
    from retrieval_service.clip_artifacts import build_clip_artifacts
    from retrieval_service.keyword_index import KeywordIndex
    from retrieval_service.semantic import load_clip_retrievers

    steps = BuildSteps()
    figures = build_clip_artifacts(
        catalogue, tmp_path, None, train_steps=2, show_progress=False, step=steps.step
    )
    # Each part of the CLIP work is a step of its own in the build's manifest.
    assert [s["step"] for s in steps.steps] == [
        "clip training",
        "clip embedding",
        "vector index",
        "index calibration",
        "clip text runtime",
    ]
    assert all(s["peak_rss_mib"] > 0 and s["cpu_seconds"] >= 0 for s in steps.steps)
    for path in (CLIP_DIR + "/clip.json", EMBEDDINGS, VECTOR_INDEX, "vector.json"):
        assert (tmp_path / path).exists(), path
    assert figures["embedding"]["embedded"] == 46
    assert figures["vector_index"]["factory"] == "Flat"
    assert figures["vector_index"]["chosen"].startswith("default below 50,000 photos")
    assert figures["vector_index"]["recall@10_vs_exact"] == 1.0
    assert figures["vector_index"]["calibration"]["parameter"] is None  # exact: nothing to tune
    gate = figures["text_runtime"]
    assert [c["runtime"] for c in gate["candidates"]] == list(RUNTIMES)
    assert gate["queries"] > 0 and gate["runtime"] in RUNTIMES
    meta = json.loads((tmp_path / CLIP_DIR / "clip.json").read_text())
    assert meta["text_encoder"] == gate["runtime"]
    kept = {rt for rt, name in ONNX_FILES.items() if (tmp_path / CLIP_DIR / name).exists()}
    assert kept == ({gate["runtime"]} & set(ONNX_FILES))  # only the chosen runtime's file stays
    known = KnownQueries.load(tmp_path / CLIP_DIR / KEYWORD_EMBEDDINGS)
    assert set(known.keywords) == {*COLOURS, *SHAPES, *SCENES, "abstract"}
    assert figures["known_queries"]["keywords"] == 8
    assert figures["known_queries"]["real_token_max_abs_diff"] <= 1e-4
    vector_meta = json.loads((tmp_path / "vector.json").read_text())
    assert vector_meta["row_map"] == "image_embeddings.npz:photo_idx"

    keyword = KeywordIndex.from_keywords(catalogue.keywords)
    retrievers = load_clip_retrievers(tmp_path, keyword, threads=None)
    assert set(retrievers) == {"clip", "hybrid"}
    assert retrievers["clip"].text_encoder.runtime == gate["runtime"]
    np.testing.assert_array_equal(retrievers["clip"].embed_query("red"), known.get("red"))
    assert retrievers["clip"].known_hits == 1 and retrievers["clip"].cache_misses == 0
    clip = retrievers["clip"].retrieve("red circle", 10)
    assert len(clip.photo_idx) == 10 and set(clip.source_scores) == {"clip"}
    assert not set(clip.photo_idx.tolist()) & {5, 7, 48}
    hybrid = retrievers["hybrid"].retrieve("red", 10)
    assert hybrid.keyword == "red" and set(hybrid.source_scores) == {"keyword", "clip"}
    assert load_clip_retrievers(tmp_path / "nothing", keyword) == {}


@pytest.mark.parametrize("factory, parameter", [("HNSW32", "efSearch"), ("IVF4,Flat", "nprobe")])
def test_an_approximate_index_is_built_with_the_search_effort_calibrated_on_held_out_queries(
    tmp_path, catalogue, factory, parameter
):
    from retrieval_service.clip_artifacts import build_clip_artifacts
    from retrieval_service.index_calibration import EF_SEARCH_STEPS, NPROBE_STEPS, TARGET_RECALL
    from retrieval_service.vector_index import VectorIndex

    figures = build_clip_artifacts(
        catalogue, tmp_path, None, factory=factory, train_steps=2, show_progress=False
    )
    assert figures["vector_index"]["chosen"] == "given (--index-factory)"
    calibration = figures["vector_index"]["calibration"]
    steps = EF_SEARCH_STEPS if parameter == "efSearch" else NPROBE_STEPS
    assert calibration["parameter"] == parameter and calibration["value"] in steps
    assert set(calibration["queries"]) == {"single keyword", "multi-word keyword", "held-out"}
    # Half of the 8 keywords tune, the others measure; all 8 are one word.
    assert calibration["queries"]["single keyword"] == 4
    assert calibration["queries"]["multi-word keyword"] == 0
    assert set(calibration["unseen_by_family"]) == {"single keyword", "held-out"}
    assert calibration["reached"] == (calibration["recall"] >= TARGET_RECALL)
    assert figures["vector_index"]["params"] == {parameter: calibration["value"]}
    # One-word queries and the others (the held-out ones stand for them) each get their own.
    by_query = calibration["by_query"]
    assert set(by_query) == {"one word", "several words"}
    assert set(by_query["several words"]["unseen_by_family"]) == {"held-out"}
    assert figures["vector_index"]["params_by_query"] == {
        name: {parameter: chosen["value"]} for name, chosen in by_query.items()
    }
    assert all(chosen["value"] <= calibration["value"] for chosen in by_query.values())
    photo_idx, _ = load_embeddings(tmp_path / EMBEDDINGS)
    served = VectorIndex.load(tmp_path / VECTOR_INDEX, row_to_photo_idx=photo_idx)
    assert served.params_by_query == figures["vector_index"]["params_by_query"]
    if parameter == "efSearch":
        assert served.index.hnsw.efSearch == calibration["value"]
    else:
        assert served.index.nprobe == calibration["value"] == served.params["nprobe"]


def test_build_skips_a_catalogue_without_images(tmp_path, catalogue):
    from retrieval_service.clip_artifacts import build_clip_artifacts

    no_images = Catalogue(
        photos=catalogue.photos.assign(has_image=False),
        keywords=catalogue.keywords,
        users=catalogue.users,
        conversions=catalogue.conversions,
        data_dir=catalogue.data_dir,
    )
    assert "skipped" in build_clip_artifacts(no_images, tmp_path, None, show_progress=False)
    assert not any(tmp_path.iterdir())


def test_bench_clip_small(tmp_path):
    from imgsearch_tools.bench.clip_components import bench_clip, format_bench

    figures = bench_clip(demo_n=300, synthetic_n=400, synthetic_dim=16, n_queries=5, k=10)
    assert set(figures["text_encode"]) == {"fp32", "int8"}
    assert [row["ntotal"] for row in figures["search"]] == [300, 400]
    assert figures["embedding"]["images_per_s"] > 0
    table = format_bench(figures)
    assert "INT8" in table and "HNSW32" in table and "images/s" in table


def test_known_queries_are_the_photos_keywords_and_what_users_searched(catalogue):
    from retrieval_service.clip_artifacts import heldout_queries, keyword_vocabulary

    searched = pd.DataFrame({"keyword": ["Red  Circle"] * 300 + ["night", ""]})
    vocabulary = keyword_vocabulary(catalogue.with_conversions(searched))
    assert vocabulary[0] == "red circle"  # searched 300 times: the most frequent
    assert set(vocabulary) == {"red circle", *COLOURS, *SHAPES, *SCENES, "abstract"}
    assert keyword_vocabulary(catalogue, max_keywords=3) == ["abstract", "circle", "night"]
    heldout = heldout_queries(catalogue, set(vocabulary), n=20)
    assert len(heldout) == 20 and not set(heldout) & set(vocabulary)
    assert any(len(q.split()) == 2 for q in heldout)  # keyword pairs
    assert any(q.startswith("a ") for q in heldout)  # descriptions


def test_held_out_queries_of_a_large_catalogue_come_from_a_sample_of_its_photos(
    catalogue, monkeypatch
):
    from retrieval_service import clip_artifacts

    vocabulary = set(clip_artifacts.keyword_vocabulary(catalogue))
    monkeypatch.setattr(clip_artifacts, "HELDOUT_PHOTOS", 12)
    heldout = clip_artifacts.heldout_queries(catalogue, vocabulary, n=40)
    assert heldout == clip_artifacts.heldout_queries(catalogue, vocabulary, n=40)  # seeded
    assert heldout and not set(heldout) & vocabulary
    # Only 12 photos' descriptions can be drawn from now: at most 12 distinct ones per column.
    descriptions = [q for q in heldout if len(q.split()) > 2]
    assert 0 < len(descriptions) <= 2 * 12
