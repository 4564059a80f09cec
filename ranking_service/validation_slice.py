"""The validation slice rankers are tuned and chosen on: the most recent share of the training
conversions, its (user, keyword) queries and their candidates, cut as the evaluation cuts test."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.config import DEFAULT_CANDIDATES_K
from imgsearch.evaluation_protocol import temporal_split
from ranking_service.rankers.validation import ValidationSet
from ranking_service.selection import (
    MIN_SELECTION_QUERIES,
)

# The validation slice: the most recent 20% of the training conversions (never test data).
VALIDATION_FRACTION = 0.2

# Conversions a (user, keyword) pair needs in the slice, as test queries need in the test part:
# on the demo, validating on every pair chose a prior weight 4x the one that pairs like the
# test queries chose, and the latter was the better on test.
VALIDATION_MIN_PAIR = 3

# Validation queries drawn in all (tuning and selection parts together).
MAX_VALIDATION_QUERIES = 6000

VALIDATION_FILE = "validation.npz"


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
