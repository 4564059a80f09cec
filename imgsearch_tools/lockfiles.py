"""`make lock`'s last step: a hash-locked requirements file without what only torch needs.

PyTorch's CPU wheels come from PyTorch's own index (the Docker build installs them first),
while the lock resolves PyPI's wheels, which bring the CUDA libraries (``nvidia-*``,
``cuda-*``, ``triton``). The image's file is the runtime lock less ``torch``, ``torchvision``
and the CUDA packages that only they (directly or through one another) pull in; everything
else stays pinned with its hashes, torch's plain dependencies (``sympy``, ``setuptools``...)
included. The lock's ``# via`` annotations (uv and pip-compile write them alike) say who
needs what.

    python -m imgsearch_tools.lockfiles requirements/runtime.txt requirements/image.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

WITHOUT = ("torch", "torchvision")
# What PyPI's torch wheels need and PyTorch's CPU wheels do not.
CUDA_STACK = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
_PACKAGE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_blocks(text: str) -> tuple[list[str], dict[str, list[str]], dict[str, set[str]]]:
    """The header lines, each package's lines, and who needs each package (``# via``)."""
    header: list[str] = []
    blocks: dict[str, list[str]] = {}
    needed_by: dict[str, set[str]] = {}
    current = None
    in_via = False
    for line in text.splitlines():
        match = _PACKAGE.match(line)
        if match:
            current = _canonical(match.group(1))
            blocks[current] = [line]
            needed_by[current] = set()
            in_via = False
            continue
        if current is None:
            header.append(line)
            continue
        blocks[current].append(line)
        comment = line.strip().removeprefix("#").strip()
        if comment.startswith("via"):
            in_via = True
            comment = comment.removeprefix("via").strip()
        elif not line.strip().startswith("#"):
            in_via = False
            continue
        if in_via and comment:
            needed_by[current].add(comment.split()[0].split("(")[0])
    return header, blocks, needed_by


def without(text: str, dropped: tuple[str, ...] = WITHOUT) -> str:
    """``text`` (a `uv pip compile` output) less ``dropped`` and the CUDA packages only they
    need."""
    header, blocks, needed_by = parse_blocks(text)
    gone = {_canonical(name) for name in dropped}
    changed = True
    while changed:
        changed = False
        for name, parents in needed_by.items():
            if name in gone or not parents or not CUDA_STACK.match(name):
                continue
            if all(_canonical(parent) in gone for parent in parents):
                gone.add(name)
                changed = True
    kept = [line for name, lines in blocks.items() if name not in gone for line in lines]
    note = (
        f"# Less {', '.join(dropped)} and the CUDA packages only they need (torch comes "
        "from PyTorch's CPU index): python -m imgsearch_tools.lockfiles"
    )
    return "\n".join([*header, note, *kept]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runtime", help="a `uv pip compile` output with hashes")
    parser.add_argument("out", help="the file to write")
    args = parser.parse_args(argv)
    text = Path(args.runtime).read_text()
    Path(args.out).write_text(without(text))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
