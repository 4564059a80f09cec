"""`imgsearch bench-ingest`'s measurement at tiny sizes on real in-process servers: its writes
are acknowledged and logged, its photos found and then gone, and its figures printed and
written (JSON, Markdown, a results page)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil

from imgsearch import artifacts
from imgsearch.catalog_log import DELETE, UPSERT, CatalogLog
from imgsearch.conversion_store import open_store
from imgsearch_tools.bench import ingest
from imgsearch_tools.results_page import parse_header
from tests.conftest import CLIP_SET_TIMEOUT, Stack

pytestmark = CLIP_SET_TIMEOUT


def test_bench_ingest_writes_finds_and_reports_on_a_live_stack(
    loop_thread, clip_set, clip_data, tmp_path, capsys
):
    root = tmp_path / "root"
    shutil.copytree(clip_set, root, symlinks=True, copy_function=os.link)
    out, page = tmp_path / "out", tmp_path / "docs" / "ingest.md"
    out.mkdir()
    live = {"live_catalogue": True, "conversions_db": str(out / "ingest-log.sqlite3")}
    parser = argparse.ArgumentParser()
    ingest.add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["bench-ingest", "--data", str(clip_data), "--artifacts", str(root), "--out", str(out)]
        + ["--writes", "3", "--batch", "2", "--throughput-s", "0.2", "--search-s", "0.5"]
        + ["--search-rate", "20", "--ingest-rate", "10", "--warm-s", "0.2"]
        + ["--results-page", str(page)]
    )
    stack = Stack(loop_thread, root, stage_overrides=live, **live)
    try:
        report = asyncio.run(ingest.measure(args, stack.target, ingest.Images(clip_data)))
    finally:
        stack.stop()
    ingest.write_report(args, report, artifacts.resolve(str(root)), out)

    throughput = report["throughput"]
    assert throughput["photos"] >= 2 and throughput["photos"] % 2 == 0
    assert throughput["photos_per_s"] > 0
    # Each of the 3 photos was found after its write and gone after its deletion (measure
    # raises when one is not within 30 s).
    for name in ("ack_to_searchable_ms", "delete_to_gone_ms"):
        assert 0 < report[name]["p50"] <= report[name]["p99"], name
    assert report["search_idle"]["searches"] == 10 and report["search_idle"]["errors"] == 0
    busy = report["search_while_ingesting"]
    assert (busy["searches"], busy["errors"]) == (10, 0)
    assert (busy["photos_written"], busy["photos_refused"]) == (5, 0)
    # Every acknowledged write is in the log: the warm-up photo, the batches, the 3 photos
    # timed to searchable (then taken down) and the 5 written under search load.
    with open_store(db=live["conversions_db"]) as store:
        changes = CatalogLog(store).since(0, 10_000)
    upserts = {c.photo_id for c in changes if c.operation == UPSERT}
    deletes = {c.photo_id for c in changes if c.operation == DELETE}
    assert len(upserts) == 1 + throughput["photos"] + 3 + 5
    assert len(deletes) == 3 and deletes <= upserts
    assert all(c.embedding is not None for c in changes if c.operation == UPSERT)

    written = json.loads((out / "ingest.json").read_text())
    assert written["throughput"] == throughput and written["settings"]["writes"] == 3
    markdown = (out / "ingest.md").read_text()
    assert "| photos/s written (batches of 2" in markdown
    assert f"| {report['p99_ratio']:.2f}x |" in markdown
    assert markdown.strip() in capsys.readouterr().out
    assert parse_header(page.read_text()).command.startswith("imgsearch ")
