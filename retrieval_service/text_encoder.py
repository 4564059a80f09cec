"""Serving-time CLIP text encoders: real tokens only, torch or ONNX Runtime, bounded tokenizer."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Runtime names, as recorded in a CLIP folder's clip.json under "text_encoder".
TORCH_FP32 = "torch-fp32"
TORCH_INT8 = "torch-int8"
ONNX_FP32 = "onnx-fp32"
ONNX_INT8 = "onnx-int8"
RUNTIMES = (TORCH_FP32, TORCH_INT8, ONNX_FP32, ONNX_INT8)
ONNX_FILES = {ONNX_FP32: "text_fp32.onnx", ONNX_INT8: "text_int8.onnx"}
# Names written by earlier builds, before ONNX Runtime was a choice.
LEGACY_RUNTIMES = {"fp32": TORCH_FP32, "int8": TORCH_INT8}

# open_clip's BPE tokenizer memoises every word it has seen in a dict that never shrinks; a
# stream of distinct queries grows it without bound. Past this many words it starts afresh.
TOKENIZER_CACHE_WORDS = 20_000
ENCODE_BATCH = 256  # texts per forward pass when embedding many (vocabulary, gate)


class BoundedTokenizer:
    """An open_clip tokenizer whose word cache is cleared when it passes ``max_words``.

    Parameters
    ----------
    tokenizer:
        ``open_clip.get_tokenizer(...)``; tokenizers without a ``cache`` dict (Hugging Face
        ones) are used as they are.
    max_words:
        Cached words kept at most before the cache is reset to what it held at start.
    """

    def __init__(self, tokenizer: Any, max_words: int = TOKENIZER_CACHE_WORDS):
        self.tokenizer = tokenizer
        self.max_words = int(max_words)
        cache = getattr(tokenizer, "cache", None)
        self._initial = dict(cache) if isinstance(cache, dict) else None
        # The BPE reads its cache in two steps (membership, then lookup): a reset between them
        # in another thread would raise, so calls are serialised.
        self._lock = threading.Lock()
        self.resets = 0

    @property
    def cached_words(self) -> int:
        """Words in the underlying tokenizer's cache now (0 when it has none)."""
        cache = getattr(self.tokenizer, "cache", None)
        return len(cache) if isinstance(cache, dict) else 0

    def __call__(self, texts: list[str]) -> Any:
        """Tokenize to open_clip's padded ``(n, context_length)`` int64 tensor."""
        with self._lock:
            tokens = self.tokenizer(list(texts))
            if self._initial is not None and self.cached_words > self.max_words:
                self.tokenizer.cache = dict(self._initial)
                self.resets += 1
        return tokens


@dataclass(frozen=True)
class TextTower:
    """The parts of a causal open_clip text tower that the real-token forward needs."""

    token_embedding: Any
    positional_embedding: Any
    transformer: Any
    attn_mask: Any
    ln_final: Any
    text_projection: Any
    pool_type: str
    eos_id: int | None


