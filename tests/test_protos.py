"""The committed generated protobuf code matches `make protos`, and the floors match it."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *protos,
        ],
        check=True,
    )
    generated = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert generated
    stale = []
    for fresh in generated:
        committed = ROOT / fresh.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(committed.relative_to(ROOT)))
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def _floors() -> dict[str, tuple[str, str]]:
    """``{package: (operator, version)}`` of pyproject.toml's dependencies and dev extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(>=|==)\s*([0-9.]+)", requirement)
        if match:
            found[match.group(1).lower()] = (match.group(2), match.group(3))
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_dependency_floors_match_what_the_generated_code_requires():
    generated = sorted((ROOT / "imgsearch").glob("*/v1/*_pb2*.py"))
    grpc_needs = {
        re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", p.read_text()).group(1)
        for p in generated
        if p.name.endswith("_pb2_grpc.py")
    }
    protobuf_needs = {
        re.search(r"# Protobuf Python Version: ([0-9.]+)", p.read_text()).group(1)
        for p in generated
        if p.name.endswith("_pb2.py")
    }
    assert grpc_needs and protobuf_needs
    floors = _floors()
    for package in ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status"):
        operator, floor = floors[package]
        assert operator == ">=" and _version(floor) >= max(map(_version, grpc_needs)), package
    operator, floor = floors["protobuf"]
    assert operator == ">=" and _version(floor) >= max(map(_version, protobuf_needs))
    # The generator is a development tool, pinned to the version that wrote the code.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(r.startswith("grpcio-tools") for r in project["dependencies"])
    assert floors["grpcio-tools"] == ("==", max(grpc_needs, key=_version))
