"""One check of retriever and ranker names: the same error from the library, the load
generator and the build command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imgsearch.names import RANKER_NAMES, RETRIEVER_CHOICES, check_names
from imgsearch_tools.bench.load import LoadSpec
from ranking_service.rankers import ranker_class

pytestmark = pytest.mark.unit


def test_check_names_normalises_and_names_what_is_wrong():
    assert check_names([" ALS", "als", "popularity "], RANKER_NAMES, "ranker") == [
        "als",
        "popularity",
    ]
    assert check_names(None, RANKER_NAMES, "ranker") == list(RANKER_NAMES)
    assert check_names("Keyword", RETRIEVER_CHOICES, "retriever") == ["keyword"]
    with pytest.raises(ValueError, match=r"unknown ranker 'svd', 'xgb'; valid: none, "):
        check_names(["als", "svd", "xgb"], RANKER_NAMES, "ranker")
    with pytest.raises(ValueError, match="no ranker given"):
        check_names([" ", ""], RANKER_NAMES, "ranker")


def test_the_registry_and_the_load_generator_use_the_same_check():
    with pytest.raises(ValueError, match=r"unknown ranker 'svd'; valid: none, popularity"):
        ranker_class("svd")
    with pytest.raises(ValueError, match=r"unknown retriever 'bm25'; valid: default, "):
        LoadSpec(target="x", qps=1, retriever="bm25")
    assert LoadSpec(target="x", qps=1, ranker="ALS").ranker == "als"


def test_build_rejects_an_unknown_ranker_before_reading_data(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsearch_tools.cli",
            "build",
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
            "--rankers",
            "als,svd",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown ranker 'svd'; valid: none, popularity, als" in result.stderr
    assert not (tmp_path / "out").exists()