def causal_text_tower(model: Any) -> tuple[TextTower | None, str]:
    """The model's text tower when it can run over real tokens only, else None and why not.

    Running over the batch's longest real length instead of the padded context is exact when
    attention is causal (a token never sees the padding after it) and the embedding is read at
    the end-of-text token (``argmax``/``eos`` pooling): the CLIP family. SigLIP-style towers
    (bidirectional, last-token or CLS pooling) and Hugging Face towers are not.
    """
    import torch

    text = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if text is None or not hasattr(text, "token_embedding"):
        return None, "the text tower is not open_clip's transformer (e.g. a Hugging Face tower)"
    pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", None)
    if pool_type not in ("argmax", "eos"):
        return None, f"pooling {pool_type!r} does not read the end-of-text token"
    if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
        return None, "the tower appends a class token or masks padding"
    mask = getattr(text, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None, "attention is not causal (no causal mask)"
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    if not (torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all()):
        return None, "the attention mask is not causal"
    eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
    tower = TextTower(
        text.token_embedding,
        text.positional_embedding,
        text.transformer,
        mask,
        text.ln_final,
        text.text_projection,
        pool_type,
        eos_id,
    )
    return tower, ""


def real_token_inputs(tokens: np.ndarray, pool_type: str, eos_id: int | None):
    """Cut padded tokens to the batch's longest real length; returns (tokens, eot index).

    ``tokens`` is ``(n, context_length)`` int64 as open_clip's tokenizer pads it. The end-of-text
    position is found as open_clip's pooling finds it (the largest id for ``argmax``, the first
    ``eos_id`` for ``eos``).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if pool_type == "eos":
        eot = (tokens == eos_id).argmax(axis=1)
    else:
        eot = tokens.argmax(axis=1)
    length = int(eot.max()) + 1 if len(eot) else 1
    return np.ascontiguousarray(tokens[:, :length]), eot.astype(np.int64)


def real_token_module(tower: TextTower) -> Any:
    """A ``torch.nn.Module`` ``(tokens (n, L), eot_index (n,)) -> L2-normalised (n, d)``.

    The same computation as open_clip's ``encode_text`` (token and positional embedding, the
    transformer under the causal mask, final norm, pooling at the end-of-text token, projection),
    with the positional embedding and the mask cut to the input's length ``L``. It shares the
    model's weights and is what ONNX export traces (batch and length are dynamic axes).
    """
    import torch
    import torch.nn.functional as F

    class RealTokenTextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = tower.token_embedding
            self.transformer = tower.transformer
            self.ln_final = tower.ln_final
            self.positional_embedding = tower.positional_embedding
            if isinstance(tower.text_projection, torch.nn.Module):
                self.projection_layer = tower.text_projection
                self.projection_matrix = None
            else:
                self.projection_layer = None
                self.projection_matrix = tower.text_projection
            self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
            self.cast_dtype = tower.transformer.get_cast_dtype()

        def forward(self, tokens, eot_index):
            length = tokens.shape[1]
            x = self.token_embedding(tokens).to(self.cast_dtype)
            x = x + self.positional_embedding[:length].to(self.cast_dtype)
            x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
            x = self.ln_final(x)
            x = x[torch.arange(x.shape[0]), eot_index]
            if self.projection_layer is not None:
                x = self.projection_layer(x)
            elif self.projection_matrix is not None:
                x = x @ self.projection_matrix
            return F.normalize(x, dim=-1)

    return RealTokenTextTower().eval()


class TextEncoder:
    """Embeds texts with one runtime; subclasses run the forward pass.

    ``encode_text(texts)`` tokenizes, groups texts of similar length (so a long caption does not
    make a batch of short ones pay for its length), runs batches of at most ``batch_size`` and
    returns L2-normalised float32 rows in the input order.
    """

    runtime = ""

    def __init__(
        self, tokenizer: Any, embed_dim: int, pool_type: str | None, eos_id: int | None = None
    ):
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, BoundedTokenizer) else BoundedTokenizer(tokenizer)
        )
        self.embed_dim = int(embed_dim)
        self.real_tokens = pool_type is not None  # None: the padded context
        self.pool_type = pool_type or ""
        self.eos_id = eos_id

    def encode_text(self, texts: list[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts:
            Queries or captions.
        batch_size:
            Texts per forward pass at most.

        Returns
        -------
        numpy.ndarray
            ``(len(texts), embed_dim)`` float32, each row L2-normalised.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = np.asarray(self.tokenizer(texts), dtype=np.int64)
        if self.real_tokens:
            _, eot = real_token_inputs(tokens, self.pool_type, self.eos_id)
            order = np.argsort(eot, kind="stable")
        else:
            order = np.arange(len(texts))
        out = np.empty((len(texts), self.embed_dim), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self.encode_tokens(tokens[rows])
        return out

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Embed one batch of padded tokens ``(n, context_length)``; L2-normalised rows."""
        raise NotImplementedError

    def describe(self) -> str:
        """The runtime and whether it runs real tokens only, for logs."""
        return f"{self.runtime} ({'real tokens' if self.real_tokens else 'padded context'})"


