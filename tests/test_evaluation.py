"""The offline evaluation protocol on a tiny synthetic catalogue (no images, so no CLIP)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from imgsearch.evaluation_protocol import temporal_split
from imgsearch.unsplash import read_unsplash
from imgsearch_tools.cli import main as cli_main
from imgsearch_tools.demo_data import generate
from imgsearch_tools.evaluation import comparisons
from imgsearch_tools.evaluation import runner as evaluation
from imgsearch_tools.evaluation.queries import build_test_queries, user_photos
from imgsearch_tools.evaluation.report import markdown_table, write_json
from imgsearch_tools.evaluation.runner import EvalConfig, EvaluationError, evaluate
from imgsearch_tools.results_page import parse_header

RANKERS = ("none", "popularity")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate(
        out,
        n_photos=800,
        n_users=200,
        n_conversions=20_000,
        seed=3,
        with_images=False,
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def catalogue(data_dir):
    return read_unsplash(data_dir, show_progress=False)[0]


@pytest.fixture(scope="module")
def report(catalogue):
    config = EvalConfig(rankers=RANKERS, show_progress=False, bootstrap=300)
    return evaluate(catalogue, config, command="pytest")


def test_split_is_temporal_and_by_position(catalogue):
    split = temporal_split(catalogue.conversions, 0.2)
    n = len(catalogue.conversions)
    assert len(split.earlier) == round(n * 0.8) and len(split.earlier) + len(split.later) == n
    assert split.earlier["converted_at"].max() <= split.later["converted_at"].min()
    # Together they are the time-sorted table, each row exactly once.
    both = pd.concat([split.earlier, split.later], ignore_index=True)
    pd.testing.assert_frame_equal(both, catalogue.conversions.reset_index(drop=True))


def test_split_with_ties_at_the_boundary_does_not_leak():
    times = pd.to_datetime(["2020-01-01"] * 3 + ["2020-01-02"] * 4 + ["2020-01-03"] * 3)
    conversions = pd.DataFrame(
        {
            "converted_at": times[::-1],  # unsorted on purpose
            "keyword": ["a"] * 10,
            "photo_idx": np.arange(10, dtype=np.int32),
            "user_idx": np.zeros(10, dtype=np.int32),
            "conversion_country": [""] * 10,
        }
    )
    split = temporal_split(conversions, 0.5)
    assert len(split.earlier) == 5 and len(split.later) == 5
    assert split.earlier["converted_at"].max() <= split.later["converted_at"].min()
    assert set(split.earlier["photo_idx"]).isdisjoint(split.later["photo_idx"])
    for fraction in (1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            temporal_split(conversions, fraction)


def test_test_queries_follow_the_protocol(catalogue):
    split = temporal_split(catalogue.conversions, 0.2)
    queries = build_test_queries(split, min_pair=3)
    assert len(queries) > 50
    train_users = set(split.earlier["user_idx"].tolist())
    test = split.later
    for q in range(0, len(queries), 7):
        user, keyword = int(queries.user_idx[q]), queries.keyword[q]
        assert user in train_users
        rows = test[(test["user_idx"] == user) & (test["keyword"] == keyword)]
        assert len(rows) >= 3 and len(rows) == queries.counts[q].sum()
        assert sorted(set(rows["photo_idx"].tolist())) == queries.relevant[q].tolist()
        history = split.earlier.loc[split.earlier["user_idx"] == user, "photo_idx"].tail(20)
        assert queries.recent[q].tolist() == history.tolist()  # training only, oldest first
    capped = build_test_queries(split, min_pair=3, max_queries=20, seed=1)
    assert len(capped) == 20 and capped.n_pairs_total == len(queries)


def test_excluded_pairs_are_left_out_before_the_draw(catalogue):
    split = temporal_split(catalogue.conversions, 0.2)
    every = build_test_queries(split, min_pair=1)
    pairs = list(zip(every.user_idx.tolist(), every.keyword.tolist()))
    excluded = set(pairs[::3])
    kept = [i for i, pair in enumerate(pairs) if pair not in excluded]
    drawn = build_test_queries(split, min_pair=1, max_queries=40, seed=2, exclude=excluded)
    # The draw is over the pairs left, each built as it is without a draw or exclusion.
    expected = sorted(np.random.default_rng(2).choice(kept, 40, replace=False))
    assert list(zip(drawn.user_idx.tolist(), drawn.keyword.tolist())) == [
        pairs[i] for i in expected
    ]
    for q, i in enumerate(expected):
        assert drawn.relevant[q].tolist() == every.relevant[i].tolist()
        assert drawn.counts[q].tolist() == every.counts[i].tolist()
        assert drawn.recent[q].tolist() == every.recent[i].tolist()
        assert drawn.country[q] == every.country[i]
    assert drawn.n_pairs_total == len(every)
    undrawn = build_test_queries(split, min_pair=1, exclude=excluded)
    assert len(undrawn) == len(kept)


def test_user_photos_are_each_users_distinct_photos_sorted(catalogue):
    conversions = catalogue.conversions
    expected = {
        int(user): np.unique(group.to_numpy(np.int64))
        for user, group in conversions.groupby("user_idx")["photo_idx"]
    }
    found = user_photos(conversions)
    assert found.keys() == expected.keys()
    for user, photos in expected.items():
        assert found[user].dtype == np.int64 and found[user].tolist() == photos.tolist()


def test_models_are_fitted_on_the_training_part_only(catalogue, monkeypatch):
    split = temporal_split(catalogue.conversions, 0.2)
    seen = {}
    fit_rankers = evaluation.fit_rankers

    def recording_fit(names, train_catalogue, tune, show_progress, workdir=None, **options):
        seen["conversions"] = train_catalogue.conversions
        rankers, info, training = fit_rankers(
            names, train_catalogue, tune, show_progress, workdir, **options
        )
        seen["rankers"] = rankers
        return rankers, info, training

    monkeypatch.setattr(evaluation, "fit_rankers", recording_fit)
    config = EvalConfig(retrievers=("keyword",), rankers=RANKERS, show_progress=False)
    evaluate(catalogue, config, command="pytest")
    used = seen["conversions"]
    assert len(used) == len(split.earlier)
    assert used["converted_at"].max() <= split.later["converted_at"].min()
    train_counts = np.bincount(split.earlier["photo_idx"], minlength=catalogue.n_photos)
    np.testing.assert_array_equal(seen["rankers"]["popularity"].photo_counts, train_counts)


def test_report_rows_and_clip_skipped_without_images(report):
    rows = {(r["retriever"], r["ranker"]): r for r in report["results"]}
    assert set(rows) == {(ret, rk) for ret in ("keyword", "clip", "hybrid") for rk in RANKERS}
    for retriever in ("clip", "hybrid"):
        for ranker in RANKERS:
            assert "no images" in rows[(retriever, ranker)]["skipped"]
    row = rows[("keyword", "none")]
    for key in ("queries", "ndcg@10", "p@10", "recall@10", "seed_ndcg", "tag_p@10"):
        assert key in row
    assert row["queries"] == report["header"]["protocol"]["queries"] > 0
    assert 0.0 <= row["ndcg@10_ci"][0] <= row["ndcg@10"] <= row["ndcg@10_ci"][1] <= 1.0
    # The demo's labels are the truth: against them keyword retrieval inherits the mistakes of
    # the tagger behind keywords.tsv; against its own keywords it is right by construction.
    assert report["header"]["protocol"]["tag_truth"] == "labels"
    assert 0.5 < row["tag_p@10"] < row["tag_p@10_keywords"] == pytest.approx(1.0)
    assert row["pair_queries"] > 0
    assert 0.0 < row["pair_tag_p@10"] < row["pair_tag_p@10_keywords"] <= 1.0
    for stage in ("retrieval", "ranking", "total"):
        assert 0.0 <= row["latency_ms"][stage]["p50"] <= row["latency_ms"][stage]["p99"]
    header = report["header"]
    assert header["split"]["train_end"] <= header["split"]["test_start"]
    assert header["machine"]["cpu_count"] and header["command"] == "pytest"


def test_tag_figures_count_keywords_when_the_catalogue_has_no_labels(catalogue):
    config = EvalConfig(retrievers=("keyword",), rankers=("none",), show_progress=False)
    report = evaluate(dataclasses.replace(catalogue, labels=None), config, command="pytest")
    assert report["header"]["protocol"]["tag_truth"] == "keywords"
    (row,) = report["results"]
    assert row["tag_p@10"] == pytest.approx(1.0) and row["pair_tag_p@10"] > 0.95
    assert "tag_p@10_keywords" not in row


def test_popularity_beats_none(report):
    rows = {(r["retriever"], r["ranker"]): r for r in report["results"]}
    none, popularity = rows[("keyword", "none")], rows[("keyword", "popularity")]
    assert popularity["ndcg@10"] > none["ndcg@10"]
    # Also on a paired bootstrap over the same queries (none - popularity < 0), not just means.
    assert none["ndcg@10_vs_popularity"]["ci"][1] < 0


def test_filter_removes_training_photos(catalogue):
    split = temporal_split(catalogue.conversions, 0.2)
    seen = user_photos(split.earlier)
    user = int(split.earlier["user_idx"].iloc[0])
    expected = np.unique(split.earlier.loc[split.earlier["user_idx"] == user, "photo_idx"])
    np.testing.assert_array_equal(seen[user], expected)


def test_unknown_names_list_the_valid_ones(catalogue):
    with pytest.raises(EvaluationError, match="valid: keyword, clip, hybrid"):
        evaluate(catalogue, EvalConfig(retrievers=("keyword", "bm25"), show_progress=False))
    with pytest.raises(EvaluationError, match=r"unknown ranker 'xgboost'.*popularity"):
        evaluate(catalogue, EvalConfig(rankers=("xgboost",), show_progress=False))
    for fraction in (0.0, 1.0):
        with pytest.raises(EvaluationError, match="test_fraction"):
            evaluate(catalogue, EvalConfig(test_fraction=fraction, show_progress=False))


def test_cli_writes_json_markdown_and_png(data_dir, tmp_path, capsys):
    paths = {ext: tmp_path / f"eval.{ext}" for ext in ("json", "md", "png")}
    status = cli_main(
        [
            "eval",
            "--data",
            str(data_dir),
            "--rankers",
            ",".join(RANKERS),
            "--max-queries",
            "80",
            "--quiet",
            "--json",
            str(paths["json"]),
            "--markdown",
            str(paths["md"]),
            "--plot",
            str(paths["png"]),
            "--results-page",
            str(tmp_path / "site" / "evaluation.md"),
        ]
    )
    assert status == 0
    page = (tmp_path / "site" / "evaluation.md").read_text()
    header = parse_header(page)
    assert header.command.startswith("imgsearch eval --data") and not header.historical
    assert "| keyword | popularity |" in page and "](../eval.png)" in page
    written = json.loads(paths["json"].read_text())
    assert written["header"]["protocol"]["queries"] == 80
    assert len(written["results"]) == 6
    table = paths["md"].read_text()
    assert "| keyword | popularity |" in table and "skipped: catalogue has no images" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| keyword | none |" in capsys.readouterr().out


def test_cli_rejects_unknown_ranker(data_dir, tmp_path, capsys):
    status = cli_main(
        ["eval", "--data", str(data_dir), "--rankers", "nope", "--json", str(tmp_path / "x.json")]
    )
    assert status == 2
    assert "valid:" in capsys.readouterr().err


def test_markdown_table_marks_skipped_rows(report):
    table = markdown_table(report)
    assert table.count("skipped:") == 4
    assert "Command: `pytest`" in table


def test_clip_artifacts_of_another_catalogue_are_refused(catalogue, tmp_path):
    np.savez(
        tmp_path / "image_embeddings.npz",
        photo_idx=np.arange(catalogue.n_photos + 5, dtype=np.int64),
        embeddings=np.zeros((catalogue.n_photos + 5, 4), np.float32),
    )
    config = EvalConfig(
        retrievers=("clip",), rankers=("none",), clip_artifacts=str(tmp_path), show_progress=False
    )
    with pytest.raises(EvaluationError, match="another catalogue"):
        evaluate(catalogue, config)


def test_tag_figures_are_compared_to_keyword_retrieval_query_by_query():
    rows = [
        {"retriever": "keyword", "ranker": "none", "_per_query_tags": ([1.0, 0.5], [0.2, 0.4])},
        {"retriever": "clip", "ranker": "none", "_per_query_tags": ([0.5, 0.5], [0.6, 0.6])},
        {"retriever": "hybrid", "ranker": "none", "skipped": "no images"},
    ]
    comparisons.add_tag_deltas(rows, "keyword", 10, EvalConfig(bootstrap=200))
    assert all("_per_query_tags" not in row for row in rows)
    assert "tag_p@10_vs_keyword" not in rows[0] and "tag_p@10_vs_keyword" not in rows[2]
    assert rows[1]["tag_p@10_vs_keyword"]["diff"] == pytest.approx(-0.25)
    pair = rows[1]["pair_tag_p@10_vs_keyword"]
    assert (
        pair["diff"] == pytest.approx(0.3)
        and 0.2 - 1e-9 <= pair["ci"][0] <= pair["ci"][1] <= 0.4 + 1e-9
    )


def test_the_served_configuration_is_checked_against_the_best_row(report):
    header = report["header"]
    configuration = header["configuration"]
    # No CLIP here: the keyword retriever is the only one the rule can serve.
    assert header["default_retriever"] == configuration["retriever"] == "keyword"
    assert header["default_ranker"] == configuration["ranker"] in RANKERS
    assert configuration["n_queries"] > configuration["tuning_queries"]
    check = header["served_configuration_vs_best"]
    rows = [r for r in report["results"] if not r.get("skipped")]
    best = max(rows, key=lambda r: r["ndcg@10"])
    assert (check["best"]["retriever"], check["best"]["ranker"]) == ("keyword", best["ranker"])
    assert check["ratio"] == pytest.approx(check["served"]["ndcg@10"] / best["ndcg@10"])
    lo, hi = check["vs_best"]["ci"]
    assert lo <= check["vs_best"]["diff"] <= hi and check["significantly_below"] == (hi < 0)
    markdown = markdown_table(report)
    assert "Served configuration" in markdown and "of the best" in markdown


def test_stacked_is_paired_with_the_best_single_ranker_per_retriever():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    rows = [
        {"retriever": "keyword", "ranker": "popularity", "ndcg@10": 0.3, "_per_query_ndcg": base},
        {"retriever": "keyword", "ranker": "als", "ndcg@10": 0.4, "_per_query_ndcg": base + 0.1},
        {
            "retriever": "keyword",
            "ranker": "stacked",
            "ndcg@10": 0.5,
            "_per_query_ndcg": base + 0.2,
        },
        {"retriever": "clip", "ranker": "als", "ndcg@10": 0.4, "_per_query_ndcg": base},
        {"retriever": "clip", "ranker": "stacked", "ndcg@10": 0.3, "_per_query_ndcg": base - 0.1},
        {"retriever": "hybrid", "ranker": "stacked", "skipped": "no images"},
    ]
    compared = comparisons.stacked_vs_single(rows, "clip", 10, EvalConfig(bootstrap=200))
    assert compared["served_retriever"] == "clip" and set(compared["per_retriever"]) == {
        "keyword",
        "clip",
    }
    keyword, clip = compared["per_retriever"]["keyword"], compared["per_retriever"]["clip"]
    assert keyword["best_single"] == "als" and keyword["vs_best_single"]["diff"] == pytest.approx(
        0.1
    )
    assert keyword["significantly_above"] and keyword["at_least_best"]
    assert clip["significantly_below"] and not clip["at_least_best"]
    assert comparisons.stacked_vs_single(rows[:2], "keyword", 10, EvalConfig()) == {}


def test_the_report_pairs_stacked_with_the_best_single_ranker(catalogue, tmp_path, capsys):
    config = EvalConfig(
        retrievers=("keyword",),
        rankers=("popularity", "stacked"),
        bootstrap=200,
        show_progress=False,
    )
    report = evaluate(catalogue, config, command="pytest")
    rows = {r["ranker"]: r for r in report["results"] if not r.get("skipped")}
    entry = report["header"]["stacked_vs_best_single"]["per_retriever"]["keyword"]
    assert entry["best_single"] == "popularity"
    assert entry["vs_best_single"]["diff"] == pytest.approx(
        rows["stacked"]["ndcg@10"] - rows["popularity"]["ndcg@10"]
    )
    assert "| stacked − best single (paired 95% CI) |" in markdown_table(report)
    # The stacker's own rule on validation is reported with its figures.
    rule = report["header"]["models"]["rankers"]["stacked"]["rule"]
    assert rule["best_base"] in ("popularity", "als") and rule["n_queries"] > 0
    assert (rule["serves"] is None) == (rule["diff"] > rule["min_gain"])
    assert f"`stacked` on validation: {rule['reason']}." in markdown_table(report)
    # The suite's summary reads the same figures back from the JSON the run writes.
    from imgsearch_tools.evaluation import suite_summary

    run = tmp_path / "run.json"
    write_json(report, run)
    assert suite_summary.main([f"tiny={run}"]) == 0
    printed = capsys.readouterr().out
    check = report["header"]["served_configuration_vs_best"]
    lo, hi = check["vs_best"]["ci"]
    assert f"{check['vs_best']['diff']:+.4f} ({lo:+.4f} to {hi:+.4f}) | {check['ratio']:.2f}×" in (
        printed
    )
    versus = entry["vs_best_single"]
    cell = f"**{versus['diff']:+.4f} ({versus['ci'][0]:+.4f} to {versus['ci'][1]:+.4f}) vs "
    assert cell + "popularity**" in printed
    assert f"{rule['n_queries']:,} queries" in printed
    above = int(entry["significantly_above"])
    assert f"significantly above it on {above};" in printed
    with pytest.raises(SystemExit):
        suite_summary.main(["no-name-given.json"])
