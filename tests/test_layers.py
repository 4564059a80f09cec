"""The import contracts of pyproject.toml: three floors, imports only downward, no cycles."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_contracts_name_the_three_floors():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    by_type = {c["type"]: c for c in config["contracts"] if "containers" not in c}
    assert by_type["layers"]["layers"] == [
        "imgsearch_tools",
        "retrieval_service | ranking_service | gateway",
        "imgsearch",
    ]
    assert set(by_type["acyclic_siblings"]["ancestors"]) == set(config["root_packages"])


def test_the_serving_runtime_is_layered_down_to_its_request_pipeline():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (serving,) = [c for c in config["contracts"] if c.get("containers") == ["imgsearch.serving"]]
    layers = [name for layer in serving["layers"] for name in layer.split(" | ")]
    modules = {p.stem for p in (ROOT / "imgsearch" / "serving").glob("*.py")} - {"__init__"}
    assert sorted(layers) == sorted(modules), "every serving module sits in one layer"
    assert layers.index("runtime") < layers.index("interceptor") < layers.index("pipeline")


def test_imports_point_only_downward_and_have_no_cycles(capsys):
    from importlinter.cli import lint_imports

    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert status == 0, capsys.readouterr().out
