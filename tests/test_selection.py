"""The default ranker: chosen on the validation slice by one paired comparison, served with why."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

from imgsearch import artifacts
from imgsearch.admin.v1 import admin_service_pb2 as admin_pb
from imgsearch.admin.v1 import admin_service_pb2_grpc as admin_grpc
from imgsearch.search.v1 import search_service_pb2 as pb
from imgsearch.search.v1 import search_service_pb2_grpc as pb_grpc
from ranking_service.selection import MIN_SELECTION_QUERIES, format_selection, select_default


def _figures(seed: int = 0, n: int = 400) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 0.6, n)


def test_a_clear_winner_is_served():
    popularity = _figures()
    per_query = {"popularity": popularity, "als": popularity + 0.05, "none": popularity - 0.2}
    chosen = select_default(per_query)
    assert chosen["default_ranker"] == "als" == chosen["winner"]
    assert "above popularity" in chosen["reason"] and "+0.0500" in chosen["reason"]
    assert [row["ranker"] for row in chosen["table"]] == ["als", "popularity", "none"]
    assert chosen["table"][0]["vs_popularity"]["ci"][0] > 0
    assert "* als" in format_selection(chosen)


def test_a_winner_level_with_popularity_is_not_served():
    popularity = _figures()
    noise = np.random.default_rng(1).normal(0.0, 0.05, len(popularity))
    noise -= noise.mean()
    per_query = {"popularity": popularity, "ease": popularity + noise + 0.001}
    chosen = select_default(per_query)
    assert chosen["winner"] == "ease" and chosen["default_ranker"] == "popularity"
    lo, hi = chosen["table"][0]["vs_popularity"]["ci"]
    assert lo <= 0 <= hi
    assert "not significantly above popularity" in chosen["reason"]


def test_only_the_winner_is_compared():
    # The runner-up is significantly above popularity, but the rule compares the winner alone:
    # trying comparisons until one passes would serve whichever ranker got lucky.
    popularity = _figures()
    noise = np.random.default_rng(2).normal(0.0, 0.8, len(popularity))
    noise -= noise.mean()
    per_query = {
        "popularity": popularity,
        "als": popularity + 0.02,
        "fm": popularity + 0.04 + noise,
    }
    chosen = select_default(per_query)
    assert chosen["winner"] == "fm" and chosen["default_ranker"] == "popularity"


def test_too_few_queries_skip_the_selection():
    per_query = {"popularity": _figures(n=10), "als": _figures(n=10) + 1}
    chosen = select_default(per_query)
    assert chosen["default_ranker"] == "popularity"
    assert "selection skipped" in chosen["reason"] and chosen["table"] == []
    assert str(MIN_SELECTION_QUERIES) in chosen["reason"]


def _build(tmp_path, name, rankers, **generate_options):
    from imgsearch_tools.build import build_artifacts
    from imgsearch_tools.demo_data import generate

    data = tmp_path / f"{name}-data"
    generate(data, with_images=False, show_progress=False, **generate_options)
    root = tmp_path / f"{name}-artifacts"
    build_artifacts(str(data), str(root), rankers, show_progress=False)
    return root, artifacts.resolve(root).manifest


def test_the_build_serves_the_validation_point_best_never_below_popularity(tmp_path):
    from imgsearch_tools.evaluation.configuration import MIN_POINT_BEST

    sizes = {"n_photos": 400, "n_users": 120, "n_conversions": 12_000, "seed": 5}
    rankers = ["none", "popularity", "als", "item_knn"]
    for taste in ("none", "ids"):
        _, manifest = _build(tmp_path, taste, rankers, taste=taste, taste_strength=3.0, **sizes)
        configuration = manifest["configuration"]
        # Every pair with a conversion in the slice, except the tuning ones, chooses.
        assert (
            configuration["n_queries"]
            >= MIN_POINT_BEST
            > manifest["ranker_selection"]["validation"]["tuning_queries"]
        )
        assert configuration["rule"] == "point-best", configuration["reason"]
        # Enough queries on the validation slice: one fold, no refit on an earlier slice.
        assert [fold["queries"] for fold in configuration["folds"]] == [configuration["n_queries"]]
        served = configuration["ranker"]
        (row,) = configuration["table"]  # no CLIP: the keyword retriever only
        assert row["rankers"][served] == max(row["rankers"].values())
        versus = configuration["versus_popularity"]
        assert served == "popularity" or versus["ci"][1] >= 0
        assert manifest["default_ranker"] == served
        assert manifest["default_retriever"] == "keyword"
    # With a planted taste over photo ids a personal ranker leads.
    assert manifest["default_ranker"] in ("als", "item_knn"), manifest["default_ranker_reason"]


def test_too_few_conversions_train_skip_selection_and_serve_popularity(tmp_path):
    from ranking_service.server import load_ranking_state

    root, manifest = _build(
        tmp_path,
        "tiny",
        ["none", "popularity", "als", "ease", "stacked"],
        n_photos=60,
        n_users=15,
        n_conversions=120,
        seed=2,
    )
    assert set(manifest["rankers"]) == {"none", "popularity", "als", "ease"}
    # The stacker learns only from a validation slice: too small here, and the build says so.
    assert "validation slice" in manifest["rankers_skipped"]["stacked"]
    assert manifest["default_ranker"] == "popularity"
    reason = manifest["default_ranker_reason"]
    assert "selection skipped" in reason and "validation slice" in reason
    assert manifest["configuration"]["rule"] == "fallback"
    state = load_ranking_state(str(root))
    assert state.default_ranker == "popularity" and state.default_reason == reason
    assert {"als", "ease"} <= set(state.rankers)
    from retrieval_service.server import load_retrieval_state

    retrieval = load_retrieval_state(str(root))
    assert retrieval.default_retriever == manifest["default_retriever"] == "keyword"
    assert retrieval.defaults[0] == ("retriever", "keyword", reason)


def test_a_set_without_a_recorded_choice_serves_popularity_and_says_so(artifact_root, tmp_path):
    from ranking_service.server import load_ranking_state

    old = tmp_path / "old-set"
    shutil.copytree(artifacts.resolve(artifact_root).path, old)
    manifest = json.loads((old / artifacts.MANIFEST).read_text())
    for key in ("default_ranker", "default_ranker_reason", "ranker_selection"):
        manifest.pop(key, None)
    (old / artifacts.MANIFEST).write_text(json.dumps(manifest))
    state = load_ranking_state(str(old))
    assert state.default_ranker == "popularity"
    assert "records no validation choice" in state.default_reason
    configured = load_ranking_state(str(old), default_ranker="als")
    assert configured.default_ranker == "als" and "setting" in configured.default_reason


def test_status_and_notes_say_which_default_is_served_and_why(stack, artifact_root):
    manifest = artifacts.resolve(artifact_root).manifest
    served, reason = manifest["default_ranker"], manifest["default_ranker_reason"]
    with grpc.insecure_channel(f"127.0.0.1:{stack.ranking.admin_port}") as channel:
        status = admin_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb.GetStatusRequest(), timeout=10
        )
    assert [(d.kind, d.name, d.reason) for d in status.defaults] == [("ranker", served, reason)]
    with grpc.insecure_channel(f"127.0.0.1:{stack.retrieval.admin_port}") as channel:
        status = admin_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb.GetStatusRequest(), timeout=10
        )
    assert [(d.kind, d.name) for d in status.defaults] == [("retriever", "keyword")]
    assert status.defaults[0].reason == manifest["configuration"]["reason"]
    with grpc.insecure_channel(stack.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        default = stub.Search(pb.SearchRequest(query="red", k=5), timeout=10)
        chosen = stub.Search(pb.SearchRequest(query="red", k=5, ranker=1), timeout=10)
    assert f"default ranker {served}: {reason}" in default.notes
    assert not any(note.startswith("default ranker") for note in chosen.notes)


@pytest.mark.parametrize("taste", ["content", "ids", "none"])
def test_tastes_share_users_and_queries_and_differ_in_choices(tmp_path, taste):
    from imgsearch.unsplash import read_unsplash
    from imgsearch_tools.demo_data import generate

    sizes = {"n_photos": 300, "n_users": 60, "n_conversions": 3000, "seed": 4}
    base = tmp_path / "content"
    generate(base, with_images=False, show_progress=False, **sizes)
    other = tmp_path / taste
    generate(other, with_images=False, show_progress=False, taste=taste, **sizes)
    first = read_unsplash(base, show_progress=False)[0].conversions
    second = read_unsplash(other, show_progress=False)[0].conversions
    for column in ("converted_at", "keyword", "conversion_country"):
        assert first[column].tolist() == second[column].tolist()
    same = (first["photo_idx"].to_numpy() == second["photo_idx"].to_numpy()).mean()
    assert same == 1.0 if taste == "content" else same < 0.5


def _levels(n: int, lift: float, spread: float = 0.3, seed: int = 3) -> dict:
    """Per retriever, per ranker: popularity's figures and a ranker ``lift`` above, noisy."""
    popularity = _figures(seed, n)
    noise = np.random.default_rng(seed + 1).normal(0.0, spread, n)
    noise -= noise.mean()
    return {
        "keyword": {"popularity": popularity - 0.02, "als": popularity - 0.02 + lift + noise},
        "clip": {"popularity": popularity, "als": popularity + lift + noise},
    }


