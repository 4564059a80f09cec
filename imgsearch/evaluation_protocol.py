"""The evaluation protocol's shared pieces: the temporal split and users' recent history.

Ranker validation (tuning, early stopping, the INT8 gate) and the offline evaluation cut and
read conversions the same way, so both use these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Split:
    """A temporal split of a conversions table: ``earlier`` rows train, ``later`` rows hold out."""

    earlier: pd.DataFrame
    later: pd.DataFrame
    fraction: float

    def summary(self) -> dict:
        """Sizes and boundary times, for report headers."""

        def when(frame: pd.DataFrame, fn: str) -> str | None:
            if len(frame) == 0:
                return None
            return str(getattr(frame["converted_at"], fn)())

        return {
            "test_fraction": self.fraction,
            "train_conversions": len(self.earlier),
            "test_conversions": len(self.later),
            "train_start": when(self.earlier, "min"),
            "train_end": when(self.earlier, "max"),
            "test_start": when(self.later, "min"),
            "test_end": when(self.later, "max"),
            "train_users": int(self.earlier["user_idx"].nunique()),
        }


def temporal_split(conversions: pd.DataFrame, fraction: float) -> Split:
    """Split conversions by time: the first ``1 - fraction`` of the rows, then the rest.

    Splitting by position (not by a timestamp threshold) keeps the sizes exact; conversions
    sharing the boundary timestamp are split by position, which is harmless: no later row is
    earlier in time than an earlier row.

    Parameters
    ----------
    conversions:
        A conversions table; sorted here by ``converted_at`` (stable) if it is not already
        (the :class:`~imgsearch.catalogue.Catalogue` keeps it sorted).
    fraction:
        Share of rows, the most recent, held out; in [0, 1).

    Returns
    -------
    Split
        Both parts with fresh indexes; ``max(earlier time) <= min(later time)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if len(conversions) and not conversions["converted_at"].is_monotonic_increasing:
        conversions = conversions.sort_values("converted_at", kind="stable")
    cut = int(round(len(conversions) * (1.0 - fraction)))
    return Split(
        earlier=conversions.iloc[:cut].reset_index(drop=True),
        later=conversions.iloc[cut:].reset_index(drop=True),
        fraction=fraction,
    )


def of_users(conversions: pd.DataFrame, users: np.ndarray) -> pd.DataFrame:
    """The rows of ``conversions`` whose ``user_idx`` is in ``users``, in their order.

    What a few queries' histories need of millions of conversions: :func:`recent_photos` of
    these rows is the same for those users.
    """
    rows = np.isin(conversions["user_idx"].to_numpy(np.int64), np.asarray(users, np.int64))
    return conversions[rows]


def recent_photos(conversions: pd.DataFrame, recent_k: int = 20) -> dict[int, np.ndarray]:
    """Map each user to their last ``recent_k`` converted photos, oldest first.

    This is the history a client sends as ``recent_photo_ids``; repeats are kept, as a client
    that lists its user's downloads would keep them.

    Parameters
    ----------
    conversions:
        Time-sorted rows with ``user_idx`` and ``photo_idx``.
    recent_k:
        Photos kept per user.
    """
    if len(conversions) == 0 or recent_k <= 0:
        return {}
    tail = conversions[["user_idx", "photo_idx"]].groupby("user_idx", sort=False).tail(recent_k)
    users = tail["user_idx"].to_numpy(dtype=np.int64)
    photos = tail["photo_idx"].to_numpy(dtype=np.int64)
    order = np.argsort(users, kind="stable")
    users, photos = users[order], photos[order]
    starts = np.flatnonzero(np.r_[True, np.diff(users) != 0])
    return dict(zip(users[starts].tolist(), np.split(photos, starts[1:])))
