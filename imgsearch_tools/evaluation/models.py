"""The models an evaluation compares: rankers trained as ``imgsearch build`` trains them, and
the CLIP and hybrid retrievers, loaded from an artifact set or trained on the catalogue."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.catalogue import Catalogue
from imgsearch_tools.evaluation.options import CLIP_RETRIEVERS, EvalConfig, EvaluationError
from imgsearch_tools.evaluation.report import jsonable


def fit_rankers(
    names: list[str],
    train_catalogue: Catalogue,
    tune: bool,
    show_progress: bool,
    workdir: str | Path | None = None,
    retriever=None,
    embeddings=None,
    candidates_k: int = 100,
) -> tuple[dict, dict, object]:
    """Train each ranker on the training catalogue the way ``imgsearch build`` does, and load it.

    Training goes through ``ranking_service.training.train_rankers`` (the validation slice cut
    from the training part; tuning when ``tune``; the default ranker's selection; DeepFM's INT8
    gate) with ``retriever``'s candidates for the training keywords, as ``build`` hands them,
    and each model is saved and loaded back, so the evaluation measures exactly what the
    ranking service serves.

    Parameters
    ----------
    names:
        Ranker names.
    train_catalogue:
        The catalogue restricted to the training conversions.
    tune:
        Tune hyper-parameters first.
    show_progress:
        Show training progress.
    workdir:
        Where the models are written; a temporary folder when None.
    retriever:
        The retriever served by default; the keyword index of the catalogue when None.
    embeddings:
        The catalogue's image embeddings (``clip_profile`` is skipped without).
    candidates_k:
        Candidates per validation query, as per test query.

    Returns
    -------
    rankers : dict
        Name to loaded :class:`~ranking_service.rankers.base.Ranker`.
    info : dict
        Name to what training reported (parameters, seconds, tuning, INT8 gate), and the
        skipped rankers with the reason.
    training : ranking_service.training.TrainingReport
        The whole report (selection, validation slice and models), or None without names.
    """
    if not names:
        return {}, {}, None
    from imgsearch_tools.offline_candidates import served_candidates
    from ranking_service.rankers import load_ranker
    from ranking_service.training import train_rankers

    if retriever is None:
        from retrieval_service.keyword_index import KeywordIndex

        retriever = KeywordIndex.from_keywords(train_catalogue.keywords)
    candidates = served_candidates(train_catalogue, retriever, show_progress)
    with tempfile.TemporaryDirectory(prefix="imgsearch-rankers-") as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp)
        training = train_rankers(
            train_catalogue,
            list(names),
            out_dir,
            candidates,
            tune=tune,
            show_progress=show_progress,
            embeddings=embeddings,
            candidates_k=candidates_k,
        )
        rankers = {
            name: load_ranker(name, out_dir / name, train_catalogue, embeddings)
            for name in names
            if name in training.rankers
        }
    info = {}
    for name in names:
        if name in training.skipped:
            info[name] = {"skipped": training.skipped[name]}
            continue
        entry = dict(training.rankers.get(name, {}))
        entry.pop("history", None)  # per-epoch figures: in the artifact manifest, not here
        info[name] = jsonable(entry)
    return rankers, info, training


def clip_retrievers(
    catalogue: Catalogue,
    keyword_index,
    config: EvalConfig,
    workdir: Path,
) -> tuple[dict, str, dict]:
    """Build or load the CLIP and hybrid retrievers when the catalogue supports them.

    Torch's thread setting is left as it is (rankers train next).

    Returns
    -------
    retrievers : dict
        ``{"clip": ..., "hybrid": ...}``, empty when unavailable.
    reason : str
        Why they are unavailable ("" when available).
    info : dict
        Where CLIP came from and what building it reported; ``embeddings`` is the set's
        :class:`~imgsearch.image_embeddings.ImageEmbeddings` (not JSON: popped by the caller).
    """
    n_images = int(catalogue.photos["has_image"].sum()) if "has_image" in catalogue.photos else 0
    if n_images == 0 and not config.clip_artifacts:
        return {}, "catalogue has no images (images/<photo_id>.jpg): CLIP needs them", {}
    try:
        from imgsearch_tools.demo_data import query_families
        from retrieval_service.clip_artifacts import build_clip_artifacts
        from retrieval_service.semantic import load_clip_retrievers
    except ImportError as exc:
        return {}, f"CLIP retrieval is not available: {exc}", {}
    if config.clip_artifacts:
        set_dir = Path(config.clip_artifacts)
        if (set_dir / "current").exists():  # an artifact root: use its current set
            set_dir = (set_dir / "current").resolve()
        info = {"source": f"loaded from {set_dir}"}
        mismatch = _clip_set_mismatch(set_dir, catalogue)
        if mismatch:
            raise EvaluationError(f"--clip-artifacts {set_dir}: {mismatch}")
    else:
        set_dir = workdir / "clip_set"
        set_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        built = build_clip_artifacts(
            catalogue,
            set_dir,
            None,
            train_steps=config.clip_steps,
            show_progress=config.show_progress,
            query_families=query_families(catalogue),
        )
        if "skipped" in built:
            return {}, str(built["skipped"]), {}
        info = {
            "source": f"trained here on all photos' images and keywords, {config.clip_steps} steps",
            "build_s": round(time.perf_counter() - start, 1),
            "build": jsonable(built),
        }
    # No query-embedding cache and no stored keyword embeddings: every query pays for its text
    # encoding, so the latency figures are the uncached worst case rather than a hit rate.
    loaded = load_clip_retrievers(
        set_dir, keyword_index, threads=None, cache_size=0, known_queries=False
    )
    if not loaded:
        return {}, f"no CLIP artifacts (clip/, embeddings, vector index) in {set_dir}", info
    from imgsearch.artifacts import EMBEDDINGS
    from imgsearch.image_embeddings import ImageEmbeddings

    info["embeddings"] = ImageEmbeddings.load(set_dir / EMBEDDINGS)
    return {n: loaded[n] for n in CLIP_RETRIEVERS if n in loaded}, "", info


def _clip_set_mismatch(set_dir: Path, catalogue: Catalogue) -> str:
    """Why a CLIP artifact set cannot belong to this catalogue ("" when it may)."""
    from imgsearch.artifacts import CATALOGUE_DIR, EMBEDDINGS

    photos_table = set_dir / CATALOGUE_DIR / "photos.parquet"
    if photos_table.exists():  # a full artifact set: compare the photo ids themselves
        ids = pd.read_parquet(photos_table, columns=["photo_id"])["photo_id"].astype(str)
        if ids.tolist() != catalogue.photos["photo_id"].astype(str).tolist():
            return "its catalogue's photo ids differ from this catalogue's"
        return ""
    path = set_dir / EMBEDDINGS
    if not path.exists():
        return ""  # reported as "no CLIP artifacts" after loading
    with np.load(path, allow_pickle=False) as data:
        photo_idx = data["photo_idx"]
    if len(photo_idx) and int(photo_idx.max()) >= catalogue.n_photos:
        return (
            f"its embeddings index photos up to {int(photo_idx.max())}, but the catalogue has "
            f"{catalogue.n_photos} photos: it was built for another catalogue"
        )
    return ""
