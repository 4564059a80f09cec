"""What an evaluation is asked to do: its configuration, its error, and the names it accepts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from imgsearch.names import check_names
from retrieval_service.clip_model import TRAIN_STEPS

CLIP_RETRIEVERS = frozenset({"clip", "hybrid"})


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (unknown name, no test query, bad fraction)."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; the defaults are the documented protocol.

    Attributes
    ----------
    retrievers, rankers:
        Names to evaluate; None for all of them.
    candidates_k:
        Candidates the retriever returns per query.
    min_pair:
        Test conversions a (user, keyword) pair needs to become a test query.
    test_fraction:
        Share of the most recent conversions held out for testing.
    filter_train:
        Remove photos the user converted in training from the candidates.
    tune:
        Let the ranker trainer choose hyper-parameters on a validation slice of the training
        part (never the test part).
    clip_artifacts:
        An artifact set (or its ``clip`` folder's parent) to load CLIP from instead of training.
    clip_steps:
        Training steps when CLIP is trained here.
    max_queries:
        Evaluate at most this many test queries (a seeded draw); None for all.
    seed:
        Seed of the query draw and of the bootstrap.
    k:
        Cut-off of the metrics.
    bootstrap:
        Bootstrap resamples for the confidence intervals.
    show_progress:
        Draw progress bars on stderr.
    """

    retrievers: tuple[str, ...] | None = None
    rankers: tuple[str, ...] | None = None
    candidates_k: int = 100
    min_pair: int = 3
    test_fraction: float = 0.2
    filter_train: bool = True
    tune: bool = False
    clip_artifacts: str | None = None
    clip_steps: int = TRAIN_STEPS
    max_queries: int | None = None
    seed: int = 0
    k: int = 10
    bootstrap: int = 1000
    show_progress: bool = True


def resolve_names(requested: Iterable[str] | None, valid: Iterable[str], kind: str) -> list[str]:
    """:func:`imgsearch.names.check_names`, raising :class:`EvaluationError`."""
    try:
        return check_names(requested, valid, kind)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
