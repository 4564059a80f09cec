"""Training, tuning and selection of the rankers, written into an artifact set's ``rankers/``.

The most recent :data:`VALIDATION_FRACTION` of the training conversions is the validation
slice (never test data). Its queries follow the evaluation protocol (``imgsearch eval``): a
(user, keyword) pair with at least :data:`VALIDATION_MIN_PAIR` conversions in the slice, the
user's earlier photos removed from the candidates; a slice with too few such pairs uses every
pair. The queries are split in two disjoint parts:

* the **tuning** part chooses each ranker's hyper-parameters (``tune``), popularity's stats
  prior (:data:`ALWAYS_TUNED`, always; popularity trains first and, so validated, is every
  other ranker's query prior), FM/DeepFM's epoch count (early stopping) and the weight of the
  query's popularity prior (:data:`PRIOR_WEIGHTS`, always);
* the **selection** part, every other pair with a conversion in the slice (as many queries as
  the slice gives), scores every ranker, as fitted on the conversions before the slice with
  those choices, and :func:`~ranking_service.selection.select_default` ranks them (the served
  configuration is then chosen with the retrievers, ``imgsearch_tools.evaluation.configuration``).

The ``stacked`` ranker learns from the whole slice: its bases are the validation models, and
its validation figures are out-of-fold (:mod:`ranking_service.stacking`).

Then each ranker is refitted on all training conversions with its choices and saved. A
catalogue too small for a validation slice still trains (with default parameters) and serves
popularity, and the manifest says why.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.config import DEFAULT_CANDIDATES_K
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers import RANKER_NAMES, create_ranker, load_ranker, ranker_class
from ranking_service.rankers.common import load_arrays, save_arrays
from ranking_service.rankers.prior import QueryPrior
from ranking_service.rankers.validation import ValidationSet
from ranking_service.selection import (
    MIN_SELECTION_QUERIES,
    select_default,
    skipped_selection,
)

__all__ = [
    "PRIOR_WEIGHTS",
    "TUNING_GRIDS",
    "VALIDATION_FRACTION",
    "TrainingReport",
    "Validation",
    "prepare_validation",
    "train_rankers",
    "tune_prior_weight",
    "tune_ranker_report",
]

# The validation slice: the most recent 20% of the training conversions (never test data).
VALIDATION_FRACTION = 0.2
# Conversions a (user, keyword) pair needs in the slice, as test queries need in the test part:
# on the demo, validating on every pair chose a prior weight 4x the one that pairs like the
# test queries chose, and the latter was the better on test.
VALIDATION_MIN_PAIR = 3
# Validation queries drawn in all (tuning and selection parts together).
MAX_VALIDATION_QUERIES = 6000
# Weights of the query's popularity prior tried for every ranker that blends it.
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
VALIDATION_FILE = "validation.npz"
# Rankers the ranking service always has (it builds them from the catalogue when missing).
ALWAYS_SERVED = ("none", "popularity")
STACKED = "stacked"


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


@dataclass
class Validation:
    """The validation slice of one training run.

    Attributes
    ----------
    catalogue:
        The catalogue with the training conversions before the slice (what validation models
        are fitted on).
    tuning, selection:
        The two disjoint parts of the slice's queries (module docstring).
    skipped:
        Why the slice cannot decide anything ("" when it can).
    later:
        The slice's conversions (time-sorted).
    min_pair:
        Conversions each query's pair has in the slice (at least).
    """

    catalogue: Catalogue
    tuning: ValidationSet
    selection: ValidationSet
    skipped: str = ""
    later: pd.DataFrame | None = None
    min_pair: int = 1

    @property
    def usable(self) -> bool:
        """Whether tuning and selection run on this slice."""
        return not self.skipped

    def summary(self) -> dict:
        """Sizes for the manifest."""
        return {
            "fraction": VALIDATION_FRACTION,
            "conversions": 0 if self.later is None else len(self.later),
            "min_pair": self.min_pair,
            "selection_min_pair": 1,
            "tuning_queries": len(self.tuning),
            "selection_queries": len(self.selection),
            "skipped_pairs": self.tuning.n_skipped,
            "selection_fingerprint": self.selection.fingerprint(),
            **({"skipped": self.skipped} if self.skipped else {}),
        }


def prepare_validation(
    catalogue: Catalogue,
    candidates: CandidateLists,
    fraction: float = VALIDATION_FRACTION,
    max_queries: int | None = MAX_VALIDATION_QUERIES,
    candidates_k: int = DEFAULT_CANDIDATES_K,
    seed: int = 0,
    min_pair: int = VALIDATION_MIN_PAIR,
) -> Validation:
    """Cut the validation slice off the end of ``catalogue.conversions`` and build its queries.

    Parameters
    ----------
    catalogue:
        The catalogue with the training conversions.
    candidates:
        The served retriever's candidates for the conversions' keywords.
    fraction:
        Share of the most recent conversions in the slice.
    max_queries:
        Queries drawn in all (seeded); None for every usable one.
    candidates_k:
        Candidates per query.
    seed:
        Seed of the draw and of the split into tuning and selection parts.
    min_pair:
        Conversions a pair needs in the slice (1 when fewer than enough pairs have them).
    """
    split = temporal_split(catalogue.conversions, fraction)
    earlier = catalogue.with_conversions(split.earlier)

    def build(pairs: int) -> ValidationSet:
        return ValidationSet.build(
            earlier,
            split.later,
            candidates,
            candidates_k=candidates_k,
            max_queries=max_queries,
            seed=seed,
            min_pair=pairs,
        )

    every = build(1)
    for min_pair in dict.fromkeys((min_pair, 1)):
        queries = every if min_pair == 1 else build(min_pair)
        if len(queries) >= 2 * MIN_SELECTION_QUERIES:
            break
    # Tuning keeps pairs like the test queries (``min_pair`` conversions); the selection gets
    # every other pair of the slice.
    tuning, _ = queries.split(0.5, seed=seed)
    selection = every.without(tuning)
    skipped = ""
    if min(len(tuning), len(selection)) < MIN_SELECTION_QUERIES:
        skipped = (
            f"the validation slice (last {fraction:.0%} of {len(catalogue.conversions)} "
            f"training conversions) gives {len(every)} usable queries, fewer than the "
            f"{2 * MIN_SELECTION_QUERIES} that tuning and a paired comparison need"
        )
    return Validation(earlier, tuning, selection, skipped, split.later, min_pair)


@dataclass
class TrainingReport:
    """What :func:`train_rankers` did.

    Attributes
    ----------
    rankers:
        Per trained ranker, its manifest entry (parameters, seconds, tuning, validation).
    selection:
        The default ranker, why, and the validation table
        (:func:`~ranking_service.selection.select_default`).
    skipped:
        Rankers asked for but not trained, with the reason (e.g. no image embeddings).
    validation:
        The validation slice.
    validation_models:
        Per ranker, the model fitted on the conversions before the slice with its choices
        (what the selection scored), for choices made afterwards on the same slice.
    """

    rankers: dict[str, dict]
    selection: dict
    skipped: dict[str, str] = field(default_factory=dict)
    validation: Validation | None = None
    validation_models: dict = field(default_factory=dict)


def _fit_on_slice(
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


def _final_params(name: str, ranker, params: dict) -> dict:
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
            ranker = _fit_on_slice(name, params, validation, candidates, embeddings, show_progress)
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


def train_rankers(
    catalogue: Catalogue,
    names: list[str] | tuple[str, ...],
    out_dir: str | Path,
    candidates: CandidateLists,
    tune: bool = False,
    show_progress: bool = True,
    int8: bool = True,
    embeddings: ImageEmbeddings | None = None,
    kept: dict[str, Path] | None = None,
    candidates_k: int = DEFAULT_CANDIDATES_K,
) -> TrainingReport:
    """Train, validate and save each named ranker, and choose the default (module docstring).

    With ``int8`` (default) DeepFM also goes through the INT8 gate and is saved serving INT8
    only when the gate accepts it; without, it serves FP32 and no gate runs.

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
        Pick hyper-parameters on the tuning part of the slice first (slower).
    show_progress:
        Show training progress.
    int8:
        Gate INT8 for DeepFM.
    embeddings:
        The catalogue's image embeddings (None when the set has no CLIP): ``clip_profile``
        needs them (it is skipped without), FM/DeepFM use them as a dense field.
    kept:
        Rankers of an earlier set that stay as they are (name to their folder): they take part
        in the selection with the validation figures saved beside them, or, when those were
        measured on other queries, refitted on the slice with their saved parameters.
    candidates_k:
        Candidates per validation query: what a search asks of retrieval.

    Returns
    -------
    TrainingReport
    """
    unknown = [name for name in names if name not in RANKER_NAMES]
    if unknown:
        raise ValueError(f"unknown ranker(s) {unknown}; valid names: {', '.join(RANKER_NAMES)}")
    out_dir = Path(out_dir)
    validation = prepare_validation(catalogue, candidates, candidates_k=candidates_k)
    report = TrainingReport(rankers={}, selection={}, validation=validation)
    per_query: dict[str, np.ndarray] = {}
    # Popularity first: its validated parameters are every other ranker's query prior.
    prior: dict = {}
    # Popularity first, stacked last (it stacks the others).
    order = sorted(dict.fromkeys(names), key=lambda name: (name != "popularity", name == STACKED))
    for name in order:
        if name == STACKED:
            _add_stacked(report, catalogue, candidates, embeddings, out_dir, per_query, prior)
            continue
        if ranker_class(name).uses_embeddings and embeddings is None:
            report.skipped[name] = "needs image embeddings; the set has no CLIP"
            continue
        if issubclass(ranker_class(name), QueryPrior) and not prior:
            prior = _prior_params(report, validation, candidates)
        base = {"popularity": prior} if issubclass(ranker_class(name), QueryPrior) else {}
        entry, model, scores = _train_one(
            name,
            catalogue,
            validation,
            candidates,
            embeddings,
            tune,
            show_progress,
            int8,
            out_dir,
            base,
        )
        report.rankers[name] = entry
        if model is not None:
            report.validation_models[name] = model
            per_query[name] = scores
    if validation.usable:
        for name, directory in (kept or {}).items():
            if name not in per_query:
                per_query[name] = _kept_scores(name, directory, validation, candidates, embeddings)
        for name in ALWAYS_SERVED:
            # The served configuration is chosen among validation models: the baselines always
            # have one, also when they were kept from an earlier set.
            if name not in report.validation_models:
                model = _fit_on_slice(name, {}, validation, candidates, embeddings, False)
                report.validation_models[name] = model
                per_query.setdefault(name, validation.selection.per_query_ndcg(model))
        report.selection = select_default(per_query)
        report.selection["validation"] = validation.summary()
    else:
        report.selection = skipped_selection(validation.skipped)
        report.selection["validation"] = validation.summary()
    return report


def _add_stacked(
    report: TrainingReport,
    catalogue: Catalogue,
    candidates: CandidateLists,
    embeddings: ImageEmbeddings | None,
    out_dir: Path,
    per_query: dict,
    prior: dict,
) -> None:
    """Train the stacked ranker over this run's bases (:mod:`ranking_service.stacking`)."""
    from ranking_service.stacking import train_stacked

    validation = report.validation
    if not validation.usable:
        report.skipped[STACKED] = f"needs a validation slice to learn from: {validation.skipped}"
        return
    prior = prior or _prior_params(report, validation, candidates)
    base_params = {
        name: dict(report.rankers[name]["params"])
        if name in report.rankers
        else ({"popularity": prior} if issubclass(ranker_class(name), QueryPrior) else prior)
        for name in RANKER_NAMES
        if name != STACKED
    }
    final_dirs = {name: out_dir / name for name in report.rankers}
    try:
        entry, model, scores = train_stacked(
            catalogue,
            validation,
            report.validation_models,
            final_dirs,
            base_params,
            candidates,
            embeddings,
            out_dir / STACKED,
        )
    except ValueError as error:  # e.g. no held-out query with a converted candidate
        report.skipped[STACKED] = str(error)
        return
    report.rankers[STACKED] = entry
    report.validation_models[STACKED] = model
    per_query[STACKED] = scores


