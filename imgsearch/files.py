"""Temporary files that are written then renamed into place, never through a planted link."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


def open_temporary(path: str | Path, mode: str = "w", **kwargs) -> IO:
    """Open ``path`` as a new file for writing, without following a link at that name.

    A temporary name (``X.tmp``) may hold what an interrupted run left, or a symbolic link
    someone planted to make the write land elsewhere: the name is removed first (a link, not
    what it points to) and the file is created with ``O_EXCL | O_NOFOLLOW``, so the bytes go
    into a file of our own or nowhere. ``mode`` is ``"w"`` or ``"wb"``; ``kwargs`` go to
    :func:`os.fdopen` (encoding, newline).
    """
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o644), mode, **kwargs)


def write_temporary(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` into a new file at ``path`` (see :func:`open_temporary`)."""
    if isinstance(data, bytes):
        with open_temporary(path, "wb") as handle:
            handle.write(data)
    else:
        with open_temporary(path, "w", encoding=encoding) as handle:
            handle.write(data)
