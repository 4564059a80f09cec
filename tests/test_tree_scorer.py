"""The numpy tree scorer gives LightGBM's raw scores, double for double, or steps aside."""

from __future__ import annotations

import lightgbm
import numpy as np
import pytest

from ranking_service.rankers.booster_predict import (
    check_rows,
    lightgbm_rows,
    predict_rows,
    prepare,
)
from ranking_service.rankers.tree_scorer import TreeScorer, UnsupportedModel

pytestmark = pytest.mark.unit


def _ranking_data(rng: np.random.Generator, n_queries: int = 300, per_query: int = 20):
    """Features with NaNs (one column), exact zeros (one column) and ties, graded labels."""
    n = n_queries * per_query
    features = rng.normal(size=(n, 6))
    features[:, 1] = np.round(features[:, 1], 1)  # ties on thresholds
    features[rng.random(n) < 0.2, 2] = np.nan
    features[rng.random(n) < 0.3, 3] = 0.0
    signal = features[:, 0] + np.nan_to_num(features[:, 2]) - 0.5 * features[:, 3]
    labels = (signal + rng.normal(scale=0.5, size=n) > 1.0).astype(int)
    return features, labels, [per_query] * n_queries


def _booster(params: dict, rounds: int = 30, seed: int = 0) -> lightgbm.Booster:
    rng = np.random.default_rng(seed)
    features, labels, groups = _ranking_data(rng)
    base = {
        "objective": "lambdarank",
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "verbose": -1,
        "num_threads": 1,
        "deterministic": True,
        "seed": seed,
    }
    data = lightgbm.Dataset(features, labels, group=groups, params={"verbose": -1})
    return lightgbm.train({**base, **params}, data, num_boost_round=rounds)


def _rows(scorer: TreeScorer, seed: int) -> np.ndarray:
    """Candidates × features: rows at and around every threshold, with NaN, 0 and 1e-40."""
    return np.ascontiguousarray(check_rows(scorer, np.random.default_rng(seed)).T)


@pytest.mark.parametrize(
    "params",
    [
        {},  # missing type NaN where a column has NaNs, None elsewhere
        {"zero_as_missing": True},  # missing type Zero
        {"use_missing": False},  # NaN read as 0 everywhere
        {"num_leaves": 31, "min_data_in_leaf": 5},  # 32-bit leaf masks
        {"num_leaves": 63, "min_data_in_leaf": 2},  # 64-bit leaf masks
    ],
)
def test_same_doubles_as_lightgbm(params):
    booster = _booster(params)
    scorer = TreeScorer(booster.model_to_string())
    for seed in range(3):
        rows = _rows(scorer, seed)
        expected = lightgbm_rows(booster, rows)
        assert np.array_equal(scorer.predict(np.ascontiguousarray(rows.T)), expected)
        # Through the serving entry point, from either memory layout.
        assert np.array_equal(predict_rows(booster, rows), expected)
        assert np.array_equal(predict_rows(booster, np.asfortranarray(rows)), expected)
    assert prepare(booster) is not None


def test_missing_types_are_read_from_the_model():
    nan = TreeScorer(_booster({}).model_to_string())
    zero = TreeScorer(_booster({"zero_as_missing": True}).model_to_string())
    assert 2 in set(nan.missing.tolist())  # the NaN column
    assert 1 in set(zero.missing.tolist())


def test_single_leaf_trees_and_an_empty_request():
    # Labels the trees cannot split on: every tree is one leaf.
    features = np.random.default_rng(1).normal(size=(200, 3))
    data = lightgbm.Dataset(features, np.zeros(200), params={"verbose": -1})
    booster = lightgbm.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1}, data, num_boost_round=3
    )
    scorer = TreeScorer(booster.model_to_string())
    rows = np.random.default_rng(2).normal(size=(7, 3))
    expected = lightgbm_rows(booster, rows)
    assert np.array_equal(scorer.predict(np.ascontiguousarray(rows.T)), expected)
    assert scorer.predict(np.zeros((3, 0))).shape == (0,)


def test_categorical_splits_are_left_to_lightgbm():
    rng = np.random.default_rng(3)
    features = np.c_[rng.integers(0, 6, 2000), rng.normal(size=2000)]
    labels = (features[:, 0] % 2 == 0).astype(float) + features[:, 1]
    data = lightgbm.Dataset(
        features, labels, categorical_feature=[0], params={"verbose": -1, "min_data_per_group": 5}
    )
    booster = lightgbm.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1, "cat_smooth": 1},
        data,
        num_boost_round=5,
    )
    with pytest.raises(UnsupportedModel, match="categorical"):
        TreeScorer(booster.model_to_string())
    assert prepare(booster) is None
    rows = np.c_[rng.integers(0, 6, 50), rng.normal(size=50)].astype(np.float64)
    assert np.array_equal(predict_rows(booster, rows), booster.predict(rows, num_threads=1))


def test_a_model_text_the_scorer_cannot_read_is_left_to_lightgbm(monkeypatch):
    booster = _booster({}, rounds=3, seed=4)
    monkeypatch.setattr(booster, "model_to_string", lambda: "Tree=0\nnum_leaves=2\n")
    rows = np.random.default_rng(5).normal(size=(20, 6))
    assert prepare(booster) is None
    assert np.array_equal(predict_rows(booster, rows), lightgbm_rows(booster, rows))
