"""Training the ``stacked`` ranker in a build: bases from the slice, the stacker out-of-fold.

The bases' validation models (fitted on the conversions before the validation slice, with the
parameters and prior weights validation chose) give the features of the slice's queries. The
stacker is fitted :data:`FOLDS` times, each time without the queries of one fold of users:
scored with the fold's model, every selection query is judged by a stacker that never saw its
user's queries (the figure the selection compares). The served stacker is then fitted on every
query of the slice, over the bases refitted on all conversions. When the trees' out-of-fold
figure does not beat their best base's on the same queries, the ranker serves that base's
order (:func:`judge_stacker`), and the manifest says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from imgsearch.ranking_metrics import paired_bootstrap_ci
from ranking_service.rankers import create_ranker, load_ranker, ranker_class
from ranking_service.rankers.stack_features import StackFeatures
from ranking_service.rankers.stacked import (
    BASES,
    MAX_STACK_QUERIES,
    QueryRows,
    StackedRanker,
    sample_rows,
    share_popularity,
)
from ranking_service.rankers.validation import ValidationSet

# Folds of users for the out-of-fold figures.
FOLDS = 3
# How far the trees' validation NDCG@10 must be above their best base's to be served
# (judge_stacker): fixed before any test figure of the rule was looked at.
MIN_GAIN_OVER_BASE = 0.0


def train_stacked(
    catalogue,
    validation,
    validation_models: dict,
    final_dirs: dict[str, Path],
    base_params: dict[str, dict],
    candidates,
    embeddings,
    out_dir: Path,
    seed: int = 0,
    base_scores: dict[str, np.ndarray] | None = None,
) -> tuple[dict, StackedRanker, np.ndarray]:
    """Fit, save and validate the stacked ranker (module docstring).

    Parameters
    ----------
    catalogue:
        The catalogue with all training conversions.
    validation:
        The slice (``ranking_service.validation_slice.Validation``), usable.
    validation_models:
        Base name to its model fitted before the slice (fitted here when missing).
    final_dirs:
        Base name to the folder where this build saved its refit on all conversions (refitted
        here when missing).
    base_params:
        Base name to its chosen parameters.
    candidates, embeddings:
        As the other rankers get them.
    out_dir:
        Where the stacked ranker is saved.
    base_scores:
        Per base, its per-query NDCG@10 on ``validation.selection`` when already measured.

    Returns
    -------
    entry : dict
        The manifest entry.
    model : StackedRanker
        The out-of-fold validation model.
    scores : numpy.ndarray
        Its per-query NDCG@10 on ``validation.selection``.
    """
    start = time.perf_counter()
    bases = [b for b in BASES if embeddings is not None or not ranker_class(b).uses_embeddings]
    params = {name: dict(base_params.get(name, {})) for name in bases}
    stacked = StackedRanker(bases=bases, base_params=params, seed=seed)
    held_out = {
        name: validation_models.get(name)
        or create_ranker(name, **params[name]).fit(
            validation.catalogue, show_progress=False, candidates=candidates, embeddings=embeddings
        )
        for name in stacked.bases
    }
    everything = _union(validation.tuning, validation.selection)
    queries = everything.queries
    if len(queries) > MAX_STACK_QUERIES:
        keep = np.sort(np.random.default_rng(seed).choice(len(queries), MAX_STACK_QUERIES, False))
        queries = [queries[i] for i in keep]
        relevant = [everything.relevant[i] for i in keep]
    else:
        relevant = everything.relevant
    features = StackFeatures.fit(validation.catalogue, embeddings)
    n_users = max(catalogue.n_users, 1)
    fold_of_user = np.random.default_rng(seed).permutation(n_users) % FOLDS
    user_fold = np.asarray([fold_of_user[q.user_idx] for q in queries], dtype=np.int64)
    # The bases score each query once; every fold's fit and the served fit sample from that.
    scored = QueryRows.score(queries, relevant, held_out, features)
    boosters = [
        stacked.train_booster(sample_rows(scored, np.flatnonzero(user_fold != fold), seed))
        for fold in range(FOLDS)
    ]
    out_of_fold = StackedRanker(bases=stacked.bases, base_params=params, seed=seed)
    out_of_fold.base_models, out_of_fold.features = held_out, features
    out_of_fold.boosters, out_of_fold.fold_of_user = boosters, fold_of_user
    scores = validation.selection.per_query_ndcg(out_of_fold)
    known = base_scores or {}
    judged = judge_stacker(
        scores,
        {
            name: known[name] if name in known else validation.selection.per_query_ndcg(model)
            for name, model in held_out.items()
        },
        seed=seed,
    )
    if judged["serves"] is not None:
        stacked.serves = out_of_fold.serves = judged["serves"]
        scores = validation.selection.per_query_ndcg(out_of_fold)

    stacked.boosters = [stacked.train_booster(sample_rows(scored))]
    stacked.base_models = {
        name: (
            load_ranker(name, final_dirs[name], catalogue, embeddings)
            if name in final_dirs
            else create_ranker(name, **params[name]).fit(
                catalogue, show_progress=False, candidates=candidates, embeddings=embeddings
            )
        )
        for name in stacked.bases
    }
    share_popularity(stacked.base_models)
    stacked.features = StackFeatures.fit(catalogue, embeddings)
    stacked.save(out_dir)
    entry = {
        "params": stacked.params,
        "fit": stacked.fit_figures,
        "folds": FOLDS,
        "rule": judged,
        "validation_ndcg": round(float(scores.mean()), 5),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return entry, out_of_fold, scores


def judge_stacker(
    stacked: np.ndarray, bases: dict[str, np.ndarray], n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """The stacker's rule: its trees serve only if they beat their best base on validation.

    ``stacked`` is the trees' out-of-fold per-query NDCG@10 on the selection queries and
    ``bases`` each base's on the same queries. The trees are served when their mean is above
    the best base's mean by more than :data:`MIN_GAIN_OVER_BASE`; else the ranker serves that
    base's order, which is then exactly what the base would serve. The paired interval is
    reported, not required: the out-of-fold figure is already an honest one (no query scored
    by trees fitted on it), and demanding significance would withhold the trees on slices too
    small to show a gain that is there.

    Returns
    -------
    dict
        ``serves`` (None: the trees; else the base), ``best_base``, both means, the paired
        difference and its 95% interval, ``n_queries`` and ``reason``.
    """
    best = max(bases, key=lambda name: (float(bases[name].mean()), name == "popularity"))
    diff, lo, hi = paired_bootstrap_ci(stacked, bases[best], n=n_bootstrap, seed=seed)
    trees = diff > MIN_GAIN_OVER_BASE
    figures = (
        f"out-of-fold NDCG@10 {stacked.mean():.4f} vs {best} {bases[best].mean():.4f} "
        f"({diff:+.4f}, paired 95% CI {lo:+.4f} to {hi:+.4f}, {len(stacked)} queries)"
    )
    return {
        "serves": None if trees else best,
        "best_base": best,
        "stacked_ndcg": round(float(stacked.mean()), 5),
        "best_base_ndcg": round(float(bases[best].mean()), 5),
        "diff": round(float(diff), 5),
        "ci": [round(float(lo), 5), round(float(hi), 5)],
        "n_queries": int(len(stacked)),
        "min_gain": MIN_GAIN_OVER_BASE,
        "reason": (
            f"the trees beat their best base: {figures}"
            if trees
            else f"the trees do not beat their best base, serving {best}'s order: {figures}"
        ),
    }


def _union(first: ValidationSet, second: ValidationSet) -> ValidationSet:
    """Both parts' queries (disjoint pairs) as one set."""
    return ValidationSet(
        first.queries + second.queries, first.relevant + second.relevant, first.n_skipped
    )
