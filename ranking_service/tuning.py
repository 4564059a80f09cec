"""Each ranker's hyper-parameters, tuned on the validation slice's tuning part: the grids, the
query prior's weight, and the refit parameters that follow from them."""

from __future__ import annotations

import itertools
import time

from imgsearch.candidates import CandidateLists
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers import RANKER_NAMES, create_ranker
from ranking_service.rankers.validation import ValidationSet
from ranking_service.validation_slice import Validation

# Weights of the query's popularity prior tried for every ranker that blends it.
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _product(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


# Grids sized for two cores. ALS: few factors with strong regularisation often beat the library
# defaults on real interaction data (Rendle et al. 2021, "Revisiting the Performance of iALS on
# Item Recommendation Benchmarks"), so the grid leans that way; alpha scales the confidence of
# the counts; the iteration count is read off one fit per point (ALS_ITERATION_CHECKPOINTS).
# FM/DeepFM: learning rate and how the negatives from all photos are drawn; epochs come from
# early stopping. EASE: its one L2 weight. The prior's weight is tuned apart, for every ranker.
TUNING_GRIDS: dict[str, list[dict]] = {
    "none": [{}],
    "popularity": [{"per_keyword": False}]
    + _product(per_keyword=[True], keyword_prior=[5.0, 20.0, 100.0], stats_strength=[0.0, 32.0]),
    "als": _product(factors=[8, 16, 32, 64], regularization=[1.0, 10.0, 100.0], alpha=[1.0, 10.0]),
    "fm": _product(learning_rate=[0.001, 0.003, 0.01], negative_sampling=["uniform", "popularity"]),
    "deepfm": _product(
        learning_rate=[0.001, 0.003, 0.01], negative_sampling=["uniform", "popularity"]
    ),
    "ease": _product(l2=[10.0, 50.0, 200.0, 1000.0]),
    "item_knn": _product(shrink=[0.0, 10.0, 100.0], neighbours=[50, 200]),
    "clip_profile": _product(half_life=[10.0, 50.0, 1000.0], ridge=[0.03, 0.1, 0.3, 1.0]),
}

ALS_ITERATION_CHECKPOINTS = (5, 10, 15, 25)

# Grids tried even without ``tune``, being nearly free: whether popularity leans on the photos'
# views and downloads, and how much (the stats prior's strength; 0 is the counts alone). The
# served baseline is then the best of these on validation, the bar every ranker has to clear.
ALWAYS_TUNED: dict[str, list[dict]] = {
    "popularity": _product(stats_strength=[0.0, 8.0, 32.0, 128.0]),
}


def fit_on_slice(
    name: str,
    params: dict,
    validation: Validation,
    candidates: CandidateLists,
    embeddings: ImageEmbeddings | None,
    show_progress: bool,
):
    """Fit ``name`` on the conversions before the slice (FM/DeepFM stop early on tuning)."""
    ranker = create_ranker(name, **params)
    extra = {"validation": validation.tuning} if name in ("fm", "deepfm") else {}
    return ranker.fit(
        validation.catalogue,
        show_progress=show_progress,
        candidates=candidates,
        embeddings=embeddings,
        **extra,
    )


def final_params(name: str, ranker, params: dict) -> dict:
    """The parameters of the fit on all conversions, from the validation model's choices."""
    chosen = {**params}
    if hasattr(ranker, "popularity_weight"):
        chosen["popularity_weight"] = ranker.popularity_weight
    if name in ("fm", "deepfm"):
        chosen.update(epochs=max(1, ranker.best_epoch), validation_fraction=0.0)
    return chosen


def tune_prior_weight(ranker, validation: ValidationSet, weights=PRIOR_WEIGHTS) -> dict:
    """Set ``ranker.popularity_weight`` to the best of ``weights`` on ``validation``.

    Ties go to the smaller weight (the ranker's own order).

    Returns
    -------
    dict
        ``popularity_weight`` (the choice) and ``grid`` (each weight's NDCG@10).
    """
    tried = []
    for weight in weights:
        ranker.popularity_weight = float(weight)
        ndcg = validation.ndcg(ranker)
        tried.append({"popularity_weight": float(weight), "validation_ndcg": ndcg})
    best = max(tried, key=lambda entry: entry["validation_ndcg"])
    ranker.popularity_weight = best["popularity_weight"]
    return {"popularity_weight": best["popularity_weight"], "grid": tried}


def tune_ranker_report(
    name: str,
    validation: Validation,
    candidates: CandidateLists,
    embeddings: ImageEmbeddings | None = None,
    grid: list[dict] | None = None,
    show_progress: bool = False,
) -> dict:
    """Pick a ranker's hyper-parameters on the tuning part of the validation slice.

    Every grid point is fitted on the conversions before the slice and scored by NDCG@10 on
    ``validation.tuning``. ALS also picks its iteration count (scored at
    :data:`ALS_ITERATION_CHECKPOINTS` during one fit); FM and DeepFM their epoch count (early
    stopping on the same part).

    Parameters
    ----------
    name:
        A ranker name.
    validation:
        The slice (:func:`prepare_validation`).
    candidates:
        The served retriever's candidates for the conversions' keywords.
    embeddings:
        The catalogue's image embeddings, for rankers that use them.
    grid:
        Parameter sets to try; defaults to :data:`TUNING_GRIDS` ``[name]``.
    show_progress:
        Show training progress.

    Returns
    -------
    dict
        ``params`` (the best constructor parameters), ``validation_ndcg`` (its NDCG@10),
        ``grid`` (every tried point with its figure), ``n_queries`` and, except for ALS,
        ``model`` (the best point's fitted ranker).
    """
    if name not in RANKER_NAMES:
        raise ValueError(f"unknown ranker {name!r}; valid names: {', '.join(RANKER_NAMES)}")
    grid = TUNING_GRIDS[name] if grid is None else grid
    tried: list[dict] = []
    best_model, best_ndcg = None, -1.0
    for params in grid:
        start = time.perf_counter()
        if name == "als":
            tried += _tune_als_point(params, validation, show_progress)
        else:
            ranker = fit_on_slice(name, params, validation, candidates, embeddings, show_progress)
            ndcg = validation.tuning.ndcg(ranker)
            tried.append({"params": dict(params), "validation_ndcg": ndcg})
            if name in ("fm", "deepfm"):
                tried[-1]["best_epoch"] = ranker.best_epoch
            if ndcg > best_ndcg:
                best_model, best_ndcg = ranker, ndcg
        tried[-1]["fit_seconds"] = round(time.perf_counter() - start, 2)
    best = max(tried, key=lambda entry: entry["validation_ndcg"])
    report = {
        "params": best["params"],
        "validation_ndcg": best["validation_ndcg"],
        "grid": tried,
        "n_queries": len(validation.tuning),
    }
    if best_model is not None:
        report["model"] = best_model
    return report


def _tune_als_point(params: dict, validation: Validation, show_progress: bool) -> list[dict]:
    """Fit ALS once and score it at each iteration checkpoint."""
    checkpoints = [n for n in ALS_ITERATION_CHECKPOINTS if n <= params.get("iterations", 10**9)]
    ranker = create_ranker("als", **{**params, "iterations": max(checkpoints)})
    scored = []

    def on_iteration(done: int) -> None:
        if done in checkpoints:
            ndcg = validation.tuning.ndcg(ranker)
            scored.append({"params": {**params, "iterations": done}, "validation_ndcg": ndcg})

    ranker.fit(validation.catalogue, show_progress=show_progress, iteration_callback=on_iteration)
    return scored
