"""Output folders: a command writes only into folders that are new, empty, or its own.

A command that writes a folder (``demo-data OUT``, ``demo --data``, ``train-clip --out``,
``bench-suite --out``, ``bench-feedback --out``) leaves a marker file in it listing, per
command, what it wrote. Run again, a command may replace its own files; files another command
listed are left alone; a folder holding anything no command listed is someone else's, and the
command refuses it unless given ``--force``, which adds the command's files beside the others
without deleting or overwriting any of them. Generators build the whole folder in a temporary
folder beside the target and move it into place at the end, so an interrupted run leaves no
half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from imgsearch.files import write_temporary

MARKER = ".imgsearch-output.json"
# An entry of a marker's file list that ends with "/" owns everything under that folder.
SUBTREE = "/"


class RefusedFolder(Exception):
    """A command was pointed at a folder holding files it did not make."""


@dataclass
class FolderContents:
    """What is in a would-be output folder, split by who made it."""

    folder: Path
    maker: str
    ours: list[str] = field(default_factory=list)  # this maker's marker entries
    others: list[str] = field(default_factory=list)  # present, listed by another command
    foreign: list[str] = field(default_factory=list)  # present, listed by no command
    marker: dict | None = None  # this maker's record

    @property
    def made_by_us(self) -> bool:
        return self.marker is not None


def tree_entries(folder: Path) -> list[str]:
    """Files, symlinks and empty folders under ``folder`` as sorted relative POSIX paths."""
    entries = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        rel = here.relative_to(folder)
        entries += [(rel / name).as_posix() for name in files]
        # os.walk lists a symlink to a folder among dirs without entering it.
        entries += [(rel / name).as_posix() for name in dirs if (here / name).is_symlink()]
        if not dirs and not files and rel != Path("."):
            entries.append(rel.as_posix() + SUBTREE)
    return sorted(entries)


def _read_all(folder: str | Path) -> dict[str, dict]:
    """Every command's record in ``folder``'s marker (empty when absent or unreadable)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    makers = marker.get("makers") if isinstance(marker, dict) else None
    if not isinstance(makers, dict):
        return {}
    return {
        name: {
            **record,
            "files": [f for f in record["files"] if _inside(f)],
            "folders": [f for f in record.get("folders", []) if _inside(f)],
        }
        for name, record in makers.items()
        if isinstance(record, dict) and isinstance(record.get("files"), list)
    }


def _inside(entry) -> bool:
    """Whether a marker's entry names something inside its folder: a relative POSIX path
    without ``..``, ``.`` or empty parts (a crafted marker listing ``/etc/x`` or ``../x``
    must not make a command delete outside its output folder)."""
    if not isinstance(entry, str) or not entry or "\\" in entry or "\0" in entry:
        return False
    parts = entry.removesuffix(SUBTREE).split("/")
    return not entry.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def read_marker(folder: str | Path, maker: str) -> dict | None:
    """What ``maker`` recorded in ``folder``'s marker (its files, folders, info), or None."""
    return _read_all(folder).get(maker)


def write_marker(
    folder: Path,
    maker: str,
    files: Iterable[str],
    info: dict | None = None,
    folders: Iterable[str] = (),
) -> None:
    """Record that ``maker`` wrote ``files`` and made ``folders`` (relative paths).

    A file entry ending in "/" owns that folder's whole subtree; ``folders`` are folders the
    maker created to hold its files, removed with them when they are left empty. Other
    commands' records in the marker are kept.
    """
    makers = _read_all(folder)
    makers[maker] = {
        **(info or {}),
        "files": sorted(set(files)),
        "folders": sorted(set(folders)),
    }
    tmp = folder / (MARKER + ".tmp")
    write_temporary(tmp, json.dumps({"makers": makers}, indent=1, default=str))
    os.replace(tmp, folder / MARKER)


