"""CLIP encoders through open_clip: the project's tiny config, loading, saving and encoding."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TINY_CLIP_NAME = "imgsearch-tiny-clip"

# A CLIP small enough to train on the 64x64 demo images in about a minute and a half on two
# cores (issue 4): a ModifiedResNet learns shapes in that budget where tiny ViTs did not, and a
# 16-token context covers keyword captions and short descriptions.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 2,
    },
}
PROJECT_CONFIGS = {TINY_CLIP_NAME: TINY_CLIP_CONFIG}
# Training steps of the tiny CLIP (batch 128). On the demo, held-out shape P@10 is 0.50 after
# 400 steps, 0.73 after 800 and 0.89 after 1200; colour and scene are 1.00 from 400 on.
TRAIN_STEPS = 1200

CLIP_JSON = "clip.json"  # what a CLIP folder holds: model name and weights (file or hub tag)
CHECKPOINT_FILE = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # makes the folder loadable as `local-dir:` too
KEYWORD_EMBEDDINGS = "keyword_embeddings.npz"  # the known keywords' query embeddings

_register_lock = threading.Lock()


def register_configs() -> None:
    """Register the project's model configs with open_clip; idempotent, once per process.

    open_clip keeps its registry per process and reads configs from JSON files, so the configs
    are written to a private temporary folder, added from there, and the folder removed (the
    registry keeps what it read; a later rescan skips paths that are gone).
    """
    import open_clip

    with _register_lock:
        missing = {n: c for n, c in PROJECT_CONFIGS.items() if n not in open_clip.list_models()}
        if not missing:
            return
        with tempfile.TemporaryDirectory(prefix="imgsearch-open-clip-configs-") as folder:
            for name, config in missing.items():
                path = Path(folder) / f"{name}.json"
                path.write_text(json.dumps(config, indent=2))
                open_clip.add_model_config(path)


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load.

    Attributes
    ----------
    model_name:
        An open_clip model name (``"ViT-B-32"``) or the project's ``"imgsearch-tiny-clip"``.
    pretrained:
        An open_clip pretrained tag (``"laion2b_s34b_b79k"``, downloaded by open_clip), a local
        checkpoint file, a folder written by :func:`save_clip`, or None for random weights.
    """

    model_name: str = TINY_CLIP_NAME
    pretrained: str | None = None

    @classmethod
    def from_dir(cls, directory: str | Path) -> ClipSpec:
        """The spec of a folder written by :func:`save_clip`."""
        directory = Path(directory)
        meta = read_clip_json(directory)
        if meta.get("checkpoint"):
            return cls(meta["model_name"], str(directory / meta["checkpoint"]))
        return cls(meta["model_name"], meta.get("pretrained"))

    def describe(self) -> str:
        """A one-line description for logs and manifests."""
        return f"{self.model_name} ({self.pretrained or 'random init'})"


def read_clip_json(directory: str | Path) -> dict:
    """Read ``clip.json`` of a CLIP folder.

    Raises
    ------
    FileNotFoundError
        When the folder holds no ``clip.json``.
    """
    path = Path(directory) / CLIP_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a CLIP folder (write one with save_clip)")
    return json.loads(path.read_text())


