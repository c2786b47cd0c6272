"""ONNX artifacts of compressed candidates: export, ONNX Runtime's transformer fusions, int8 quantization.

``write_onnx`` writes ``model.onnx`` for one of ``ONNX_BACKENDS`` and returns what the artifact's model info
records about the graph:

- ``onnx-int8``: an eager-attention export, fused by ONNX Runtime's transformer optimizer (Attention,
  EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), then dynamic int8 (weights int8, activations
  quantized per batch, attention included as QAttention). The default for every ONNX candidate.
- ``onnx-int8-per-channel``: the same fused graph, with one int8 scale per output channel of each weight
  instead of one per tensor (ONNX Runtime's ``per_channel``): the rounding error of a weight matrix whose
  columns differ in range stays that of each column.
- ``onnx-int8-unfused``: the plain export, then dynamic int8: what one call of ONNX Runtime's quantizer gives a
  user, kept as the baseline the search is measured against.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

ONNX_BACKENDS = ("onnx-int8", "onnx-int8-per-channel", "onnx-int8-unfused")
FUSED_OPS = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
             "Gelu", "FastGelu")


def export_onnx(model: Any, tokenizer: Any, path: Path, attention: str | None = None) -> None:
    """Exports an fp32 classifier or tagger to ONNX (opset 17) with dynamic batch and sequence axes (a tagger's
    logits, one row per piece, have both).

    ``attention="eager"`` exports the explicit softmax(QK^T)V graph that ONNX Runtime's optimizer recognises
    as attention (the default SDPA export is a pattern it cannot fuse).
    """
    import torch

    if attention is not None:
        model = copy.deepcopy(model)
        model.set_attn_implementation(attention)
    enc = tokenizer(["a short example", "another slightly longer example text"], padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    with torch.inference_mode():
        per_piece = model.eval()(**enc).logits.dim() == 3  # (B, T, tags) of a tagger; (B, labels) otherwise
    axes = {k: {0: "batch", 1: "sequence"} for k in [*names, *(["logits"] if per_piece else [])]}
    axes.setdefault("logits", {0: "batch"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(enc[k] for k in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)


def attention_shape(model: Any) -> tuple[int, int] | None:
    """(heads, heads x head size) shared by every layer, or None when pruning left layers with different heads."""
    from jobs.modeling import encoder_layers

    shapes = {(layer.attention.self.num_attention_heads, layer.attention.self.all_head_size)
              for layer in encoder_layers(model)}
    return shapes.pop() if len(shapes) == 1 else None


def fuse(src: Path, dst: Path, model: Any) -> dict[str, int]:
    """Runs ONNX Runtime's BERT optimizer on ``src``; returns how many of each fused op ``dst`` has.

    The exported graph computes the head count at run time (a reshape to (..., -1, head size)), so the optimizer
    is told heads and width; layers with different head counts get every fusion but attention.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    shape = attention_shape(model)
    options = FusionOptions("bert")
    options.enable_attention = shape is not None
    # Pruned heads make the attention width (heads x head size) differ from the layer's input width, which the
    # fusion warns about although it handles it; onnxruntime.transformers imports it as a top-level module.
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    fused = optimize_model(str(src), model_type="bert", num_heads=shape[0] if shape else 0,
                           hidden_size=shape[1] if shape else 0, optimization_options=options)
    fused.save_model_to_file(str(dst))
    stats = fused.get_fused_operator_statistics()
    return {op: stats[op] for op in FUSED_OPS if stats.get(op)}


def quantize_dynamic_int8(src: Path, dst: Path, per_channel: bool = False) -> None:
    """ONNX Runtime dynamic int8: int8 weights (one scale per tensor, or per output channel), activations
    quantized per batch at run time."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX shape inference gives no types past the fused (com.microsoft) ops; every float tensor here is fp32.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


def write_onnx(model: Any, tokenizer: Any, out: Path, backend: str) -> dict[str, Any]:
    """Writes ``out/model.onnx`` for ``backend`` (one of ``ONNX_BACKENDS``); returns its model-info fields."""
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"unknown ONNX backend {backend!r}; use one of {ONNX_BACKENDS}")
    with tempfile.TemporaryDirectory(prefix="slimray-onnx-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        info: dict[str, Any] = {"backend": "onnx", "weights": "model.onnx", "quantization": "dynamic int8"}
        if backend == "onnx-int8-unfused":
            export_onnx(model, tokenizer, fp32)
            info["fused"] = {}
        else:
            export_onnx(model, tokenizer, fp32, attention="eager")
            info["fused"] = fuse(fp32, Path(tmp) / "fused.onnx", model)
            fp32 = Path(tmp) / "fused.onnx"
        quantize_dynamic_int8(fp32, out / "model.onnx", per_channel=backend == "onnx-int8-per-channel")
        if backend == "onnx-int8-per-channel":
            info["quantization"] = "dynamic int8, per channel"
    return info
