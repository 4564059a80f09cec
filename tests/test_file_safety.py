"""Files the project did not make stay untouched: crafted markers, links, foreign folders."""

from __future__ import annotations

import json
import os

import pytest

from imgsearch import artifacts
from imgsearch_tools import certs, outputs
from imgsearch_tools.fetch_images import fetch_images
from tests.test_fetch_images import ImageServer, jpeg_bytes


def test_a_crafted_output_marker_cannot_delete_outside_its_folder(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    victims = [tmp_path / "victim.txt", tmp_path / "elsewhere" / "victim.txt"]
    victims[1].parent.mkdir()
    for victim in victims:
        victim.write_text("keep me")
    (out / "notes.txt").write_text("someone's notes")
    crafted = {"files": ["../victim.txt", str(victims[1]), "./../victim.txt"], "folders": [".."]}
    (out / outputs.MARKER).write_text(json.dumps({"makers": {certs.MAKER: crafted}}))
    certs.write_dev_certs(out, force=True)
    assert all(victim.read_text() == "keep me" for victim in victims)
    assert (out / certs.SERVER_CERT).exists() and (out / "notes.txt").exists()


def test_a_marker_entry_through_a_link_out_of_the_folder_is_not_deleted(tmp_path):
    out = tmp_path / "certs"
    certs.write_dev_certs(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / certs.TOKEN).write_text("not ours")
    (out / "sub").symlink_to(outside)
    record = outputs.read_marker(out, certs.MAKER)
    outputs.write_marker(out, certs.MAKER, [*record["files"], f"sub/{certs.TOKEN}"])
    (out / "notes.txt").write_text("someone's notes")
    certs.write_dev_certs(out, renew=True, force=True)
    assert (outside / certs.TOKEN).read_text() == "not ours"


def test_temporary_files_never_write_through_a_planted_link(tmp_path):
    set_dir = tmp_path / "root" / artifacts.SETS_DIR / "20200101T000000-aaaa"
    set_dir.mkdir(parents=True)
    target = tmp_path / "target.txt"
    target.write_text("original")
    (set_dir / (artifacts.MANIFEST + ".tmp")).symlink_to(target)
    artifacts.write_manifest(set_dir, {"version": set_dir.name})
    out = tmp_path / "out"
    out.mkdir()
    (out / (outputs.MARKER + ".tmp")).symlink_to(target)
    outputs.write_marker(out, "test", ["a"])
    assert target.read_text() == "original"
    assert artifacts.resolve(set_dir).version == set_dir.name
    assert outputs.read_marker(out, "test")["files"] == ["a"]


def test_a_sets_own_current_link_is_not_followed_out_of_the_root(tmp_path):
    root = tmp_path / "root"
    inside = root / artifacts.SETS_DIR / "20200101T000000-aaaa"
    inside.mkdir(parents=True)
    artifacts.write_manifest(inside, {"version": inside.name})
    artifacts.publish(root, inside)
    elsewhere = tmp_path / "elsewhere" / "20990101T000000-ffff"
    elsewhere.mkdir(parents=True)
    artifacts.write_manifest(elsewhere, {"version": "planted"})
    (inside / artifacts.CURRENT).symlink_to(elsewhere)
    located = artifacts.locate(root, inside.name)
    with pytest.raises(artifacts.ArtifactError, match="outside"):
        artifacts.resolve(located)
    assert artifacts.resolve(root).version == inside.name  # the root's own link still works


def test_prune_never_deletes_a_foreign_folder_with_a_stale_in_progress_file(tmp_path):
    root = tmp_path / "root"
    published = root / artifacts.SETS_DIR / "20200101T000000-aaaa"
    published.mkdir(parents=True)
    artifacts.write_manifest(published, {"version": published.name})
    artifacts.publish(root, published)
    foreign = root / artifacts.SETS_DIR / "holiday-photos"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"jpg")
    (foreign / artifacts.IN_PROGRESS).write_text("4242\n")  # a pid, no lock: looks dead
    mislabelled = root / artifacts.SETS_DIR / "20200102T000000-bbbb"
    mislabelled.mkdir()
    (mislabelled / artifacts.IN_PROGRESS).write_text(f"4242 {foreign.name}\n")
    assert artifacts.prune(root, keep=3) == []
    assert (foreign / "beach.jpg").read_bytes() == b"jpg" and mislabelled.exists()
    # A writer that died in a set it started is still cleaned up.
    dead = root / artifacts.SETS_DIR / "20200103T000000-cccc"
    dead.mkdir()
    (dead / artifacts.IN_PROGRESS).write_text(f"4242 {dead.name}\n")
    assert artifacts.prune(root, keep=3) == [dead]


def test_fetch_images_fetches_web_addresses_only_and_bounds_the_body(tmp_path, monkeypatch):
    from imgsearch_tools import fetch_images as fetch_module

    local = tmp_path / "local.jpg"
    local.write_bytes(jpeg_bytes((1, 2, 3)))
    data = tmp_path / "data"
    data.mkdir()
    with ImageServer() as server:
        (data / "photos.tsv000").write_text(
            f"photo_id\tphoto_image_url\nlocal\tfile://{local}\nbig\t{server.base}/ok/1.jpg\n"
        )
        monkeypatch.setattr(fetch_module, "MAX_IMAGE_BYTES", 100, raising=False)
        result = fetch_images(data, show_progress=False, retries=0, timeout=5)
    assert result["downloaded"] == 0 and result["failed"] == 2
    reasons = json.dumps(result["failures"])
    assert "scheme 'file'" in reasons and "larger than 100 bytes" in reasons
    assert not os.path.exists(data / "images" / "local.jpg")
