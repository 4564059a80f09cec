"""A catalogue's image embeddings: batched, resumable, saved with the CLIP's identity."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgsearch.image_embeddings import ImageEmbeddings


def partial_path(out_path: str | Path) -> Path:
    """Where progress of an unfinished run is kept: ``<out>.partial.npz`` beside the output."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".npz") + ".partial.npz")


def _signature(model_name: str, pretrained: str | None, photo_idx: np.ndarray) -> str:
    """Identifies a run: resuming is only allowed with the same model and the same photos."""
    digest = hashlib.sha256(f"{model_name}|{pretrained}|".encode())
    digest.update(np.ascontiguousarray(photo_idx, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# A checkpoint rewrites every embedding done so far, so saving one every few batches is
# quadratic in the catalogue (a million photos: 781 saves of 256 MB on average). A save waits
# until the run has worked this many times as long as the last save took: saving stays about a
# tenth of the run at any size.
CHECKPOINT_WORK_RATIO = 10.0


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an embeddings file: ``photo_idx`` (int64) and ``embeddings`` (float32)."""
    stored = ImageEmbeddings.load(path)
    return stored.photo_idx, stored.vectors


def clip_identity(bundle: Any) -> dict:
    """What embeddings record of the CLIP that made them: name, weights digest, size."""
    from retrieval_service.clip_model import weights_fingerprint

    return {
        "model_name": bundle.spec.model_name,
        "weights_sha256": weights_fingerprint(bundle.model),
        "embed_dim": int(bundle.embed_dim),
    }


def _id_array(photo_ids: Any) -> np.ndarray:
    # Fixed-width unicode, so the file loads with allow_pickle=False.
    return np.asarray(list(photo_ids), dtype=str)


def save_embeddings(
    path: str | Path,
    clip: dict,
    photo_ids: Any,
    embeddings: np.ndarray,
    missing: Any = (),
    corrupt: Any = (),
    photo_idx: np.ndarray | None = None,
) -> None:
    """Write one embeddings ``.npz`` (atomically) with what a later build checks it against.

    Parameters
    ----------
    path:
        The file to write.
    clip:
        :func:`clip_identity` of the CLIP that made the embeddings.
    photo_ids:
        One photo id per embedding row.
    embeddings:
        ``(n, dim)`` float32, L2-normalised.
    missing, corrupt:
        Photo ids whose image file was missing or could not be decoded.
    photo_idx:
        Catalogue indexes of the rows (what servers read), when known.
    """
    arrays = {
        "photo_id": _id_array(photo_ids),
        "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
        "missing_photo_id": _id_array(missing),
        "corrupt_photo_id": _id_array(corrupt),
        "clip": np.array(json.dumps(clip, sort_keys=True)),
    }
    if photo_idx is not None:
        arrays["photo_idx"] = np.asarray(photo_idx, dtype=np.int64)
    _save_npz(Path(path), **arrays)


def load_image(path: Path) -> tuple[Any, str]:
    """Open one image fully decoded; returns (image or None, "" | "missing" | "corrupt")."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return None, "missing"
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), ""
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None, "corrupt"


def embed_catalogue(
    bundle: Any,
    catalogue: Any,
    out_path: str | Path,
    batch_size: int = 64,
    show_progress: bool = True,
    checkpoint_every: int = 20,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Embed every photo that has an image and write ``photo_idx`` + ``embeddings`` to an npz.

    Progress is saved to ``<out>.partial.npz`` every ``checkpoint_every`` batches (less often once
    a save takes more than a tenth of the work between saves: :data:`CHECKPOINT_WORK_RATIO`)
    and on interruption; a rerun with the same model and photos resumes from there (an
    interrupted ViT-B-32 run over 25k photos loses minutes, not the half hour done so far).
    Images are decoded and preprocessed one batch ahead in a thread while the model runs on the
    current one (:meth:`~retrieval_service.clip_model.ClipBundle.image_pixels`).

    Parameters
    ----------
    bundle:
        A :class:`~retrieval_service.clip_model.ClipBundle`.
    catalogue:
        The catalogue; photos with ``has_image`` are embedded, in ``photo_idx`` order.
    out_path:
        The ``.npz`` to write (``photo_idx`` int64, ``embeddings`` float32 L2-normalised).
    batch_size:
        Images per forward pass.
    show_progress:
        Show a tqdm bar with rate and ETA.
    checkpoint_every:
        Save progress every this many batches.
    max_batches:
        Stop (saving progress) after this many batches of this call: the run is then left
        incomplete, as after an interruption.
    on_batch:
        Called with the number of batches done in this call after each batch. An exception
        (or Ctrl-C) interrupts the run; progress up to the last finished batch is saved first.
    threads:
        Torch intra-op threads; None takes the idle cores (``auto_threads``). Restored after.

    Returns
    -------
    dict
        ``complete``, ``embedded``, ``missing``, ``corrupt`` (counts), ``resumed_from`` (photos
        already done by an earlier run), ``seconds``, ``images_per_s``, ``dim``, ``path`` and
        ``threads``.
    """
    from imgsearch.cpu import torch_threads

    with torch_threads(threads) as used_threads:
        result = _embed(
            bundle, catalogue, out_path, batch_size, show_progress, checkpoint_every,
            max_batches, on_batch,
        )  # fmt: skip
    result["threads"] = used_threads
    return result


def _embed(
    bundle: Any,
    catalogue: Any,
    out_path: str | Path,
    batch_size: int,
    show_progress: bool,
    checkpoint_every: int,
    max_batches: int | None,
    on_batch: Callable[[int], None] | None,
) -> dict:
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    progress_path = partial_path(out_path)
    photos = catalogue.photos
    todo = photos.loc[photos["has_image"].astype(bool), ["photo_idx", "photo_id"]]
    todo_idx = todo["photo_idx"].to_numpy(np.int64)
    todo_ids = todo["photo_id"].astype(str).tolist()
    signature = _signature(bundle.spec.model_name, bundle.spec.pretrained, todo_idx)

    done_idx = np.zeros(0, np.int64)
    done_emb = np.zeros((0, bundle.embed_dim), np.float32)
    missing = np.zeros(0, np.int64)
    corrupt = np.zeros(0, np.int64)
    position = 0
    if progress_path.exists():
        with np.load(progress_path, allow_pickle=False) as data:
            if str(data["signature"]) == signature:
                position = int(data["position"])
                done_idx, done_emb = data["photo_idx"], data["embeddings"]
                missing, corrupt = data["missing"], data["corrupt"]
    resumed_from = position
    idx_parts, emb_parts = [done_idx], [done_emb]
    missing_parts, corrupt_parts = [missing], [corrupt]

    last_save = {"ended": time.perf_counter(), "took": 0.0}

    def save_progress() -> None:
        started = time.perf_counter()
        _save_npz(
            progress_path,
            signature=np.array(signature),
            position=np.array(position),
            photo_idx=np.concatenate(idx_parts),
            embeddings=np.concatenate(emb_parts),
            missing=np.concatenate(missing_parts),
            corrupt=np.concatenate(corrupt_parts),
        )
        last_save["ended"] = time.perf_counter()
        last_save["took"] = last_save["ended"] - started

    def save_due() -> bool:
        worked = time.perf_counter() - last_save["ended"]
        return (
            batches % checkpoint_every == 0 and worked >= CHECKPOINT_WORK_RATIO * last_save["took"]
        )

    def load_batch(start: int) -> tuple[Any, list[int], np.ndarray]:
        """Decode and preprocess one batch: (pixels of the images that decoded, their rows in
        the batch, why each image failed: "" | "missing" | "corrupt")."""
        ids = todo_ids[start : start + batch_size]
        loaded = [load_image(catalogue.image_path(pid)) for pid in ids]
        keep = [j for j, (image, _) in enumerate(loaded) if image is not None]
        pixels = bundle.image_pixels([loaded[j][0] for j in keep]) if keep else None
        return pixels, keep, np.array([why for _, why in loaded])

    starts = list(range(position, len(todo_ids), batch_size))
    started = time.perf_counter()
    embedded_now = 0
    batches = 0
    bar = tqdm(
        total=len(todo_ids),
        initial=position,
        unit="img",
        desc="embed",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=1) as loader:
            pending = loader.submit(load_batch, starts[0]) if starts else None
            for i, start in enumerate(starts):
                if max_batches is not None and batches >= max_batches:
                    break
                pixels, keep, why = pending.result()
                nxt = i + 1
                pending = loader.submit(load_batch, starts[nxt]) if nxt < len(starts) else None
                batch_idx = todo_idx[start : start + len(why)]
                if keep:
                    batch_emb = bundle.encode_image_tensor(pixels).astype(np.float32)
                else:
                    batch_emb = np.zeros((0, bundle.embed_dim), np.float32)
                # Append only once the batch is fully computed, so progress saved after an
                # interruption never holds half a batch.
                emb_parts.append(batch_emb)
                idx_parts.append(batch_idx[keep])
                missing_parts.append(batch_idx[why == "missing"])
                corrupt_parts.append(batch_idx[why == "corrupt"])
                position = start + len(why)
                embedded_now += len(keep)
                batches += 1
                bar.update(len(why))
                if save_due():
                    save_progress()
                if on_batch is not None:
                    on_batch(batches)
    except BaseException:
        save_progress()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    complete = position >= len(todo_ids)
    photo_idx = np.concatenate(idx_parts).astype(np.int64)
    embeddings = np.concatenate(emb_parts).astype(np.float32)
    if complete:
        save_embeddings(
            out_path,
            clip_identity(bundle),
            catalogue.photo_ids(photo_idx),
            embeddings,
            missing=catalogue.photo_ids(np.concatenate(missing_parts)),
            corrupt=catalogue.photo_ids(np.concatenate(corrupt_parts)),
            photo_idx=photo_idx,
        )
        progress_path.unlink(missing_ok=True)
    else:
        save_progress()
    return {
        "complete": complete,
        "embedded": int(len(photo_idx)),
        "missing": int(sum(len(m) for m in missing_parts)),
        "corrupt": int(sum(len(c) for c in corrupt_parts)),
        "resumed_from": int(resumed_from),
        "seconds": round(seconds, 3),
        "images_per_s": round(embedded_now / seconds, 1) if seconds > 0 else 0.0,
        "dim": int(bundle.embed_dim),
        "path": str(out_path if complete else progress_path),
    }
