"""The hash-locked requirements: complete, above the CVE floors, and what CI and the image use."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from imgsearch_tools import lock_pythons
from imgsearch_tools.lockfiles import parse_blocks, without

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "requirements"
CVE_FLOORS = {"pillow": "11.3.0", "tqdm": "4.66.3", "onnx": "1.17", "cryptography": "44.0.1"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    _, blocks, _ = parse_blocks(path.read_text())
    found = {}
    for name, lines in blocks.items():
        text = " ".join(lines)
        assert "--hash=sha256:" in text, f"{path.name}: {name} has no hash"
        found[name] = lines[0].split("==")[1].split()[0].rstrip("\\").strip()
    return found


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


@pytest.mark.parametrize(
    "lock, extras", [("runtime.txt", ("postgres",)), ("dev.txt", ("postgres", "dev", "ray"))]
)
def test_each_lock_pins_every_declared_dependency_with_hashes(lock, extras):
    locked = pins(LOCKS / lock)
    for requirement in declared(extras):
        name = canonical(requirement.name)
        assert name in locked, f"{lock} lacks {name}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{lock}: {name}=={locked[name]} does not meet {requirement}: run `make lock`"
        )
    for name, floor in CVE_FLOORS.items():
        assert Version(locked[name]) >= Version(floor), name
    assert locked["torch"] == "2.14.1" and locked["torchvision"] == "0.29.1"


def test_the_image_lock_leaves_torch_to_its_cpu_index():
    runtime, image = pins(LOCKS / "runtime.txt"), pins(LOCKS / "image.txt")
    assert not {"torch", "torchvision", "triton"} & set(image)
    assert not [name for name in image if name.startswith(("nvidia-", "cuda-"))]
    assert image.items() <= runtime.items()
    # What torch shares with others stays (open_clip's own dependencies, say).
    assert {"open-clip-torch", "numpy", "pillow", "grpcio"} <= set(image)
    assert (LOCKS / "image.txt").read_text() == without((LOCKS / "runtime.txt").read_text())


def test_ci_and_the_image_install_from_the_locks_with_hashes():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes -r requirements/dev.txt" in makefile
    assert "--no-deps -e ." in makefile
    assert re.search(r"^lock:", makefile, re.MULTILINE)
    # make lock checks that the 3.11 resolution installs as locked on the newer Pythons.
    assert "imgsearch_tools.lock_pythons requirements/dev.txt" in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/image.txt" in dockerfile
    assert "--no-deps '.[postgres]'" in dockerfile


def test_without_drops_only_the_cuda_stack_that_nothing_else_needs():
    text = "\n".join(
        [
            "# header",
            "filelock==3.0 \\",
            "    --hash=sha256:aa",
            "    # via",
            "    #   huggingface-hub",
            "    #   torch",
            "nvidia-cudnn==9 \\",
            "    --hash=sha256:bb",
            "    # via torch",
            "cuda-pathfinder==1 \\",
            "    --hash=sha256:cc",
            "    # via cuda-bindings",
            "cuda-bindings==13 \\",
            "    --hash=sha256:dd",
            "    # via torch",
            "torch==2.14.1 \\",
            "    --hash=sha256:ee",
            "    # via imgsearch (pyproject.toml)",
            "huggingface-hub==1 \\",
            "    --hash=sha256:ff",
            "    # via imgsearch (pyproject.toml)",
            "sympy==1 \\",
            "    --hash=sha256:ab",
            "    # via torch",
        ]
    )
    _, blocks, _ = parse_blocks(without(text))
    # torch's plain dependencies stay pinned; its CUDA stack goes with it.
    assert set(blocks) == {"filelock", "huggingface-hub", "sympy"}


def test_a_lock_checked_on_another_python_names_each_package_it_changes():
    locked = lock_pythons.pins(
        "# header\nnumpy==2.4.6 \\\n    --hash=sha256:aa\n    # via imgsearch\n"
        "tomli==2.0 \\\n    --hash=sha256:bb\nscipy==1.17.1 \\\n    --hash=sha256:cc\n"
    )
    assert locked == {"numpy": "numpy==2.4.6", "tomli": "tomli==2.0", "scipy": "scipy==1.17.1"}
    resolved = lock_pythons.pins("numpy==2.4.6\n    # via imgsearch\nscipy==1.18.1\nzipp==3\n")
    assert lock_pythons.differences(locked, locked) == []
    assert lock_pythons.differences(locked, resolved) == [
        "scipy==1.17.1 resolves to scipy==1.18.1 there",
        "tomli==2.0 is not installed there (a marker drops it)",
        "zipp==3 is added there (a marker adds it)",
    ]
