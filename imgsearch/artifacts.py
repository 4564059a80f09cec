"""The versioned artifact store: one build writes one set; servers load and swap sets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

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
        path = (path / CURRENT).resolve()
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


def data_fingerprint(data_dir: str | Path) -> str:
    """A short hash of the data tables' names, sizes and modification times."""
    digest = hashlib.sha256()
    for entry in sorted(Path(data_dir).glob("*.tsv*")):
        stat = entry.stat()
        digest.update(f"{entry.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:12]


def new_set_dir(root: str | Path, fingerprint: str) -> tuple[Path, str]:
    """Create an empty folder for a new set under ``root/sets`` and return it with its version."""
    version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{fingerprint[:8]}"
    path = Path(root) / SETS_DIR / version
    suffix = 1
    while path.exists():
        path = Path(root) / SETS_DIR / f"{version}.{suffix}"
        suffix += 1
    path.mkdir(parents=True)
    return path, path.name


def write_manifest(set_dir: Path, manifest: dict) -> None:
    """Write the manifest last: a set without one is incomplete and is never loaded."""
    tmp = set_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, set_dir / MANIFEST)


def publish(root: str | Path, set_dir: Path) -> None:
    """Point ``root/current`` at ``set_dir`` atomically (symlink + rename)."""
    root = Path(root)
    link = root / CURRENT
    tmp = root / (CURRENT + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(set_dir, root), tmp)
    os.replace(tmp, link)


def prune(root: str | Path, keep: int = 3) -> list[Path]:
    """Delete all but the newest ``keep`` sets (never the current one); returns what went."""
    root = Path(root)
    sets_dir = root / SETS_DIR
    if not sets_dir.exists():
        return []
    current = (root / CURRENT).resolve() if (root / CURRENT).exists() else None
    sets = sorted(p for p in sets_dir.iterdir() if p.is_dir())
    removed = []
    for old in sets[:-keep] if keep else sets:
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
