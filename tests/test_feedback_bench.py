"""`imgsearch bench-feedback`: a real gateway process, a real store, figures that add up."""

from __future__ import annotations

import json

from imgsearch_tools.cli import main


def test_bench_feedback_measures_a_real_gateway_and_cleans_up(artifact_root, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench-feedback", "--artifacts", str(artifact_root), "--backends", "sqlite"]
    argv += ["--concurrency", "1,2", "--duration", "0.5", "--warmup", "0.2", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "feedback.json").read_text())
    (sqlite,) = report["backends"]
    runs = sqlite["runs"]
    assert [run["spec"]["concurrency"] for run in runs] == [1, 2]
    for run in runs:
        assert run["errors"] == {} and run["events_rejected"] == 0
        assert run["events_acknowledged"] > 0 and run["events_acknowledged"] % 100 == 0
        assert run["events_per_s"] == run["events_acknowledged"] / run["spec"]["duration_s"]
        assert run["latency_ms"]["p99"] >= run["latency_ms"]["p50"] > 0
    # Calls outside the measured windows store events too: never fewer stored than counted.
    assert sqlite["events_stored"] >= sum(run["events_acknowledged"] for run in runs)
    assert "| sqlite | 100 | 2 |" in (out / "feedback.md").read_text()
    assert "| sqlite | 100 | 1 |" in capsys.readouterr().out
    assert not list(out.glob("*.sqlite3*"))  # the scratch store is gone


def test_bench_feedback_needs_a_postgres_server_for_that_backend(
    artifact_root, capsys, monkeypatch
):
    monkeypatch.delenv("IMGSEARCH_CONVERSIONS_DSN", raising=False)
    argv = ["bench-feedback", "--artifacts", str(artifact_root), "--backends", "postgres"]
    assert main(argv) == 2
    assert "--postgres-dsn" in capsys.readouterr().err
