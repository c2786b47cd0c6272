"""Compression methods: plain functions in one name -> function registry, composable in a pipeline.

Each method takes a ``Candidate`` (an fp32 PyTorch classifier and its tokenizer) plus a ``Context`` (the
train/validation texts, the teacher's logits on train, threads, seed) and returns a new candidate. Order in
a pipeline: distil -> prune -> trim_vocab -> quantize. ``save_candidate`` writes any candidate as an artifact
that ``jobs.inference.load_inference_model`` loads (backend torch, torch-int8 or onnx).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jobs.artifacts import write_json
from jobs.inference import MODEL_INFO, quantize_dynamic_int8
from jobs.modeling import encoder_layers, layer_shapes, shrink_layer
from jobs.tasks import accuracy_macro_f1

QUANTIZE_BACKENDS = ("none", "torch-int8", "onnx-int8")


@dataclass
class Context:
    """What every method may use. Teacher logits are on the train texts, in order."""

    train_texts: list[str]
    train_labels: np.ndarray
    teacher_logits: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    max_length: int
    threads: int = 1
    seed: int = 0
    batch_size: int = 32
    # Called after each distillation epoch with (epoch, validation accuracy); a Tune trial reports through it.
    on_epoch: Callable[[int, float], None] | None = None


@dataclass
class Candidate:
    """A model being compressed: fp32 weights, its tokenizer, and the int8 backend to export it with."""

    model: Any  # fp32 transformers sequence classifier (possibly pruned / fewer layers / trimmed vocab)
    tokenizer: Any
    int8_backend: str = "none"  # one of QUANTIZE_BACKENDS, applied by save_candidate
    steps: list[dict[str, Any]] = field(default_factory=list)  # what was applied, with parameters


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Any]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def val_accuracy(model: Any, tokenizer: Any, ctx: Context) -> float:
    """Accuracy of an fp32 model on the context's validation texts (leaves it in train mode)."""
    import torch

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(ctx.val_texts), 128):
            preds.append(model(**_encode(tokenizer, ctx.val_texts[i:i + 128], ctx.max_length)).logits.argmax(-1))
    model.train()
    return accuracy_macro_f1(ctx.val_labels, torch.cat(preds).numpy())["accuracy"]


def kd_train(model: Any, tokenizer: Any, ctx: Context, *, epochs: float, lr: float, temperature: float,
             alpha: float, max_steps: int | None = None, freeze_embeddings: bool = True) -> None:
    """Trains on the train split with alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE."""
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    if freeze_embeddings:  # word embeddings are half of a small encoder's weights; their updates cost most
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n = len(ctx.train_texts)
    steps_per_epoch = max(1, n // ctx.batch_size)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    rng = np.random.default_rng(ctx.seed)
    teacher = torch.from_numpy(ctx.teacher_logits).float()
    labels = torch.from_numpy(ctx.train_labels).long()
    model.train()
    step = 0
    while step < total:
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            idx = order[b * ctx.batch_size:(b + 1) * ctx.batch_size]
            batch = _encode(tokenizer, [ctx.train_texts[i] for i in idx], ctx.max_length)
            logits = model(**batch).logits
            kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(teacher[idx] / temperature, -1),
                          reduction="batchmean") * temperature**2
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step >= total:
                break
        epoch = math.ceil(step / steps_per_epoch)
        if ctx.on_epoch is not None and max_steps is None:
            ctx.on_epoch(epoch, val_accuracy(model, tokenizer, ctx))
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(True)
    model.eval()


def pick_layers(depth: int, keep: int) -> list[int]:
    """Evenly spaced layers, always including the last (it feeds the classifier)."""
    if not 1 <= keep <= depth:
        raise ValueError(f"cannot keep {keep} of {depth} layers")
    return sorted({int(round(x)) for x in np.linspace(depth - 1, 0, keep)})[-keep:] if keep > 1 else [depth - 1]


