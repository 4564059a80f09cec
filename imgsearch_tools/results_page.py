"""Results pages of the docs site: figures headed by the command, commit and machine that made them.

`make eval` and `make bench` write their pages with :func:`write_results_page`; a page kept
from an earlier run carries the same header with that run's commit and a ``historical`` note.
:func:`parse_header` reads the header back, so a test can hold every committed page to it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from imgsearch_tools.provenance import current_commit, machine_description

# The first line of every results page: what marks it as written by a command.
MARKER = "<!-- results page: written by a command; rerun the command instead of editing -->"
TABLE_HEAD = "| command | commit | machine | date |"
_COMMIT = re.compile(r"^[0-9a-f]{7,40}(-dirty)?$")
_ROW = re.compile(
    r"^\| `(?P<command>[^`]+)` \| `(?P<commit>[^`]+)` \| (?P<machine>[^|]+) \| (?P<date>[^|]+) \|$"
)


@dataclass(frozen=True)
class ResultsHeader:
    """Who made a results page's figures: command line, commit, machine, date."""

    command: str
    commit: str
    machine: str
    date: str
    # Non-empty for a page kept from an earlier run: what was not rerun and why.
    historical: str = ""


def render_header(title: str, header: ResultsHeader) -> str:
    """The marker, the page title and the one-row header table (and the historical note)."""
    for name in ("command", "commit", "machine", "date"):
        if not getattr(header, name) or "|" in getattr(header, name):
            raise ValueError(f"results header: {name} must be non-empty and hold no '|'")
    lines = [
        MARKER,
        f"# {title}",
        "",
        TABLE_HEAD,
        "|---|---|---|---|",
        f"| `{header.command}` | `{header.commit}` | {header.machine} | {header.date} |",
        "",
    ]
    if header.historical:
        lines += [f"**Historical:** {header.historical}", ""]
    return "\n".join(lines) + "\n"


def parse_header(text: str) -> ResultsHeader:
    """Read a results page's header; ValueError says what is missing or malformed."""
    lines = text.splitlines()
    if not lines or lines[0] != MARKER:
        raise ValueError("the first line is not the results-page marker")
    if len(lines) < 6 or not lines[1].startswith("# "):
        raise ValueError("line 2 is not the page title ('# ...')")
    if lines[3] != TABLE_HEAD:
        raise ValueError(f"line 4 is not the header table's head {TABLE_HEAD!r}")
    match = _ROW.match(lines[5])
    if not match:
        raise ValueError("line 6 is not a header row: | `command` | `commit` | machine | date |")
    fields = {k: v.strip() for k, v in match.groupdict().items()}
    if not _COMMIT.match(fields["commit"]):
        raise ValueError(f"commit {fields['commit']!r} is not a git commit hash")
    historical = ""
    if len(lines) > 7 and lines[7].startswith("**Historical:** "):
        historical = lines[7].removeprefix("**Historical:** ").strip()
    return ResultsHeader(historical=historical, **fields)


def write_results_page(path: str | Path, title: str, command: str, body: str) -> ResultsHeader:
    """Write ``body`` under a header naming ``command``, this commit and this machine."""
    header = ResultsHeader(
        command=command,
        commit=current_commit(),
        machine=machine_description(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_header(title, header) + body.rstrip("\n") + "\n")
    return header
