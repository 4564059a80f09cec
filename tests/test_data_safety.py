"""Commands pointed at someone else's folder leave every byte of it as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from imgsearch import artifacts
from imgsearch_tools import outputs
from imgsearch_tools.cli import main as imgsearch
from imgsearch_tools.demo_data import generate

FAKE = dict(n_photos=60, n_users=12, n_conversions=900, seed=4, image_size=16)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: files by content hash, links by target, folders."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir",)
        else:
            found[rel] = (
                "file",
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mode,
            )
    return found


@pytest.fixture(scope="module")
def someone_elses(tmp_path_factory) -> Path:
    """A downloaded Unsplash Lite folder: tables, thumbnails, and its owner's other files."""
    folder = tmp_path_factory.mktemp("owner") / "unsplash-lite"
    generate(folder, with_images=True, show_progress=False, **FAKE)
    (folder / outputs.MARKER).unlink()  # nothing here was made by imgsearch as far as it knows
    (folder / "README.md").write_text("downloaded from unsplash.com/data\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("label 500 photos\n")
    (folder / "images" / "contact-sheet.png").write_bytes(b"\x89PNG not really")
    (folder / "empty").mkdir()
    os.symlink("README.md", folder / "readme-link")
    return folder


@pytest.fixture
def folder(someone_elses, tmp_path) -> Path:
    """A fresh copy of the owner's folder for one test, alone in its parent."""
    copy = tmp_path / "owner" / "unsplash-lite"
    shutil.copytree(someone_elses, copy, symlinks=True)
    return copy


def run(*argv, capsys) -> tuple[int, str]:
    status = imgsearch([str(a) for a in argv])
    return status, capsys.readouterr().err


REFUSALS = {
    "demo-data": lambda f, t: ["demo-data", f, "--photos", "30", "--users", "5", "--quiet"],
    "demo-data --force": lambda f, t: ["demo-data", f, "--photos", "30", "--quiet", "--force"],
    "demo": lambda f, t: ["demo", "--data", f, "--artifacts", t / "art", "--no-serve"],
    "demo --force": lambda f, t: ["demo", "--data", f, "--artifacts", t / "a", "--no-serve",
                                  "--force"],
    "bench-suite --data": lambda f, t: ["bench-suite", "--data", f, "--artifacts", t / "a",
                                        "--out", t / "b"],
    "bench-suite --out": lambda f, t: ["bench-suite", "--artifacts", t / "a", "--out", f],
    "bench-feedback --out": lambda f, t: ["bench-feedback", "--artifacts", t / "a",
                                          "--backends", "sqlite", "--out", f],
    "build --out": lambda f, t: ["build", "--data", f, "--out", f, "--no-clip", "--quiet"],
    "train": lambda f, t: ["train", "--artifacts", f, "--quiet"],
    "train-clip --out": lambda f, t: ["train-clip", "--data", f, "--out", f, "--steps", "2",
                                      "--quiet"],
    "serve": lambda f, t: ["serve", "retrieval", "--artifacts", f, "--port", "0"],
    "certs --out": lambda f, t: ["certs", "--out", f],
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSALS))
def test_commands_refuse_someone_elses_folder_and_touch_nothing(name, folder, tmp_path, capsys):
    before = snapshot(folder)
    parent_before = sorted(p.name for p in folder.parent.iterdir())
    status, err = run(*REFUSALS[name](folder, tmp_path), capsys=capsys)
    assert status != 0
    assert str(folder) in err
    if name not in ("train", "serve"):
        assert "--force" in err or "even with --force" in err, err
    assert snapshot(folder) == before
    # Nothing written beside it (no temporary folder left) nor into the other outputs named.
    assert sorted(p.name for p in folder.parent.iterdir()) == parent_before
    assert not (tmp_path / "art").exists() and not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_commands_reading_someone_elses_folder_leave_it_intact(folder, tmp_path, capsys, stack):
    before = snapshot(folder)
    art, clip, emb = tmp_path / "art", tmp_path / "clip", tmp_path / "emb.npz"
    commands = [
        ["build", "--data", folder, "--out", art, "--rankers", "none,popularity,als",
         "--clip-steps", "3", "--quiet"],
        ["train", "--artifacts", art, "--rankers", "als", "--quiet"],
        ["eval", "--data", folder, "--json", tmp_path / "eval.json", "--retrievers", "keyword",
         "--rankers", "none,popularity", "--min-pair", "1", "--quiet"],
        ["train-clip", "--data", folder, "--out", clip, "--steps", "3", "--quiet"],
        ["embed", "--data", folder, "--clip", clip, "--out", emb, "--quiet"],
        ["index-stats", "--embeddings", emb, "--queries", "5"],
        ["fetch-images", "--data", folder, "--quiet"],  # every thumbnail is there: no network
        ["search", "red", "--target", stack.target, "--html", tmp_path / "page.html",
         "--images", folder / "images"],
    ]  # fmt: skip
    for argv in commands:
        status, err = run(*argv, capsys=capsys)
        assert status == 0, (argv[0], err[-2000:])
        assert snapshot(folder) == before, argv[0]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    assert artifacts.resolve(art).manifest["clip"].get("skipped") is None
    assert (tmp_path / "page.html").exists() and emb.exists()


