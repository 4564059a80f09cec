"""Ranking metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgsearch.latency import percentiles_ms
from imgsearch.ranking_metrics import (
    bootstrap_ci,
    hit_matrix,
    metrics_from_hits,
    ndcg_at_k,
    paired_bootstrap_ci,
    precision_at_k,
    rank_by_scores,
    recall_at_k,
    seed_ndcg,
    standard_error,
)

D = [1.0 / math.log2(r + 1) for r in range(1, 12)]  # discount of rank r at D[r - 1]


def test_perfect_ranking_scores_one():
    ranked = np.array([7, 3, 5, 1, 2])
    assert ndcg_at_k(ranked, {7, 3, 5}, k=10) == pytest.approx(1.0)
    assert recall_at_k(ranked, {7, 3, 5}, k=10) == pytest.approx(1.0)
    assert precision_at_k(ranked, {7, 3, 5}, k=3) == pytest.approx(1.0)


def test_hand_computed_ndcg():
    # Relevant at ranks 2 and 4 of 5; two relevant photos in all.
    ranked = np.array([10, 11, 12, 13, 14])
    expected = (D[1] + D[3]) / (D[0] + D[1])
    assert ndcg_at_k(ranked, [11, 13], k=10) == pytest.approx(expected)
    assert precision_at_k(ranked, [11, 13], k=10) == pytest.approx(0.2)
    assert recall_at_k(ranked, [11, 13], k=10) == pytest.approx(1.0)


def test_cutoff_ignores_hits_past_k():
    ranked = np.array([1, 2, 3, 4])
    assert ndcg_at_k(ranked, [4], k=3) == 0.0
    assert recall_at_k(ranked, [1, 4], k=3) == pytest.approx(0.5)


def test_ideal_dcg_is_capped_at_k():
    # 12 relevant photos, all 10 slots hit: perfect at k=10 although recall is 10/12.
    ranked = np.arange(12)
    assert ndcg_at_k(ranked, range(12), k=10) == pytest.approx(1.0)
    assert recall_at_k(ranked, range(12), k=10) == pytest.approx(10 / 12)


def test_fewer_than_k_candidates_precision_divides_by_k():
    ranked = np.array([5, 6, 7, 8])
    assert precision_at_k(ranked, [5, 7], k=10) == pytest.approx(0.2)
    # IDCG is over min(k, |relevant|) = 3 ones even though only 4 candidates exist.
    assert ndcg_at_k(ranked, [5, 7, 99], k=10) == pytest.approx((D[0] + D[2]) / sum(D[:3]))
    assert recall_at_k(ranked, [5, 7, 99], k=10) == pytest.approx(2 / 3)


def test_no_relevant_in_candidates_or_no_relevant_at_all():
    ranked = np.array([1, 2, 3])
    for relevant in ([9, 10], []):
        assert ndcg_at_k(ranked, relevant) == 0.0
        assert precision_at_k(ranked, relevant) == 0.0
        assert recall_at_k(ranked, relevant) == 0.0
    assert ndcg_at_k(np.array([], dtype=np.int64), [1]) == 0.0


def test_duplicate_relevant_ids_count_once():
    assert recall_at_k(np.array([1, 2]), [1, 1, 1], k=10) == pytest.approx(1.0)
    assert ndcg_at_k(np.array([1, 2]), [1, 1], k=10) == pytest.approx(1.0)


def test_ties_are_broken_by_retrieval_order():
    candidates = np.array([40, 30, 20, 10])
    scores = np.array([0.5, 0.9, 0.5, 0.5])
    assert rank_by_scores(candidates, scores).tolist() == [30, 40, 20, 10]
    # All equal: retrieval order is kept, so ties cannot make a ranker look better.
    flat = rank_by_scores(candidates, np.zeros(4))
    assert flat.tolist() == [40, 30, 20, 10]
    assert ndcg_at_k(flat, [10], k=10) == pytest.approx(D[3])


def test_nan_scores_rank_last():
    ranked = rank_by_scores(np.array([1, 2, 3]), np.array([np.nan, 0.1, 0.2]))
    assert ranked.tolist() == [3, 2, 1]


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(3)
    rankings = [rng.permutation(30)[: rng.integers(0, 15)] for _ in range(50)]
    relevant = [rng.choice(30, size=rng.integers(0, 6), replace=False) for _ in range(50)]
    hits, n_rel = hit_matrix(rankings, relevant, k=10)
    batch = metrics_from_hits(hits, n_rel)
    for q, (ranked, rel) in enumerate(zip(rankings, relevant)):
        assert batch["ndcg"][q] == pytest.approx(ndcg_at_k(ranked, rel))
        assert batch["precision"][q] == pytest.approx(precision_at_k(ranked, rel))
        assert batch["recall"][q] == pytest.approx(recall_at_k(ranked, rel))


def test_seed_ndcg_uses_counts_as_gains():
    # Counts 3, 1, 2; the scores order them 1st, 3rd, 2nd.
    scores = np.array([0.9, 0.1, 0.5])
    counts = np.array([3, 1, 2])
    assert seed_ndcg(scores, counts) == pytest.approx(1.0)
    reversed_scores = -scores  # order: count 1, 2, 3
    expected = (1 * D[0] + 2 * D[1] + 3 * D[2]) / (3 * D[0] + 2 * D[1] + 1 * D[2])
    assert seed_ndcg(reversed_scores, counts) == pytest.approx(expected)


def test_seed_ndcg_ties_single_photo_and_empty():
    # Equal scores keep input order: counts [1, 2] give the non-ideal order.
    assert seed_ndcg(np.zeros(2), np.array([1, 2])) == pytest.approx((D[0] + 2 * D[1]) / (2 + D[1]))
    assert seed_ndcg(np.array([0.3]), np.array([4])) == pytest.approx(1.0)
    assert seed_ndcg(np.array([]), np.array([])) == 0.0
    assert seed_ndcg(np.array([0.1, 0.2]), np.array([3, 1]), k=1) == pytest.approx(1 / 3)


def test_seed_ndcg_length_mismatch_raises():
    with pytest.raises(ValueError):
        seed_ndcg(np.zeros(2), np.ones(3))


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    population = rng.random(4000)
    small = bootstrap_ci(population[:100], n=500, seed=1)
    large = bootstrap_ci(population, n=500, seed=1)
    for mean, lo, hi in (small, large):
        assert lo <= mean <= hi
    assert small[0] == pytest.approx(population[:100].mean())
    assert (large[2] - large[1]) < (small[2] - small[1]) / 3  # ~sqrt(40) narrower
    assert bootstrap_ci(population[:100], n=500, seed=1) == small  # deterministic
    # A 95% interval is about +-1.96 standard errors.
    assert (large[2] - large[1]) / 2 == pytest.approx(1.96 * standard_error(population), rel=0.15)


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))
    assert bootstrap_ci(np.full(20, 0.25)) == (0.25, 0.25, 0.25)
    assert standard_error(np.array([1.0])) == 0.0


def test_paired_bootstrap_detects_a_consistent_gain():
    rng = np.random.default_rng(5)
    b = rng.random(300)
    a = b + 0.02 + rng.normal(0, 0.01, 300)
    diff, lo, hi = paired_bootstrap_ci(a, b)
    assert diff == pytest.approx(0.02, abs=0.005)
    assert lo > 0


def test_percentiles_ms():
    out = percentiles_ms(np.arange(1, 101) / 1000.0)
    assert out["p50"] == pytest.approx(50.5)
    assert out["p99"] == pytest.approx(99.01)
    assert out["max"] == pytest.approx(100.0) and out["mean"] == pytest.approx(50.5)
    assert percentiles_ms(np.array([]))["p50"] is None
    assert percentiles_ms([0.002, 0.004], "_ms") == {
        "p50_ms": 3.0,
        "p90_ms": 3.8,
        "p99_ms": 3.98,
        "max_ms": 4.0,
        "mean_ms": 3.0,
    }


def test_cores_busy_elsewhere_leaves_this_process_out():
    import threading
    import time

    from imgsearch.cpu import cores_busy_elsewhere, machine_busy_seconds

    if machine_busy_seconds() is None:
        pytest.skip("no /proc/stat here")
    others = cores_busy_elsewhere(0.5)
    stop = time.perf_counter() + 1.0

    def spin():  # this process keeps one core busy for the whole window
        while time.perf_counter() < stop:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    busy = cores_busy_elsewhere(0.5)
    thread.join()
    # Counting this process would add a whole core to what other processes use.
    assert 0.0 <= busy < others + 0.6


def test_niced_processes_take_no_core_from_a_process_that_is_not_niced(monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from imgsearch import cpu

    if cpu.machine_busy_seconds() is None or not hasattr(os, "nice"):
        pytest.skip("no /proc/stat or niceness here")
    # Where the kernel shares CPU by session first, a niced job elsewhere does compete, and
    # is counted; here the spinner below runs in this test's session, where niceness holds.
    monkeypatch.setattr(cpu, "autogroup_scheduling", lambda: False)
    assert cpu.machine_busy_seconds(count_niced=False) <= cpu.machine_busy_seconds()
    baseline = cpu.cores_busy_elsewhere(0.5, niceness=0)
    spinner = subprocess.Popen(
        [
            "nice",
            "-n",
            "19",
            sys.executable,
            "-c",
            "import time\nend = time.time() + 3\nwhile time.time() < end: pass",
        ]
    )
    try:
        time.sleep(0.3)  # started and spinning
        as_unniced = cpu.cores_busy_elsewhere(0.5, niceness=0)
    finally:
        spinner.kill()
        spinner.wait()
    # Counting the niced spinner would add up to a whole core.
    assert 0.0 <= as_unniced < baseline + 0.6
