"""Image embedding on Ray Data: photo files decoded by tasks, the image tower on an actor pool."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_service.embedding import clip_identity, load_image
from retrieval_service.embedding_sets import EmbeddingShardWriter

INSTALL_HINT = (
    "install the extra with `pip install '.[ray]'` in the imgsearch checkout "
    "(or `pip install 'ray[data]'`)"
)
# Ray CPUs reserved per model actor and per decode task. An actor takes less than a whole CPU
# so that on a small machine (2 cores, 2 actors) the decode tasks still get scheduled: with
# whole CPUs the actors would hold every CPU and the reads that feed them would wait forever.
CPUS_PER_WORKER = 0.75
CPUS_PER_DECODE = 0.25
# Logical memory a decode task asks of Ray: a worker that imported torch holds a batch of
# preprocessed pixels (64 x 3 x 224 x 224 float32 is 39 MB) in and out; about 650 MB measured.
DECODE_MEMORY = 1 << 30


class RayUnavailable(RuntimeError):
    """Ray (with Ray Data) is not installed."""


def import_ray(local: bool = True) -> Any:
    """Import Ray and Ray Data, or fail with how to install them.

    Parameters
    ----------
    local:
        Whether this process will start its own Ray rather than join a cluster. Ray then binds
        127.0.0.1 instead of the machine's network address (a laptop's Ray needs no open port)
        and sends no usage statistics, unless the environment already says otherwise
        (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, ``RAY_USAGE_STATS_ENABLED``). Both are read
        when Ray is first imported, so they are set before.

    Raises
    ------
    RayUnavailable
        When ``ray[data]`` is not installed.
    """
    if local:
        # The only switch Ray has for a loopback-only node; named for the platforms where it
        # is the default.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailable(f"Ray is not installed: {INSTALL_HINT}") from exc
    return ray


def decode_images(batch: dict, preprocess: Any, pixel_shape: tuple) -> dict:
    """Ray Data task: read and preprocess a batch of photo files.

    Parameters
    ----------
    batch:
        Columns ``photo_id`` and ``path``.
    preprocess:
        The CLIP's evaluation transform (PIL image -> tensor), the one single-process
        embedding uses.
    pixel_shape:
        ``(3, H, W)`` of a preprocessed image; rows whose image failed stay zero.

    Returns
    -------
    dict
        ``photo_id``, ``status`` ("" when decoded, else "missing" or "corrupt") and ``pixels``.
    """
    import torch

    torch.set_num_threads(1)  # per-image transforms are too small to split across threads
    paths = batch["path"]
    pixels = np.zeros((len(paths), *pixel_shape), np.float32)
    statuses = []
    for i, path in enumerate(paths):
        image, why = load_image(Path(str(path)))
        if image is not None:
            pixels[i] = preprocess(image).numpy()
        statuses.append(why)
    return {"photo_id": batch["photo_id"], "status": np.array(statuses), "pixels": pixels}


class ImageEmbedder:
    """Ray Data actor: one CLIP per actor, embedding the decoded batches it is handed.

    Parameters
    ----------
    model:
        The open_clip model, or a reference to it in Ray's object store (put there once by
        the driver, so the workers need neither the checkpoint file nor a download).
    threads:
        Torch intra-op threads of this actor.
    """

    def __init__(self, model: Any, threads: int = 1):
        import ray
        import torch

        torch.set_num_threads(threads)
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.model = model.eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = batch["status"] == ""
        dim = int(self.model.text_projection.shape[1])
        embeddings = np.zeros((len(ok), dim), np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            with torch.inference_mode():
                embeddings[ok] = self.model.encode_image(pixels, normalize=True).float().numpy()
        return {
            "photo_id": batch["photo_id"],
            "status": batch["status"],
            "embedding": embeddings,
            "worker": np.full(len(ok), f"{socket.gethostname()}:{os.getpid()}"),
        }


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address``, or start a local Ray; True when started here.

    A process already connected is reused (and not stopped by the caller).
    """
    ray = import_ray(local=not address)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