def distill(cand: Candidate, ctx: Context, *, layers: int, epochs: float = 2, lr: float = 2e-4,
            temperature: float = 2.0, alpha: float = 0.7) -> Candidate:
    """A student of ``layers`` layers picked from the teacher (initialised from its weights), trained by KD."""
    import torch

    model = copy.deepcopy(cand.model)
    all_layers = encoder_layers(model)
    keep = pick_layers(len(all_layers), layers)
    model.base_model.encoder.layer = torch.nn.ModuleList([all_layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(model.base_model.encoder.layer):  # layer_idx indexes caches in transformers 5
        if hasattr(layer.attention.self, "layer_idx"):
            layer.attention.self.layer_idx = i
    kd_train(model, cand.tokenizer, ctx, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha)
    return Candidate(model, cand.tokenizer, cand.int8_backend, cand.steps + [
        {"method": "distill", "layers": keep, "epochs": epochs, "lr": lr, "temperature": temperature, "alpha": alpha}])


def _importance(model: Any, tokenizer: Any, ctx: Context, kind: str, batches: int = 8) -> list[tuple[Any, Any]]:
    """Per-layer (head scores, neuron scores). taylor: sum |w * dL/dw| over a few train batches; magnitude: |w|."""
    import torch
    import torch.nn.functional as F

    layers = encoder_layers(model)
    if kind == "taylor":
        model.zero_grad()
        model.train()
        rng = np.random.default_rng(ctx.seed)
        for _ in range(batches):
            idx = rng.choice(len(ctx.train_texts), size=min(ctx.batch_size, len(ctx.train_texts)), replace=False)
            logits = model(**_encode(tokenizer, [ctx.train_texts[i] for i in idx], ctx.max_length)).logits
            F.cross_entropy(logits, torch.from_numpy(ctx.train_labels[idx]).long()).backward()
        score = lambda w: (w.weight * w.weight.grad).abs()  # noqa: E731
    elif kind == "magnitude":
        score = lambda w: w.weight.abs()  # noqa: E731
    else:
        raise ValueError(f"unknown importance {kind!r}; use taylor or magnitude")
    out = []
    with torch.no_grad():
        for layer in layers:
            attn = layer.attention.self
            hs = attn.attention_head_size
            rows = score(attn.query).sum(1) + score(attn.key).sum(1) + score(attn.value).sum(1)
            rows = rows + score(layer.attention.output.dense).sum(0)
            heads = rows.view(-1, hs).sum(1)
            neurons = score(layer.intermediate.dense).sum(1) + score(layer.output.dense).sum(0)
            out.append((heads, neurons))
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def prune(cand: Candidate, ctx: Context, *, heads: float = 0.25, ffn: float = 0.25, importance: str = "taylor",
          recovery_steps: int = 0, lr: float = 1e-4, temperature: float = 2.0, alpha: float = 0.7) -> Candidate:
    """Removes the least important ``heads`` share of attention heads and ``ffn`` share of FFN neurons in
    every layer (weight matrices really shrink), then optionally recovers with a short KD fine-tune."""
    model = copy.deepcopy(cand.model)
    scores = _importance(model, cand.tokenizer, ctx, importance)
    for layer, (h, n) in zip(encoder_layers(model), scores):
        keep_h = max(1, round(len(h) * (1 - heads)))
        keep_n = max(1, round(len(n) * (1 - ffn)))
        shrink_layer(layer, h.argsort(descending=True)[:keep_h].tolist(), n.argsort(descending=True)[:keep_n].tolist())
    if recovery_steps:
        kd_train(model, cand.tokenizer, ctx, epochs=1, lr=lr, temperature=temperature, alpha=alpha,
                 max_steps=recovery_steps)
    return Candidate(model, cand.tokenizer, cand.int8_backend, cand.steps + [
        {"method": "prune", "heads": heads, "ffn": ffn, "importance": importance, "recovery_steps": recovery_steps,
         "layer_shapes": layer_shapes(model)}])


def _renumbered_tokenizer(tok: Any, keep: list[int], new_id: dict[int, int]) -> Any:
    """``tok`` with only the ``keep`` token ids, renumbered by ``new_id`` (old id -> new id)."""
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="slimray-trim-"))
    try:
        tok.save_pretrained(tmp)
        spec = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = spec["model"]["vocab"]
        if not isinstance(vocab, dict):
            raise ValueError(f"vocabulary trimming supports WordPiece/BPE tokenizers, not {spec['model']['type']}")
        by_id = {i: t for t, i in vocab.items()}
        spec["model"]["vocab"] = {by_id[old]: new for old, new in new_id.items()}
        for added in spec.get("added_tokens", []):
            added["id"] = new_id[added["id"]]
        post = spec.get("post_processor") or {}
        for processor in [post, *post.get("processors", [])]:
            for special in (processor.get("special_tokens") or {}).values():
                special["ids"] = [new_id[i] for i in special["ids"]]
            for key in ("cls", "sep"):
                if isinstance(processor.get(key), list):
                    processor[key][1] = new_id[processor[key][1]]
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        if (tmp / "vocab.txt").is_file():
            (tmp / "vocab.txt").write_text("".join(by_id[old] + "\n" for old in keep), encoding="utf-8")
        new_tok = AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return new_tok


