"""Training and selection of the rankers, written into an artifact set's ``rankers/``.

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

The slice is cut in :mod:`ranking_service.validation_slice`, the grids tried on it are in
:mod:`ranking_service.tuning`. Then each ranker is refitted on all training conversions with
its choices and saved. A
catalogue too small for a validation slice still trains (with default parameters) and serves
popularity, and the manifest says why.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.config import DEFAULT_CANDIDATES_K
from imgsearch.image_embeddings import ImageEmbeddings
from imgsearch.names import check_names
from ranking_service.rankers import RANKER_NAMES, create_ranker, load_ranker, ranker_class
from ranking_service.rankers.common import load_arrays, save_arrays
from ranking_service.rankers.prior import QueryPrior
from ranking_service.selection import (
    select_default,
    skipped_selection,
)
from ranking_service.tuning import (
    ALWAYS_TUNED,
    TUNING_GRIDS,
    final_params,
    fit_on_slice,
    tune_prior_weight,
    tune_ranker_report,
)
from ranking_service.validation_slice import (
    VALIDATION_FILE,
    Validation,
    prepare_validation,
)

# Rankers the ranking service always has (it builds them from the catalogue when missing).
ALWAYS_SERVED = ("none", "popularity")

STACKED = "stacked"


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
    candidates, embeddings:
        What the rankers were fitted with (a second fold refits them:
        :mod:`ranking_service.earlier_fold`).
    """

    rankers: dict[str, dict]
    selection: dict
    skipped: dict[str, str] = field(default_factory=dict)
    validation: Validation | None = None
    validation_models: dict = field(default_factory=dict)
    candidates: CandidateLists | None = None
    embeddings: ImageEmbeddings | None = None


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
    names = check_names(names, RANKER_NAMES, "ranker")
    out_dir = Path(out_dir)
    validation = prepare_validation(catalogue, candidates, candidates_k=candidates_k)
    report = TrainingReport(
        rankers={},
        selection={},
        validation=validation,
        candidates=candidates,
        embeddings=embeddings,
    )
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
                model = fit_on_slice(name, {}, validation, candidates, embeddings, False)
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
            base_scores=per_query,
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
            model = fit_on_slice(name, params, validation, candidates, embeddings, show_progress)
        if hasattr(model, "popularity_weight"):
            entry["prior_weight"] = tune_prior_weight(model, validation.tuning)
        params = final_params(name, model, params)
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
    model = fit_on_slice(name, params, validation, candidates, embeddings, False)
    return validation.selection.per_query_ndcg(model)


def _int8_gate(ranker, validation: Validation) -> dict:
    """Run the INT8 gate on the validation slice's tuning queries."""
    from ranking_service.rankers.int8 import format_int8_gate, int8_gate

    if len(validation.tuning) == 0:
        return {"accepted": False, "skipped": "no validation queries"}
    figures = int8_gate(ranker, validation.tuning)
    figures["summary"] = format_int8_gate(figures)
    return figures
