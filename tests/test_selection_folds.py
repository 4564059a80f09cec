"""A second time-ordered fold for the served choice when the validation slice gives few queries."""

from __future__ import annotations

import pytest

from imgsearch import artifacts


# One whole build with stacked: minutes on a busy machine.
@pytest.mark.timeout(900)
def test_a_small_slice_adds_the_earlier_slice_as_a_second_fold(tmp_path):
    from imgsearch_tools.build import build_artifacts
    from imgsearch_tools.demo_data import generate
    from imgsearch_tools.evaluation.configuration import MIN_POINT_BEST

    data, root = tmp_path / "data", tmp_path / "artifacts"
    # Few conversions: the validation slice gives fewer than MIN_POINT_BEST selection queries.
    generate(
        data,
        with_images=False,
        show_progress=False,
        n_photos=400,
        n_users=120,
        n_conversions=2500,
        seed=5,
        taste="ids",
        taste_strength=3.0,
    )
    build_artifacts(
        str(data), str(root), ["none", "popularity", "als", "stacked"], show_progress=False
    )
    manifest = artifacts.resolve(root).manifest
    configuration = manifest["configuration"]
    latest, earlier = configuration["folds"]
    assert latest["slice"] == "validation slice" and earlier["slice"] == "slice before it"
    assert 0 < latest["queries"] < MIN_POINT_BEST
    assert earlier["queries"] > 0
    # The choice pools both folds' queries, and says how many each gave.
    assert configuration["n_queries"] == latest["queries"] + earlier["queries"]
    assert configuration["rule"] in ("point-best", "learned"), configuration["reason"]
    for fold in (latest, earlier):
        assert (
            f"{fold['queries']} selection queries from the {fold['slice']}"
            in (configuration["reason"])
        )
    # The earlier fold's models saw only the conversions before its slice: the validation
    # share (20%) of the conversions before the validation slice is held out again.
    assert earlier["conversions_before"] == round(0.8 * latest["conversions_before"])
    (row,) = configuration["table"]  # no CLIP: the keyword retriever only
    assert set(row["rankers"]) == {"none", "popularity", "als", "stacked"}
    served = configuration["ranker"]
    assert row["rankers"][served] == max(row["rankers"].values())
    assert manifest["default_ranker"] == served
