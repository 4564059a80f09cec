"""The import contracts of pyproject.toml: three floors, imports only downward, no cycles."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_contracts_name_the_three_floors():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    by_type = {contract["type"]: contract for contract in config["contracts"]}
    assert by_type["layers"]["layers"] == [
        "imgsearch_tools",
        "retrieval_service | ranking_service | gateway",
        "imgsearch",
    ]
    assert set(by_type["acyclic_siblings"]["ancestors"]) == set(config["root_packages"])


def test_imports_point_only_downward_and_have_no_cycles(capsys):
    from importlinter.cli import lint_imports

    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert status == 0, capsys.readouterr().out
