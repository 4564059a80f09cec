"""Contract tests run against every ranker, on a small catalogue with planted user tastes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imgsearch.candidates import CandidateLists
from imgsearch.catalogue import Catalogue
from imgsearch.evaluation_protocol import temporal_split
from imgsearch.image_embeddings import ImageEmbeddings
from ranking_service.rankers import RANKER_NAMES, create_ranker, load_ranker
from ranking_service.rankers.base import RankQuery
from ranking_service.rankers.validation import ValidationSet
from retrieval_service.keyword_index import KeywordIndex

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
N_PHOTOS = 300
N_USERS = 100
N_CONVERSIONS = 4000
UNSEEN_USER = N_USERS  # in the users table, with no conversion at all

# Small, fast settings: the contract is about behaviour, not about the defaults' figures.
TEST_PARAMS = {
    "none": {},
    "popularity": {},
    "als": {"factors": 8, "regularization": 1.0, "iterations": 10, "num_threads": 1},
    "fm": {  # no early stopping here: a 10% slice of this data is too small to stop on
        "factors": 8,
        "epochs": 10,
        "validation_fraction": 0.0,
        "batch_size": 256,
        "learning_rate": 0.02,
        "patience": 3,
        "num_threads": 1,
    },
    "deepfm": {
        "factors": 8,
        "hidden": (16,),
        "epochs": 10,
        "batch_size": 256,
        "learning_rate": 0.02,
        "patience": 3,
        "num_threads": 1,
    },
    "ease": {"l2": 100.0},
    "item_knn": {"shrink": 5.0},
    "clip_profile": {},
    "stacked": {"base_params": {"als": {"factors": 8, "iterations": 10, "num_threads": 1}}},
}


def photo_colour(photo_idx: np.ndarray) -> np.ndarray:
    """The planted colour index of each photo (shape is ``photo_idx % 5``)."""
    return (np.asarray(photo_idx) // len(SHAPES)) % len(COLOURS)


def image_embeddings(seed: int = 0) -> ImageEmbeddings:
    """What a CLIP would see: each photo's colour and shape (one-hot) plus noise, L2-normalised.

    Photos 0–9 have no image (no embedding), like photos whose download failed.
    """
    rng = np.random.default_rng(seed)
    photo_idx = np.arange(10, N_PHOTOS)
    vectors = np.zeros((len(photo_idx), len(COLOURS) + len(SHAPES) + 5), dtype=np.float32)
    vectors[np.arange(len(photo_idx)), photo_colour(photo_idx)] = 1.0
    vectors[np.arange(len(photo_idx)), len(COLOURS) + photo_idx % len(SHAPES)] = 1.0
    vectors += rng.normal(0.0, 0.3, vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ImageEmbeddings(photo_idx.astype(np.int64), vectors)


EMBEDDINGS = image_embeddings()


def make_catalogue(seed: int = 0) -> Catalogue:
    """Photos = shape × colour; each user converts photos of their 1–2 favourite colours.

    A query is a shape; its candidates are that shape's 60 photos in every colour, so only a
    ranker that learned the user's colours can put the right ones first. Within a colour, a
    latent photo popularity gives the popularity baseline something to find too.
    """
    rng = np.random.default_rng(seed)
    photo_idx = np.arange(N_PHOTOS)
    shapes, colours = photo_idx % len(SHAPES), photo_colour(photo_idx)
    photos = pd.DataFrame(
        {
            "photo_idx": photo_idx.astype(np.int32),
            "photo_id": [f"p{i:04d}" for i in photo_idx],
            "photo_image_url": "",
            "photo_description": "",
            "ai_description": "",
            "photographer_username": [f"artist{i % 17}" if i % 11 else "" for i in photo_idx],
            "stats_views": rng.integers(0, 100_000, N_PHOTOS),
            "stats_downloads": rng.integers(0, 1_000, N_PHOTOS),
            "has_image": False,
        }
    )
    keywords = pd.concat(
        [
            pd.DataFrame(
                {
                    "photo_idx": photo_idx.astype(np.int32),
                    "keyword": np.array(names)[values],
                    "confidence": rng.uniform(0.5, 1.0, N_PHOTOS).astype(np.float32),
                }
            )
            for names, values in ((SHAPES, shapes), (COLOURS, colours))
        ],
        ignore_index=True,
    )
    users = pd.DataFrame(
        {
            "user_idx": np.arange(N_USERS + 1, dtype=np.int32),
            "anonymous_user_id": [f"u{i:03d}" for i in range(N_USERS + 1)],
        }
    )
    tastes = [
        rng.choice(len(COLOURS), size=rng.integers(1, 3), replace=False) for _ in range(N_USERS)
    ]
    appeal = rng.pareto(1.5, N_PHOTOS) + 0.1
    user = rng.integers(0, N_USERS, N_CONVERSIONS)
    shape = rng.integers(0, len(SHAPES), N_CONVERSIONS)
    chosen = np.empty(N_CONVERSIONS, dtype=np.int64)
    for i in range(N_CONVERSIONS):
        pool = photo_idx[shapes == shape[i]]
        liked = pool[np.isin(colours[pool], tastes[user[i]])]
        pool = liked if rng.random() < 0.9 else pool
        chosen[i] = rng.choice(pool, p=appeal[pool] / appeal[pool].sum())
    conversions = pd.DataFrame(
        {
            "converted_at": pd.Timestamp("2024-01-01")
            + pd.to_timedelta(np.arange(N_CONVERSIONS), "min"),
            "conversion_type": "download",
            "keyword": np.array(SHAPES)[shape],
            "photo_idx": chosen.astype(np.int32),
            "user_idx": user.astype(np.int32),
            "conversion_country": np.array(["", "DE", "US", "FR"])[
                rng.integers(0, 4, N_CONVERSIONS)
            ],
        }
    )
    return Catalogue(photos, keywords, users, conversions)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return make_catalogue()


@pytest.fixture(scope="module")
def split(catalogue):
    """(training catalogue, held-out conversions): a temporal 80/20 split."""
    parts = temporal_split(catalogue.conversions, 0.2)
    return catalogue.with_conversions(parts.earlier), parts.later


_candidates: dict[int, CandidateLists] = {}


def served(catalogue: Catalogue) -> CandidateLists:
    """The keyword retriever's candidates for every keyword (what the build hands rankers)."""
    if id(catalogue) not in _candidates:
        index = KeywordIndex.from_keywords(catalogue.keywords)
        keywords = catalogue.keywords["keyword"].unique()
        _candidates[id(catalogue)] = CandidateLists.collect(keywords, index.retrieve, 2000)
    return _candidates[id(catalogue)]


