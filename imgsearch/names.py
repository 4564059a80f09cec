"""Retriever and ranker names and their API enum values: one map, read off the protos.

The names are the enum value names without their prefix, lower-cased (``RANKER_ALS`` ->
``"als"``); ``"default"`` stands for ``*_UNSPECIFIED`` (the server's default).
"""

from __future__ import annotations

from imgsearch.ranking.v1 import ranking_service_pb2 as _rank_pb
from imgsearch.retrieval.v1 import retrieval_service_pb2 as _retr_pb

DEFAULT = "default"


def _by_name(enum, prefix: str) -> dict[str, int]:
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in enum.DESCRIPTOR.values
        if value.number != 0
    }


RETRIEVER_ENUM: dict[str, int] = _by_name(_retr_pb.Retriever, "RETRIEVER_")
RANKER_ENUM: dict[str, int] = _by_name(_rank_pb.Ranker, "RANKER_")
# Rankers the gateway composes from others rather than a model the ranking service holds.
COMPOSED_RANKERS = ("two_step",)

RETRIEVER_NAMES: tuple[str, ...] = tuple(RETRIEVER_ENUM)
RANKER_NAMES: tuple[str, ...] = tuple(n for n in RANKER_ENUM if n not in COMPOSED_RANKERS)
RETRIEVER_CHOICES: tuple[str, ...] = (DEFAULT, *RETRIEVER_ENUM)
RANKER_CHOICES: tuple[str, ...] = (DEFAULT, *RANKER_ENUM)
# Names by enum value, read on every request ("default" for 0).
_RETRIEVER_BY_VALUE: dict[int, str] = {0: DEFAULT, **{v: k for k, v in RETRIEVER_ENUM.items()}}
_RANKER_BY_VALUE: dict[int, str] = {0: DEFAULT, **{v: k for k, v in RANKER_ENUM.items()}}


def retriever_value(name: str) -> int:
    """The ``Retriever`` enum value of ``name`` (``"default"``: unspecified)."""
    return 0 if name == DEFAULT else RETRIEVER_ENUM[name]


def ranker_value(name: str) -> int:
    """The ``Ranker`` enum value of ``name`` (``"default"``: unspecified)."""
    return 0 if name == DEFAULT else RANKER_ENUM[name]


def retriever_name(value: int) -> str | None:
    """``"keyword"`` for ``RETRIEVER_KEYWORD``; ``"default"`` for 0; None when unknown."""
    return _RETRIEVER_BY_VALUE.get(value)


def ranker_name(value: int) -> str | None:
    """``"als"`` for ``RANKER_ALS``; ``"default"`` for 0; None when unknown."""
    return _RANKER_BY_VALUE.get(value)


def check_names(requested, valid, kind: str) -> list[str]:
    """The ``requested`` names, lower-cased, stripped and de-duplicated, all of them in ``valid``.

    The one check of retriever and ranker names: the CLI, the build, training and the
    evaluation all call it, so a wrong name reads the same everywhere. ``None`` means every
    valid name.

    Raises
    ------
    ValueError
        Naming the unknown ``kind`` names and listing the valid ones, or when none is given.
    """
    valid = list(valid)
    if requested is None:
        return valid
    if isinstance(requested, str):
        requested = [requested]
    names = [n.strip().lower() for n in requested if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"unknown {kind} {', '.join(repr(n) for n in unknown)}; valid: {', '.join(valid)}"
        )
    if not names:
        raise ValueError(f"no {kind} given; valid: {', '.join(valid)}")
    return list(dict.fromkeys(names))