def trim_vocab(cand: Candidate, ctx: Context) -> Candidate:
    """Keeps the embedding rows of tokens seen in the train texts plus special tokens; remaps the tokenizer.

    WordPiece/BPE match greedily against the vocabulary, so on text whose tokens are all kept the new
    tokenizer produces the same pieces (renumbered) and the model gives identical logits.
    """
    import torch

    tok = cand.tokenizer
    seen = set(tok.all_special_ids)
    for i in range(0, len(ctx.train_texts), 1024):
        for ids in tok(ctx.train_texts[i:i + 1024], truncation=False)["input_ids"]:
            seen.update(ids)
    keep = sorted(seen)
    new_id = {old: new for new, old in enumerate(keep)}
    new_tok = _renumbered_tokenizer(tok, keep, new_id)

    model = copy.deepcopy(cand.model)
    old = model.get_input_embeddings()
    emb = torch.nn.Embedding(len(keep), old.embedding_dim, padding_idx=new_id.get(old.padding_idx))
    emb.weight.data = old.weight.data[torch.tensor(keep)].clone()
    model.set_input_embeddings(emb)
    model.config.vocab_size = len(keep)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        if getattr(model.config, attr, None) is not None:
            setattr(model.config, attr, new_id.get(getattr(model.config, attr)))
    return Candidate(model, new_tok, cand.int8_backend, cand.steps + [
        {"method": "trim_vocab", "kept_tokens": len(keep), "original_tokens": len(tok)}])


def quantize(cand: Candidate, ctx: Context, *, backend: str = "onnx-int8") -> Candidate:
    """Marks the candidate for int8 export: PyTorch dynamic int8 or ONNX Runtime dynamic int8."""
    if backend not in QUANTIZE_BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; use one of {QUANTIZE_BACKENDS}")
    return Candidate(cand.model, cand.tokenizer, backend, cand.steps + [{"method": "quantize", "backend": backend}])


METHODS: dict[str, Callable[..., Candidate]] = {
    "distill": distill,
    "prune": prune,
    "trim_vocab": trim_vocab,
    "quantize": quantize,
}
PIPELINE_ORDER = ("distill", "prune", "trim_vocab", "quantize")


def run_pipeline(cand: Candidate, ctx: Context, plan: dict[str, dict[str, Any]]) -> Candidate:
    """Applies the methods named in ``plan`` ({method: params}) in the canonical order."""
    unknown = set(plan) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown compression methods {sorted(unknown)}; known: {sorted(METHODS)}")
    for name in PIPELINE_ORDER:
        if name in plan:
            cand = METHODS[name](cand, ctx, **plan[name])
    return cand


def export_onnx(model: Any, tokenizer: Any, path: Path) -> None:
    """Exports an fp32 classifier to ONNX (opset 17) with dynamic batch and sequence axes."""
    import warnings

    import torch

    enc = tokenizer(["a short example", "another slightly longer example text"], padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    axes = {k: {0: "batch", 1: "sequence"} for k in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(enc[k] for k in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)


def save_candidate(cand: Candidate, out: Path, max_length: int) -> Path:
    """Writes the candidate as an artifact the jobs/ loader reads; returns the weight file."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = cand.model.eval()
    cand.tokenizer.save_pretrained(out)
    shapes = layer_shapes(model)
    config = model.config
    pruned = any(s["heads"] != config.num_attention_heads or s["ffn"] != config.intermediate_size for s in shapes)
    info: dict[str, Any] = {
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "max_length": max_length,
        "pipeline": cand.steps,
        "layer_shapes": shapes if pruned else None,
    }
    if cand.int8_backend == "none":
        model.save_pretrained(out, safe_serialization=True)
        info.update(backend="torch", weights="model.safetensors")
    elif cand.int8_backend == "torch-int8":
        config.save_pretrained(out)
        torch.save(quantize_dynamic_int8(copy.deepcopy(model)).state_dict(), out / "model_int8.pt")
        info.update(backend="torch-int8", weights="model_int8.pt")
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        config.save_pretrained(out)
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, cand.tokenizer, Path(tmp) / "fp32.onnx")
            quantize_dynamic(str(Path(tmp) / "fp32.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8)
        info.update(backend="onnx", weights="model.onnx")
    write_json(out / MODEL_INFO, info)
    return out / info["weights"]
