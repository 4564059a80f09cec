"""The protocol's queries: test (user, keyword) pairs of a split, and tag-precision queries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch.catalogue import map_distinct, normalise_keyword
from imgsearch.evaluation_protocol import Split, of_users, recent_photos


@dataclass
class TestQueries:
    """The test queries of a split, one entry per (user, keyword) pair.

    Attributes
    ----------
    user_idx, keyword:
        The pair (keyword normalised).
    relevant:
        Per query, the distinct photos converted by the user with the keyword in the test part.
    counts:
        Per query, how many test conversions each relevant photo had (the seed-NDCG gains).
    country:
        The country of the user's latest training conversion ("" when unknown).
    recent:
        Per query, the user's last ``recent_k`` training photos (oldest first), sent as the
        request's ``recent_photos`` as a client with the user's history would.
    n_pairs_total:
        Pairs that qualified before ``max_queries`` cut them down.
    """

    user_idx: np.ndarray
    keyword: np.ndarray
    relevant: list[np.ndarray]
    counts: list[np.ndarray]
    country: np.ndarray
    recent: list[np.ndarray]
    n_pairs_total: int

    def __len__(self) -> int:
        return len(self.user_idx)


def build_test_queries(
    split: Split,
    min_pair: int = 3,
    max_queries: int | None = None,
    seed: int = 0,
    recent_k: int = 20,
    exclude: set | None = None,
) -> TestQueries:
    """Find the test queries of a split.

    Parameters
    ----------
    split:
        The temporal split.
    min_pair:
        Test conversions (rows, repeats included) a (user, keyword) pair needs.
    max_queries:
        Keep at most this many pairs, drawn uniformly with ``seed``; None keeps all.
    seed:
        Seed of that draw.
    recent_k:
        Training photos per query sent as the user's recent history.
    exclude:
        (user_idx, keyword) pairs left out before the draw (they still count in
        ``n_pairs_total``).

    Returns
    -------
    TestQueries
        Sorted by (user, keyword), so the order is deterministic.
    """
    test = split.later
    train_users = np.unique(split.earlier["user_idx"].to_numpy(np.int64))
    frame = pd.DataFrame(
        {
            "user_idx": test["user_idx"].to_numpy(np.int64),
            "keyword": map_distinct(test["keyword"], normalise_keyword).to_numpy(),
            "photo_idx": test["photo_idx"].to_numpy(np.int64),
        }
    )
    frame = frame[np.isin(frame["user_idx"].to_numpy(), train_users) & (frame["keyword"] != "")]
    sizes = frame.groupby(["user_idx", "keyword"], sort=True).size()
    pairs = sizes[sizes >= min_pair].index
    n_total = len(pairs)
    if exclude:
        pairs = pairs[~pairs.isin(list(exclude))]
    # Drawn before the queries are built: a slice's millions of pairs cost only their count.
    if max_queries is not None and len(pairs) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_queries, replace=False))
        pairs = pairs[keep]
    per_photo = (
        frame.merge(pairs.to_frame(index=False), on=["user_idx", "keyword"])
        .groupby(["user_idx", "keyword", "photo_idx"], sort=True)
        .size()
        .reset_index(name="n")
    )
    pair_id = per_photo.groupby(["user_idx", "keyword"], sort=True).ngroup().to_numpy()
    starts = np.flatnonzero(np.r_[True, np.diff(pair_id) != 0])
    photos = np.split(per_photo["photo_idx"].to_numpy(np.int64), starts[1:])
    counts = np.split(per_photo["n"].to_numpy(np.int64), starts[1:])
    users = per_photo["user_idx"].to_numpy(np.int64)[starts]
    keywords = per_photo["keyword"].to_numpy(object)[starts]
    last_country = (
        split.earlier.groupby("user_idx", sort=False)["conversion_country"].last().astype(str)
    )
    country = last_country.reindex(users).fillna("").to_numpy(object)
    if len(starts) == 0:
        photos, counts = [], []
    by_user = recent_photos(of_users(split.earlier, users), recent_k)
    none = np.zeros(0, np.int64)
    recent = [by_user.get(int(u), none) for u in users]
    return TestQueries(users, keywords, photos, counts, country, recent, n_total)


def user_photos(conversions: pd.DataFrame) -> dict[int, np.ndarray]:
    """Map each user to the distinct photos they converted in ``conversions`` (sorted)."""
    if len(conversions) == 0:
        return {}
    users = conversions["user_idx"].to_numpy(np.int64)
    photos = conversions["photo_idx"].to_numpy(np.int64)
    # One int64 key per pair: a 1-D unique sorts numbers, where a unique over the columns of
    # a 2 x N array compares them as records, many times slower.
    width = int(photos.max()) + 1
    keys = np.unique(users * width + photos)
    users, photos = keys // width, keys % width
    starts = np.flatnonzero(np.r_[True, np.diff(users) != 0])
    return dict(zip(users[starts].tolist(), np.split(photos, starts[1:])))


# --------------------------------------------------------------------------- tags


class KeywordTags:
    """Which photos carry which keyword, for the tag precision figures."""

    def __init__(self, keywords: pd.DataFrame, n_photos: int) -> None:
        table = keywords[["keyword", "photo_idx"]]
        self.n_photos = n_photos
        self._photos = {
            k: np.unique(g.to_numpy(np.int64))
            for k, g in table.groupby("keyword", sort=False)["photo_idx"]
        }
        self._masks: dict[str, np.ndarray] = {}

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._photos

    def photos(self, keyword: str) -> np.ndarray:
        """Photos tagged with ``keyword`` (sorted; empty when unknown)."""
        return self._photos.get(keyword, np.zeros(0, np.int64))

    def mask(self, keyword: str) -> np.ndarray:
        """Boolean mask over all photos, True where tagged with ``keyword``."""
        if keyword not in self._masks:
            mask = np.zeros(self.n_photos, dtype=bool)
            mask[self.photos(keyword)] = True
            self._masks[keyword] = mask
        return self._masks[keyword]

    def precision(self, retrieved: np.ndarray, words: Iterable[str], k: int) -> float:
        """Share of the top ``k`` of ``retrieved`` tagged with every one of ``words`` (over k)."""
        top = np.asarray(retrieved, dtype=np.int64)[:k]
        ok = np.ones(len(top), dtype=bool)
        for word in words:
            ok &= self.mask(word)[top]
        return float(ok.sum()) / k


def pair_queries(
    tags: KeywordTags,
    test: pd.DataFrame,
    single_keywords: Iterable[str],
    k: int = 10,
    max_pairs: int = 200,
) -> tuple[list[tuple[str, str, str]], str]:
    """The two-keyword queries of ``pair_tag_p@k``.

    Parameters
    ----------
    tags:
        Keyword tags of the catalogue.
    test:
        Test conversions; their two-word keywords whose words are both catalogue keywords are
        the queries.
    single_keywords:
        The test queries' keywords, most frequent first; pairs of them are the fallback when
        the conversions have no two-word keyword.
    k:
        Only pairs that at least ``k`` photos carry are kept.
    max_pairs:
        At most this many queries.

    Returns
    -------
    queries : list of (query, word_1, word_2)
        Sorted, deterministic.
    source : str
        How they were built, for the report.
    """
    found = []
    for keyword in sorted(set(normalise_keyword(x) for x in test["keyword"].tolist())):
        words = keyword.split()
        if len(words) == 2 and words[0] != words[1] and all(w in tags for w in words):
            if len(np.intersect1d(tags.photos(words[0]), tags.photos(words[1]))) >= k:
                found.append((keyword, words[0], words[1]))
    if found:
        return found[:max_pairs], "two-word keywords of the test conversions"
    frequent = [w for w in dict.fromkeys(single_keywords) if w in tags and " " not in w][:20]
    built = []
    for i, first in enumerate(frequent):
        for second in frequent[i + 1 :]:
            if len(np.intersect1d(tags.photos(first), tags.photos(second))) >= k:
                built.append((f"{first} {second}", first, second))
    return built[:max_pairs], "pairs of the test queries' most frequent keywords"
