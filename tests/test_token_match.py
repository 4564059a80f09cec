"""Token matching, by subsets of tokens and by scatter: the same top k as sorting every posting."""

import numpy as np
import pandas as pd
import pytest

from retrieval_service.keyword_index import KeywordIndex
from retrieval_service.token_match import TokenPostings, match, score_all, top_k
from retrieval_service.token_subsets import Bitset, set_bits


def random_index(seed: int, photos: int = 5_000, keywords: int = 12) -> KeywordIndex:
    """A catalogue of multi-word keywords with confidences on a coarse grid (many ties)."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "car", "sea", "night", "star"]
    vocabulary = [
        " ".join(rng.choice(words, size=rng.integers(1, 3), replace=False)) for _ in range(keywords)
    ]
    rows = photos * 4
    table = pd.DataFrame(
        {
            "photo_idx": rng.integers(0, photos, rows),
            "keyword": rng.choice(vocabulary, rows),
            "confidence": (rng.integers(1, 21, rows) / 20).astype(np.float32),
        }
    ).drop_duplicates(["photo_idx", "keyword"])
    return KeywordIndex.from_keywords(table)


QUERIES = ["red car", "blue sea night", "star zzz", "car car red", "night red blue star"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_adding_up_without_sorting_returns_exactly_the_top_k_of_scoring_everything(seed, k):
    index = random_index(seed)
    for query in QUERIES:
        tokens = list(dict.fromkeys(query.split()))
        postings = [index.token_photos(t) for t in tokens if index.token_photos(t) is not None]
        match = top_k(postings, len(tokens), k)
        photos, scores = score_all(postings, len(tokens), k)
        assert match.complete
        assert match.photos.tolist() == photos.tolist()
        assert match.scores.tolist() == scores.tolist()
        if " ".join(tokens) not in index:  # an exact keyword is not token-matched
            assert index.retrieve(query, k).photo_idx.tolist() == photos.tolist()


def test_a_filter_keeps_the_exact_top_k_among_allowed_photos():
    index = random_index(3)
    allowed = np.random.default_rng(0).random(5_000) < 0.05
    tokens = ["blue", "sea", "night"]
    postings = [index.token_photos(t) for t in tokens]
    match = top_k(postings, 3, 50, allowed)
    photos, scores = score_all(postings, 3, 50, allowed)
    assert match.photos.tolist() == photos.tolist()
    assert allowed[match.photos].all()
    assert index.retrieve("blue sea night", 50, allowed).photo_idx.tolist() == photos.tolist()


def test_the_cap_bounds_the_read_and_says_the_top_may_be_incomplete(monkeypatch):
    from retrieval_service import keyword_index

    index = random_index(4, photos=20_000)
    postings = [index.token_photos("red"), index.token_photos("blue")]
    match = top_k(postings, 2, 1000, max_depth=32)
    assert not match.complete
    assert len(match.photos) == len(np.unique(match.photos)) <= 64
    assert np.all(np.diff(match.scores) <= 0)

    # The best 32 of each token by confidence, scored as the full lists score them.
    best = [p.photos_by_conf[:32] for p in postings]
    assert set(match.photos.tolist()) == set(np.concatenate(best).tolist())
    assert "read the best" not in index.retrieve("red blue", 1000).note
    from retrieval_service import token_match

    monkeypatch.setattr(token_match, "MAX_TOKENS", 1)  # two tokens: past the subsets' limit
    monkeypatch.setattr(token_match, "top_k", lambda *a: top_k(*a, max_depth=32))
    assert "read the best" in index.retrieve("red blue", 1000).note
    assert keyword_index.match is token_match.match


def test_a_capped_token_is_read_in_photo_order_with_the_same_answer():
    from retrieval_service.token_match import MAX_DEPTH

    rng = np.random.default_rng(6)
    n = MAX_DEPTH + 5_000
    photos = np.arange(n, dtype=np.int64) * 2
    conf = (rng.integers(1, 21, n) / 20).astype(np.float32)  # many ties at the cut
    long = TokenPostings.from_best(photos, conf)
    short = TokenPostings.from_best(photos[::7], conf[::7])
    read, read_conf = long.best(MAX_DEPTH)
    assert np.all(np.diff(read) > 0)
    assert set(read.tolist()) == set(long.photos_by_conf[:MAX_DEPTH].tolist())
    assert np.array_equal(read_conf, conf[read // 2])
    # Scored as sorting every posting of the best MAX_DEPTH and the short list scores them.
    photos_expected, scores_expected = score_all(
        [TokenPostings.from_best(read, read_conf), short], 2, 100
    )
    match = top_k([long, short], 2, 100)
    assert not match.complete
    assert match.photos.tolist() == photos_expected.tolist()
    assert match.scores.tolist() == scores_expected.tolist()


def test_a_token_nobody_allowed_holds_returns_nothing():
    postings = [TokenPostings.from_best(np.array([1, 2]), np.array([0.5, 0.9], np.float32))]
    match = top_k(postings, 1, 10, np.zeros(3, bool))
    assert len(match.photos) == 0 and match.complete


def test_a_tiled_index_holds_each_photo_once_per_copy():
    from imgsearch_tools.bench.token_match import tiled

    index = random_index(5, photos=300)
    twice = tiled(index, 300, 2)
    for keyword in index.vocabulary[:4]:
        photos, conf = index.keyword_photos(keyword)
        copies, copied_conf = twice.keyword_photos(keyword)
        assert sorted(copies.tolist()) == sorted([*photos.tolist(), *(photos + 300).tolist()])
        assert sorted(copied_conf.tolist()) == sorted([*conf.tolist(), *conf.tolist()])
    single, double = index.retrieve("red blue", 10), twice.retrieve("red blue", 20)
    assert double.scores.tolist()[::2] == single.scores.tolist()


def postings_of(index: KeywordIndex, query: str) -> tuple[list[TokenPostings], int]:
    tokens = list(dict.fromkeys(query.split()))
    return [p for p in map(index.token_photos, tokens) if p is not None], len(tokens)


def exact_match(postings, n_tokens, k, allowed=None, context=""):
    """:func:`match`, checked photo for photo and score for score against :func:`score_all`."""
    found = match(postings, n_tokens, k, allowed)
    photos, scores = score_all(postings, n_tokens, k, allowed)
    assert found.photos.tolist() == photos.tolist(), context
    assert found.scores.tolist() == scores.tolist(), context
    return found


SUBSET_QUERIES = [*QUERIES, "red", "red zzz", "sea star", "car night qq", "blue red sea car star"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 10, 100, 1000, 6000])
@pytest.mark.parametrize("filtered", [False, True])
def test_reading_by_subsets_of_tokens_returns_exactly_the_reference_top_k(seed, k, filtered):
    index = random_index(seed)
    allowed = np.random.default_rng(seed).random(5_000) < 0.1 if filtered else None
    for query in SUBSET_QUERIES:
        postings, n_tokens = postings_of(index, query)
        found = match(postings, n_tokens, k, allowed)
        photos, scores = score_all(postings, n_tokens, k, allowed)
        assert found.complete and found.subsets_read >= 1
        assert found.photos.tolist() == photos.tolist()
        assert found.scores.tolist() == scores.tolist()


def disjoint_index(zero: bool = False) -> KeywordIndex:
    """Tokens with no photo in common ('sea', 'night'), or with every confidence 0 (all tied)."""
    rng = np.random.default_rng(7)
    photos = np.arange(3_000)
    keyword = np.where(photos % 3 == 0, "sea", np.where(photos % 3 == 1, "night", "car"))
    conf = np.zeros(3_000) if zero else rng.integers(1, 5, 3_000) / 4
    extra = pd.DataFrame({"photo_idx": photos[::5], "keyword": "red", "confidence": 0.5})
    table = pd.DataFrame({"photo_idx": photos, "keyword": keyword, "confidence": conf})
    return KeywordIndex.from_keywords(pd.concat([table, extra]).astype({"confidence": "float32"}))


@pytest.mark.parametrize("zero", [False, True])
def test_when_no_photo_holds_every_token_the_best_of_each_token_are_read(zero):
    index = disjoint_index(zero)
    for query in ["sea night", "sea night red", "red sea zzz", "car red"]:
        for k in (5, 100, 2_000):
            postings, n_tokens = postings_of(index, query)
            found = match(postings, n_tokens, k)
            photos, scores = score_all(postings, n_tokens, k)
            assert found.photos.tolist() == photos.tolist()
            assert found.scores.tolist() == scores.tolist()
    sea_night = match(*postings_of(index, "sea night"), 10)
    assert sea_night.subsets_read == 3  # the empty intersection, then each token alone


def test_the_photos_holding_every_token_settle_a_query_whose_top_they_fill():
    index = disjoint_index()
    found = match(*postings_of(index, "sea red"), 10)  # every 15th photo holds both
    assert found.subsets_read == 1
    assert set(index.token_photos("red").photos.tolist()) >= set(found.photos.tolist())


def test_bitsets_give_each_photos_rank_membership_and_the_set_bits():
    rng = np.random.default_rng(8)
    for density in (0.001, 0.3, 0.9):
        photos = np.flatnonzero(rng.random(10_000) < density)
        bitset = Bitset.of(photos)
        assert set_bits(bitset.words).tolist() == photos.tolist()
        assert bitset.rank(photos).tolist() == list(range(len(photos)))
        probe = rng.integers(0, 20_000, 500)
        assert bitset.holds(probe).tolist() == np.isin(probe, photos).tolist()
    assert len(set_bits(Bitset.of(np.zeros(0, np.int64)).words)) == 0


def test_a_sparse_token_builds_its_bitset_per_query_and_a_dense_one_keeps_it():
    sparse = TokenPostings.from_best(np.array([3, 90_000]), np.array([0.5, 0.9], np.float32))
    dense = TokenPostings.from_best(np.arange(0, 9_000, 2), np.ones(4_500, np.float32))
    assert sparse.bitset() is not sparse.bitset()
    assert dense.bitset() is dense.bitset()
    found = match([sparse, dense], 2, 5)
    assert found.photos.tolist() == score_all([sparse, dense], 2, 5)[0].tolist()


def two_tokens(together: bool) -> list[TokenPostings]:
    """Two tokens over the same 20,000 photos, confidences with no ties: rising together, or
    one rising as the other falls."""
    rng = np.random.default_rng(11)
    photos = np.arange(20_000)
    first = rng.random(20_000)
    second = first if together else 1 - first
    second = np.clip(second + rng.normal(0, 0.05, 20_000), 0, 1)
    return [
        TokenPostings.from_best(photos, first.astype(np.float32)),
        TokenPostings.from_best(photos, second.astype(np.float32)),
    ]


def spy_parts(monkeypatch) -> list[str]:
    """The kinds of part :func:`_intersect` is asked for, in order, from now on."""
    from retrieval_service import token_subsets

    parts = []
    intersect = token_subsets._intersect

    def spy(postings, bitsets, holding, n_tokens, part=None):
        parts.append(part[0] if part else "all")
        return intersect(postings, bitsets, holding, n_tokens, part)

    monkeypatch.setattr(token_subsets, "_intersect", spy)
    return parts


@pytest.mark.parametrize("together", [True, False])
def test_two_tokens_are_read_a_cell_of_levels_at_a_time(monkeypatch, together):
    from retrieval_service import token_subsets

    cells = []
    intersect = token_subsets._intersect

    def spy(postings, bitsets, holding, n_tokens, part=None):
        cells.append(part)
        return intersect(postings, bitsets, holding, n_tokens, part)

    monkeypatch.setattr(token_subsets, "_intersect", spy)
    postings = two_tokens(together)
    last_levels = {id(p.levels().words[-1]) for p in postings}
    for k in (1, 100):
        cells.clear()
        exact_match(postings, 3, k)
        assert {part[0] for part in cells} == {"cell"}
        if together:
            assert len(cells) == 1  # the best level of both settles the top
        else:
            # High in one token is low in the other: every photo scores about the same, and
            # the cells of the upper levels are read; the cell of both tokens' last levels
            # (their worst eighths, at most 1/8 + 1/8 here) is bounded below the top.
            assert (
                len(token_subsets.LEVEL_CUTS) ** 2
                <= len(cells)
                < len(postings[0].levels().words) ** 2
            )
            assert not any({id(words) for words in part[1]} == last_levels for part in cells)


@pytest.mark.parametrize("together", [True, False])
def test_three_tokens_are_scored_in_one_part(monkeypatch, together):
    parts = spy_parts(monkeypatch)
    rng = np.random.default_rng(1)
    third = TokenPostings.from_best(np.arange(20_000), rng.random(20_000).astype(np.float32))
    postings = [*two_tokens(together), third]
    found = exact_match(postings, 3, 100)
    # Every photo holds the three tokens: their one part settles the top.
    assert parts == ["all"] and found.subsets_read == 1


def test_a_subset_no_photo_holds_is_dropped_with_all_its_parts(monkeypatch):
    parts = spy_parts(monkeypatch)
    rng = np.random.default_rng(2)
    photos = np.arange(20_000)
    # Two tokens on the even photos, a third on the odd ones: no photo holds all three, and
    # the pair's photos hold no other token.
    even, odd = photos[::2], photos[1::2]
    postings = [
        TokenPostings.from_best(even, rng.random(len(even)).astype(np.float32)),
        TokenPostings.from_best(even, rng.random(len(even)).astype(np.float32)),
        TokenPostings.from_best(odd, rng.random(len(odd)).astype(np.float32)),
    ]
    for k in (1, 100, 15_000):
        parts.clear()
        exact_match(postings, 4, k)
        # Only the pair that holds photos is read (a cell at a time), never the empty ones.
        assert set(parts) == {"cell"}


def test_levels_cut_a_tokens_photos_by_rank_and_bound_each_level():
    from retrieval_service.token_subsets import LEVEL_CUTS

    token = two_tokens(True)[0]
    levels = token.levels()
    cuts = [0, *(int(np.ceil(len(token) * share)) for share in LEVEL_CUTS), len(token)]
    for words, top, (a, b) in zip(levels.words, levels.tops, zip(cuts, cuts[1:])):
        assert set_bits(words).tolist() == sorted(token.photos_by_conf[a:b].tolist())
        assert top == token.conf_by_conf[a] == token.conf_by_conf[a:b].max()
    assert token.levels() is levels


def test_a_token_too_sparse_or_small_to_cut_keeps_no_levels():
    sparse = TokenPostings.from_best(np.array([3, 90_000]), np.array([0.5, 0.9], np.float32))
    assert sparse.levels() is None  # its bitset is built per query, and it is read whole
    one = TokenPostings.from_best(np.array([3]), np.array([0.5], np.float32))
    assert one.bitset() is one.bitset() and one.levels() is None  # nothing to cut


def test_many_random_queries_return_exactly_the_reference_top_k():
    # Confidences skewed towards 1 (as a tagger's are) with coarse ties, and pairs of tokens
    # that rise together or against each other, on a catalogue dense enough to keep levels.
    rng = np.random.default_rng(12)
    photos = 8_000
    words = [f"w{i}" for i in range(9)]
    rows = []
    for word in words:
        held = np.flatnonzero(rng.random(photos) < rng.uniform(0.05, 0.5))
        conf = np.round(1 - rng.beta(0.6, 3, len(held)), rng.integers(1, 4))
        rows.append(pd.DataFrame({"photo_idx": held, "keyword": word, "confidence": conf}))
    against = rows[0][["photo_idx"]].assign(keyword="w9", confidence=1 - rows[0]["confidence"])
    table = pd.concat([*rows, against]).astype({"confidence": "float32"})
    index = KeywordIndex.from_keywords(table)
    vocabulary = [*words, "w9", "zz"]
    for _ in range(300):
        query = " ".join(rng.choice(vocabulary, size=rng.integers(2, 6)))
        postings, n_tokens = postings_of(index, query)
        if not postings:
            continue
        exact_match(postings, n_tokens, int(rng.choice([1, 10, 100, 1000])), context=query)