@pytest.fixture(scope="module")
def held_out(split) -> ValidationSet:
    train_catalogue, test = split
    return ValidationSet.build(train_catalogue, test, served(train_catalogue), candidates_k=100)


_fitted: dict[str, object] = {}


def fitted(name: str, train_catalogue: Catalogue):
    """Fit each ranker once per test session (the mixin's tests share it)."""
    if name not in _fitted:
        ranker = create_ranker(name, **TEST_PARAMS[name])
        candidates = served(train_catalogue)
        _fitted[name] = ranker.fit(
            train_catalogue, show_progress=False, candidates=candidates, embeddings=EMBEDDINGS
        )
    return _fitted[name]


def query(user_idx, keyword="circle", candidates=None, **extra) -> RankQuery:
    candidates = np.arange(0, N_PHOTOS, len(SHAPES)) if candidates is None else candidates
    candidates = np.asarray(candidates, dtype=np.int64)
    retrieval = np.linspace(1.0, 0.5, len(candidates)).astype(np.float32)
    return RankQuery(user_idx, keyword, candidates, retrieval, **extra)


class RankerContract:
    """What every ranker guarantees; subclasses set ``name``."""

    name = ""

    @pytest.fixture
    def ranker(self, split):
        return fitted(self.name, split[0])

    def test_one_finite_score_per_candidate_in_order(self, ranker):
        q = query(3)
        result = ranker.score(q)
        assert result.scores.shape == q.candidates.shape
        assert np.isfinite(result.scores).all()
        flipped = RankQuery(3, q.keyword, q.candidates[::-1], q.retrieval_scores[::-1])
        reversed_scores = ranker.score(flipped).scores
        np.testing.assert_allclose(reversed_scores, result.scores[::-1], rtol=1e-5, atol=1e-6)

    def test_scores_exactly_the_candidates_given(self, ranker):
        single = ranker.score(query(3, candidates=[10]))
        assert single.scores.shape == (1,) and np.isfinite(single.scores).all()
        assert ranker.score(query(3, candidates=[])).scores.shape == (0,)
        retrieval = np.array([0.9, 0.8, 0.9], dtype=np.float32)
        duplicated = ranker.score(RankQuery(3, "circle", np.array([10, 20, 10]), retrieval))
        assert duplicated.scores.shape == (3,)
        assert duplicated.scores[0] == duplicated.scores[2]

    def test_out_of_range_photos_score_lowest(self, ranker):
        candidates = [5, -1, 10, N_PHOTOS + 7, 15]
        scores = ranker.score(query(3, candidates=candidates)).scores
        assert np.isfinite(scores).all()
        assert max(scores[1], scores[3]) < min(scores[0], scores[2], scores[4])

    def test_save_load_round_trip_gives_identical_scores(self, ranker, catalogue, tmp_path):
        ranker.save(tmp_path)
        loaded = load_ranker(self.name, tmp_path, catalogue, EMBEDDINGS)
        for q in (query(3), query(None, keyword="nothing like it"), query(7, keyword="star")):
            np.testing.assert_array_equal(loaded.score(q).scores, ranker.score(q).scores)
        assert not list(tmp_path.rglob("*.pkl"))
        for npz in tmp_path.rglob("*.npz"):
            np.load(npz, allow_pickle=False)  # raises if anything needed pickling
        json.loads((tmp_path / "config.json").read_text())

    def test_unknown_user_and_keyword_do_not_raise(self, ranker):
        for q in (
            query(None),
            query(UNSEEN_USER),
            query(10_000),
            query(3, keyword="never searched"),
            query(None, keyword=""),
        ):
            result = ranker.score(q)
            assert np.isfinite(result.scores).all()
            assert isinstance(result.fallback_reason, str)
        if self.name in ("als", "fm", "deepfm", "ease", "item_knn", "clip_profile"):
            assert "unknown user" in ranker.score(query(None)).fallback_reason
            assert "unknown user" in ranker.score(query(UNSEEN_USER)).fallback_reason
            assert ranker.score(query(3)).fallback_reason == ""
        if self.name in ("fm", "deepfm", "popularity"):
            assert "unknown keyword" in ranker.score(query(3, keyword="zzz")).fallback_reason