def _owned(entry: str, ours: Iterable[str]) -> bool:
    for owned in ours:
        if entry == owned or (owned.endswith(SUBTREE) and entry.startswith(owned)):
            return True
    return False


def contents(folder: str | Path, maker: str) -> FolderContents:
    """Split what ``folder`` holds into ``maker``'s files, other commands' and the rest."""
    folder = Path(folder)
    found = FolderContents(folder, maker)
    if not folder.exists() and not folder.is_symlink():
        return found
    if not folder.is_dir():
        found.foreign = [folder.name]
        return found
    makers = _read_all(folder)
    found.marker = makers.get(maker)

    def owned(record: dict) -> tuple[list[str], set[str]]:
        made = {str(f) + SUBTREE for f in record.get("folders", [])}
        return [str(f) for f in record["files"]], made

    ours, our_folders = owned(found.marker) if found.marker else ([], set())
    found.ours = ours
    theirs = [owned(r) for name, r in makers.items() if name != maker]
    for entry in tree_entries(folder):
        if entry in (MARKER, MARKER + ".tmp"):
            if entry == MARKER and not makers:
                found.foreign.append(entry)  # a file of that name, not a marker
            continue
        if entry in our_folders or _owned(entry, ours):
            continue
        if any(entry in made or _owned(entry, files) for files, made in theirs):
            found.others.append(entry)
        else:
            found.foreign.append(entry)
    return found


def _folders(folder: Path) -> list[str]:
    """Every folder under ``folder`` (relative POSIX paths, not following links)."""
    return sorted(
        (Path(root) / name).relative_to(folder).as_posix()
        for root, dirs, _ in os.walk(folder)
        for name in dirs
        if not (Path(root) / name).is_symlink()
    )


def _examples(entries: list[str], n: int = 3) -> str:
    shown = ", ".join(entries[:n])
    return shown + (f" and {len(entries) - n} more" if len(entries) > n else "")


def claim(
    folder: str | Path,
    maker: str,
    force: bool = False,
    conflicts: Callable[[FolderContents], list[str]] | None = None,
) -> FolderContents:
    """Check that ``maker`` may write ``folder``; return what is there.

    Parameters
    ----------
    folder:
        The output folder named on the command line.
    maker:
        The command's name (``demo-data``), recorded in the marker.
    force:
        Accept a folder holding other files (the command adds its own beside them).
    conflicts:
        Given the folder's contents, what would make the command's output wrong even with
        ``force`` (e.g. foreign tables a reader would mix with the generated ones).

    Raises
    ------
    RefusedFolder
        The folder holds files ``maker`` did not make and ``force`` is off, or ``conflicts``
        names a problem. The message names the folder and ``--force``.
    """
    found = contents(folder, maker)
    if not found.foreign:
        return found
    if not Path(folder).is_dir():
        raise RefusedFolder(f"{folder} exists and is not a folder")
    problems = conflicts(found) if conflicts else []
    if not force:
        alternative = (
            f" (--force would not do either: {'; '.join(problems)})"
            if problems
            else f", or pass --force to add the {maker} files beside them (nothing already "
            "there is deleted or overwritten)"
        )
        raise RefusedFolder(
            f"{folder} is not empty and holds files `imgsearch {maker}` did not make "
            f"({_examples(found.foreign)}); give a new or empty folder{alternative}"
        )
    if problems:
        raise RefusedFolder(f"{folder}: refused even with --force: {'; '.join(problems)}")
    return found