def _train_one(
    name: str,
    catalogue: Catalogue,
    validation: Validation,
    candidates: CandidateLists,
    embeddings: ImageEmbeddings | None,
    tune: bool,
    show_progress: bool,
    int8: bool,
    out_dir: Path,
    base: dict | None = None,
) -> tuple[dict, object, np.ndarray | None]:
    """Validate, refit on all conversions and save one ranker; returns its entry and figures.

    ``base`` holds parameters every fit of the ranker starts from (the query prior's).
    """
    entry: dict = {}
    start = time.perf_counter()
    params: dict = dict(base or {})
    model, scores = None, None
    if validation.usable:
        if tune or name in ALWAYS_TUNED:
            grid = [{**params, **point} for point in (TUNING_GRIDS if tune else ALWAYS_TUNED)[name]]
            tuning = tune_ranker_report(
                name, validation, candidates, embeddings, grid=grid, show_progress=show_progress
            )
            params = tuning["params"]
            model = tuning.get("model")
            entry["tuning"] = {
                "validation_ndcg": round(tuning["validation_ndcg"], 5),
                "n_queries": tuning["n_queries"],
                "grid": tuning["grid"],
            }
        if model is None:
            model = _fit_on_slice(name, params, validation, candidates, embeddings, show_progress)
        if hasattr(model, "popularity_weight"):
            entry["prior_weight"] = tune_prior_weight(model, validation.tuning)
        params = _final_params(name, model, params)
        scores = validation.selection.per_query_ndcg(model)
        entry["validation_ndcg"] = round(float(scores.mean()), 5)
    fit_start = time.perf_counter()
    ranker = create_ranker(name, **params).fit(
        catalogue, show_progress=show_progress, candidates=candidates, embeddings=embeddings
    )
    entry["fit_seconds"] = round(time.perf_counter() - fit_start, 2)
    entry["params"] = getattr(ranker, "params", params)
    if hasattr(ranker, "history"):
        entry["best_epoch"] = ranker.best_epoch
        entry["history"] = ranker.history
    if hasattr(ranker, "fit_figures"):
        entry["fit"] = ranker.fit_figures
    if name == "deepfm":
        entry["int8"] = (
            _int8_gate(ranker, validation) if int8 else {"accepted": False, "skipped": "--no-int8"}
        )
    ranker.save(out_dir / name)
    if scores is not None:
        save_arrays(
            out_dir / name / VALIDATION_FILE,
            per_query_ndcg=scores,
            fingerprint=np.asarray(validation.selection.fingerprint()),
        )
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry, model, scores