def test_force_adds_files_beside_the_owners_and_replaces_only_its_own(tmp_path, capsys):
    out = tmp_path / "shared"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine\n")
    (out / "plan.md").write_text("also mine\n")
    owners = snapshot(out)
    argv = ["demo-data", out, "--photos", "40", "--users", "6", "--conversions", "300", "--quiet"]

    status, err = run(*argv, capsys=capsys)
    assert status == 2 and "--force" in err and str(out) in err
    assert snapshot(out) == owners

    assert run(*argv, "--force", capsys=capsys)[0] == 0
    first = outputs.read_marker(out, "demo-data")["files"]
    assert "photos.tsv000" in first and any(f.startswith("images/") for f in first)
    assert {k: v for k, v in snapshot(out).items() if k in owners} == owners

    # Again, without images: its own files are replaced, the owner's still untouched.
    assert run(*argv, "--force", "--no-images", capsys=capsys)[0] == 0
    now = snapshot(out)
    assert {k: v for k, v in now.items() if k in owners} == owners
    assert not any(k.startswith("images/") for k in now)
    tables = {f"{name}.tsv000" for name in ("colors", "conversions", "keywords", "labels")}
    assert set(now) == set(owners) | tables | {"photos.tsv000", outputs.MARKER}

    # Without --force the folder is still someone else's.
    assert run(*argv, capsys=capsys)[0] == 2


def test_a_generator_folder_is_replaced_whole_and_an_interrupted_run_leaves_none(tmp_path):
    out = tmp_path / "demo"
    generate(out, n_photos=30, n_users=5, n_conversions=100, show_progress=False)
    marker = outputs.read_marker(out, "demo-data")
    assert marker["files"] == [e for e in outputs.tree_entries(out) if e != outputs.MARKER]

    class Interrupted(Exception):
        pass

    before = snapshot(out)
    with pytest.raises(Interrupted):
        with outputs.staged_folder(out, "demo-data") as staging:
            (staging / "photos.tsv000").write_text("half")
            raise Interrupted
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    # A file added to the generated folder by hand makes it someone else's again.
    (out / "mine.txt").write_text("x")
    with pytest.raises(outputs.RefusedFolder, match="mine.txt"):
        generate(out, n_photos=30, n_users=5, n_conversions=100, show_progress=False)


def test_build_refuses_a_current_that_is_not_its_link_even_with_force(folder, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "current").write_text("someone's file called current\n")
    before = snapshot(out)
    for extra in ([], ["--force"]):
        status, err = run(
            "build", "--data", folder, "--out", out, "--no-clip", "--quiet", *extra, capsys=capsys
        )
        assert status == 2 and "current" in err
        assert snapshot(out) == before


def test_build_with_force_writes_beside_other_files(folder, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["build", "--data", folder, "--out", out, "--no-clip", "--rankers", "none", "--quiet"]
    status, err = run(*argv, capsys=capsys)
    assert status == 2 and "--force" in err
    assert run(*argv, "--force", capsys=capsys)[0] == 0
    assert (out / "keep.txt").read_text() == "x"
    assert artifacts.resolve(out).rankers == ["none"]


def _complete_set(root: Path, version: str) -> Path:
    path = root / artifacts.SETS_DIR / version
    path.mkdir(parents=True)
    artifacts.write_manifest(path, {"version": version})
    return path


def test_prune_skips_sets_being_written_and_folders_that_are_not_sets(tmp_path):
    root = tmp_path / "root"
    old = [_complete_set(root, f"2020010{i}T000000-aaaa") for i in range(1, 4)]
    artifacts.publish(root, old[-1])
    foreign = root / artifacts.SETS_DIR / "2019-holiday-photos"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"jpg")
    renamed = _complete_set(root, "20180101T000000-bbbb")
    os.rename(renamed, root / artifacts.SETS_DIR / "2018-copy")  # its manifest names another

    with artifacts.writing_set(root, "cccc") as (writing, _):
        (writing / "half-written.npz").write_bytes(b"...")
        assert (writing / artifacts.IN_PROGRESS).exists()
        # Another build finishing now prunes with keep=1: the set being written stays.
        removed = artifacts.prune(root, keep=1)
        assert writing.exists() and (writing / "half-written.npz").exists()
        assert sorted(removed) == old[:2]
        artifacts.write_manifest(writing, {"version": writing.name})
        artifacts.publish(root, writing)
    assert not (writing / artifacts.IN_PROGRESS).exists()
    assert foreign.exists() and (foreign / "beach.jpg").read_bytes() == b"jpg"
    assert (root / artifacts.SETS_DIR / "2018-copy").exists()
    assert artifacts.prune(root, keep=1) == [old[2]]
    assert artifacts.resolve(root).version == writing.name


