"""The queries a load run sends: (user, keyword) pairs sampled from the served catalogue's
conversions or read from a file, a share of them made unique so that no cache has seen them."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUERY_SOURCES = ("catalogue", "unique")  # or a file with one query per line
# Numbers that make queries unique: one count per load-generator process, from a random start
# so that a second run against the same servers does not find its queries in their caches.
_unique_numbers = itertools.count(random.SystemRandom().randrange(10_000, 900_000))


@dataclass(frozen=True)
class BenchQuery:
    """One realistic request: an anonymous user and the keyword they searched, and the photo
    filter it carries (None: none)."""

    user_id: str
    query: str
    photo_filter: Any = None


def sample_queries(artifacts_path: str | Path, n: int = 2000, seed: int = 0) -> list[BenchQuery]:
    """Sample ``n`` (user, keyword) pairs from the artifact set's conversions.

    Sampling conversions uniformly reproduces the real mix: popular keywords and active users
    come up as often as they do in the traffic the catalogue recorded.

    Parameters
    ----------
    artifacts_path:
        An artifact root (with ``current``) or one set folder.
    n:
        How many requests to draw (with replacement).
    seed:
        Seed of the draw; the same seed gives the same requests.

    Returns
    -------
    list of BenchQuery

    Raises
    ------
    ValueError
        When the catalogue has no conversion with a keyword.
    """
    import numpy as np
    import pandas as pd

    from imgsearch import artifacts

    artifact_set = artifacts.resolve(artifacts_path)
    catalogue_dir = artifact_set.file(artifacts.CATALOGUE_DIR)
    conversions = pd.read_parquet(
        catalogue_dir / "conversions.parquet", columns=["keyword", "user_idx"]
    )
    conversions = conversions[conversions["keyword"].astype(str).str.strip() != ""]
    if conversions.empty:
        raise ValueError(f"{catalogue_dir}: no conversion has a keyword to search for")
    users = pd.read_parquet(catalogue_dir / "users.parquet")
    user_ids = users.set_index("user_idx")["anonymous_user_id"]
    rows = np.random.default_rng(seed).integers(0, len(conversions), n)
    picked = conversions.iloc[rows]
    ids = user_ids.reindex(picked["user_idx"].to_numpy()).fillna("").astype(str).tolist()
    return [BenchQuery(user, str(query)) for user, query in zip(ids, picked["keyword"].tolist())]


def read_query_file(path: str | Path, users: list[BenchQuery]) -> list[BenchQuery]:
    """Queries from a text file (one per line, blank lines skipped), sent as ``users``' users.

    Parameters
    ----------
    path:
        The file.
    users:
        Sampled requests whose users are reused in turn (see :func:`sample_queries`).

    Raises
    ------
    ValueError
        When the file holds no query.
    """
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ValueError(f"{path}: no query in the file (one query per line)")
    return [BenchQuery(users[i % len(users)].user_id, text) for i, text in enumerate(texts)]


def is_unique(i: int, share: float) -> bool:
    """Whether request ``i`` is made unique: ``share`` of the requests, evenly spread."""
    return int((i + 1) * share) > int(i * share)


def unique_query(query: BenchQuery, words: list[str]) -> BenchQuery:
    """``query`` made unique: another catalogue word and a number no request had before.

    "red" becomes "red star 104217": the length of a short real query, never in any cache.
    """
    number = next(_unique_numbers)
    return BenchQuery(query.user_id, f"{query.query} {words[number % len(words)]} {number}")


def query_mix(queries: list[BenchQuery], n: int, share: float) -> list[BenchQuery]:
    """The first ``n`` requests a load with ``share`` unique queries sends (fresh numbers)."""
    words = sorted({q.query for q in queries})
    mixed = []
    for i in range(n):
        query = queries[i % len(queries)]
        mixed.append(unique_query(query, words) if is_unique(i, share) else query)
    return mixed