@dataclass
class ClipBundle:
    """A CLIP model with its image preprocessing and tokenizer.

    Attributes
    ----------
    model:
        The open_clip model, in eval mode.
    preprocess:
        The evaluation image transform (PIL image -> normalised tensor).
    tokenizer:
        ``open_clip.get_tokenizer(model_name)``; respects the model's context length.
    spec:
        What was loaded.
    """

    model: Any
    preprocess: Any
    tokenizer: Any
    spec: ClipSpec
    # (mean, std) of the batched preprocessing once checked against ``preprocess``; False when
    # it does not reproduce it (see image_pixels).
    _batch_normaliser: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def preprocess_config(self) -> dict:
        """open_clip's preprocess config of the model (size, mean, std, interpolation...)."""
        import open_clip

        return dict(open_clip.get_model_preprocess_cfg(self.model))

    def with_model(self, model: Any) -> ClipBundle:
        """The same bundle around another model (e.g. its INT8 copy)."""
        return ClipBundle(model, self.preprocess, self.tokenizer, self.spec)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts:
            Queries or captions.
        batch_size:
            Texts per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(len(texts), embed_dim)`` float32, each row L2-normalised.
        """
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size]))
                out.append(self.model.encode_text(tokens, normalize=True).float().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def encode_images(self, images: list, batch_size: int = 64) -> np.ndarray:
        """Embed PIL images (any mode; converted by the preprocess transform).

        Returns
        -------
        numpy.ndarray
            ``(len(images), embed_dim)`` float32, each row L2-normalised.
        """
        out = []
        for start in range(0, len(images), batch_size):
            out.append(
                self.encode_image_tensor(self.image_pixels(images[start : start + batch_size]))
            )
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def image_pixels(self, images: list) -> Any:
        """Preprocess PIL images into one ``(n, 3, S, S)`` float32 batch, channels last in memory.

        The values are those of ``preprocess`` applied to each image, bit for bit. RGB images
        already at the model's input size (the demo's 64 px photos) skip the per-image
        transform: their resize and centre crop change nothing, so they are stacked as uint8
        and scaled and normalised in one pass over the batch, with the same float32 operations
        as ``ToTensor`` and ``Normalize``. That path is used only once it reproduced
        ``preprocess`` exactly on a probe image holding every pixel value; other images go
        through ``preprocess``.

        Parameters
        ----------
        images:
            PIL images, any mode and size.

        Returns
        -------
        torch.Tensor
            ``(len(images), 3, S, S)`` float32 with channels-last strides.
        """
        import torch

        size = self.image_size
        direct = [im.mode == "RGB" and im.size == (size, size) for im in images]
        normaliser = self._checked_normaliser() if any(direct) else False
        if normaliser and all(direct):
            stacked = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
            return _normalised(torch.from_numpy(stacked), *normaliser).permute(0, 3, 1, 2)
        nhwc = torch.empty((len(images), size, size, 3), dtype=torch.float32)
        if normaliser:
            rows = [i for i, ok in enumerate(direct) if ok]
            stacked = np.stack([np.asarray(images[i], dtype=np.uint8) for i in rows])
            nhwc[torch.tensor(rows)] = _normalised(torch.from_numpy(stacked), *normaliser)
        for i, image in enumerate(images):
            if not (normaliser and direct[i]):
                nhwc[i] = self.preprocess(image).permute(1, 2, 0)
        return nhwc.permute(0, 3, 1, 2)  # (n, 3, S, S) view with channels-last strides

    def _checked_normaliser(self) -> Any:
        if self._batch_normaliser is None:
            self._batch_normaliser = _batch_normaliser(self)
        return self._batch_normaliser

    def encode_image_tensor(self, batch: Any) -> np.ndarray:
        """Embed an already preprocessed ``(n, 3, H, W)`` tensor; L2-normalised float32.

        The batch runs channels last in memory: oneDNN's convolutions of the ResNet tower then
        skip reordering every layer's input (docs/guides/scale.md has the figures). The result
        differs from the same batch laid out channels first by float32 rounding only (at most
        about 1.5e-7 per component of a unit vector).
        """
        import torch

        with torch.inference_mode():
            batch = batch.contiguous(memory_format=torch.channels_last)
            return self.model.encode_image(batch, normalize=True).float().numpy()


def _normalised(pixels: Any, mean: Any, std: Any) -> Any:
    """``(n, H, W, 3)`` uint8 -> float32 as ``ToTensor`` then ``Normalize`` compute it."""
    return pixels.float().div_(255).sub_(mean).div_(std)


def _batch_normaliser(bundle: ClipBundle) -> Any:
    """(mean, std) for batched preprocessing, or False when it would not equal ``preprocess``.

    Checked on one probe image at the model's size whose pixels take every value 0-255 in each
    channel: only a transform that leaves such an image's geometry alone and maps each value
    as ``ToTensor`` + ``Normalize`` do passes.
    """
    import torch
    from PIL import Image

    size = bundle.image_size
    try:
        cfg = bundle.preprocess_config()
        mean = torch.tensor(cfg["mean"], dtype=torch.float32)
        std = torch.tensor(cfg["std"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return False
    probe = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    probe.reshape(-1, 3)[: min(256, size * size)] = np.arange(256, dtype=np.uint8)[
        : min(256, size * size), None
    ]
    expected = bundle.preprocess(Image.fromarray(probe, "RGB"))
    got = _normalised(torch.from_numpy(probe[None]), mean, std)[0].permute(2, 0, 1)
    if expected.shape != got.shape or not torch.equal(expected, got):
        return False
    return mean, std


def _resolve_pretrained(spec: ClipSpec) -> tuple[str, str | None]:
    """Model name and the ``pretrained`` argument for open_clip (tag, file path or None)."""
    pretrained = spec.pretrained
    if pretrained and os.path.isdir(pretrained):
        inner = ClipSpec.from_dir(pretrained)
        return inner.model_name, inner.pretrained
    return spec.model_name, pretrained


def load_clip(spec: ClipSpec, device: str = "cpu") -> ClipBundle:
    """Create a CLIP through open_clip, the same path users take.

    A local checkpoint goes through ``open_clip.create_model_and_transforms(name,
    pretrained=PATH)``; a tag is downloaded (and cached) by open_clip, which needs internet the
    first time.

    Parameters
    ----------
    spec:
        Model name and weights; ``pretrained`` may also be a folder written by :func:`save_clip`.
    device:
        Torch device.

    Returns
    -------
    ClipBundle
        The model in eval mode, its eval transform and its tokenizer.
    """
    import open_clip

    register_configs()
    model_name, pretrained = _resolve_pretrained(spec)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBundle(model, preprocess, tokenizer, ClipSpec(model_name, pretrained))


def save_clip(
    bundle_or_model: Any, directory: str | Path, model_name: str | None = None, **extra: Any
) -> Path:
    """Write a CLIP folder that :func:`load_clip` (and open_clip's ``local-dir:``) reads back.

    Writes ``open_clip_model.safetensors`` (the state dict), ``open_clip_config.json``
    (model and preprocess config) and ``clip.json`` (model name, checkpoint file, embedding
    size, plus ``extra``).

    Parameters
    ----------
    bundle_or_model:
        A :class:`ClipBundle` or a bare open_clip model (then ``model_name`` is required).
    directory:
        Folder to write into (created).
    model_name:
        The open_clip model name; taken from the bundle's spec when omitted.
    **extra:
        JSON-serialisable facts recorded in ``clip.json`` (e.g. training figures).

    Returns
    -------
    pathlib.Path
        The checkpoint file.
    """
    import open_clip
    from safetensors.torch import save_file

    register_configs()
    if isinstance(bundle_or_model, ClipBundle):
        model = bundle_or_model.model
        model_name = model_name or bundle_or_model.spec.model_name
    else:
        model = bundle_or_model
    if not model_name:
        raise ValueError("model_name is required when saving a bare model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    checkpoint = directory / CHECKPOINT_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, checkpoint)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    (directory / OPEN_CLIP_CONFIG).write_text(
        json.dumps(
            {"model_cfg": open_clip.get_model_config(model_name), "preprocess_cfg": preprocess_cfg},
            indent=2,
        )
    )
    meta = {
        "model_name": model_name,
        "checkpoint": CHECKPOINT_FILE,
        "embed_dim": int(model.text_projection.shape[1]),
        "context_length": int(model.context_length),
        **extra,
    }
    (directory / CLIP_JSON).write_text(json.dumps(meta, indent=2, default=str))
    return checkpoint


def save_clip_reference(spec: ClipSpec, directory: str | Path, **extra: Any) -> None:
    """Write a CLIP folder that names a hub model (``clip.json`` only, no weights copied)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"model_name": spec.model_name, "pretrained": spec.pretrained, **extra}
    (directory / CLIP_JSON).write_text(json.dumps(meta, indent=2, default=str))


def update_clip_json(directory: str | Path, **fields: Any) -> dict:
    """Add or replace fields of a CLIP folder's ``clip.json`` (e.g. the INT8 gate's verdict)."""
    meta = read_clip_json(directory)
    meta.update(fields)
    path = Path(directory) / CLIP_JSON
    tmp = path.with_name(CLIP_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path)
    return meta


def weights_fingerprint(model: Any) -> str:
    """A short SHA-256 of a model's state dict (names, dtypes, shapes and values).

    Embeddings made elsewhere (``imgsearch embed``, on Ray) record it, so a build can tell
    whether they came from the very weights it serves.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}|".encode())
        digest.update(values.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
