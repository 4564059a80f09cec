"""Exporting the CLIP text tower to ONNX (real tokens, dynamic shapes) and quantising it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval_service.text_encoder import causal_text_tower, real_token_module


def traceable_attention(mha: Any) -> Any:
    """A drop-in for an ``nn.MultiheadAttention`` whose ONNX trace keeps the length dynamic.

    torch's traced export of ``nn.MultiheadAttention`` bakes the example's sequence length into
    its reshapes; this computes the same attention (packed input projection, scaled dot
    product with the additive mask, output projection) with shapes read from the input.
    """
    import torch

    class TraceableAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj_weight = mha.in_proj_weight
            self.in_proj_bias = mha.in_proj_bias
            self.out_proj = mha.out_proj
            self.num_heads = mha.num_heads
            self.head_dim = mha.embed_dim // mha.num_heads
            self.batch_first = mha.batch_first

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
            x = query if self.batch_first else query.transpose(0, 1)
            qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
            q, k, v = (
                part.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)
                for part in qkv.chunk(3, dim=-1)
            )
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape)
            out = self.out_proj(out)
            return (out if self.batch_first else out.transpose(0, 1)), None

    return TraceableAttention()


def export_text_onnx(model: Any, path: str | Path, int8_path: str | Path | None = None) -> Path:
    """Export the real-token text tower to ONNX; optionally also a dynamic-INT8 copy.

    Uses torch's TorchScript exporter (``dynamo=False``), which needs no extra package; batch
    and sequence length are dynamic axes. The INT8 copy is ONNX Runtime's dynamic quantization
    (INT8 weights with per-channel scales, activations quantized per batch at run time).

    Raises
    ------
    ValueError
        When the tower cannot run over real tokens (see :func:`causal_text_tower`).
    """
    import copy
    import warnings

    import torch

    tower, why_not = causal_text_tower(model)
    if tower is None:
        raise ValueError(f"ONNX export needs a causal text tower: {why_not}")
    module = copy.deepcopy(real_token_module(tower))
    for block in module.transformer.resblocks:
        if isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            block.attn = traceable_attention(block.attn)
    path = Path(path)
    example = (
        torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]], dtype=torch.long),
        torch.tensor([3, 1], dtype=torch.long),
    )
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo in torch 2.9+, and warns
        # about traced shapes that are in fact dynamic here; it is the path with no extra deps.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            input_names=["tokens", "eot_index"],
            output_names=["embedding"],
            dynamic_axes={
                "tokens": {0: "batch", 1: "length"},
                "eot_index": {0: "batch"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
        )
    if int8_path is not None:
        quantize_onnx(path, int8_path)
    return path


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """ONNX Runtime dynamic INT8 quantization of an exported text tower."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    def not_the_preprocessing_hint(record: logging.LogRecord) -> bool:
        # quantize_dynamic logs advice to pre-process the model on the root logger every call.
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(not_the_preprocessing_hint)
    try:
        # Per-channel weight scales: on ViT-B-32 they lift the top-10 overlap with FP32 from
        # 0.91 to 0.93 (cosine 0.9989 -> 0.9992) at the same speed.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(not_the_preprocessing_hint)
    return Path(target)
