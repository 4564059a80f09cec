"""The versioned artifact store: one build writes one set; servers load and swap sets."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgsearch.files import write_temporary

# Layout of one artifact set (paths relative to the set's folder).
MANIFEST = "manifest.json"
CATALOGUE_DIR = "catalogue"  # photos/keywords/users/conversions .parquet
# In a set retrained with logged conversions: the catalogue before they were merged, so that
# the next retraining merges the store's events again into it instead of on top of them.
BASE_CATALOGUE_DIR = "catalogue_base"
KEYWORD_INDEX = "keyword_index.npz"
CLIP_DIR = (
    "clip"  # open_clip_config.json + open_clip_model.safetensors, or clip.json for a hub model
)
EMBEDDINGS = "image_embeddings.npz"  # photo_idx (int64), embeddings (float32, L2-normalised)
VECTOR_INDEX = "vector.faiss"
RANKERS_DIR = "rankers"  # rankers/<name>/...

# A root folder holds sets under sets/<version>/ and a `current` symlink swapped atomically.
SETS_DIR = "sets"
CURRENT = "current"


class ArtifactError(RuntimeError):
    """An artifact set is missing, incomplete or unreadable."""


class UnknownVersion(ArtifactError):
    """No set of that version is available where a server may load from."""


# What a set version may look like: the folder name under ``sets/`` that `build` writes
# (``20261126T040408-0fde62a0``, ``...-reload``, ``....1``): never a path.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ArtifactSet:
    """One loaded-or-loadable artifact set: its folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "unknown"))

    def file(self, relative: str) -> Path:
        return self.path / relative

    def has(self, relative: str) -> bool:
        return (self.path / relative).exists()

    @property
    def rankers(self) -> list[str]:
        return list(self.manifest.get("rankers", {}))


