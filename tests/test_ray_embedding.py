"""Embedding on Ray Data matches single-process embedding; build takes precomputed embeddings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from imgsearch.artifacts import EMBEDDINGS  # noqa: E402
from retrieval_service.clip_model import ClipSpec, load_clip, save_clip  # noqa: E402
from retrieval_service.embedding import (  # noqa: E402
    clip_identity,
    embed_catalogue,
    load_embeddings,
)
from retrieval_service.embedding_sets import (  # noqa: E402
    EMBEDDING_SET_JSON,
    EmbeddingMismatch,
    EmbeddingShardWriter,
    PrecomputedEmbeddings,
    import_embeddings,
)
from retrieval_service.ray_embedding import RayUnavailable, import_ray  # noqa: E402

N_PHOTOS = 60


def _ray_or_skip():
    try:
        return import_ray(local=True)
    except RayUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc}; `make test` installs it, and CI must run this test")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A demo catalogue with drawn images, one of them not a JPEG."""
    from imgsearch_tools.demo_data import generate

    out = tmp_path_factory.mktemp("ray-data")
    generate(out, n_photos=N_PHOTOS, n_users=10, n_conversions=300, seed=5, show_progress=False)
    sorted((out / "images").glob("*.jpg"))[10].write_bytes(b"not a jpeg")
    return out


@pytest.fixture(scope="module")
def catalogue(data_dir):
    from imgsearch.unsplash import read_unsplash

    catalogue, _ = read_unsplash(data_dir, show_progress=False)
    return catalogue


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    save_clip(load_clip(ClipSpec()), directory)
    return directory


@pytest.fixture(scope="module")
def bundle(clip_dir):
    return load_clip(ClipSpec(pretrained=str(clip_dir)))


@pytest.fixture(scope="module")
def single(tmp_path_factory, bundle, catalogue):
    """Single-process embeddings of the catalogue (what `imgsearch embed` writes)."""
    path = tmp_path_factory.mktemp("single") / "embeddings.npz"
    result = embed_catalogue(bundle, catalogue, path, batch_size=8, show_progress=False)
    assert (result["embedded"], result["missing"], result["corrupt"]) == (N_PHOTOS - 1, 0, 1)
    return path


def test_decode_tasks_count_missing_and_corrupt_images(tmp_path, bundle, catalogue):
    from retrieval_service.ray_embedding import decode_images

    photo_ids = catalogue.photos["photo_id"].tolist()
    paths = [catalogue.image_path(photo_ids[0]), tmp_path / "gone.jpg"]
    paths.append(catalogue.image_path(photo_ids[10]))  # the corrupt one
    shape = (3, bundle.image_size, bundle.image_size)
    batch = {"photo_id": np.array(["a", "b", "c"]), "path": np.array([str(p) for p in paths])}
    decoded = decode_images(batch, bundle.preprocess, shape)
    assert decoded["status"].tolist() == ["", "missing", "corrupt"]
    with Image.open(paths[0]) as image:
        expected = bundle.preprocess(image.convert("RGB")).numpy()
    np.testing.assert_array_equal(decoded["pixels"][0], expected)
    assert not decoded["pixels"][1:].any()


def test_embed_on_ray_matches_single_process_and_build_reads_it(
    tmp_path, data_dir, clip_dir, bundle, single, capsys
):
    from imgsearch_tools.build import build_artifacts
    from imgsearch_tools.cli import main

    ray = _ray_or_skip()
    shards = tmp_path / "shards"
    args = ["embed", "--data", str(data_dir), "--clip", str(clip_dir), "--batch-size", "8",
            "--quiet", "--ray", "--workers", "2", "--rows-per-shard", "25"]  # fmt: skip
    assert main(args + ["--out", str(shards)]) == 0
    assert "on Ray (local, 2 workers)" in capsys.readouterr().out
    assert not ray.is_initialized()  # the local Ray it started is stopped again
    run = json.loads((shards / EMBEDDING_SET_JSON).read_text())
    assert (run["embedded"], run["missing"], run["corrupt"]) == (N_PHOTOS - 1, 0, 1)
    assert run["workers"] == 2 and run["cluster"] == "local"
    assert len(run["shards"]) >= 2  # 60 photos, a shard closes once it holds 25

    on_ray = PrecomputedEmbeddings.read(shards)
    reference = PrecomputedEmbeddings.read(single)
    assert on_ray.clip == reference.clip == clip_identity(bundle)
    assert sorted(on_ray.corrupt) == sorted(reference.corrupt)
    assert sorted(on_ray.photo_ids) == sorted(reference.photo_ids)
    rows = dict(zip(on_ray.photo_ids.tolist(), on_ray.embeddings))
    cosine = np.array(
        [rows[pid] @ emb for pid, emb in zip(reference.photo_ids, reference.embeddings)]
    )
    assert cosine.min() >= 0.9999, cosine.min()

    # A folder embed did not make is refused before Ray starts.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert main(args + ["--out", str(tmp_path / "theirs")]) == 2
    assert "did not make" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]

    root = tmp_path / "artifacts"
    set_dir = build_artifacts(
        str(data_dir), str(root), ["none"], clip_model="imgsearch-tiny-clip",
        clip_pretrained=str(clip_dir), embeddings=str(shards), show_progress=False,
    )  # fmt: skip
    manifest = json.loads((set_dir / "manifest.json").read_text())
    assert manifest["clip"]["embedding"]["precomputed"] == str(shards)
    assert manifest["clip"]["embedding"]["run"]["workers"] == 2
    assert manifest["clip"]["embedding"]["corrupt"] == 1
    photo_idx, embeddings = load_embeddings(set_dir / EMBEDDINGS)
    expected_idx, expected = load_embeddings(single)
    np.testing.assert_array_equal(photo_idx, expected_idx)
    np.testing.assert_allclose(embeddings, expected, atol=1e-4)


