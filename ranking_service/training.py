"""Training and tuning of the rankers, written into an artifact set's ``rankers/<name>/``."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.protocol import temporal_split
from ranking_service.rankers import RANKER_NAMES, create_ranker
from ranking_service.rankers.validation import ValidationSet

__all__ = [
    "TUNING_GRIDS",
    "VALIDATION_FRACTION",
    "train_rankers",
    "tune_ranker",
    "tune_ranker_report",
]

# The tuning slice: the most recent 10% of the training conversions (never test data).
VALIDATION_FRACTION = 0.1
MAX_VALIDATION_QUERIES = 3000


def _product(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


# Small grids. ALS: few factors with strong regularisation often beats the library defaults on
# real interaction data (Rendle et al. 2021, FIGURES.md), so the grid leans that way; its
# iteration count is read off one fit per point. FM/DeepFM: epochs come from early stopping.
TUNING_GRIDS: dict[str, list[dict]] = {
    "none": [{}],
    "popularity": [{"per_keyword": False}]
    + _product(per_keyword=[True], keyword_prior=[5.0, 20.0, 100.0]),
    "als": _product(factors=[8, 16, 32, 64], regularization=[1.0, 10.0, 100.0]),
    "fm": _product(factors=[16, 32], l2=[0.01, 0.03]),
    "deepfm": _product(factors=[16, 32], mlp_weight_decay=[1e-3]),
}
ALS_ITERATION_CHECKPOINTS = (5, 10, 15, 25)


def tune_ranker_report(
    name: str,
    catalogue: Catalogue,
    candidates: CandidateLists,
    grid: list[dict] | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    candidates_k: int = 100,
    max_queries: int | None = MAX_VALIDATION_QUERIES,
    show_progress: bool = False,
) -> dict:
    """Pick a ranker's parameters on a validation slice cut from the end of the conversions.

    Every grid point is fitted on the first ``1 - validation_fraction`` of
    ``catalogue.conversions`` (by time) and scored by NDCG@10 on the rest
    (:class:`~ranking_service.rankers.validation.ValidationSet`). ALS also picks its
    iteration count (scored at :data:`ALS_ITERATION_CHECKPOINTS` during one fit); FM and DeepFM
    their epoch count (early stopping on the slice), returned with ``validation_fraction=0``
    so that the final fit trains exactly that many epochs on all conversions.

    Parameters
    ----------
    name:
        A ranker name.
    catalogue:
        The catalogue with the training conversions only.
    candidates:
        The served retriever's candidates for the conversions' keywords.
    grid:
        Parameter sets to try; defaults to :data:`TUNING_GRIDS` ``[name]``.
    validation_fraction:
        Share of the most recent conversions held out.
    candidates_k:
        Candidates per validation query.
    max_queries:
        Validation queries scored per grid point (a seeded draw); None for all.
    show_progress:
        Show training progress.

    Returns
    -------
    dict
        ``params`` (the best constructor parameters), ``validation_ndcg`` (its NDCG@10),
        ``grid`` (every tried point with its figure) and ``n_queries``.
    """
    if name not in RANKER_NAMES:
        raise ValueError(f"unknown ranker {name!r}; valid names: {', '.join(RANKER_NAMES)}")
    grid = TUNING_GRIDS[name] if grid is None else grid
    split = temporal_split(catalogue.conversions, validation_fraction)
    train_catalogue = catalogue.with_conversions(split.earlier)
    validation = ValidationSet.build(
        train_catalogue, split.later, candidates, candidates_k=candidates_k, max_queries=max_queries
    )
    tried: list[dict] = []
    for params in grid:
        start = time.perf_counter()
        if name == "als":
            tried += _tune_als_point(params, train_catalogue, validation, show_progress)
        elif name in ("fm", "deepfm"):
            ranker = create_ranker(name, **params)
            ranker.fit(
                train_catalogue,
                show_progress=show_progress,
                candidates=candidates,
                validation=validation,
            )
            best = max(ranker.history, key=lambda entry: entry.get("validation_ndcg", -1.0))
            chosen = {**params, "epochs": ranker.best_epoch, "validation_fraction": 0.0}
            tried.append({"params": chosen, "validation_ndcg": best.get("validation_ndcg", 0.0)})
        else:
            ranker = create_ranker(name, **params).fit(train_catalogue, show_progress=False)
            tried.append({"params": dict(params), "validation_ndcg": validation.ndcg(ranker)})
        tried[-1]["fit_seconds"] = round(time.perf_counter() - start, 2)
    best = max(tried, key=lambda entry: entry["validation_ndcg"])
    return {
        "params": best["params"],
        "validation_ndcg": best["validation_ndcg"],
        "grid": tried,
        "n_queries": len(validation),
    }


def _tune_als_point(
    params: dict, catalogue: Catalogue, validation: ValidationSet, show_progress: bool
) -> list[dict]:
    """Fit ALS once and score it at each iteration checkpoint."""
    checkpoints = [n for n in ALS_ITERATION_CHECKPOINTS if n <= params.get("iterations", 10**9)]
    ranker = create_ranker("als", **{**params, "iterations": max(checkpoints)})
    scored = []

    def on_iteration(done: int) -> None:
        if done in checkpoints:
            ndcg = validation.ndcg(ranker)
            scored.append({"params": {**params, "iterations": done}, "validation_ndcg": ndcg})

    ranker.fit(catalogue, show_progress=show_progress, iteration_callback=on_iteration)
    return scored


def tune_ranker(name: str, catalogue: Catalogue, candidates: CandidateLists, **options) -> dict:
    """Return the best constructor parameters of ranker ``name`` (see :func:`tune_ranker_report`).

    Parameters
    ----------
    name:
        A ranker name.
    catalogue:
        The catalogue with the training conversions only.
    candidates:
        The served retriever's candidates for the conversions' keywords.
    **options:
        Passed to :func:`tune_ranker_report`.

    Returns
    -------
    dict
        Keyword arguments for ``create_ranker(name, **params)``.
    """
    return tune_ranker_report(name, catalogue, candidates, **options)["params"]


def train_rankers(
    catalogue: Catalogue,
    names: list[str] | tuple[str, ...],
    out_dir: str | Path,
    candidates: CandidateLists,
    tune: bool = False,
    show_progress: bool = True,
    int8: bool = True,
) -> dict:
    """Train each named ranker on ``catalogue.conversions`` and save it to ``out_dir/<name>/``.

    With ``int8`` (default) DeepFM also goes through the INT8 gate (on the last
    :data:`VALIDATION_FRACTION` of the conversions) and is saved serving INT8 only when the
    gate accepts it; without, it serves FP32 and no gate runs.

    Parameters
    ----------
    catalogue:
        The catalogue; its conversions are the training data.
    names:
        Ranker names (see :data:`~ranking_service.rankers.RANKER_NAMES`).
    out_dir:
        The artifact set's rankers folder.
    candidates:
        The served retriever's candidates for the conversions' keywords (validation queries
        and hard negatives come from them).
    tune:
        Pick parameters with :func:`tune_ranker_report` first (slower).
    show_progress:
        Show training progress.

    Returns
    -------
    dict
        Per ranker: ``params``, ``fit_seconds``, and where measured ``tuning``,
        ``history``/``best_epoch`` (FM, DeepFM) and ``int8`` (the gate's figures), for the
        artifact manifest.
    """
    unknown = [name for name in names if name not in RANKER_NAMES]
    if unknown:
        raise ValueError(f"unknown ranker(s) {unknown}; valid names: {', '.join(RANKER_NAMES)}")
    out_dir = Path(out_dir)
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(names):
        entry: dict = {}
        start = time.perf_counter()
        params: dict = {}
        if tune:
            report = tune_ranker_report(name, catalogue, candidates, show_progress=show_progress)
            params = report["params"]
            entry["tuning"] = {
                "validation_ndcg": round(report["validation_ndcg"], 5),
                "n_queries": report["n_queries"],
                "grid": report["grid"],
            }
        fit_start = time.perf_counter()
        ranker = create_ranker(name, **params).fit(
            catalogue, show_progress=show_progress, candidates=candidates
        )
        entry["fit_seconds"] = round(time.perf_counter() - fit_start, 2)
        entry["params"] = getattr(ranker, "params", params)
        if hasattr(ranker, "history"):
            entry["best_epoch"] = ranker.best_epoch
            entry["history"] = ranker.history
        if name == "deepfm":
            entry["int8"] = (
                _int8_gate(ranker, catalogue, candidates)
                if int8
                else {"accepted": False, "skipped": "--no-int8"}
            )
        ranker.save(out_dir / name)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        summary[name] = entry
    return summary


def _int8_gate(ranker, catalogue: Catalogue, candidates: CandidateLists) -> dict:
    """Run the INT8 gate on the last slice of the training conversions."""
    from ranking_service.rankers.int8 import format_int8_gate, int8_gate

    split = temporal_split(catalogue.conversions, VALIDATION_FRACTION)
    validation = ValidationSet.build(
        catalogue.with_conversions(split.earlier),
        split.later,
        candidates,
        max_queries=MAX_VALIDATION_QUERIES,
    )
    if len(validation) == 0:
        return {"accepted": False, "skipped": "no validation queries"}
    figures = int8_gate(ranker, validation)
    figures["summary"] = format_int8_gate(figures)
    return figures
