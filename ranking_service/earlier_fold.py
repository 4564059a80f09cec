"""A second time-ordered fold for choices on a small slice: the slice before the validation slice.

When the validation slice gives too few selection queries, the served configuration is also
judged on the time slice just before it (the same share of the conversions that precede the
validation slice). Every validation model is refitted on the conversions before that earlier
slice with the parameters the validation slice chose for it, so each fold's queries are scored
by models that never saw a conversion of their slice or after it. The ``stacked`` ranker keeps
its out-of-fold trees (fitted on the validation slice's queries, none of which is in the
earlier slice) over its bases refitted there, and serves the same base's order when its rule
chose one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import temporal_split
from ranking_service.rankers import create_ranker
from ranking_service.rankers.stack_features import StackFeatures
from ranking_service.rankers.stacked import StackedRanker, share_popularity
from ranking_service.validation_slice import VALIDATION_FRACTION


@dataclass
class EarlierFold:
    """The time slice before the validation slice and the models fitted before it.

    Attributes
    ----------
    catalogue:
        The catalogue with the conversions before the earlier slice.
    later:
        The earlier slice's conversions.
    models:
        Ranker name to its model fitted on ``catalogue`` with the validation slice's choices.
    """

    catalogue: Catalogue
    later: pd.DataFrame
    models: dict


def earlier_fold(
    validation, models: dict, params: dict[str, dict], candidates, embeddings
) -> EarlierFold:
    """Cut the slice before ``validation``'s and refit ``models`` on the conversions before it.

    Parameters
    ----------
    validation:
        The validation slice (``ranking_service.validation_slice.Validation``).
    models:
        Ranker name to its validation model (fitted before the validation slice).
    params:
        Ranker name to the parameters its final fit uses (the validation slice's choices);
        missing names fit with their defaults.
    candidates, embeddings:
        As the rankers' fits get them.
    """
    split = temporal_split(validation.catalogue.conversions, VALIDATION_FRACTION)
    catalogue = validation.catalogue.with_conversions(split.earlier)

    def fit(name: str, chosen: dict):
        return create_ranker(name, **chosen).fit(
            catalogue, show_progress=False, candidates=candidates, embeddings=embeddings
        )

    refits = {
        name: fit(name, params.get(name, {}))
        for name, model in models.items()
        if not isinstance(model, StackedRanker)
    }
    for name, model in models.items():
        if isinstance(model, StackedRanker):
            refits[name] = _restack(model, refits, params, catalogue, embeddings, fit)
    return EarlierFold(catalogue, split.later, refits)


def _restack(
    model: StackedRanker, refits: dict, params: dict, catalogue, embeddings, fit
) -> StackedRanker:
    """``model``'s trees (or served base) over its bases refitted on ``catalogue``."""
    restacked = StackedRanker(
        bases=model.bases, base_params=model.base_params, seed=model.seed, serves=model.serves
    )
    # A base that is one of the fold's own models with the same parameters is that very refit.
    restacked.base_models = {
        name: refits[name]
        if name in refits and params.get(name, {}) == model.base_params.get(name, {})
        else fit(name, model.base_params.get(name, {}))
        for name in model.bases
    }
    share_popularity(restacked.base_models)
    restacked.features = StackFeatures.fit(catalogue, embeddings)
    restacked.boosters, restacked.fold_of_user = model.boosters, model.fold_of_user
    return restacked
