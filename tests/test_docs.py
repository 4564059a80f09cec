"""The docs site: generated reference pages cover the code, results pages carry their header."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from imgsearch.config import METRICS_PORT_OFFSETS
from imgsearch.settings import SETTINGS
from imgsearch_tools import reference_docs
from imgsearch_tools.results_page import (
    ResultsHeader,
    parse_header,
    render_header,
    write_results_page,
)

ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("imgsearch", "imgsearch_tools", "retrieval_service", "ranking_service", "gateway")
# An IMGSEARCH_* name written out, and a name handed to config.env/env_flag/env_int/env_float.
_LITERAL = re.compile(r"IMGSEARCH_([A-Z0-9_]*[A-Z0-9])\b")
_ENV_CALL = re.compile(r"\benv(?:_flag|_int|_float)?\(\s*[\"']([A-Z0-9_]+)[\"']")


def settings_read_by_the_code() -> set[str]:
    """Every IMGSEARCH_* variable the packages name (without the prefix)."""
    names = {f"{service.upper()}_METRICS_PORT" for service in METRICS_PORT_OFFSETS}
    for package in CODE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "/v1/" in path.as_posix():  # generated protobuf code
                continue
            text = path.read_text()
            names |= set(_LITERAL.findall(text)) | set(_ENV_CALL.findall(text))
    return names


def test_every_setting_the_code_reads_is_documented():
    names = settings_read_by_the_code()
    assert {"ARTIFACTS", "GATEWAY_PORT", "ACCESS_LOG", "TOKEN_FILE"} <= names  # the scan works
    assert reference_docs.undocumented_settings(names) == []


def test_a_setting_without_a_row_is_reported():
    assert reference_docs.undocumented_settings({"ARTIFACTS", "NEW_KNOB"}) == ["NEW_KNOB"]


def test_settings_are_unique_and_described():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.description.endswith(".") and s.default and s.read_by for s in SETTINGS)


def test_every_cli_command_and_argument_has_help():
    assert reference_docs.undocumented_cli_arguments() == []


def test_an_argument_without_help_is_reported():
    parser = argparse.ArgumentParser(prog="imgsearch")
    sub = parser.add_subparsers(dest="command")
    command = sub.add_parser("frobnicate", help="does a thing")
    command.add_argument("--documented", help="is documented")
    command.add_argument("--bare")
    sub.add_parser("silent")
    assert reference_docs.undocumented_cli_arguments(parser) == [
        "frobnicate --bare",
        "silent (the command itself)",
    ]


def test_every_proto_element_has_a_comment():
    assert reference_docs.undocumented_proto_elements(ROOT / "protos") == []


def test_reference_pages_list_every_flag_setting_and_rpc():
    pages = reference_docs.reference_pages(ROOT / "protos")
    cli = pages["reference/cli.md"]
    assert "## `imgsearch eval`" in cli and "`--results-page`" in cli
    assert "| `--encode-batch` |" in cli
    config = pages["reference/configuration.md"]
    assert all(f"`IMGSEARCH_{s.name}`" in config for s in SETTINGS)
    api = pages["reference/grpc-api.md"]
    assert "### service `imgsearch.search.v1.SearchService`" in api
    assert "| `Search` | `imgsearch.search.v1.SearchRequest` → " in api
    assert "| `candidates_k` | `int32` = " in api
    assert "RETRIEVER_UNSPECIFIED" in api
    assert "| `retrieval_source_scores` | `map<string, float>` = 5 |" in api


RESULTS = sorted((ROOT / "docs" / "results").glob("*.md"))


def _is_shallow() -> bool:
    out = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    )
    return out.returncode != 0 or out.stdout.strip() != "false"


@pytest.mark.parametrize("page", RESULTS, ids=lambda p: p.name)
def test_every_results_page_names_its_command_commit_and_machine(page):
    text = page.read_text()
    header = parse_header(text)
    assert header.command and header.machine and header.date
    assert not header.commit.endswith("-dirty"), "a committed page comes from a committed tree"
    if not _is_shallow():
        known = subprocess.run(
            ["git", "cat-file", "-e", f"{header.commit}^{{commit}}"], cwd=ROOT, capture_output=True
        )
        assert known.returncode == 0, f"{page.name}: commit {header.commit} is not in history"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (page.parent / image).is_file(), f"{page.name}: missing image {image}"


def test_results_pages_exist_for_the_two_commands():
    assert {p.name for p in RESULTS} >= {"evaluation.md", "bench.md"}


def test_a_written_page_reads_back_with_its_header(tmp_path):
    path = tmp_path / "results" / "x.md"
    written = write_results_page(path, "X", "imgsearch eval --data d --json j", "| a |\n|---|\n")
    header = parse_header(path.read_text())
    assert header == written
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", header.commit)
    assert "vCPU" in header.machine and "GiB" in header.machine
    assert path.read_text().endswith("| a |\n|---|\n")


@pytest.mark.parametrize(
    "broken, complaint",
    [
        (lambda t: t.replace("<!-- results page", "<!-- page"), "marker"),
        (lambda t: t.replace("| command | commit |", "| cmd | commit |"), "head"),
        (lambda t: t.replace("`abc1234`", "`HEAD`"), "git commit hash"),
        (lambda t: t.replace("| `imgsearch eval` |", "| imgsearch eval |"), "header row"),
    ],
)
def test_a_malformed_header_is_refused_naming_what_is_wrong(broken, complaint):
    header = ResultsHeader("imgsearch eval", "abc1234", "2 vCPU, 24.0 GiB, no GPU", "today")
    text = render_header("T", header) + "body\n"
    assert parse_header(text) == header
    with pytest.raises(ValueError, match=complaint):
        parse_header(broken(text))


def test_historical_note_reads_back():
    header = ResultsHeader("make bench", "1bb6bb3", "2 vCPU", "2026-11-29", "not rerun since")
    assert parse_header(render_header("T", header)).historical == "not rerun since"