def test_build_rejects_embeddings_of_other_weights(tmp_path, catalogue, single):
    torch.manual_seed(1)
    other = load_clip(ClipSpec())
    with pytest.raises(EmbeddingMismatch, match="was embedded with imgsearch-tiny-clip"):
        import_embeddings(single, other, catalogue, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def _write_shards(folder, bundle, reference, keep, extra_ids=()):
    """Shards holding the reference rows ``keep``, plus rows for ``extra_ids``."""
    writer = EmbeddingShardWriter(folder, clip_identity(bundle), rows_per_shard=10)
    ids = list(reference.photo_ids[keep]) + list(extra_ids)
    rows = [reference.embeddings[keep], np.repeat(reference.embeddings[:1], len(extra_ids), 0)]
    writer.add(ids, np.concatenate(rows), reference.missing, reference.corrupt)
    writer.close()
    return folder


def test_build_rejects_embeddings_of_another_catalogue(tmp_path, bundle, catalogue, single):
    reference = PrecomputedEmbeddings.read(single)
    everything = np.ones(len(reference.photo_ids), bool)
    foreign = _write_shards(tmp_path / "a", bundle, reference, everything, ["not-a-photo"])
    with pytest.raises(EmbeddingMismatch, match="1 photo.* not photos with an image"):
        import_embeddings(foreign, bundle, catalogue, tmp_path / "out.npz")

    partial = everything.copy()
    partial[:5] = False
    incomplete = _write_shards(tmp_path / "b", bundle, reference, partial)
    with pytest.raises(EmbeddingMismatch, match="5 of the catalogue's 60 photos"):
        import_embeddings(incomplete, bundle, catalogue, tmp_path / "out.npz")

    with pytest.raises(FileExistsError, match="already holds embeddings"):
        _write_shards(incomplete, bundle, reference, everything)  # never mixes two runs

    (incomplete / EMBEDDING_SET_JSON).unlink()
    with pytest.raises(EmbeddingMismatch, match="did not finish"):
        import_embeddings(incomplete, bundle, catalogue, tmp_path / "out.npz")

    old_format = tmp_path / "old.npz"
    np.savez(old_format, photo_idx=np.arange(3), embeddings=np.eye(3, dtype=np.float32))
    with pytest.raises(EmbeddingMismatch, match="records no CLIP"):
        import_embeddings(old_format, bundle, catalogue, tmp_path / "out.npz")


def test_build_cli_needs_the_clip_of_the_embeddings(tmp_path, data_dir, single, capsys):
    from imgsearch_tools.cli import main

    status = main(
        ["build", "--data", str(data_dir), "--out", str(tmp_path), "--embeddings", str(single)]
    )
    assert status == 2
    assert "--embeddings needs the CLIP they were made with" in capsys.readouterr().err


def test_build_cli_reports_a_mismatch(tmp_path, data_dir, single, capsys):
    from imgsearch_tools.cli import main

    torch.manual_seed(2)
    other = tmp_path / "other-clip"
    save_clip(load_clip(ClipSpec()), other)
    status = main(
        ["build", "--data", str(data_dir), "--out", str(tmp_path / "art"), "--rankers", "none",
         "--clip-model", "imgsearch-tiny-clip", "--clip-pretrained", str(other),
         "--embeddings", str(single), "--quiet"]
    )  # fmt: skip
    assert status == 1
    assert "give the build the CLIP the embeddings were made with" in capsys.readouterr().err
    assert not list((tmp_path / "art" / "sets").iterdir())  # the half-built set is removed


def test_embed_ray_without_ray_says_how_to_install(
    tmp_path, data_dir, clip_dir, monkeypatch, capsys
):
    import sys

    from imgsearch_tools.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    args = ["embed", "--data", str(data_dir), "--clip", str(clip_dir), "--out", str(tmp_path)]
    assert main(args + ["--workers", "2"]) == 2
    assert "--workers only apply with --ray" in capsys.readouterr().err
    assert main(args + ["--ray"]) == 2
    err = capsys.readouterr().err
    assert "Ray is not installed" in err and "pip install '.[ray]'" in err
    assert not list(tmp_path.iterdir())
