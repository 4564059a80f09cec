"""Embedding sets made outside a build (``imgsearch embed``, alone or on Ray): the sharded writer,
the reader, and the checked import into an artifact set."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_service.embedding import clip_identity, save_embeddings

# A folder of precomputed embeddings (``imgsearch embed --ray``): shards, then the summary.
EMBEDDING_SET_JSON = "embeddings.json"
SHARD_NAME = "embeddings-{:05d}.npz"
SHARD_GLOB = "embeddings-[0-9][0-9][0-9][0-9][0-9].npz"


class EmbeddingMismatch(ValueError):
    """Precomputed embeddings that do not fit the catalogue or the CLIP of a build."""


class EmbeddingShardWriter:
    """Writes embeddings as they arrive into numbered ``.npz`` shards plus ``embeddings.json``.

    The folder is what ``imgsearch build --embeddings`` reads. ``embeddings.json`` is written
    last, by :meth:`close`: a folder without it is an unfinished run.

    Parameters
    ----------
    out_dir:
        The folder to write (created).
    clip:
        :func:`clip_identity` of the CLIP that makes the embeddings.
    rows_per_shard:
        Photos per shard file: a shard is closed by the first batch that brings it there.

    Raises
    ------
    FileExistsError
        When the folder already holds shards or a summary.
    """

    def __init__(self, out_dir: str | Path, clip: dict, rows_per_shard: int = 50_000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        earlier = sorted(self.out_dir.glob(SHARD_GLOB)) + sorted(
            self.out_dir.glob(EMBEDDING_SET_JSON)
        )
        if earlier:
            # Mixing shards of two runs would corrupt both; deleting files is not ours to do.
            raise FileExistsError(
                f"{self.out_dir} already holds embeddings ({earlier[0].name}); give a new folder"
            )
        self.clip = clip
        self.rows_per_shard = rows_per_shard
        self.shards: list[str] = []
        self.counts = {"embedded": 0, "missing": 0, "corrupt": 0}
        self._pending: dict[str, list] = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        self._pending_rows = 0

    def add(
        self, photo_ids: Any, embeddings: np.ndarray, missing: Any = (), corrupt: Any = ()
    ) -> None:
        """Queue one batch: its embedded photos and those whose image was missing or corrupt."""
        photo_ids, missing, corrupt = list(photo_ids), list(missing), list(corrupt)
        self._pending["ids"] += photo_ids
        self._pending["emb"].append(np.asarray(embeddings, np.float32))
        self._pending["missing"] += missing
        self._pending["corrupt"] += corrupt
        self._pending_rows += len(photo_ids) + len(missing) + len(corrupt)
        self.counts["embedded"] += len(photo_ids)
        self.counts["missing"] += len(missing)
        self.counts["corrupt"] += len(corrupt)
        if self._pending_rows >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        name = SHARD_NAME.format(len(self.shards))
        dim = int(self.clip["embed_dim"])
        embeddings = np.concatenate([np.zeros((0, dim), np.float32), *self._pending["emb"]])
        save_embeddings(
            self.out_dir / name,
            self.clip,
            self._pending["ids"],
            embeddings,
            self._pending["missing"],
            self._pending["corrupt"],
        )
        self.shards.append(name)
        self._pending = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        self._pending_rows = 0

    def close(self, **figures: Any) -> dict:
        """Write the last shard and ``embeddings.json`` (counts, shards, ``figures``)."""
        self._flush()
        summary = {"clip": self.clip, **self.counts, "shards": self.shards, **figures}
        path = self.out_dir / EMBEDDING_SET_JSON
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, path)
        return summary


@dataclass
class PrecomputedEmbeddings:
    """Embeddings made outside a build (``imgsearch embed``, with or without ``--ray``).

    Attributes
    ----------
    source:
        The file or shard folder they were read from.
    clip:
        :func:`clip_identity` of the CLIP that made them.
    photo_ids:
        One photo id per row of ``embeddings``.
    embeddings:
        ``(n, dim)`` float32.
    missing, corrupt:
        Photo ids whose image was missing or could not be decoded.
    """

    source: str
    clip: dict
    photo_ids: np.ndarray
    embeddings: np.ndarray
    missing: np.ndarray
    corrupt: np.ndarray

    @classmethod
    def read(cls, path: str | Path) -> PrecomputedEmbeddings:
        """Read an ``imgsearch embed`` output: one ``.npz`` or a folder of shards.

        Raises
        ------
        EmbeddingMismatch
            When the path holds no finished embeddings or they record no CLIP.
        """
        path = Path(path)
        if path.is_dir():
            summary_path = path / EMBEDDING_SET_JSON
            if not summary_path.exists():
                raise EmbeddingMismatch(
                    f"{path}: no {EMBEDDING_SET_JSON}; the embedding run did not finish"
                )
            summary = json.loads(summary_path.read_text())
            files = [path / name for name in summary["shards"]]
        elif path.exists():
            summary, files = None, [path]
        else:
            raise EmbeddingMismatch(f"{path}: no such file or folder")
        parts: dict[str, list[np.ndarray]] = {"ids": [], "emb": [], "missing": [], "corrupt": []}
        clip = summary["clip"] if summary else None
        for file in files:
            if not file.exists():
                raise EmbeddingMismatch(f"{file}: shard listed in {EMBEDDING_SET_JSON} is missing")
            with np.load(file, allow_pickle=False) as data:
                if "clip" not in data or "photo_id" not in data:
                    raise EmbeddingMismatch(
                        f"{file}: records no CLIP model or photo ids (written by an older "
                        "imgsearch embed); embed the catalogue again"
                    )
                shard_clip = json.loads(str(data["clip"]))
                if clip is not None and shard_clip != clip:
                    raise EmbeddingMismatch(f"{file}: made by another CLIP than the other shards")
                clip = shard_clip
                parts["ids"].append(data["photo_id"].astype(str))
                parts["emb"].append(data["embeddings"].astype(np.float32))
                parts["missing"].append(data["missing_photo_id"].astype(str))
                parts["corrupt"].append(data["corrupt_photo_id"].astype(str))
        dim = int(clip["embed_dim"]) if clip else 0
        return cls(
            source=str(path),
            clip=clip or {},
            photo_ids=np.concatenate([np.zeros(0, str), *parts["ids"]]),
            embeddings=np.concatenate([np.zeros((0, dim), np.float32), *parts["emb"]]),
            missing=np.concatenate([np.zeros(0, str), *parts["missing"]]),
            corrupt=np.concatenate([np.zeros(0, str), *parts["corrupt"]]),
        )

    def for_catalogue(self, catalogue: Any, clip: dict) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the catalogue's photos, in ``photo_idx`` order, after checking they fit.

        Parameters
        ----------
        catalogue:
            The catalogue being built.
        clip:
            :func:`clip_identity` of the CLIP the build serves.

        Returns
        -------
        tuple
            ``photo_idx`` (int64, ascending) and ``embeddings`` (float32) in that order.

        Raises
        ------
        EmbeddingMismatch
            Another CLIP (name or weights), photos the catalogue has no image for, photos with
            an image that were neither embedded nor found missing or corrupt, duplicate photo
            ids, or rows that are not finite unit vectors.
        """
        if self.clip != clip:
            raise EmbeddingMismatch(
                f"{self.source} was embedded with {_describe_clip(self.clip)}, but the build "
                f"uses {_describe_clip(clip)}: give the build the CLIP the embeddings were "
                "made with (--clip-model NAME --clip-pretrained PATH), or embed again"
            )
        ids = self.photo_ids.tolist()
        if len(set(ids)) != len(ids):
            raise EmbeddingMismatch(f"{self.source}: some photos are embedded more than once")
        photos = catalogue.photos
        with_image = set(photos.loc[photos["has_image"].astype(bool), "photo_id"].astype(str))
        failed = set(self.missing.tolist()) | set(self.corrupt.tolist())
        # A photo whose image was missing then may still be missing now (no has_image).
        foreign = sorted((set(ids) - with_image) | (failed - set(photos["photo_id"].astype(str))))
        seen = set(ids) | failed
        if foreign:
            raise EmbeddingMismatch(
                f"{self.source}: {len(foreign):,} photo(s) are not photos with an image in this "
                f"catalogue (e.g. {', '.join(foreign[:3])}): embeddings of another catalogue?"
            )
        uncovered = sorted(with_image - seen)
        if uncovered:
            raise EmbeddingMismatch(
                f"{self.source}: {len(uncovered):,} of the catalogue's {len(with_image):,} "
                f"photos with an image were not embedded (e.g. {', '.join(uncovered[:3])}): "
                "embed this catalogue again"
            )
        norms = np.linalg.norm(self.embeddings, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(np.abs(norms - 1) > 1e-3):
            raise EmbeddingMismatch(f"{self.source}: rows that are not finite unit vectors")
        photo_idx = np.array([catalogue.photo_idx(pid) for pid in ids], dtype=np.int64)
        order = np.argsort(photo_idx, kind="stable")
        return photo_idx[order], self.embeddings[order]


def _describe_clip(clip: dict) -> str:
    if not clip:
        return "an unknown CLIP"
    return f"{clip.get('model_name')} (weights {clip.get('weights_sha256')})"


def import_embeddings(
    source: str | Path, bundle: Any, catalogue: Any, out_path: str | Path
) -> dict:
    """Check precomputed embeddings against a build's catalogue and CLIP, and write them.

    Parameters
    ----------
    source:
        An ``imgsearch embed`` output: an ``.npz`` or a folder of shards (``--ray``).
    bundle:
        The build's :class:`~retrieval_service.clip_model.ClipBundle`.
    catalogue:
        The catalogue being built.
    out_path:
        The artifact set's embeddings file, written like :func:`embed_catalogue` writes it.

    Returns
    -------
    dict
        ``precomputed`` (the source), ``embedded``, ``missing``, ``corrupt``, ``dim``,
        ``path`` and, for a shard folder, the run's figures from its ``embeddings.json``.

    Raises
    ------
    EmbeddingMismatch
        When they do not fit (see :meth:`PrecomputedEmbeddings.for_catalogue`).
    """
    clip = clip_identity(bundle)
    precomputed = PrecomputedEmbeddings.read(source)
    photo_idx, embeddings = precomputed.for_catalogue(catalogue, clip)
    save_embeddings(
        out_path,
        clip,
        catalogue.photo_ids(photo_idx),
        embeddings,
        precomputed.missing,
        precomputed.corrupt,
        photo_idx=photo_idx,
    )
    figures = {
        "precomputed": str(source),
        "embedded": int(len(photo_idx)),
        "missing": int(len(precomputed.missing)),
        "corrupt": int(len(precomputed.corrupt)),
        "dim": int(clip["embed_dim"]),
        "path": str(out_path),
    }
    summary = Path(source) / EMBEDDING_SET_JSON
    if summary.exists():
        run = json.loads(summary.read_text())
        figures["run"] = {k: v for k, v in run.items() if k not in ("clip", "shards")}
    return figures