class TestNone(RankerContract):
    name = "none"

    def test_keeps_retrieval_order(self, ranker):
        q = query(3)
        assert np.all(np.diff(ranker.score(q).scores) < 0)
        flat = RankQuery(3, "circle", q.candidates, np.ones(len(q.candidates), np.float32))
        assert np.all(np.diff(ranker.score(flat).scores) < 0)


class TestPopularity(RankerContract):
    name = "popularity"

    def test_orders_by_training_counts_then_retrieval(self, ranker, split):
        train = split[0].conversions
        candidates = np.arange(0, N_PHOTOS, len(SHAPES))
        counts = train[train.keyword == "circle"].photo_idx.value_counts()
        scores = ranker.score(query(None, candidates=candidates)).scores
        best = candidates[np.argmax(scores)]
        assert best == counts.index[0]
        never = candidates[~np.isin(candidates, train.photo_idx)]
        if len(never) >= 2:  # unconverted photos tie on popularity: retrieval order decides
            positions = np.flatnonzero(np.isin(candidates, never))
            assert np.all(np.diff(scores[positions]) < 0)

    def test_the_stats_prior_orders_equal_counts_by_views(self, split):
        """Photos converted as often for the keyword rank by their views, converted ones first."""
        from dataclasses import replace

        train = split[0]
        photos = train.photos.copy()
        rng = np.random.default_rng(3)
        photos["stats_views"] = rng.integers(1_000, 1_000_000, len(photos))
        photos["stats_downloads"] = photos["stats_views"] // 50
        with_stats = replace(train, photos=photos)
        counts = train.conversions[train.conversions.keyword == "circle"].photo_idx.value_counts()
        once = counts.index[counts == counts.min()].to_numpy()
        never = np.setdiff1d(np.arange(N_PHOTOS), train.conversions.photo_idx)
        assert len(once) >= 3 and len(never) >= 1
        loudest = never[np.argmax(photos["stats_views"].to_numpy()[never])]
        photos.loc[loudest, ["stats_views", "stats_downloads"]] = (10**8, 10**6)
        candidates = np.r_[once, loudest]
        plain = create_ranker("popularity").fit(with_stats, False)
        ranker = create_ranker("popularity", stats_strength=32.0).fit(with_stats, False)
        views = photos["stats_views"].to_numpy()[once]
        scores = ranker.score(query(None, candidates=candidates)).scores
        slope = np.sign(np.corrcoef(np.log(views), ranker.stats_rates[once])[0, 1])
        expected = once[np.argsort(-slope * np.log(views), kind="stable")]
        assert list(candidates[np.argsort(-scores, kind="stable")][: len(once)]) == list(expected)
        assert np.argmin(scores) == len(candidates) - 1  # no conversion for "circle": last
        # Without the prior, the tie is broken by retrieval order, not views.
        plain_scores = plain.score(query(None, candidates=candidates)).scores
        assert np.all(np.diff(plain_scores[: len(once)]) < 0)

    def test_stats_rates_follow_the_views_the_counts_follow(self):
        import pandas as pd

        from ranking_service.rankers.photo_rates import stats_rates

        rng = np.random.default_rng(0)
        views = np.exp(rng.normal(9.0, 1.3, 4000))
        counts = rng.poisson(np.exp(-5.0) * views**0.6)
        photos = pd.DataFrame({"stats_views": views.astype(np.int64), "stats_downloads": 0})
        rates = stats_rates(photos, counts)
        assert rates.sum() == pytest.approx(counts.sum())
        slope = np.polyfit(np.log(views), np.log(rates), 1)[0]
        assert slope == pytest.approx(0.6, abs=0.05)
        blank = pd.DataFrame({"stats_views": np.zeros(4000), "stats_downloads": 0})
        assert np.allclose(stats_rates(blank, counts), counts.mean())

    def test_bad_stats_strength_is_refused(self):
        with pytest.raises(ValueError, match="stats_strength"):
            create_ranker("popularity", stats_strength=-1.0)


