"""Training the ``stacked`` ranker in a build: bases from the slice, the stacker out-of-fold.

The bases' validation models (fitted on the conversions before the validation slice, with the
parameters and prior weights validation chose) give the features of the slice's queries. The
stacker is fitted :data:`FOLDS` times, each time without the queries of one fold of users:
scored with the fold's model, every selection query is judged by a stacker that never saw its
user's queries (the figure the selection compares). The served stacker is then fitted on every
query of the slice, over the bases refitted on all conversions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ranking_service.rankers import create_ranker, load_ranker, ranker_class
from ranking_service.rankers.stack_features import StackFeatures
from ranking_service.rankers.stacked import (
    BASES,
    MAX_STACK_QUERIES,
    QueryRows,
    StackedRanker,
    sample_rows,
)
from ranking_service.rankers.validation import ValidationSet

# Folds of users for the out-of-fold figures.
FOLDS = 3


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
    stacked.features = StackFeatures.fit(catalogue, embeddings)
    stacked.save(out_dir)
    entry = {
        "params": stacked.params,
        "fit": stacked.fit_figures,
        "folds": FOLDS,
        "validation_ndcg": round(float(scores.mean()), 5),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return entry, out_of_fold, scores


def _union(first: ValidationSet, second: ValidationSet) -> ValidationSet:
    """Both parts' queries (disjoint pairs) as one set."""
    return ValidationSet(
        first.queries + second.queries, first.relevant + second.relevant, first.n_skipped
    )