@contextmanager
def staged_folder(
    folder: str | Path,
    maker: str,
    force: bool = False,
    info: dict | None = None,
    conflicts: Callable[[FolderContents], list[str]] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder`` to write into; put it in place on success.

    The target is checked with :func:`claim` before the work and again before it is touched.
    A new target gets the temporary folder by rename; a target this maker wrote alone is
    swapped for it (its old files deleted: they are the maker's own); an empty or forced
    target receives the new files one by one after the maker's previous files (and only
    those) are deleted. A name that already exists and is not the maker's is never
    overwritten. On error the temporary folder is removed and the target left as it was.
    """
    # Absolute, so that the folder's parent (where the temporary folder goes) is outside it
    # even for "." or "..".
    folder = Path(os.path.abspath(folder))
    claim(folder, maker, force, conflicts)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(folder, "partial")
    try:
        yield staging
        new_files = [e for e in tree_entries(staging) if not e.endswith(SUBTREE)]
        write_marker(staging, maker, new_files, info, _folders(staging))
        _install(staging, folder, maker, force, conflicts, new_files)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _sibling(folder: Path, kind: str) -> Path:
    """A new hidden folder beside ``folder`` (made with the umask's mode, unlike mkdtemp)."""
    while True:
        path = folder.parent / f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _install(staging, folder, maker, force, conflicts, new_files) -> None:
    found = claim(folder, maker, force, conflicts)  # the folder may have changed meanwhile
    if not folder.exists() and not folder.is_symlink():
        os.rename(staging, folder)
        return
    if found.made_by_us and not found.foreign and not found.others and not folder.is_symlink():
        aside = _sibling(folder, "old")
        os.rename(folder, aside / folder.name)
        os.rename(staging, folder)
        shutil.rmtree(aside)
        return
    clashes = [
        f
        for f in new_files
        if (folder / f).exists() or (folder / f).is_symlink()
        if not _owned(f, found.ours)
    ]
    if clashes:
        raise RefusedFolder(
            f"{folder}: {_examples(clashes)} already exist(s), not made by `imgsearch {maker}`; "
            "nothing is overwritten"
        )
    _remove_owned(folder, found)
    made = []
    for name in _folders(staging):
        if not (folder / name).exists():
            (folder / name).mkdir()
            made.append(name)
    for entry in new_files:
        os.rename(staging / entry, folder / entry)
    write_marker(folder, maker, new_files, read_marker(staging, maker), made)


def _remove_owned(folder: Path, found: FolderContents) -> None:
    """Delete the files a maker's marker lists, then its folders left empty; nothing else."""
    real_folder = folder.resolve()
    for entry in found.ours:
        path = folder / entry
        if not _inside(entry) or path.parent.resolve() != (real_folder / entry).parent:
            continue  # through a link out of the folder: not ours to delete
        if not entry.endswith(SUBTREE) and (path.is_symlink() or path.is_file()):
            path.unlink()
    made = found.marker.get("folders", []) if found.marker else []
    for name in sorted(made, key=lambda n: -n.count("/")):
        if not _inside(name) or (folder / name).resolve() != real_folder / name:
            continue
        try:
            (folder / name).rmdir()
        except OSError:
            pass  # not empty (someone's files are in it) or gone


def claim_in_place(
    folder: str | Path,
    maker: str,
    names: Iterable[str],
    force: bool = False,
    record: bool = True,
) -> FolderContents:
    """Check ``folder`` for a command that writes ``names`` (top-level) directly into it.

    For commands whose output grows while they run (logs, reports). ``names`` ending in "/"
    are folders the command owns whole. Raises :class:`RefusedFolder` as :func:`claim` does,
    and whenever one of ``names`` exists and is not the maker's; then, with ``record``,
    creates the folder and records ``names`` in its marker (keeping what it recorded before).
    """
    names = list(names)
    found = claim(folder, maker, force)
    taken = [
        n
        for n in names
        if (found.folder / n.rstrip(SUBTREE)).exists() and not _owned(n, found.ours)
    ]
    if taken:
        raise RefusedFolder(
            f"{folder}: {_examples(taken)} already exist(s), not made by `imgsearch {maker}`; "
            "nothing is overwritten"
        )
    if record:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        earlier = found.marker or {}
        write_marker(folder, maker, [*found.ours, *names], earlier, earlier.get("folders", []))
    return found