def resolve(path: str | Path) -> ArtifactSet:
    """Open an artifact set from a set folder or from a root holding `current`.

    Raises
    ------
    ArtifactError
        When no manifest is found, naming the path and the command that builds one.
    """
    path = Path(path)
    if (path / CURRENT).exists():
        target = (path / CURRENT).resolve()
        # A root's `current` names one of its own sets; one pointing anywhere else (a link
        # planted in a set folder, say) is not followed.
        if target.parent != (path / SETS_DIR).resolve():
            raise ArtifactError(
                f"{path / CURRENT} points to {target}, outside {path / SETS_DIR}; "
                "it is not followed"
            )
        path = target
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(
            f"no artifact set at {path} (missing {MANIFEST}); "
            "build one with `imgsearch build --data DIR --out ARTIFACTS`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    return ArtifactSet(path=path.resolve(), manifest=manifest)


def locate(configured: str | Path, version: str = "") -> Path:
    """The folder a server started with ``configured`` loads for ``version``.

    ``configured`` is what the server was given: an artifact root (with ``sets/`` and
    ``current``) or one set folder. An empty ``version`` means ``configured`` itself (the set
    ``current`` points to at load time, or the one set). A version names a set under the
    root's ``sets/``; a server given one set folder can load only that set.

    Raises
    ------
    ValueError
        When ``version`` is not a well-formed version (a path, say).
    UnknownVersion
        When no complete set of that version is there.
    """
    configured = Path(configured)
    if not version:
        return configured
    if not VERSION_PATTERN.fullmatch(version):
        raise ValueError(
            "must be a set version (letters, digits, '.', '_', '-'; at most 128), "
            "e.g. 20261126T040408-0fde62a0"
        )
    sets_dir = configured / SETS_DIR
    if (configured / CURRENT).exists() or sets_dir.is_dir():
        candidate = sets_dir / version
        # A link under sets/ pointing elsewhere is not a set of this root.
        inside = candidate.resolve().parent == sets_dir.resolve()
        if not inside or not (candidate / MANIFEST).exists():
            raise UnknownVersion(f"no complete artifact set {version!r} under {sets_dir}")
        return candidate
    served = resolve(configured)
    if version not in (served.version, served.path.name):
        raise UnknownVersion(
            f"this server was started with the set folder {configured} (version "
            f"{served.version}); it can reload only that set. Start it with the artifact "
            "root to switch versions"
        )
    return configured


def data_fingerprint(data_dir: str | Path) -> str:
    """A short hash of the data tables' names, sizes and modification times."""
    digest = hashlib.sha256()
    for entry in sorted(Path(data_dir).glob("*.tsv*")):
        stat = entry.stat()
        digest.update(f"{entry.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:12]


# A set being written holds this file, locked (flock) by the writer, until it is published.
IN_PROGRESS = ".in-progress"


def new_set_dir(root: str | Path, fingerprint: str) -> tuple[Path, str]:
    """Create an empty folder for a new set under ``root/sets`` and return it with its version.

    Prefer :func:`writing_set`, which also marks the set as being written.
    """
    version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{fingerprint[:8]}"
    sets_dir = Path(root) / SETS_DIR
    sets_dir.mkdir(parents=True, exist_ok=True)
    path = sets_dir / version
    suffix = 1
    while True:
        try:
            path.mkdir()  # atomic: two builds in the same second get different folders
            return path, path.name
        except FileExistsError:
            path = sets_dir / f"{version}.{suffix}"
            suffix += 1


@contextmanager
def writing_set(root: str | Path, fingerprint: str) -> Iterator[tuple[Path, str]]:
    """A new set folder marked in progress while the caller writes and publishes it.

    The folder holds :data:`IN_PROGRESS`, locked by this process, until the block ends, so
    :func:`prune` (of this or another build) leaves it alone. If the block raises, the folder
    (this call's own) is removed.
    """
    set_dir, version = new_set_dir(root, fingerprint)
    marker = set_dir / IN_PROGRESS
    handle = open(marker, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        # Written only once locked: prune takes a marker with a pid and no lock for a set
        # whose writer died (see _settle_in_progress).
        handle.write(f"{os.getpid()} {version}\n")
        handle.flush()
        try:
            yield set_dir, version
        except BaseException:
            shutil.rmtree(set_dir, ignore_errors=True)
            raise
        marker.unlink(missing_ok=True)
    finally:
        handle.close()


def _settle_in_progress(set_dir: Path) -> str:
    """Look at a set's in-progress marker: "" (none: the set is finished), "writing" (a live
    writer holds the lock, or is just starting), or "removed" (its writer died before
    publishing: the set was deleted here, under the lock, so no writer can resume it)."""
    try:
        handle = open(set_dir / IN_PROGRESS)
    except FileNotFoundError:
        return ""
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "writing"
        if os.fstat(handle.fileno()).st_nlink == 0:
            return ""  # unlinked by its writer, which has just published the set
        written = handle.read().split()
        if not written:
            return "writing"  # the writer has created the marker but not locked it yet
        if not _started_by_a_build(set_dir, written):
            return "foreign"  # not a folder writing_set made: never deleted
        shutil.rmtree(set_dir, ignore_errors=True)
        return "removed"


# The folder names new_set_dir gives: a UTC time, the data fingerprint, a counter on clashes.
BUILD_VERSION = re.compile(r"\d{8}T\d{6}-[0-9a-f]{0,8}(\.\d+)?")


def _started_by_a_build(set_dir: Path, marker: list[str]) -> bool:
    """Whether an in-progress marker's words are those :func:`writing_set` wrote for this
    folder: a pid and the folder's version (a pid alone, before versions were written,
    counts for a folder named as builds name them)."""
    if not marker[0].isdigit():
        return False
    if len(marker) == 1:
        return BUILD_VERSION.fullmatch(set_dir.name) is not None
    return marker[1:] == [set_dir.name]


def _is_set(path: Path) -> bool:
    """A folder a build wrote: its manifest names it (a foreign folder is never pruned)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("version") == path.name


def write_manifest(set_dir: Path, manifest: dict) -> None:
    """Write the manifest last: a set without one is incomplete and is never loaded."""
    tmp = set_dir / (MANIFEST + ".tmp")
    write_temporary(tmp, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, set_dir / MANIFEST)


def check_root(root: str | Path) -> None:
    """Raise ArtifactError when ``root`` holds a ``current`` that is not this store's link."""
    for name in (CURRENT, CURRENT + ".tmp"):
        path = Path(root) / name
        if (path.exists() or path.is_symlink()) and not path.is_symlink():
            raise ArtifactError(
                f"{path} exists and is not the artifact store's link; it is left as it is, "
                "so no set can be published into this root"
            )


def publish(root: str | Path, set_dir: Path) -> None:
    """Point ``root/current`` at ``set_dir`` atomically (symlink + rename)."""
    root = Path(root)
    check_root(root)
    link = root / CURRENT
    tmp = root / (CURRENT + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()  # left by an interrupted publish
    os.symlink(os.path.relpath(set_dir, root), tmp)
    os.replace(tmp, link)


def prune(root: str | Path, keep: int = 3) -> list[Path]:
    """Delete all but the newest ``keep`` sets; returns what went.

    Only folders a build wrote are candidates (a manifest naming the folder's version);
    anything else under ``sets/`` is left alone. Never deleted: the current set, a set being
    written (its writer holds the in-progress lock). A set whose writer died before
    publishing it (in-progress marker, no lock) is deleted.
    """
    root = Path(root)
    sets_dir = root / SETS_DIR
    if not sets_dir.is_dir():
        return []
    current = (root / CURRENT).resolve() if (root / CURRENT).is_symlink() else None
    removed = []
    complete = []
    for path in sorted(p for p in sets_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        state = _settle_in_progress(path)
        if state == "removed":
            removed.append(path)
        elif not state and _is_set(path):
            complete.append(path)
    for old in complete[:-keep] if keep else complete:
        if current is not None and old.resolve() == current:
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def link_tree(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a set's files into ``target`` as hard links (a copy where links are impossible).

    Sets are immutable once published, so sharing files between versions is safe; ``skip``
    names top-level entries to leave out (they are rewritten by the caller).
    """

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(
        source,
        target,
        copy_function=link_or_copy,
        dirs_exist_ok=True,
        ignore=lambda folder, names: [n for n in names if Path(folder) == source and n in skip],
    )