def test_enough_queries_serve_the_point_best_configuration():
    from imgsearch_tools.evaluation.served_rule import MIN_POINT_BEST, apply_rule

    per_query = _levels(MIN_POINT_BEST, lift=0.004)
    chosen = apply_rule(per_query, ["keyword", "clip"])
    assert (chosen["label"], chosen["ranker"], chosen["rule"]) == ("clip", "als", "point-best")
    lo, hi = chosen["versus_popularity"]["ci"]
    assert lo < 0 < hi  # not significant: the point estimate decides
    # The same lift on fewer queries needs a significant win: popularity, its best retriever.
    chosen = apply_rule(_levels(MIN_POINT_BEST - 1, lift=0.004), ["keyword", "clip"])
    assert (chosen["label"], chosen["ranker"], chosen["rule"]) == (
        "clip",
        "popularity",
        "significant",
    )
    assert "not significantly above popularity" in chosen["reason"]
    chosen = apply_rule(_levels(MIN_POINT_BEST - 1, lift=0.1, spread=0.05), ["keyword", "clip"])
    assert (chosen["label"], chosen["ranker"]) == ("clip", "als")


def test_a_learned_ranker_level_with_the_point_best_is_served_only_when_its_trees_passed():
    from imgsearch_tools.evaluation.served_rule import MIN_POINT_BEST, apply_rule

    per_query = _levels(MIN_POINT_BEST, lift=0.03, spread=0.05)
    noise = np.random.default_rng(9).normal(0.0, 0.05, MIN_POINT_BEST)
    for label in per_query:  # level with ALS, a hair below it on average
        per_query[label]["stacked"] = per_query[label]["als"] + noise - noise.mean() - 0.001
    chosen = apply_rule(per_query, ["keyword", "clip"], learned="stacked")
    assert (chosen["label"], chosen["ranker"], chosen["rule"]) == ("clip", "stacked", "learned")
    lo, hi = chosen["versus_point_best"]["ci"]
    assert chosen["versus_point_best"]["ranker"] == "als" and lo < 0 < hi
    assert "within noise of the validation point-best als" in chosen["reason"]
    # Trees that did not pass their own rule: the point-best is served.
    chosen = apply_rule(per_query, ["keyword", "clip"], learned=None)
    assert (chosen["ranker"], chosen["rule"]) == ("als", "point-best")
    # Significantly below the point-best: never served by this rule.
    for label in per_query:
        per_query[label]["stacked"] = per_query[label]["als"] - 0.02
    chosen = apply_rule(per_query, ["keyword", "clip"], learned="stacked")
    assert (chosen["ranker"], chosen["rule"]) == ("als", "point-best")