def _prior_params(
    report: TrainingReport, validation: Validation, candidates: CandidateLists
) -> dict:
    """The popularity parameters of the rankers' query prior: the validated popularity's.

    Taken from the popularity ranker trained in this run, or else chosen on the tuning part
    of the slice from :data:`ALWAYS_TUNED` (defaults when there is no usable slice).
    """
    if "popularity" in report.rankers:
        return dict(report.rankers["popularity"]["params"])
    if not validation.usable:
        return {}
    tuning = tune_ranker_report(
        "popularity", validation, candidates, None, ALWAYS_TUNED["popularity"]
    )
    return create_ranker("popularity", **tuning["params"]).params


def _kept_scores(
    name: str,
    directory: Path,
    validation: Validation,
    candidates: CandidateLists,
    embeddings: ImageEmbeddings | None,
) -> np.ndarray:
    """Selection figures of a ranker kept from an earlier set: saved ones, else a refit."""
    saved = Path(directory) / VALIDATION_FILE
    if saved.exists():
        arrays = load_arrays(saved)
        if str(arrays["fingerprint"]) == validation.selection.fingerprint():
            return arrays["per_query_ndcg"]
    loaded = load_ranker(name, directory, validation.catalogue, embeddings)
    params = copy.deepcopy(getattr(loaded, "params", {}))
    if name in ("fm", "deepfm"):
        params.update(validation_fraction=0.0)
    model = _fit_on_slice(name, params, validation, candidates, embeddings, False)
    return validation.selection.per_query_ndcg(model)


def _int8_gate(ranker, validation: Validation) -> dict:
    """Run the INT8 gate on the validation slice's tuning queries."""
    from ranking_service.rankers.int8 import format_int8_gate, int8_gate

    if len(validation.tuning) == 0:
        return {"accepted": False, "skipped": "no validation queries"}
    figures = int8_gate(ranker, validation.tuning)
    figures["summary"] = format_int8_gate(figures)
    return figures
