"""The demo folder on disk: its output marker, conflicts with what is there, and tables written
in shards."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from imgsearch_tools import outputs

TABLE_NAMES = ("photos", "keywords", "conversions", "colors", "labels")

# The name recorded in the marker of the folders this generator writes.
MAKER = "demo-data"

# The marker `imgsearch demo` wrote before output markers existed (see adopt_legacy_folder).
LEGACY_MARKER = ".complete"

_TABLE_FILE = re.compile(r"[^/]+\.tsv\d*")

_IMAGE_FILE = re.compile(r"images/[^/]+\.jpg")


def table_conflicts(found: outputs.FolderContents) -> list[str]:
    """Tables already in a folder would be read together with the generated ones."""
    tables = [f for f in found.foreign if _TABLE_FILE.fullmatch(f)]
    if tables:
        return [f"it holds tables ({', '.join(tables[:3])}) a reader would mix with the new ones"]
    return []


def check_folder(out_dir: str | Path, force: bool = False) -> None:
    """Raise :class:`~imgsearch_tools.outputs.RefusedFolder` if :func:`generate` would refuse
    ``out_dir`` (someone else's files, or with ``force`` tables of its own)."""
    adopt_legacy_folder(Path(out_dir))
    outputs.claim(out_dir, MAKER, force, table_conflicts)


def generated_by(folder: str | Path) -> dict | None:
    """The generator's record of a folder it wrote (version, seed, sizes), or None."""
    adopt_legacy_folder(Path(folder))
    return outputs.read_marker(folder, MAKER)


def adopt_legacy_folder(folder: Path) -> None:
    """Give a folder written before output markers existed the marker it would have now.

    Such folders carry `imgsearch demo`'s old ``.complete`` file (with the generator
    version); the generator's own files in them are its tables and ``images/*.jpg``.
    """
    legacy = folder / LEGACY_MARKER
    if not legacy.is_file() or (folder / outputs.MARKER).exists():
        return
    try:
        record = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or "generator" not in record:
        return
    ours = [
        entry
        for entry in outputs.tree_entries(folder)
        if _TABLE_FILE.fullmatch(entry)
        and entry.split(".")[0] in TABLE_NAMES
        or _IMAGE_FILE.fullmatch(entry)
    ]
    images = ["images"] if (folder / "images").is_dir() else []
    outputs.write_marker(folder, MAKER, [*ours, LEGACY_MARKER], record, images)


def write_table(table, out_dir: Path, name: str, rows_per_shard: int) -> list[str]:
    """Write ``name.tsv000``, ``name.tsv001``… with a header row each; returns the file names.

    ``table`` is a DataFrame or an object with ``len()`` and ``rows(start, stop)`` returning
    one (the conversions, spelled out a shard at a time).
    """
    files = []
    n_shards = max(1, math.ceil(len(table) / rows_per_shard))
    rows = table.rows if hasattr(table, "rows") else lambda a, b: table.iloc[a:b]
    for shard in range(n_shards):
        part = rows(shard * rows_per_shard, (shard + 1) * rows_per_shard)
        file_name = f"{name}.tsv{shard:03d}"
        _write_tsv(part, out_dir / file_name)
        files.append(file_name)
    return files


def _write_tsv(part: pd.DataFrame, path: Path) -> None:
    """Write one shard: text-only tables through Arrow's CSV writer (an order of magnitude
    faster than pandas on the conversions, same bytes), others through pandas for ``%.4f``."""
    if all(pd.api.types.is_string_dtype(dtype) for dtype in part.dtypes):
        with path.open("wb") as out:
            out.write(("\t".join(part.columns) + "\n").encode())
            options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
            pacsv.write_csv(pa.Table.from_pandas(part, preserve_index=False), out, options)
        return
    part.to_csv(path, sep="\t", index=False, na_rep="", float_format="%.4f", lineterminator="\n")
