"""The JSON door benchmark's rounds: their order, each round's added p99, the median's interval."""

from __future__ import annotations

import pytest

from imgsearch_tools.bench.json_door import median_interval, render_json_door, run_order, summarise


def _run(path: str, p99: float) -> dict:
    web_cpu = 1.2 if path == "http" else 0.0
    return {
        "path": path,
        "completed": 6000,
        "achieved_qps": 200.0,
        "error_count": 0,
        "latency_ms": {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "max": p99 * 2},
        "cpu_ms_per_search": {"web": web_cpu, "gateway": 1.5, "total": web_cpu + 1.5},
    }


def test_rounds_pair_one_grpc_and_one_http_run_with_the_first_alternating():
    assert run_order(1) == ["grpc", "http"]
    assert run_order(3) == ["grpc", "http", "http", "grpc", "grpc", "http"]
    assert run_order(0) == ["grpc", "http"]


def test_each_round_is_its_http_p99_minus_its_grpc_p99_and_the_median_is_reported():
    added = [4.0, -2.0, 9.0, 3.0, 6.0]
    runs = []
    for i, (path_a, path_b) in enumerate(zip(run_order(5)[::2], run_order(5)[1::2])):
        grpc_p99 = 20.0 + 7.0 * i  # the machine's drift: both paths of a round move together
        p99 = {"grpc": grpc_p99, "http": grpc_p99 + added[i]}
        runs += [_run(path_a, p99[path_a]), _run(path_b, p99[path_b])]
    report = summarise(runs, 200.0)
    assert report["rounds_p99_added_ms"] == pytest.approx(added)
    assert report["p99_added_ms"] == pytest.approx(4.0)
    low, high = report["p99_added_interval_ms"]
    assert -2.0 <= low <= 4.0 <= high <= 9.0
    assert report["within_budget"]
    assert report["paths"]["http"]["cpu_ms_per_search"]["web"] == pytest.approx(1.2)
    assert report["order"] == run_order(5)
    page = "\n".join(render_json_door({"json_door": report}))
    assert "median **4.0 ms**" in page and "+9.0" in page and "95% bootstrap interval" in page


def test_the_interval_of_a_median_is_seeded_and_needs_two_rounds():
    values = [1.0, 5.0, 2.0, 8.0, 3.0, 4.0]
    assert median_interval(values) == median_interval(list(values))
    low, high = median_interval(values)
    assert 1.0 <= low <= 3.5 <= high <= 8.0
    assert median_interval([3.0]) is None
    assert median_interval([2.0, 2.0]) == (2.0, 2.0)