def test_only_eligible_retrievers_are_served():
    from imgsearch_tools.evaluation.served_rule import MIN_POINT_BEST, apply_rule

    per_query = _levels(MIN_POINT_BEST, lift=0.05, spread=0.01)
    per_query["keyword"]["als"] = per_query["clip"]["als"] + 0.1
    chosen = apply_rule(per_query, ["clip"])
    assert (chosen["label"], chosen["ranker"]) == ("clip", "als")


def test_the_tag_guard_keeps_retrievers_near_the_better_source():
    from imgsearch_tools.evaluation.configuration import TAG_TOLERANCE, _tag_guard, retriever_grid

    grid = retriever_grid(has_clip=True)
    assert [row["label"] for row in grid][0] == "keyword" and grid[-1]["label"] == "clip"
    assert all(row["weights"] is not None for row in grid[1:-1])
    for row in grid:  # keyword 0.90, clip 0.96; hybrid 0.97 minus a tenth of keyword's weight
        row["tag_p@10"] = {"keyword": 0.90, "clip": 0.96}.get(row["label"])
        if row["weights"] is not None:
            row["tag_p@10"] = 0.97 - 0.1 * row["weights"][0]
    guard = _tag_guard(grid, "labels", 10)
    assert guard["applied"] and guard["floor"] == pytest.approx(0.96 - TAG_TOLERANCE)
    eligible = [row["weights"] or row["label"] for row in grid if row["eligible"]]
    assert eligible == [[0.3, 0.7], [0.1, 0.9], "clip"]
    assert _tag_guard(grid, "keywords", 10)["applied"] is False
    assert all(row["eligible"] for row in grid)