class TorchTextEncoder(TextEncoder):
    """Text encoding with torch: real tokens when the tower allows it, else ``encode_text``.

    Parameters
    ----------
    model:
        An open_clip model in eval mode (FP32, or the INT8 copy of
        :func:`~retrieval_service.quantization.quantize_text_encoder`).
    tokenizer:
        Its tokenizer.
    embed_dim:
        Embedding size.
    runtime:
        The name recorded for it (``torch-fp32`` or ``torch-int8``).
    real_tokens:
        False forces the padded path (the reference the others are checked against).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        embed_dim: int,
        runtime: str = TORCH_FP32,
        real_tokens: bool = True,
    ):
        tower, _ = causal_text_tower(model) if real_tokens else (None, "")
        if tower is None:
            super().__init__(tokenizer, embed_dim, None)
        else:
            super().__init__(tokenizer, embed_dim, tower.pool_type, tower.eos_id)
        self.model = model
        self.runtime = runtime
        self.module = real_token_module(tower) if tower is not None else None

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.module is None:
                out = self.model.encode_text(torch.from_numpy(tokens), normalize=True)
            else:
                cut, eot = real_token_inputs(tokens, self.pool_type, self.eos_id)
                out = self.module(torch.from_numpy(cut), torch.from_numpy(eot))
            return out.float().numpy()


def onnx_session_options() -> Any:
    """ONNX Runtime options for serving: one intra-op thread, no spinning, sequential.

    The server shares two cores with gRPC work: a spinning intra-op pool would burn a core
    waiting for work between batches.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OnnxTextEncoder(TextEncoder):
    """Text encoding with ONNX Runtime over a model written by :func:`export_text_onnx`.

    Parameters
    ----------
    path:
        The ``.onnx`` file (inputs ``tokens`` (n, L) and ``eot_index`` (n,), int64).
    tokenizer:
        The CLIP's tokenizer.
    embed_dim:
        Embedding size.
    pool_type, eos_id:
        How the end-of-text token is found (the tower's pooling).
    runtime:
        The name recorded for it (``onnx-fp32`` or ``onnx-int8``).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        embed_dim: int,
        pool_type: str,
        eos_id: int | None,
        runtime: str = ONNX_FP32,
    ):
        import onnxruntime as ort

        super().__init__(tokenizer, embed_dim, pool_type, eos_id)
        self.path = Path(path)
        self.runtime = runtime
        self.session = ort.InferenceSession(
            str(self.path), onnx_session_options(), providers=["CPUExecutionProvider"]
        )

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        cut, eot = real_token_inputs(tokens, self.pool_type, self.eos_id)
        (out,) = self.session.run(None, {"tokens": cut, "eot_index": eot})
        return np.asarray(out, dtype=np.float32)


def onnx_available() -> str:
    """Why ONNX Runtime cannot be used here ("" when it can)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    return ""


def load_text_encoder(
    clip_dir: str | Path, bundle: Any, runtime: str | None = None
) -> tuple[TextEncoder, str]:
    """The serving text encoder of a CLIP folder: the runtime its build chose.

    Parameters
    ----------
    clip_dir:
        The CLIP folder (its ``clip.json`` names the runtime under ``text_encoder``).
    bundle:
        The loaded :class:`~retrieval_service.clip_model.ClipBundle` (torch runs from it, and
        it is the fallback).
    runtime:
        Overrides the recorded choice (one of :data:`RUNTIMES`).

    Returns
    -------
    encoder : TextEncoder
        Ready to encode.
    note : str
        Why the recorded runtime was not used ("" when it was).
    """
    from retrieval_service.clip_model import read_clip_json
    from retrieval_service.quantization import quantize_text_encoder

    clip_dir = Path(clip_dir)
    recorded = runtime or read_clip_json(clip_dir).get("text_encoder") or TORCH_FP32
    chosen = LEGACY_RUNTIMES.get(recorded, recorded)
    if chosen not in RUNTIMES:
        raise ValueError(f"unknown text runtime {recorded!r}: use one of {', '.join(RUNTIMES)}")
    if chosen in ONNX_FILES:
        tower, why_not = causal_text_tower(bundle.model)
        path = clip_dir / ONNX_FILES[chosen]
        missing = why_not or onnx_available() or ("" if path.exists() else f"{path} is missing")
        if not missing:
            encoder = OnnxTextEncoder(
                path, bundle.tokenizer, bundle.embed_dim, tower.pool_type, tower.eos_id, chosen
            )
            return encoder, ""
        fallback = TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)
        return fallback, f"{chosen} unavailable ({missing}); serving {TORCH_FP32}"
    model = quantize_text_encoder(bundle.model) if chosen == TORCH_INT8 else bundle.model
    return TorchTextEncoder(model, bundle.tokenizer, bundle.embed_dim, chosen), ""
