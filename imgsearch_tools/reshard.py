"""`imgsearch shard`: publish the current set again, its retrieval indexes split into shards."""

from __future__ import annotations

import time
from pathlib import Path

from imgsearch_tools.build import check_shard_count, current_set, stage_printer


def reshard(root: str, count: int, keep: int = 3, show_progress: bool = True) -> Path:
    """Publish a new set: the current one's files (hard links) plus ``count`` shards.

    A set that is sharded already is resharded: its shards are left out of the new set.
    """
    from imgsearch import artifacts
    from retrieval_service.sharding import SHARDS_DIR, write_shards

    check_shard_count(count)
    current = current_set(root)
    log = stage_printer(show_progress)
    fingerprint = current.manifest.get("data_fingerprint", "")
    with artifacts.writing_set(root, fingerprint) as (set_dir, version):
        artifacts.link_tree(current.path, set_dir, skip=(artifacts.MANIFEST, SHARDS_DIR))
        log(f"splitting the retrieval indexes of {current.version} into {count} shards")
        layout = write_shards(set_dir, count, log)
        manifest = {
            **current.manifest,
            "version": version,
            "parent_version": current.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": layout,
        }
        artifacts.write_manifest(set_dir, manifest)
        artifacts.publish(root, set_dir)
    artifacts.prune(root, keep=keep)
    log(f"artifact set {version} ({count} retrieval shards) ready: {set_dir}")
    return set_dir