class RecentPhotosContract(RankerContract):
    """Rankers that personalise a user the model has never seen from the request's recent photos."""

    def test_recent_photos_personalise_an_unseen_user(self, ranker):
        import copy

        # The prior's weight is chosen on validation; light here, so that the taste shows.
        ranker = copy.copy(ranker)
        ranker.popularity_weight = 0.25
        red = np.flatnonzero(photo_colour(np.arange(N_PHOTOS)) == COLOURS.index("red"))
        recent = red[red % len(SHAPES) != 0][10:18]  # red photos with images, no circles
        result = ranker.score(query(UNSEEN_USER, recent_photos=recent))
        assert result.fallback_reason == ""
        candidates = query(UNSEEN_USER).candidates
        top = candidates[np.argsort(-result.scores, kind="stable")[:10]]
        red_share = np.mean(photo_colour(top) == COLOURS.index("red"))
        assert red_share >= 0.7  # 10 of the 60 candidates are red: 1/6 by chance
        fallback = ranker.score(query(UNSEEN_USER))
        assert fallback.fallback_reason == "unknown user: popularity order"
        top = candidates[np.argsort(-fallback.scores, kind="stable")[:10]]
        assert np.mean(photo_colour(top) == COLOURS.index("red")) < red_share


class TestALS(RecentPhotosContract):
    name = "als"

    def test_fold_in_matches_training_for_a_known_user(self, ranker, split):
        train = split[0].conversions
        user = int(train.user_idx.iloc[0])
        folded = ranker.fold_in(train.photo_idx[train.user_idx == user].to_numpy())
        trained = ranker.user_factors[user]
        cosine = folded @ trained / np.linalg.norm(folded) / np.linalg.norm(trained)
        assert cosine > 0.9

    def test_query_prior_keeps_photos_of_the_query_above_partial_matches(self, ranker):
        import copy

        # Circles and squares in every colour for the query "circle": taste alone (the dot
        # product) cannot tell them apart, the query's popularity prior can.
        candidates = np.flatnonzero(np.isin(np.arange(N_PHOTOS) % len(SHAPES), [0, 1]))
        plain = copy.copy(ranker)
        plain.popularity_weight = 0.0
        shares = {}
        for name, model in (("with prior", ranker), ("plain", plain)):
            scores = model.score(query(3, candidates=candidates)).scores
            top = candidates[np.argsort(-scores, kind="stable")[:20]]
            shares[name] = np.mean(top % len(SHAPES) == 0)
        assert ranker.popularity_weight > 0
        assert shares["with prior"] >= shares["plain"] + 0.2, shares

    def test_sets_saved_before_the_query_prior_load_without_it(self, ranker, catalogue, tmp_path):
        ranker.save(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        del config["params"]["popularity_weight"]
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert load_ranker("als", tmp_path, catalogue).popularity_weight == 0.0

    def test_recommend_scores_the_whole_catalogue(self, ranker):
        assert ranker.recommend(3, 10).scores.shape == (N_PHOTOS,)
        assert "unknown user" in ranker.recommend(None, 10).fallback_reason


class TestFM(RankerContract):
    name = "fm"

    def test_trains_deterministically(self, split):
        params = {**TEST_PARAMS["fm"], "epochs": 2, "validation_fraction": 0.0}
        candidates = served(split[0])
        first = create_ranker("fm", **params).fit(split[0], False, candidates)
        second = create_ranker("fm", **params).fit(split[0], False, candidates)
        np.testing.assert_array_equal(first.score(query(3)).scores, second.score(query(3)).scores)

    def test_early_stopping_keeps_the_best_epoch_and_refits(self, split):
        params = {**TEST_PARAMS["fm"], "epochs": 3, "validation_fraction": 0.1, "patience": 1}
        ranker = create_ranker("fm", **params).fit(split[0], False, served(split[0]))
        scored = [entry["validation_ndcg"] for entry in ranker.history]
        assert 1 <= len(scored) <= 3 and all(0.0 <= ndcg <= 1.0 for ndcg in scored)
        assert ranker.best_epoch == 1 + int(np.argmax(scored))
        # The refit saw every training conversion: its vocabulary has every training user.
        assert ranker.encoder.field_sizes[0] == split[0].conversions.user_idx.nunique() + 1

    def test_each_conversion_trains_against_the_negatives_drawn_for_it(self, split, monkeypatch):
        from ranking_service.rankers.bpr_data import BPRTrainingData

        # A negative equal to its conversion's photo is masked out of the loss: with every
        # negative drawn as its own conversion's photo, the loss is 0 exactly when each
        # conversion meets the negatives drawn for it and not another conversion's.
        def own_photo(data, order, rng, keyword_negatives, uniform_negatives):
            photos = data.photo_rows.numpy()[order]
            return np.repeat(photos[:, None], keyword_negatives + uniform_negatives, axis=1)

        monkeypatch.setattr(BPRTrainingData, "sample_negatives", own_photo)
        params = {**TEST_PARAMS["fm"], "epochs": 1, "validation_fraction": 0.0}
        ranker = create_ranker("fm", **params).fit(split[0], False, served(split[0]))
        assert ranker.history[0]["loss"] == 0.0

    def test_an_epoch_trains_on_at_most_max_epoch_conversions(self, split, monkeypatch):
        from ranking_service.rankers.bpr_data import BPRTrainingData

        drawn_for = []
        sample_negatives = BPRTrainingData.sample_negatives

        def counted(data, order, *args):
            drawn_for.append((len(order), len(np.unique(order)), len(data)))
            return sample_negatives(data, order, *args)

        monkeypatch.setattr(BPRTrainingData, "sample_negatives", counted)
        params = {**TEST_PARAMS["fm"], "epochs": 2, "validation_fraction": 0.0}
        create_ranker("fm", **params, max_epoch_conversions=100).fit(
            split[0], False, served(split[0])
        )
        assert [(n, distinct) for n, distinct, _ in drawn_for] == [(100, 100), (100, 100)]
        assert all(total > 100 for _, _, total in drawn_for)
        drawn_for.clear()
        create_ranker("fm", **params, max_epoch_conversions=0).fit(
            split[0], False, served(split[0])
        )
        assert all(n == total for n, _, total in drawn_for)


class TestDeepFM(RankerContract):
    name = "deepfm"

    def test_int8_gate_reports_and_keeps_fp32_when_it_fails(self, ranker, held_out):
        from ranking_service.rankers.int8 import format_int8_gate, int8_gate

        figures = int8_gate(ranker, held_out, timing_queries=20, rounds=1, require_speedup=False)
        for key in ("fp32_ndcg", "int8_ndcg", "fp32_ms_per_request", "int8_ms_per_request"):
            assert np.isfinite(figures[key])
        assert figures["accepted"] == ranker.int8
        assert "NDCG@10" in format_int8_gate(figures)
        fp32 = (ranker.set_int8(False), ranker.score(query(3)).scores)[1]
        forced = int8_gate(ranker, held_out, max_relative_drop=-1.0, timing_queries=5, rounds=1)
        assert not forced["accepted"] and not ranker.int8
        assert "NDCG@10 dropped" in forced["reason"]
        np.testing.assert_array_equal(ranker.score(query(3)).scores, fp32)

    def test_int8_state_survives_save_and_load(self, ranker, catalogue, tmp_path):
        ranker.set_int8(True)
        try:
            ranker.save(tmp_path)
            loaded = load_ranker("deepfm", tmp_path, catalogue)
            assert loaded.int8
            np.testing.assert_allclose(
                loaded.score(query(3)).scores, ranker.score(query(3)).scores, rtol=1e-5
            )
        finally:
            ranker.set_int8(False)


class TestEASE(RecentPhotosContract):
    name = "ease"

    def test_weights_solve_the_regularised_regression(self, split):
        from ranking_service.rankers.common import conversion_matrix

        ranker = create_ranker("ease", l2=20.0, neighbours=N_PHOTOS).fit(split[0], False)
        x = conversion_matrix(split[0], binary=True)
        items = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
        b = ranker.weights[items][:, items].toarray().astype(np.float64)
        gram = (x[:, items].T @ x[:, items]).toarray().astype(np.float64)
        assert np.allclose(np.diag(b), 0.0)
        # Off the diagonal, (XᵀX + λI) B = XᵀX (Steck 2019, eq. 8's optimality condition).
        residual = (gram + 20.0 * np.eye(len(items))) @ b - gram
        off_diagonal = ~np.eye(len(items), dtype=bool)
        assert np.abs(residual[off_diagonal]).max() < 1e-2 * np.abs(gram).max()

    def test_max_items_keeps_the_most_converted_photos(self, split):
        ranker = create_ranker("ease", max_items=20).fit(split[0], False)
        counts = np.bincount(split[0].conversions.photo_idx, minlength=N_PHOTOS)
        rows = np.flatnonzero(np.diff(ranker.weights.indptr) > 0)
        assert 0 < len(rows) <= 20
        assert counts[rows].min() >= np.sort(counts)[-20]
        assert ranker.score(query(3)).scores.shape == (N_PHOTOS // len(SHAPES),)


class TestItemKNN(RecentPhotosContract):
    name = "item_knn"

    def test_similarity_is_shrunk_cosine(self, split):
        from ranking_service.rankers.common import conversion_matrix

        ranker = create_ranker("item_knn", shrink=5.0, neighbours=N_PHOTOS).fit(split[0], False)
        x = conversion_matrix(split[0], binary=True).toarray()
        i, j = np.argsort(-x.sum(axis=0))[:2]
        expected = x[:, i] @ x[:, j] / (np.sqrt(x[:, i].sum() * x[:, j].sum()) + 5.0)
        assert ranker.weights[i, j] == pytest.approx(expected, rel=1e-5)
        assert ranker.weights[i, i] == 0.0

    def test_neighbours_bounds_each_row(self, split):
        ranker = create_ranker("item_knn", neighbours=7).fit(split[0], False)
        assert np.diff(ranker.weights.indptr).max() <= 7

    def test_weights_equal_the_dense_computation_pair_by_pair(self, split):
        """Computed on co-converted pairs only, every weight is the float32 the dense block gave."""
        from ranking_service.rankers.common import conversion_matrix

        ranker = create_ranker("item_knn", shrink=5.0, neighbours=N_PHOTOS).fit(split[0], False)
        x = conversion_matrix(split[0], binary=True).toarray()
        norms = np.sqrt(x.sum(axis=0)).astype(np.float32)
        dense = (x.T @ x) / (norms[:, None] * norms[None, :] + 5.0)
        np.fill_diagonal(dense, 0.0)
        np.testing.assert_array_equal(ranker.weights.toarray(), dense.astype(np.float32))
        assert ranker.weights.dtype == np.float32 and (ranker.weights.data != 0).all()


def _kept_by_sorting(block: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per row: its k largest-magnitude non-zeros (equal magnitudes: smaller column first),
    then by column."""
    kept = []
    for row in block:
        entries = sorted((-abs(v), c, v) for c, v in enumerate(row) if v != 0)[:k]
        kept.append(sorted((c, v) for _, c, v in entries))
    return kept


@pytest.mark.parametrize("k", [0, 1, 3, 8, 50])
def test_sparse_top_weights_keep_what_the_dense_selection_keeps(k):
    from scipy import sparse

    from ranking_service.rankers.item_item import top_weights_of_sparse_rows, top_weights_per_row

    rng = np.random.default_rng(k)
    # Ties on purpose (few distinct values, negatives of the same magnitude), empty rows,
    # rows shorter and longer than k.
    block = rng.choice([0.0, 0.0, 0.0, 0.5, -0.5, 1.0, 2.0, -2.0], size=(40, 30)).astype(np.float32)
    block[5] = 0.0
    lengths, columns, values = top_weights_of_sparse_rows(sparse.csr_matrix(block), k)
    assert lengths.sum() == len(columns) == len(values)
    starts = np.r_[0, np.cumsum(lengths)]
    got = [
        list(zip(columns[a:b].tolist(), values[a:b].tolist())) for a, b in zip(starts, starts[1:])
    ]
    assert got == _kept_by_sorting(block, k)

    distinct = block * (1 + rng.permutation(block.size).reshape(block.shape) / 1e3)  # no ties
    sparse_pieces = top_weights_of_sparse_rows(sparse.csr_matrix(distinct), k)
    for a, b in zip(sparse_pieces, top_weights_per_row(distinct, k)):
        np.testing.assert_array_equal(a, b)


class TestClipProfile(RecentPhotosContract):
    name = "clip_profile"

    def test_photos_no_one_converted_rank_by_what_they_show(self, ranker, split):
        converted = set(split[0].conversions.photo_idx.tolist())
        fresh = [p for p in range(10, N_PHOTOS) if p not in converted]
        user = 3
        liked = split[0].conversions.photo_idx[split[0].conversions.user_idx == user]
        favourite = np.bincount(photo_colour(liked), minlength=len(COLOURS)).argmax()
        fresh = np.asarray(fresh)
        if len(np.unique(photo_colour(fresh))) < 2:
            pytest.skip("every never-converted photo has the same colour")
        scores = ranker.score(query(user, candidates=fresh)).scores
        top = fresh[np.argsort(-scores, kind="stable")[: max(1, len(fresh) // 6)]]
        share = np.mean(photo_colour(top) == favourite)
        assert share > np.mean(photo_colour(fresh) == favourite) + 0.2

    def test_needs_the_embeddings(self, split, tmp_path):
        with pytest.raises(ValueError, match="image embeddings"):
            create_ranker("clip_profile").fit(split[0], False)
        fitted("clip_profile", split[0]).save(tmp_path)
        with pytest.raises(ValueError, match="image embeddings"):
            load_ranker("clip_profile", tmp_path, split[0])

    def test_thin_histories_have_weaker_tastes(self, ranker):
        one = ranker.profile(None, np.array([20]))
        several = ranker.profile(None, np.array([20, 21, 22, 23, 24, 25]))
        many = ranker.profile(None, np.tile([20, 21, 22, 23, 24, 25], 10))
        assert np.linalg.norm(one) < np.linalg.norm(several) < np.linalg.norm(many)

    def test_the_query_alone_is_no_taste(self, split):
        """Converting what the query asked for says nothing; the choice within it does."""
        from ranking_service.rankers.clip_profile import ClipProfileRanker

        catalogue = split[0]
        ranker = ClipProfileRanker(half_life=1e12).fit(catalogue, False, embeddings=EMBEDDINGS)
        # Unweighted, the residuals against each keyword's mean cancel over all users...
        assert np.abs(ranker.gradients.sum(axis=0)).max() < 1e-3
        # ...while a single user's do not: their choices within the queries are their taste.
        assert np.linalg.norm(ranker.gradients, axis=1).max() > 0.1
        assert ranker.curvature.min() >= 0.0

    def test_a_mean_profile_ranker_is_refused(self, split, tmp_path):
        import json

        fitted("clip_profile", split[0]).save(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        config.pop("model")
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="earlier format"):
            load_ranker("clip_profile", tmp_path, split[0], EMBEDDINGS)


class TestStacked(RankerContract):
    name = "stacked"

    def test_saved_as_lightgbm_text_with_its_bases(self, ranker, catalogue, tmp_path):
        ranker.save(tmp_path)
        assert (tmp_path / "model.txt").read_text().startswith("tree")
        assert {p.name for p in (tmp_path / "bases").iterdir()} == {
            "popularity",
            "als",
            "clip_profile",
        }
        with pytest.raises(ValueError, match="needs embeddings"):
            load_ranker("stacked", tmp_path, catalogue, None)

    def test_an_unseen_user_falls_back_and_says_so(self, ranker):
        assert "unknown user" in ranker.score(query(None)).fallback_reason
        assert ranker.score(query(3)).fallback_reason == ""

    def test_without_embeddings_it_stacks_the_other_bases(self, split, catalogue, tmp_path):
        ranker = create_ranker("stacked", **TEST_PARAMS["stacked"]).fit(
            split[0], show_progress=False, candidates=served(split[0])
        )
        assert ranker.bases == ("popularity", "als")
        ranker.save(tmp_path)
        loaded = load_ranker("stacked", tmp_path, catalogue, None)
        np.testing.assert_array_equal(loaded.score(query(3)).scores, ranker.score(query(3)).scores)

    def test_needs_candidate_lists(self, split):
        with pytest.raises(ValueError, match="candidate lists"):
            create_ranker("stacked").fit(split[0], show_progress=False)


@pytest.mark.parametrize(
    "name", ["als", "fm", "deepfm", "ease", "item_knn", "clip_profile", "stacked"]
)
def test_personalized_rankers_beat_popularity_on_held_out_tastes(name, split, held_out):
    popularity = held_out.ndcg(fitted("popularity", split[0]))
    personalized = held_out.ndcg(fitted(name, split[0]))
    assert len(held_out) > 100
    assert personalized > popularity + 0.05, (name, personalized, popularity)


def test_factory_names_and_errors():
    from imgsearch import names

    # The ranking service implements exactly the rankers the API names (RANKER_* enum values).
    expected = (
        "none",
        "popularity",
        "als",
        "fm",
        "deepfm",
        "ease",
        "item_knn",
        "clip_profile",
        "stacked",
    )
    assert RANKER_NAMES == names.RANKER_NAMES == expected
    for name in RANKER_NAMES:
        assert create_ranker(name).name == name
    with pytest.raises(ValueError, match="unknown ranker .svd.; valid: none, popularity, als"):
        create_ranker("svd")
    with pytest.raises(ValueError, match="valid: none"):
        load_ranker("svd", "/nonexistent", None)


def test_candidate_lists_are_what_the_keyword_retriever_returns(catalogue):
    index = KeywordIndex.from_keywords(catalogue.keywords)
    lists = CandidateLists.collect(
        ["Circle", "red circle", "unicorn", "circle"], index.retrieve, 50, retriever="keyword"
    )
    assert lists.keywords == ["circle", "red circle", "unicorn"] and lists.depth == 50
    for keyword in ("circle", "red circle"):
        expected = index.retrieve(keyword, 50)
        photos, scores = lists.top(keyword)
        np.testing.assert_array_equal(photos, expected.photo_idx)
        np.testing.assert_allclose(scores, expected.scores)
    both, _ = lists.top("red circle", 10)  # token match: photos with both words come first
    assert len(both) == 10 and np.all(both % len(SHAPES) == 0)
    assert np.all(photo_colour(both) == COLOURS.index("red"))
    assert len(lists.top("unicorn")[0]) == 0 and len(lists.top("never asked")[0]) == 0
    start, length, photos = lists.pools(["", "circle", "red circle"], 3)
    assert list(length) == [0, 3, 3]
    np.testing.assert_array_equal(photos[start[2] : start[2] + 3], lists.top("red circle", 3)[0])


def test_fm_needs_candidate_lists_for_its_keyword_negatives(split):
    with pytest.raises(ValueError, match="candidate lists"):
        create_ranker("fm", **TEST_PARAMS["fm"]).fit(split[0], show_progress=False)


def test_training_tunes_on_validation_and_writes_a_loadable_artifact(split, catalogue, tmp_path):
    from ranking_service.training import train_rankers
    from ranking_service.tuning import tune_ranker_report
    from ranking_service.validation_slice import prepare_validation

    train_catalogue, test = split
    candidates = served(train_catalogue)
    validation = prepare_validation(train_catalogue, candidates)
    assert validation.usable and len(validation.tuning) and len(validation.selection)
    tuned = validation.catalogue.conversions
    assert tuned.converted_at.max() <= validation.later.converted_at.min()
    assert len(tuned) + len(validation.later) == len(train_catalogue.conversions)
    grid = [{"factors": 4, "regularization": 1.0}]
    report = tune_ranker_report("als", validation, candidates, grid=grid)
    assert report["params"]["factors"] == 4 and report["params"]["iterations"] in (5, 10, 15, 25)
    grid = [{**TEST_PARAMS["fm"], "epochs": 2}]
    report = tune_ranker_report("fm", validation, candidates, grid=grid)
    assert report["grid"][0]["best_epoch"] in (1, 2) and report["model"].best_epoch in (1, 2)
    trained = train_rankers(
        train_catalogue, ["popularity", "als"], tmp_path, candidates, show_progress=False
    )
    assert set(trained.rankers) == {"popularity", "als"}
    json.dumps(trained.rankers)
    json.dumps(trained.selection)
    chosen = trained.rankers["als"]["prior_weight"]["popularity_weight"]
    als = load_ranker("als", tmp_path / "als", catalogue)
    assert als.popularity_weight == chosen
    assert {row["ranker"] for row in trained.selection["table"]} == {"none", "popularity", "als"}
    validation_set = ValidationSet.build(train_catalogue, test, candidates)
    assert 0.0 < validation_set.ndcg(als) <= 1.0
    # Popularity's stats prior is chosen on validation even untuned, and ALS's query prior is
    # that validated popularity.
    from ranking_service.tuning import ALWAYS_TUNED

    grid = trained.rankers["popularity"]["tuning"]["grid"]
    assert [point["params"] for point in grid] == ALWAYS_TUNED["popularity"]
    best = max(grid, key=lambda point: point["validation_ndcg"])["params"]["stats_strength"]
    popularity = load_ranker("popularity", tmp_path / "popularity", catalogue)
    assert popularity.stats_strength == best
    assert als.popularity.params == popularity.params


def test_the_prior_is_validated_without_the_popularity_ranker(split, tmp_path):
    from ranking_service.training import train_rankers
    from ranking_service.tuning import ALWAYS_TUNED, tune_ranker_report
    from ranking_service.validation_slice import prepare_validation

    candidates = served(split[0])
    trained = train_rankers(split[0], ["item_knn"], tmp_path, candidates, show_progress=False)
    validation = prepare_validation(split[0], candidates)
    grid = ALWAYS_TUNED["popularity"]
    chosen = tune_ranker_report("popularity", validation, candidates, None, grid)["params"]
    expected = create_ranker("popularity", **chosen).params
    assert trained.rankers["item_knn"]["params"]["popularity"] == expected
    assert load_ranker("item_knn", tmp_path / "item_knn", split[0]).popularity.params == expected


def test_rankers_needing_embeddings_are_skipped_without(split, tmp_path):
    from ranking_service.training import train_rankers

    trained = train_rankers(
        split[0], ["clip_profile", "ease"], tmp_path, served(split[0]), show_progress=False
    )
    assert "image embeddings" in trained.skipped["clip_profile"]
    assert set(trained.rankers) == {"ease"} and not (tmp_path / "clip_profile").exists()
