"""`make lock`'s check that a lock resolved for Python 3.11 installs, as it is, on 3.12 and 3.13.

The hash-locked files are resolved for the oldest supported Python; the same files are what
`make test` installs on a newer one (`make test-py313`). Each pin must then have a wheel for
that Python (a binary one for its ABI, or a pure-Python one: no sdist is built at install
time), and no environment marker may add or drop a package there. uv answers both: resolving
the project again for the other Python with every pin as a constraint and building disabled
fails on a pin without a usable wheel, and the resolved set must equal the locked one.

    python -m imgsearch_tools.lock_pythons requirements/dev.txt --extra postgres --extra dev \\
        --extra ray --python-version 3.12 --python-version 3.13
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from imgsearch_tools.lockfiles import parse_blocks

PLATFORM = "x86_64-unknown-linux-gnu"


def pins(lock_text: str) -> dict[str, str]:
    """Each locked package's canonical name and its pinned ``name==version`` line."""
    _, blocks, _ = parse_blocks(lock_text)
    return {name: lines[0].split()[0] for name, lines in blocks.items()}


def differences(locked: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """What the resolution for another Python changed: packages dropped, added or moved."""
    found = []
    for name in sorted(locked.keys() | resolved.keys()):
        if name not in resolved:
            found.append(f"{locked[name]} is not installed there (a marker drops it)")
        elif name not in locked:
            found.append(f"{resolved[name]} is added there (a marker adds it)")
        elif locked[name] != resolved[name]:
            found.append(f"{locked[name]} resolves to {resolved[name]} there")
    return found


def check(lock: Path, extras: list[str], python_version: str, uv: str) -> list[str]:
    """The problems of ``lock`` on ``python_version``; empty when it installs as locked."""
    locked = pins(lock.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "pins.txt"
        constraints.write_text("\n".join(locked.values()) + "\n")
        out = Path(tmp) / "resolved.txt"
        command = [uv, "pip", "compile", "--quiet", "--no-build", "--python-version"]
        command += [python_version, "--python-platform", PLATFORM, "-c", str(constraints)]
        command += [f"--extra={extra}" for extra in extras]
        command += ["pyproject.toml", "-o", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            return [result.stderr.strip() or f"uv exited with {result.returncode}"]
        return differences(locked, pins(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="the hash-locked requirements file to check")
    parser.add_argument(
        "--extra", action="append", default=[], help="an extra the lock was resolved with"
    )
    parser.add_argument(
        "--python-version",
        action="append",
        required=True,
        help="a Python (major.minor) the lock must install on, as locked",
    )
    parser.add_argument("--uv", default="uv", help="the uv executable (default: uv on PATH)")
    args = parser.parse_args(argv)
    failed = False
    for version in args.python_version:
        problems = check(args.lock, args.extra, version, args.uv)
        for problem in problems:
            print(f"{args.lock} on Python {version}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.lock}: every pin installs from a wheel on Python {version}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
