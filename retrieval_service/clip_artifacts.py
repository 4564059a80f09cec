"""The CLIP part of an artifact set: model, image embeddings, vector index, text runtime and the
stored keywords' query embeddings."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.catalogue import normalise_keyword
from retrieval_service.clip_model import TRAIN_STEPS
from retrieval_service.clip_training import QueryFamilies, train_clip
from retrieval_service.semantic import KnownQueries

# Keywords whose query embeddings a build stores (the most frequent, on huge catalogues): at
# 512-d float32 that is 41 MB, and about a minute of ViT-B-32 encoding on two cores.
KNOWN_QUERIES_MAX = 20_000
HELDOUT_QUERIES = 256  # queries the runtime gate compares on
# Photos the held-out queries are drawn from, at most (a seeded sample beyond): 256 queries need
# few, and reading every photo's keywords in Python took minutes at a million photos.
HELDOUT_PHOTOS = 20_000


def keyword_vocabulary(catalogue: Any, max_keywords: int = KNOWN_QUERIES_MAX) -> list[str]:
    """The catalogue's most frequent keywords, normalised and distinct (ties by name).

    Both the photos' keywords (``keywords.tsv``) and what users searched (the conversions'
    ``keyword``, e.g. "red circle") count: either is a query the servers will see again.
    """
    import pandas as pd

    words = [catalogue.keywords["keyword"]]
    conversions = catalogue.conversions
    if conversions is not None and "keyword" in conversions:
        words.append(conversions["keyword"])
    # Counted as written, then normalised: one call per distinct spelling, not per row.
    counts = pd.Series(dtype="int64")
    for column in words:
        written = column.astype(str).value_counts() if len(column) else pd.Series(dtype="int64")
        written.index = written.index.map(normalise_keyword)
        counts = counts.add(written.groupby(level=0).sum(), fill_value=0)
    counts = counts.astype("int64")
    frame = counts.rename_axis("keyword").reset_index(name="count")
    frame = frame[frame["keyword"] != ""]
    frame = frame.sort_values(["count", "keyword"], ascending=[False, True], kind="stable")
    return frame["keyword"].head(max_keywords).tolist()


def heldout_queries(
    catalogue: Any, known: set[str], n: int = HELDOUT_QUERIES, seed: int = 0
) -> list[str]:
    """Queries the encoder will really see: none of them is a stored keyword.

    Half are two keywords of one photo ("red circle"), half the photos' descriptions (longer
    sentences), drawn with a fixed seed; either kind fills in when the other runs short. A
    catalogue of more than :data:`HELDOUT_PHOTOS` photos has them drawn from a seeded sample.
    """
    rng = np.random.default_rng(seed)
    photos = catalogue.photos
    keywords = catalogue.keywords[["photo_idx", "keyword"]]
    if len(photos) > HELDOUT_PHOTOS:
        # Its own stream: a smaller catalogue draws exactly the queries it drew before.
        sample = np.random.default_rng([seed, 2]).choice(len(photos), HELDOUT_PHOTOS, False)
        photos = photos.iloc[np.sort(sample)]
        keywords = keywords[keywords["photo_idx"].isin(photos["photo_idx"])]
    keywords = keywords.astype({"keyword": str})
    pairs: list[str] = []
    for _, words in keywords.groupby("photo_idx", sort=True)["keyword"]:
        words = sorted({normalise_keyword(w) for w in words} - {""})
        if len(words) >= 2:
            a, b = rng.choice(len(words), size=2, replace=False)
            pairs.append(f"{words[a]} {words[b]}")
    texts = [
        normalise_keyword(t)
        for column in ("photo_description", "ai_description")
        if column in photos
        for t in photos[column].fillna("").astype(str)
    ]
    pools = []
    for pool in (pairs, texts):
        distinct = [q for q in dict.fromkeys(pool) if q and q != "nan" and q not in known]
        pools.append([distinct[i] for i in rng.permutation(len(distinct))])
    half = n // 2
    first = pools[0][:half]
    second = pools[1][: n - len(first)]
    first += pools[0][half : half + n - len(first) - len(second)]
    return first + second


def build_text_runtimes(
    bundle: Any,
    clip_dir: Path,
    queries: list[str],
    image_embeddings: np.ndarray,
    show_progress: bool = True,
) -> Any:
    """Build the candidate text runtimes, run the gate, keep the chosen one's files.

    Candidates: torch FP32 (the reference; over real tokens when the tower is causal), torch
    INT8, and, when ONNX Runtime is installed and the tower is causal, ONNX FP32 and dynamic
    INT8 exported into ``clip_dir``. ``.onnx`` files of runtimes not chosen are deleted.

    Returns
    -------
    ~retrieval_service.quantization.RuntimeChoice
    """
    from retrieval_service.onnx_export import export_text_onnx
    from retrieval_service.quantization import quantize_text_encoder, select_text_runtime
    from retrieval_service.text_encoder import (
        ONNX_FILES,
        ONNX_FP32,
        ONNX_INT8,
        TORCH_INT8,
        OnnxTextEncoder,
        TorchTextEncoder,
        causal_text_tower,
        onnx_available,
    )

    reference = TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)
    int8_model = quantize_text_encoder(bundle.model)
    candidates = {
        TORCH_INT8: TorchTextEncoder(int8_model, bundle.tokenizer, bundle.embed_dim, TORCH_INT8)
    }
    tower, why_not = causal_text_tower(bundle.model)
    why_not = why_not or onnx_available()
    if not why_not:
        fp32_path = clip_dir / ONNX_FILES[ONNX_FP32]
        int8_path = clip_dir / ONNX_FILES[ONNX_INT8]
        export_text_onnx(bundle.model, fp32_path, int8_path)
        for runtime, path in ((ONNX_FP32, fp32_path), (ONNX_INT8, int8_path)):
            candidates[runtime] = OnnxTextEncoder(
                path, bundle.tokenizer, bundle.embed_dim, tower.pool_type, tower.eos_id, runtime
            )
    elif show_progress:
        print(f"ONNX Runtime not tried: {why_not}", file=sys.stderr)
    choice = select_text_runtime(reference, candidates, queries, image_embeddings)
    for runtime, name in ONNX_FILES.items():
        if runtime != choice.runtime:
            (clip_dir / name).unlink(missing_ok=True)
    return choice


def build_clip_artifacts(
    catalogue: Any,
    set_dir: str | Path,
    clip_spec: Any | None = None,
    factory: str | None = None,
    train_steps: int = TRAIN_STEPS,
    show_progress: bool = True,
    seed: int = 0,
    query_families: QueryFamilies | None = None,
    embeddings: str | Path | None = None,
    step: Any | None = None,
) -> dict:
    """Write the CLIP part of an artifact set: model, embeddings, index, text runtime, keywords.

    Parameters
    ----------
    catalogue:
        The catalogue being built.
    set_dir:
        The artifact set's folder; ``clip/``, ``image_embeddings.npz``, ``vector.faiss`` and
        ``vector.json`` are written there.
    clip_spec:
        A :class:`~retrieval_service.clip_model.ClipSpec` to use as is (a local checkpoint is
        copied into the set; a hub tag is recorded by name and loaded from open_clip's cache).
        None trains the tiny CLIP on the catalogue for ``train_steps`` steps.
    factory:
        FAISS factory string; by catalogue size when None (see ``default_factory``).
    train_steps:
        Training steps when a CLIP is trained.
    show_progress:
        Progress bars and printed figures.
    seed:
        Training seed.
    query_families:
        Query families of the held-out figure when CLIP is trained (see :func:`train_clip`).
    embeddings:
        Image embeddings made beforehand by ``clip_spec`` (``imgsearch embed``, with or
        without ``--ray``): checked against the catalogue and the CLIP's weights and used
        instead of embedding the images here.
    step:
        ``step(name)``: a context manager timing one part of the work (the build's
        :meth:`~imgsearch_tools.build_steps.BuildSteps.step`: ``clip training``, ``clip
        embedding``, ``vector index``, ``index calibration``, ``clip text runtime``); None
        times nothing.

    Returns
    -------
    dict
        Figures for the manifest: ``clip`` (spec, training figures), ``embedding`` (counts,
        images/s), ``vector_index`` (factory, size, recall@10 vs exact), ``known_queries``
        (keywords whose query embeddings are stored in ``clip/keyword_embeddings.npz``),
        ``text_runtime`` (the gate's figures and choice, also in ``clip/clip.json``).
        ``{"skipped": reason}`` when no photo has an image (nothing written).

    Raises
    ------
    ~retrieval_service.embedding_sets.EmbeddingMismatch
        When ``embeddings`` do not fit the catalogue or were made by other weights.
    """
    from imgsearch.artifacts import CLIP_DIR, EMBEDDINGS, VECTOR_INDEX
    from retrieval_service.clip_model import (
        KEYWORD_EMBEDDINGS,
        ClipSpec,
        load_clip,
        save_clip,
        save_clip_reference,
        update_clip_json,
    )
    from retrieval_service.embedding import embed_catalogue, load_embeddings
    from retrieval_service.embedding_sets import import_embeddings
    from retrieval_service.index_calibration import calibrate
    from retrieval_service.text_encoder import TorchTextEncoder
    from retrieval_service.vector_index import (
        ONE_WORD,
        SEVERAL_WORDS,
        VectorIndex,
        factory_choice,
        query_class,
    )

    step = step or (lambda name: contextlib.nullcontext({}))
    set_dir = Path(set_dir)
    clip_dir = set_dir / CLIP_DIR
    n_images = int(catalogue.photos["has_image"].astype(bool).sum())
    if n_images == 0:
        return {"skipped": "no photo has an image; CLIP retrieval is not built"}
    if embeddings is not None and clip_spec is None:
        raise ValueError("precomputed embeddings need the spec of the CLIP that made them")
    figures: dict = {}
    if clip_spec is None:
        with step("clip training"):
            training = train_clip(
                catalogue,
                clip_dir,
                steps=train_steps,
                seed=seed,
                show_progress=show_progress,
                query_families=query_families,
            )
        bundle = load_clip(ClipSpec.from_dir(clip_dir))
        figures["clip"] = {"model_name": training["model_name"], "trained": training}
    else:
        bundle = load_clip(clip_spec)
        local = clip_spec.pretrained and Path(clip_spec.pretrained).exists()
        if local or not clip_spec.pretrained:
            save_clip(bundle, clip_dir)
        else:
            save_clip_reference(clip_spec, clip_dir)
        figures["clip"] = {"model_name": clip_spec.model_name, "pretrained": clip_spec.pretrained}

    with step("clip embedding"):
        if embeddings is None:
            figures["embedding"] = embed_catalogue(
                bundle, catalogue, set_dir / EMBEDDINGS, show_progress=show_progress
            )
        else:
            figures["embedding"] = import_embeddings(
                embeddings, bundle, catalogue, set_dir / EMBEDDINGS
            )
    photo_idx, embeddings = load_embeddings(set_dir / EMBEDDINGS)
    with step("vector index"):
        vector_index = VectorIndex.build(embeddings, photo_idx, factory=factory, seed=seed)
    vocabulary = keyword_vocabulary(catalogue)
    started = time.perf_counter()
    reference = TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)
    known = KnownQueries(vocabulary, reference.encode_text(vocabulary))
    known.save(clip_dir / KEYWORD_EMBEDDINGS)
    figures["known_queries"] = {
        "keywords": len(known),
        "seconds": round(time.perf_counter() - started, 1),
        "real_tokens": reference.real_tokens,
    }
    sample = vocabulary[:8] + heldout_queries(catalogue, set(vocabulary), 8, seed=seed + 1)
    if reference.real_tokens and sample:
        # The real-token forward must equal open_clip's encode_text over the padded context.
        diff = float(np.abs(reference.encode_text(sample) - bundle.encode_text(sample)).max())
        figures["known_queries"]["real_token_max_abs_diff"] = diff
        if diff > 1e-4:
            raise RuntimeError(f"real-token text encoding differs from encode_text by {diff}")
    # Held-out queries (else the keywords) gate the text runtime; with the keywords, they tune
    # the index's search effort (half of each kind) and measure it (the other half). The
    # one-word keywords are a family of their own: their exact top 10 are a few of the many
    # photos of one colour or scene, all about as near, the hardest for an approximate index
    # (on 100,000 demo photos IVF1024 at nprobe 32: 0.98 on the whole vocabulary, 0.93 on them).
    # Served apart (query_class): one-word queries search as much of the index as their
    # family needs, queries of several words as much as theirs (far less, on an inverted file).
    queries = heldout_queries(catalogue, set(vocabulary), seed=seed) or vocabulary[:HELDOUT_QUERIES]
    single = np.array([query_class(text) == ONE_WORD for text in vocabulary], bool)
    families = {
        "single keyword": known.embeddings[single],
        "multi-word keyword": known.embeddings[~single],
        "held-out": reference.encode_text(queries),
    }
    classes = {ONE_WORD: ("single keyword",), SEVERAL_WORDS: ("multi-word keyword", "held-out")}
    with step("index calibration"):
        calibration = calibrate(vector_index, embeddings, families, seed=seed, classes=classes)
    vector_index.save(set_dir / VECTOR_INDEX, row_map=f"{EMBEDDINGS}:photo_idx")
    figures["vector_index"] = {
        "factory": vector_index.factory,
        "chosen": factory_choice(vector_index.ntotal, factory),
        "ntotal": vector_index.ntotal,
        "dim": vector_index.dim,
        "params": vector_index.params,
        "params_by_query": vector_index.params_by_query,
        "recall@10_vs_exact": (recall := calibration.pop("unseen_recall")),
        "calibration": calibration,
    }
    with step("clip text runtime"):
        choice = build_text_runtimes(bundle, clip_dir, queries, embeddings, show_progress)
    update_clip_json(clip_dir, text_encoder=choice.runtime, text_runtime=choice.as_dict())
    figures["text_runtime"] = choice.as_dict()
    if show_progress:
        print(
            f"vector index {vector_index.factory}: {vector_index.ntotal:,} x {vector_index.dim}, "
            f"recall@10 vs exact {recall:.3f}; {len(known):,} keywords' query embeddings stored",
            file=sys.stderr,
        )
        print(choice.summary(), file=sys.stderr)
    return figures
