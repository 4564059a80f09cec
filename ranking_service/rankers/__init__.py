"""Personalization rankers by name: ``none``, ``popularity``, ``als``, ``fm``, ``deepfm``,
``ease``, ``item_knn``, ``clip_profile`` and ``stacked``."""

from __future__ import annotations

import importlib
from pathlib import Path

from imgsearch.catalogue import Catalogue
from imgsearch.image_embeddings import ImageEmbeddings
from imgsearch.names import RANKER_NAMES, check_names
from ranking_service.rankers.base import Ranker, RankQuery, RankScores

# name -> (module, class), one per name of imgsearch.names.RANKER_NAMES (a test checks);
# modules are imported on first use so that serving ALS or popularity never pays for
# importing torch.
_REGISTRY = {
    "none": ("ranking_service.rankers.none", "NoneRanker"),
    "popularity": ("ranking_service.rankers.popularity", "PopularityRanker"),
    "als": ("ranking_service.rankers.als", "ALSRanker"),
    "fm": ("ranking_service.rankers.fm", "FMRanker"),
    "deepfm": ("ranking_service.rankers.deepfm", "DeepFMRanker"),
    "ease": ("ranking_service.rankers.item_item", "EASERanker"),
    "item_knn": ("ranking_service.rankers.item_item", "ItemKNNRanker"),
    "clip_profile": ("ranking_service.rankers.clip_profile", "ClipProfileRanker"),
    "stacked": ("ranking_service.rankers.stacked", "StackedRanker"),
}

__all__ = [
    "RANKER_NAMES",
    "RankQuery",
    "RankScores",
    "Ranker",
    "create_ranker",
    "load_ranker",
    "ranker_class",
]


def ranker_class(name: str) -> type[Ranker]:
    """Return the ranker class registered as ``name``.

    Raises
    ------
    ValueError
        For a name that is not one of :data:`RANKER_NAMES`.
    """
    check_names([name], RANKER_NAMES, "ranker")
    module, attribute = _REGISTRY[name]
    return getattr(importlib.import_module(module), attribute)


def create_ranker(name: str, **params) -> Ranker:
    """Return an unfitted ranker by name, with its constructor parameters.

    Parameters
    ----------
    name:
        One of :data:`RANKER_NAMES`.
    **params:
        Parameters of that ranker's constructor.
    """
    return ranker_class(name)(**params)


def load_ranker(
    name: str,
    directory: str | Path,
    catalogue: Catalogue,
    embeddings: ImageEmbeddings | None = None,
) -> Ranker:
    """Load a ranker saved with ``Ranker.save`` into ``directory``.

    Parameters
    ----------
    name:
        The ranker's name (checked against the saved ``config.json``).
    directory:
        Where it was saved.
    catalogue:
        The catalogue it serves.
    embeddings:
        The set's image embeddings, handed to rankers that score with them
        (``Ranker.uses_embeddings``: they fail to load without) or may use them
        (``Ranker.accepts_embeddings``).
    """
    cls = ranker_class(name)
    if cls.uses_embeddings or cls.accepts_embeddings:
        return cls.load(Path(directory), catalogue, embeddings)
    return cls.load(Path(directory), catalogue)