def embed_catalogue_on_ray(
    bundle: Any,
    catalogue: Any,
    out_dir: str | Path,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = CPUS_PER_WORKER,
    threads_per_worker: int = 1,
    batch_size: int = 64,
    rows_per_shard: int = 50_000,
    show_progress: bool = True,
) -> dict:
    """Embed every photo that has an image with Ray Data and write embedding shards.

    The photo list becomes a dataset; tasks read and preprocess the files (a fraction of a
    CPU each), a fixed pool of ``workers`` actors runs the image tower (one model per actor),
    and the driver writes what comes back into ``out_dir`` (see
    :class:`~retrieval_service.embedding_sets.EmbeddingShardWriter`), which ``imgsearch build
    --embeddings`` reads. The same call runs on a local Ray (``address=None``) and on a
    cluster; there every node must see the catalogue's ``images/`` at the same path.

    Parameters
    ----------
    bundle:
        The :class:`~retrieval_service.clip_model.ClipBundle` to embed with.
    catalogue:
        The catalogue; photos with ``has_image`` are embedded.
    out_dir:
        The shard folder to write.
    address:
        A Ray cluster address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); None
        starts a local Ray for this call and stops it after.
    workers:
        Model actors (the actor pool's fixed size).
    cpus_per_worker:
        Ray CPUs each actor reserves; fractional so decode tasks still fit beside them.
    threads_per_worker:
        Torch threads per actor.
    batch_size:
        Images per decode and model batch.
    rows_per_shard:
        Photos per shard file.
    show_progress:
        Show a tqdm bar of photos done, with rate and ETA.

    Returns
    -------
    dict
        ``embedded``, ``missing``, ``corrupt``, ``workers``, ``workers_used`` (actors that
        embedded at least one batch), ``seconds`` (the pipeline, actor start-up included),
        ``images_per_s`` over those seconds, ``connect_s`` (starting or joining Ray),
        ``cluster_cpus``, ``shards`` and ``path``; also written to ``embeddings.json``.

    Raises
    ------
    RayUnavailable
        When Ray is not installed.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    ray = import_ray(local=not address)
    photos = catalogue.photos
    photo_ids = photos.loc[photos["has_image"].astype(bool), "photo_id"].astype(str).tolist()
    writer = EmbeddingShardWriter(out_dir, clip_identity(bundle), rows_per_shard)
    pixel_shape = tuple(bundle.preprocess(Image.new("RGB", (8, 8))).shape)

    started = time.perf_counter()
    started_here = connect(address)
    try:
        connect_s = time.perf_counter() - started
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        # One bar for the whole pipeline (photos written, rate, ETA) instead of Ray Data's
        # per-operator bars, and without Ray's notice that those are off.
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        items = [{"photo_id": pid, "path": str(catalogue.image_path(pid))} for pid in photo_ids]
        # One batch per block: results come back batch by batch, and a decode task holds one
        # batch of pixels at a time.
        blocks = max(1, math.ceil(len(items) / batch_size))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        dataset = dataset.map_batches(
            decode_images,
            fn_kwargs={"preprocess": bundle.preprocess, "pixel_shape": pixel_shape},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=workers),  # one decoder per model actor
            num_cpus=CPUS_PER_DECODE,
            memory=DECODE_MEMORY,
        )
        dataset = dataset.map_batches(
            ImageEmbedder,
            fn_constructor_kwargs={"model": ray.put(bundle.model), "threads": threads_per_worker},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
        )
        bar = tqdm(
            total=len(items),
            unit="img",
            desc=f"embed on Ray ({workers} workers)",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        pipeline_started = time.perf_counter()
        workers_used: set[str] = set()
        with bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                ids, status = batch["photo_id"].astype(str), batch["status"].astype(str)
                ok = status == ""
                writer.add(
                    ids[ok],
                    batch["embedding"][ok],
                    missing=ids[status == "missing"],
                    corrupt=ids[status == "corrupt"],
                )
                bar.update(len(ids))
                workers_used.update(batch["worker"].astype(str).tolist())
        finished = time.perf_counter()
    finally:
        if started_here:
            ray.shutdown()
    seconds = finished - pipeline_started
    embedded = writer.counts["embedded"]
    figures = {
        "workers": workers,
        "workers_used": len(workers_used),
        "cpus_per_worker": cpus_per_worker,
        "threads_per_worker": threads_per_worker,
        "batch_size": batch_size,
        "cluster": address or "local",
        "cluster_cpus": cluster_cpus,
        "connect_s": round(connect_s, 2),
        "seconds": round(seconds, 3),
        "images_per_s": round(embedded / seconds, 1) if seconds > 0 else 0.0,
    }
    summary = writer.close(**figures)
    return {**{k: v for k, v in summary.items() if k != "clip"}, "path": str(out_dir)}
