"""Deleted users stay deleted: a catalogue without the events their tombstones cover."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from imgsearch.catalogue import CONVERSION_COLUMNS, USER_COLUMNS, Catalogue
from imgsearch.conversion_store import user_hash


def forget_users(catalogue: Catalogue, tombstones: dict[str, int]) -> tuple[Catalogue, int]:
    """``catalogue`` without the conversions of deleted users made before their deletion.

    ``tombstones`` maps a user hash (:func:`~imgsearch.conversion_store.user_hash`) to its
    deletion time in microseconds (``ConversionStore.tombstones``). A user left with no
    conversion leaves the users table too (the others are renumbered, kept sorted by id);
    a user who converted again after the deletion keeps those later events.

    Returns
    -------
    (Catalogue, int)
        The catalogue (the same object when nothing was forgotten) and how many
        conversions were dropped.
    """
    if not tombstones:
        return catalogue, 0
    user_ids = catalogue.users["anonymous_user_id"].astype(str)
    deleted_at = user_ids.map(lambda uid: tombstones.get(user_hash(uid), -1)).to_numpy()
    if not (deleted_at >= 0).any():
        return catalogue, 0
    conversions = catalogue.conversions
    user_idx = conversions["user_idx"].to_numpy()
    converted_us = conversions["converted_at"].to_numpy(dtype="datetime64[us]").astype(np.int64)
    drop = converted_us <= deleted_at[user_idx]
    if not drop.any():
        return catalogue, 0
    kept = conversions[~drop]
    remaining = np.zeros(len(user_ids), dtype=bool)
    remaining[kept["user_idx"].to_numpy()] = True
    remaining |= deleted_at < 0  # users without a tombstone stay, with or without events
    new_idx = np.cumsum(remaining) - 1
    users = pd.DataFrame(
        {
            "user_idx": np.arange(int(remaining.sum())),
            "anonymous_user_id": user_ids.to_numpy(dtype=object)[remaining],
        }
    ).astype(USER_COLUMNS)
    kept = kept.assign(user_idx=new_idx[kept["user_idx"].to_numpy()]).reset_index(drop=True)
    result = replace(catalogue, users=users, conversions=kept.astype(CONVERSION_COLUMNS))
    return result, int(drop.sum())
