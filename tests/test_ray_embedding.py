"""Embedding on Ray Data matches single-process embedding; build takes precomputed embeddings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from imgsearch.artifacts import EMBEDDINGS  # noqa: E402
from retrieval_service.clip_model import ClipSpec, load_clip, save_clip  # noqa: E402
from retrieval_service.embedding import (  # noqa: E402
    EMBEDDING_SET_JSON,
    EmbeddingMismatch,
    EmbeddingShardWriter,
    PrecomputedEmbeddings,
    clip_identity,
    embed_catalogue,
    import_embeddings,
    load_embeddings,
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
    """A demo catalogue with drawn images."""
    from imgsearch_tools.demo_data import generate

    out = tmp_path_factory.mktemp("ray-data")
    generate(out, n_photos=N_PHOTOS, n_users=10, n_conversions=300, seed=5, show_progress=False)
    return out


@pytest.fixture(scope="module")
def catalogue(data_dir):
    """The catalogue, read while every image was there; then one goes missing, one corrupt."""
    from imgsearch.unsplash import read_unsplash

    catalogue, _ = read_unsplash(data_dir, show_progress=False)
    photo_ids = catalogue.photos["photo_id"].tolist()
    catalogue.image_path(photo_ids[3]).unlink()
    catalogue.image_path(photo_ids[10]).write_bytes(b"not a jpeg")
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
    assert (result["embedded"], result["missing"], result["corrupt"]) == (N_PHOTOS - 2, 1, 1)
    return path


def test_ray_embeddings_match_single_process_and_build_reads_them(
    tmp_path, data_dir, catalogue, clip_dir, bundle, single
):
    from imgsearch_tools.build import build_artifacts
    from retrieval_service.ray_embedding import embed_catalogue_on_ray

    ray = _ray_or_skip()
    shards = tmp_path / "shards"
    result = embed_catalogue_on_ray(
        bundle, catalogue, shards, workers=2, batch_size=8, rows_per_shard=25, show_progress=False
    )
    assert not ray.is_initialized()  # the local Ray it started is stopped again
    assert (result["embedded"], result["missing"], result["corrupt"]) == (N_PHOTOS - 2, 1, 1)
    assert result["workers"] == 2 and result["cluster"] == "local"
    assert len(result["shards"]) >= 2  # 60 photos, a shard closes once it holds 25
    assert json.loads((shards / EMBEDDING_SET_JSON).read_text())["embedded"] == N_PHOTOS - 2

    on_ray = PrecomputedEmbeddings.read(shards)
    reference = PrecomputedEmbeddings.read(single)
    assert on_ray.clip == reference.clip == clip_identity(bundle)
    assert sorted(on_ray.missing) == sorted(reference.missing)
    assert sorted(on_ray.corrupt) == sorted(reference.corrupt)
    assert sorted(on_ray.photo_ids) == sorted(reference.photo_ids)
    rows = dict(zip(on_ray.photo_ids.tolist(), on_ray.embeddings))
    cosine = np.array(
        [rows[pid] @ emb for pid, emb in zip(reference.photo_ids, reference.embeddings)]
    )
    assert cosine.min() >= 0.9999, cosine.min()

    root = tmp_path / "artifacts"
    set_dir = build_artifacts(
        str(data_dir), str(root), ["none"], clip_model="imgsearch-tiny-clip",
        clip_pretrained=str(clip_dir), embeddings=str(shards), show_progress=False,
    )  # fmt: skip
    manifest = json.loads((set_dir / "manifest.json").read_text())
    assert manifest["clip"]["embedding"]["precomputed"] == str(shards)
    assert manifest["clip"]["embedding"]["run"]["workers"] == 2
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
