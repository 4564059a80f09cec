"""MkDocs hook: add the reference pages generated from the code (CLI, configuration, gRPC API)."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def on_files(files, config):
    """Append the generated pages; they are built from this checkout's code, never written."""
    # This checkout's code first, not an installed copy of the package.
    sys.path.insert(0, str(ROOT))
    from imgsearch_tools.reference_docs import reference_pages

    for path, text in reference_pages(ROOT / "protos").items():
        files.append(File.generated(config, path, content=text))
    return files
