"""bench-scale: the same code path as the million-photo run, on a small catalogue."""

import json

import pytest

from imgsearch_tools.bench.scale import parse_sizes
from imgsearch_tools.bench.scale_report import extrapolated, growth
from imgsearch_tools.cli import main


def test_a_small_run_builds_serves_and_reports_every_figure(tmp_path, monkeypatch):
    from imgsearch_tools import results_page

    out, work = tmp_path / "out", tmp_path / "work"
    page = tmp_path / "docs" / "scale.md"
    # Whether the plot beside the page was there when the header read the commit: a tracked
    # file written before would mark the commit "-dirty".
    plot_there = []
    real_commit = results_page.current_commit
    monkeypatch.setattr(
        results_page,
        "current_commit",
        lambda: plot_there.append(page.with_suffix(".png").exists()) or real_commit(),
    )
    args = ["bench-scale", "--sizes=1000", f"--work={work}", f"--out={out}", "--qps=10"]
    args += ["--duration=1", "--warmup=0.5", f"--results-page={page}", "--load-generator=python"]
    assert main(args) == 0
    report = json.loads((out / "scale.json").read_text())
    (size,) = report["sizes"]
    assert size["photos"] == 1000
    assert size["demo_data"]["n_conversions"] == 20_000 and size["demo_data"]["seconds"] > 0
    build = size["build"]
    assert [s["step"] for s in build["steps"]] == [
        "read",
        "filters and catalogue",
        "keyword index",
        "rankers",
    ]
    assert set(build["rankers"]) == {"popularity", "als"}
    assert size["demo_data"]["cpu_seconds"] > 0 and build["cpu_seconds"] > 0
    assert all(step["cpu_seconds"] >= 0 for step in build["steps"])
    assert build["bytes"]["keyword index"] > 0 and build["bytes"]["vector index"] == 0
    served = size["serving"]
    assert (
        set(served["load_seconds"])
        == set(served["resident_mib"])
        == {
            "retrieval",
            "ranking",
            "gateway",
        }
    )
    assert all(mib > 0 for mib in served["resident_mib"].values())
    scenarios = served["scenarios"]
    assert set(scenarios) == {"keyword + ALS, single keyword", "keyword + ALS, unseen multi-word"}
    for result in scenarios.values():
        assert result["sent"] > 0 and result["errors"] == 0 and result["p99_ms"] > 0
    assert "| retrieval resident MiB |" in (out / "scale.md").read_text()
    assert (out / "scale.png").stat().st_size > 0 and page.with_suffix(".png").exists()
    assert "bench-scale --sizes=1000" in page.read_text()
    assert "sent by the Python (grpc.aio) load generator" in page.read_text()
    assert plot_there == [False]  # the page is written once, at the end, before its plot

    # A second run keeps the catalogue and the set it finds: nothing is generated again.
    again = ["bench-scale", "--sizes=1000", f"--work={work}", f"--out={out}", "--qps=0"]
    assert main(again) == 0
    kept = json.loads((out / "scale.json").read_text())["sizes"][0]
    assert kept["demo_data"]["kept"] and kept["build"]["kept"]
    assert kept["build"]["steps"] == build["steps"]


def test_growth_is_read_from_the_two_largest_sizes_and_stated_per_shard():
    exponent, value = growth([10_000, 100_000, 1_000_000], [1.0, 10.0, 100.0], 10_000_000)
    assert exponent == pytest.approx(1.0) and value == pytest.approx(1000.0)
    assert growth([10_000], [3.0], 10_000_000) is None
    assert extrapolated("retrieval resident MiB", [100_000, 1_000_000], [100, 200]) == (
        "2.0×",
        "263.5 per shard",
    )
    assert extrapolated("ranker als s", [100_000, 1_000_000], [1, 10]) == ("10.0×", "100.0")


@pytest.mark.parametrize("text", ["10k", "50", "1000,x"])
def test_a_bad_size_is_refused_naming_it(text, capsys):
    with pytest.raises(ValueError, match="--sizes"):
        parse_sizes(text)
    assert main(["bench-scale", f"--sizes={text}"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_the_calibrated_search_effort_and_its_recall_are_rows_not_extrapolated():
    from imgsearch_tools.bench.scale_report import rows

    def size(photos: int, ef_search: int, recall: float) -> dict:
        index = {"recall@10_vs_exact": recall}
        by_query = {"one word": {"value": ef_search}, "several words": {"value": ef_search // 8}}
        index["calibration"] = {"parameter": "efSearch", "value": ef_search, "by_query": by_query}
        build = {"kept": True, "steps": [], "rankers": {}, "bytes": {}, "vector_index": index}
        return {"photos": photos, "demo_data": {"kept": True}, "build": build, "serving": {}}

    report = {"sizes": [size(100_000, 2048, 0.951), size(1_000_000, 8192, 0.96)]}
    table = rows(report)
    assert table["vector index efSearch (calibrated)"] == [2048, 8192]
    assert table["vector index efSearch, several words queries (calibrated)"] == [256, 1024]
    assert table["vector index recall@10 vs exact"] == [0.951, 0.96]
    for name in table:
        assert extrapolated(name, [100_000, 1_000_000], table[name]) == ("", "")