def test_prune_deletes_a_set_whose_writer_died(tmp_path):
    root = tmp_path / "root"
    published = _complete_set(root, "20200101T000000-aaaa")
    artifacts.publish(root, published)
    dead = root / artifacts.SETS_DIR / "20200102T000000-aaaa"
    dead.mkdir()
    (dead / "catalogue.parquet").write_bytes(b"partial")
    (dead / artifacts.IN_PROGRESS).write_text("12345\n")  # a pid, and nobody holds the lock
    starting = root / artifacts.SETS_DIR / "20200103T000000-aaaa"
    starting.mkdir()
    (starting / artifacts.IN_PROGRESS).write_text("")  # created, not yet locked by its writer
    assert artifacts.prune(root, keep=3) == [dead]
    assert starting.exists() and published.exists()


def test_a_failed_build_removes_only_its_own_set(tmp_path):
    root = tmp_path / "root"
    kept = _complete_set(root, "20200101T000000-aaaa")
    with pytest.raises(RuntimeError):
        with artifacts.writing_set(root, "bbbb") as (set_dir, _):
            (set_dir / "x").write_text("x")
            raise RuntimeError("training failed")
    assert not set_dir.exists() and kept.exists()


def test_fetch_images_writes_nothing_for_a_photo_id_that_is_a_path(tmp_path):
    from imgsearch_tools.fetch_images import fetch_images

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "ok.jpg").write_bytes(b"already here")
    (data / "photos.tsv000").write_text(
        "photo_id\tphoto_image_url\n"
        "ok\thttps://images.example/ok\n"
        "../../escaped\thttps://images.example/x\n"
    )
    result = fetch_images(data, show_progress=False, retries=0, timeout=0.01)
    assert result["failed"] == 1 and result["skipped"] == 1 and result["downloaded"] == 0
    assert "not a file name" in json.dumps(result["failures"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert (data / "images" / "ok.jpg").read_bytes() == b"already here"


def test_generating_into_the_current_folder_works_when_it_is_empty(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    generate(".", n_photos=20, n_users=4, n_conversions=50, show_progress=False)
    assert (here / "photos.tsv000").exists() and outputs.read_marker(here, "demo-data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_the_suite_runs_again_where_its_servers_left_their_conversion_log(tmp_path):
    from imgsearch.conversion_store import default_db_path
    from imgsearch_tools.bench.suite import REPORT_ENTRIES

    report = tmp_path / "bench"
    outputs.claim_in_place(report, "bench-suite", REPORT_ENTRIES)
    (report / "artifacts").mkdir()
    # The suite's servers, serving report/artifacts, log conversions beside that root.
    store = default_db_path(report / "artifacts")
    assert store.parent == report
    for end in ("", "-wal", "-shm"):
        store.with_name(store.name + end).write_bytes(b"")
    outputs.claim_in_place(report, "bench-suite", REPORT_ENTRIES)  # a second run: accepted
    assert not outputs.contents(report, "bench-suite").foreign


def test_a_report_folder_from_before_markers_is_the_benchmarks_own(tmp_path):
    from imgsearch_tools.bench.suite import (
        FEEDBACK_ENTRIES,
        REPORT_ENTRIES,
        adopt_earlier_report,
    )

    report = tmp_path / "bench"
    (report / "logs").mkdir(parents=True)
    (report / "logs" / "gateway.log").write_text("...")
    (report / "bench.json").write_text(json.dumps({"machine": {}, "scenarios": []}))
    (report / "feedback.json").write_text(json.dumps({"machine": {}, "backends": []}))
    adopt_earlier_report(report)
    # Each benchmark accepts the folder, and neither takes the other's files for its own.
    outputs.claim_in_place(report, "bench-suite", REPORT_ENTRIES)
    outputs.claim_in_place(report, "bench-feedback", FEEDBACK_ENTRIES)
    suite = outputs.contents(report, "bench-suite")
    assert suite.others == ["feedback.json"] and not suite.foreign
    # A folder with anything else in it stays someone else's.
    other = tmp_path / "other"
    shutil.copytree(report, other)
    (other / outputs.MARKER).unlink()
    (other / "results.csv").write_text("a,b\n")
    adopt_earlier_report(other)
    with pytest.raises(outputs.RefusedFolder, match="not empty"):
        outputs.claim_in_place(other, "bench-suite", REPORT_ENTRIES)
    assert "results.csv" in outputs.contents(other, "bench-suite").foreign
