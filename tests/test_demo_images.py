"""Tests of the demo's image drawing: a pool of processes, resumable, byte for byte as one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from imgsearch_tools.demo_data import drawing, image_files
from imgsearch_tools.demo_data import photos as demo_photos
from imgsearch_tools.demo_data import tables as demo_data

SEED = 11
SIZE = 16
# Three chunks of the pool, the last one short.
N_PHOTOS = 2 * image_files.CHUNK_PHOTOS + 37


@pytest.fixture(scope="module")
def photos() -> dict:
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(7)]
    return demo_photos.make_photos(N_PHOTOS, streams[0])


@pytest.fixture(scope="module")
def reference(photos) -> dict[str, bytes]:
    """Every image as one process drawing one image at a time writes it."""
    images = {}
    for i in range(N_PHOTOS):
        image = drawing.draw_image(photos, i, SIZE, np.random.default_rng([SEED, 7, i]))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=drawing.JPEG_QUALITY)
        images[f"{photos['photo_id'][i]}.jpg"] = buffer.getvalue()
    return images


def read_folder(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def tree(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def interrupt_after(monkeypatch, n: int) -> None:
    """Make the drawing stop with KeyboardInterrupt (as Ctrl-C would) after ``n`` images."""
    real_draw = image_files.draw_image
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real_draw(*args)

    monkeypatch.setattr(image_files, "draw_image", interrupted)


def test_a_pool_of_processes_writes_the_same_bytes_as_one_process(tmp_path, photos, reference):
    drawn = image_files.write_images(photos, tmp_path / "images", SEED, SIZE, False, workers=2)
    assert drawn == {"drawn": N_PHOTOS, "kept": 0, "workers": 2}
    assert read_folder(tmp_path / "images") == reference


def test_an_interrupted_run_keeps_complete_images_and_the_next_draws_the_rest(
    tmp_path, photos, reference, monkeypatch
):
    resume = tmp_path / ".cat.images.partial"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 300)
        with pytest.raises(KeyboardInterrupt):
            image_files.write_images(
                photos, tmp_path / "images", SEED, SIZE, False, workers=1, resume_dir=resume
            )
    assert not (tmp_path / "images").exists()
    left = {name for name in read_folder(resume) if name.endswith(".jpg")}
    assert len(left) == 300
    # A file cut short while written has only its temporary name: it is drawn again.
    cut = sorted(set(reference) - left)[0]
    (resume / (cut + image_files.TEMPORARY)).write_bytes(reference[cut][:50])

    drawn = image_files.write_images(
        photos, tmp_path / "images", SEED, SIZE, False, workers=2, resume_dir=resume
    )
    assert drawn == {"drawn": N_PHOTOS - 300, "kept": 300, "workers": 2}
    assert read_folder(tmp_path / "images") == reference
    assert not resume.exists()


def test_images_left_by_another_catalogue_are_drawn_again(tmp_path, photos, reference):
    resume = tmp_path / ".cat.images.partial"
    image_files.open_folder(resume, {"seed": SEED + 1, "n_photos": N_PHOTOS, "image_size": SIZE})
    stale = next(iter(reference))
    (resume / stale).write_bytes(b"another catalogue's image")
    image_files.write_images(
        photos, tmp_path / "images", SEED, SIZE, False, workers=1, resume_dir=resume
    )
    assert read_folder(tmp_path / "images") == reference


def test_a_folder_demo_data_did_not_leave_is_refused_and_kept(tmp_path, photos):
    resume = tmp_path / ".cat.images.partial"
    resume.mkdir()
    (resume / "holiday.jpg").write_bytes(b"someone's photo")
    with pytest.raises(ValueError, match=r"cat\.images\.partial exists and was not left"):
        image_files.write_images(
            photos, tmp_path / "images", SEED, SIZE, False, workers=1, resume_dir=resume
        )
    assert (resume / "holiday.jpg").read_bytes() == b"someone's photo"


def test_generate_resumes_images_after_an_interruption(tmp_path, monkeypatch):
    small = dict(n_photos=120, n_users=20, n_conversions=300, seed=2, image_size=SIZE)
    clean = demo_data.generate(tmp_path / "clean", show_progress=False, **small)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 50)
        with pytest.raises(KeyboardInterrupt):
            demo_data.generate(tmp_path / "cat", show_progress=False, image_workers=1, **small)
    assert not (tmp_path / "cat").exists()
    assert len(list((tmp_path / ".cat.images.partial").glob("*.jpg"))) == 50

    summary = demo_data.generate(tmp_path / "cat", show_progress=False, image_workers=1, **small)
    assert summary["images"] == {"drawn": 70, "kept": 50, "workers": 1}
    assert not (tmp_path / ".cat.images.partial").exists()
    assert tree(tmp_path / "cat") == tree(tmp_path / "clean")
    assert clean["files"] == summary["files"]


def test_image_workers_are_at_least_one_and_no_more_than_the_chunks():
    assert image_files.image_workers(8, 10) == 1
    assert image_files.image_workers(8, 3 * image_files.CHUNK_PHOTOS) == 3
    assert image_files.image_workers(None, 0) == 1
    with pytest.raises(ValueError, match="image workers must be at least 1, got 0"):
        image_files.image_workers(0, 100)
