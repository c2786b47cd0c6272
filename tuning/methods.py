"""Compression methods: plain functions in one name -> function registry, composable in a pipeline.

Each method takes a ``Candidate`` (an fp32 PyTorch classifier or entity tagger and its tokenizer) plus a
``Context`` (the train/validation rows, the teacher's logits on train, threads, seed) and returns a new
candidate. A tagger's rows are sentences (lists of words) with a tag per word; its losses compare each word's
first piece (per-token KD), cut into windows of whole words as fine-tuning cuts them (``jobs.tagging``). Order in
a pipeline: distil -> prune -> trim_vocab -> quantize. ``save_candidate`` writes any candidate as an artifact
that ``jobs.inference.load_inference_model`` loads (backend torch, torch-int8 or onnx).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jobs.artifacts import file_records, write_json
from jobs.batching import length_grouped_batches, token_lengths
from jobs.inference import MODEL_INFO, quantize_dynamic_int8, torch_forward
from jobs.modeling import encoder_layers, layer_shapes, shrink_layer
from jobs.tagging import encode_windows, tag_sentences, word_windows
from jobs.tasks import accuracy_macro_f1, tagging_metrics
from tuning.onnx_export import ONNX_BACKENDS, write_onnx

log = logging.getLogger(__name__)

QUANTIZE_BACKENDS = ("none", "torch-int8", *ONNX_BACKENDS)


@dataclass
class Context:
    """What every method may use. Teacher logits are on the train rows, in order.

    A classifier's rows are texts with a label id each, and ``teacher_logits`` is (texts, labels). A tagger's
    (``kind="tagging"``) are sentences, each a list of words with a list of tag ids, and ``teacher_logits`` is
    (words of all sentences, tags), sentence after sentence, at each word's first piece.

    Extra texts have no gold label (teacher-labelled augmentations, in-domain unlabelled text): distillation
    trains on them with the KD terms only; pruning's importance scores use the gold train rows alone. Taggers
    have none (their augmentations would need tag-aware edits).
    """

    train_texts: list[Any]
    train_labels: Any
    teacher_logits: np.ndarray
    val_texts: list[Any]
    val_labels: Any
    max_length: int
    threads: int = 1
    seed: int = 0
    batch_size: int = 32
    extra_texts: list[str] = field(default_factory=list)
    extra_logits: np.ndarray | None = None  # teacher logits on extra_texts, (len(extra_texts), teacher_logits cols)
    # Called after each distillation epoch with (epoch, validation score); a Tune trial reports through it.
    on_epoch: Callable[[int, float], None] | None = None
    kind: str = "sequence"  # or "tagging"


@dataclass
class Candidate:
    """A model being compressed: fp32 weights, its tokenizer, and the int8 backend to export it with."""

    model: Any  # fp32 transformers sequence classifier (possibly pruned / fewer layers / trimmed vocab)
    tokenizer: Any
    int8_backend: str = "none"  # one of QUANTIZE_BACKENDS, applied by save_candidate
    steps: list[dict[str, Any]] = field(default_factory=list)  # what was applied, with parameters


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Any]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@dataclass
class Batch:
    """One training batch: model inputs, and the rows the losses compare (texts, or a tagger's words)."""

    inputs: dict[str, Any]  # torch tensors for model(**inputs)
    rows: Callable[[Any], Any]  # model logits -> (rows, classes): a classifier's as they are, a tagger's words
    teacher: Any  # (rows, classes) teacher logits
    gold: Any  # (rows,) label ids, -1 where there is none


class TextRows:
    """A classifier's training rows: one text, one label id and one teacher logit row each."""

    def __init__(self, tokenizer: Any, texts: list[str], logits: np.ndarray, gold: np.ndarray, max_length: int):
        import torch

        self.tokenizer, self.texts, self.max_length = tokenizer, texts, max_length
        self.logits, self.gold = torch.from_numpy(logits), torch.from_numpy(gold).long()
        self.lengths = token_lengths(tokenizer, texts, max_length)

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, idx: np.ndarray) -> Batch:
        return Batch(_encode(self.tokenizer, [self.texts[i] for i in idx], self.max_length), lambda x: x,
                     self.logits[idx], self.gold[idx])


class WindowRows:
    """A tagger's training rows: windows of whole words (``jobs.tagging.word_windows``, as fine-tuning cuts
    them); the losses compare each word's first piece, with its tag and the teacher's logits for that word."""

    def __init__(self, tokenizer: Any, sentences: list[list[str]], logits: np.ndarray, tags: list[Any],
                 max_length: int):
        import torch

        self.windows = word_windows(tokenizer, sentences, max_length)
        self.pad_id = tokenizer.pad_token_id
        starts = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])  # first word of each sentence
        if len(logits) != starts[-1]:
            raise ValueError(f"teacher logits must have one row per word: {len(logits)} rows for {starts[-1]} words")
        self.first = starts
        self.logits = torch.from_numpy(logits)
        self.gold = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int64) for t in tags]
                                                    or [np.zeros(0, np.int64)])).long()
        self.lengths = np.array([len(w.ids) for w in self.windows])

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, idx: np.ndarray) -> Batch:
        import torch

        windows = [self.windows[i] for i in idx]
        inputs = {k: torch.from_numpy(v) for k, v in encode_windows(windows, self.pad_id).items()}
        row = np.concatenate([np.full(len(w.starts), r) for r, w in enumerate(windows)])
        pos = np.concatenate([w.starts for w in windows])
        word = np.concatenate([self.first[w.sentence] + w.first_word + np.arange(len(w.starts)) for w in windows])
        return Batch(inputs, lambda x: x[row, pos], self.logits[word], self.gold[word])  # x: (B, T, tags)


def training_rows(tokenizer: Any, ctx: Context, extra: bool = True) -> TextRows | WindowRows:
    """The rows distillation trains on: train rows then (``extra``) the extra rows, whose gold label is -1."""
    if ctx.kind == "tagging":
        if ctx.extra_texts:
            raise ValueError("an entity tagger distils on its train sentences only: extra_texts must be empty")
        return WindowRows(tokenizer, ctx.train_texts, ctx.teacher_logits.astype(np.float32), ctx.train_labels,
                          ctx.max_length)
    classes = ctx.teacher_logits.shape[1]
    more = np.zeros((0, classes), np.float32) if ctx.extra_logits is None or not extra else ctx.extra_logits
    texts = list(ctx.extra_texts) if extra else []
    if len(ctx.teacher_logits) != len(ctx.train_texts) or more.shape != (len(texts), classes):
        raise ValueError(f"teacher logits must have one row per text: teacher_logits {ctx.teacher_logits.shape} for "
                         f"{len(ctx.train_texts)} train texts, extra_logits {more.shape} for {len(texts)} "
                         f"extra texts (with the {classes} columns of teacher_logits)")
    logits = np.concatenate([ctx.teacher_logits, more]).astype(np.float32)
    gold = np.concatenate([np.asarray(ctx.train_labels), np.full(len(texts), -1)])
    return TextRows(tokenizer, list(ctx.train_texts) + texts, logits, gold, ctx.max_length)


def predict_words(model: Any, tokenizer: Any, sentences: list[list[str]], max_length: int) -> list[np.ndarray]:
    """A PyTorch tagger's (words, tags) logits per sentence, window by window (as ``InferenceModel.tag``)."""
    return tag_sentences(torch_forward(model), tokenizer, sentences, max_length, model.config.num_labels,
                         batch_size=128)


def score(model: Any, tokenizer: Any, texts: list[Any], labels: Any, max_length: int, kind: str = "sequence") -> float:
    """The task's score of an fp32 PyTorch model (leaves it in eval mode): accuracy of a classifier on texts
    with label ids; entity F1 (seqeval's default mode) of a tagger on sentences with tag ids per word."""
    import torch

    model.eval()
    if kind == "tagging":
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        pred = [w.argmax(-1) for w in predict_words(model, tokenizer, texts, max_length)]
        return tagging_metrics(labels, pred, names)["entity_f1"]
    preds = []
    with torch.inference_mode():
        for i in range(0, len(texts), 128):
            preds.append(model(**_encode(tokenizer, texts[i:i + 128], max_length)).logits.argmax(-1))
    return accuracy_macro_f1(np.asarray(labels), torch.cat(preds).numpy())["accuracy"]


def val_score(model: Any, tokenizer: Any, ctx: Context) -> float:
    """The task's score of an fp32 model on the context's validation rows (leaves it in train mode)."""
    value = score(model, tokenizer, ctx.val_texts, ctx.val_labels, ctx.max_length, ctx.kind)
    model.train()
    return value


def _keep_output(slot: dict[str, Any], name: str, module: Any, args: Any, output: Any) -> None:
    slot[name] = output


def _keep_projections(layers: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Forward hooks that keep each layer's latest query / key / value projections, (B, T, heads * head_size).

    Relations are recomputed from them, so any attention implementation works (sdpa returns no probabilities,
    and eager's are after dropout).
    """
    kept, hooks = [], []
    for layer in layers:
        attn = layer.attention.self
        slot: dict[str, Any] = {"head_size": attn.attention_head_size}
        for name in ("query", "key", "value"):
            hooks.append(getattr(attn, name).register_forward_hook(functools.partial(_keep_output, slot, name)))
        kept.append(slot)
    return kept, hooks


def _hidden_loss(student: list[Any], teacher: list[Any], mask: Any) -> Any:
    """MSE of student layer outputs against their mapped teacher layers' (B, T, hidden each), over real tokens
    and hidden dims, mean over layers."""
    real = mask[..., None].float()  # (B, T, 1)
    per_layer = [((s - t) ** 2 * real).sum() / (real.sum() * s.shape[-1]) for s, t in zip(student, teacher)]
    return sum(per_layer) / len(per_layer)


def _log_relation(a: Any, b: Any, head_size: int, keys: Any) -> Any:
    """log softmax(a_h b_h^T / sqrt(d)) per head over real keys: (B, T, H * d) twice -> (B, H, T, T)."""
    import torch

    B, T, _ = a.shape
    a, b = (x.view(B, T, -1, head_size).transpose(1, 2) for x in (a, b))  # (B, H, T, d)
    scores = (a @ b.transpose(-1, -2)) * head_size**-0.5
    return torch.log_softmax(scores.masked_fill(~keys[:, None, None, :], torch.finfo(scores.dtype).min), -1)


def _relation_loss(student: list[dict[str, Any]], teacher: list[dict[str, Any]], mask: Any) -> Any:
    """MiniLM's self-attention transfer: KL(teacher || student) of the attention distributions softmax(QK^T/sqrt d)
    and of the value relations softmax(VV^T/sqrt d) of mapped layers; mean over heads, real query positions, the
    two relations and the layers."""
    keys, real = mask.bool(), mask.float()  # (B, T)
    total = 0.0
    for s, t in zip(student, teacher):
        for a, b in (("query", "key"), ("value", "value")):
            log_s = _log_relation(s[a], s[b], s["head_size"], keys)
            log_t = _log_relation(t[a], t[b], t["head_size"], keys)
            kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # (B, T): per query, mean over heads
            total = total + (kl * real).sum() / real.sum()
    return total / (2 * len(student))


def kd_train(model: Any, tokenizer: Any, ctx: Context, *, epochs: float, lr: float, temperature: float,
             alpha: float, max_steps: int | None = None, freeze_embeddings: bool = True, teacher: Any = None,
             layer_map: list[int] | None = None, hidden_weight: float = 0.0,
             attention_weight: float = 0.0) -> list[dict[str, float]]:
    """Trains on the train + extra rows (a tagger's rows: each word's first piece) with
    alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE, the CE
    on train rows only (extra rows have no gold label), plus intermediate-layer terms when their weights are > 0:
    ``hidden_weight`` * hidden-state MSE and ``attention_weight`` * attention-relation KL, student layer i against
    layer ``layer_map[i]`` of ``teacher`` (a model with the same hidden size, run on every batch without grad).

    An epoch is one pass over all rows, shuffled together under ``ctx.seed`` in length-grouped batches
    (``jobs.batching``; a last short batch is left out). Returns one dict per epoch: the mean
    loss and components ("kd", "ce", and "hidden" / "attention" when on) over its steps.
    """
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    if hidden_weight < 0 or attention_weight < 0:
        raise ValueError(f"intermediate loss weights must be >= 0, got hidden_weight={hidden_weight}, "
                         f"attention_weight={attention_weight}")
    intermediate = hidden_weight > 0 or attention_weight > 0
    if intermediate and (teacher is None or layer_map is None):
        raise ValueError("hidden_weight / attention_weight > 0 need the teacher model and layer_map (its layer for "
                         "each student layer)")
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(ctx.threads)
    if freeze_embeddings:  # word embeddings are half of a small encoder's weights; their updates cost most
        model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rows = training_rows(tokenizer, ctx)
    n = len(rows)
    steps_per_epoch = max(1, n // ctx.batch_size)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    rng = np.random.default_rng(ctx.seed)
    weights = {"kd": alpha, "ce": 1 - alpha, "hidden": hidden_weight, "attention": attention_weight}
    student_qkv, teacher_qkv, hooks = [], [], []
    if attention_weight > 0:
        student_qkv, hooks = _keep_projections(encoder_layers(model))
        teacher_qkv, teacher_hooks = _keep_projections([encoder_layers(teacher)[k] for k in layer_map])
        hooks += teacher_hooks
    if intermediate:
        teacher.eval()

    def batch_losses(idx: np.ndarray) -> dict[str, Any]:
        rows_batch = rows.batch(idx)
        batch = rows_batch.inputs
        out = model(**batch, output_hidden_states=hidden_weight > 0)
        logits, y = rows_batch.rows(out.logits), rows_batch.gold  # (rows, classes): texts, or a tagger's words
        losses = {
            "kd": F.kl_div(F.log_softmax(logits / temperature, -1),
                           F.softmax(rows_batch.teacher / temperature, -1), reduction="batchmean") * temperature**2,
            "ce": F.cross_entropy(logits[y >= 0], y[y >= 0]) if (y >= 0).any() else logits.new_zeros(()),
        }
        if intermediate:
            with torch.no_grad():
                ref = teacher(**batch, output_hidden_states=hidden_weight > 0)
            if hidden_weight > 0:  # hidden_states[0] is the embedding output, identical in student and teacher
                losses["hidden"] = _hidden_loss(out.hidden_states[1:], [ref.hidden_states[k + 1] for k in layer_map],
                                                batch["attention_mask"])
            if attention_weight > 0:
                losses["attention"] = _relation_loss(student_qkv, teacher_qkv, batch["attention_mask"])
        return losses

    model.train()
    history: list[dict[str, float]] = []
    step = 0
    try:
        while step < total:  # rows of similar length share a batch: on short texts about half the padding
            batches = [b for b in length_grouped_batches(rows.lengths, ctx.batch_size, rng)
                       if len(b) == ctx.batch_size] or [rng.permutation(n)]
            sums: dict[str, float] = {}
            for b, idx in enumerate(batches[:steps_per_epoch]):
                losses = batch_losses(idx)
                loss = sum(weights[k] * v for k, v in losses.items())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                for k, v in {"loss": loss, **losses}.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                step += 1
                if step >= total:
                    break
            epoch = math.ceil(step / steps_per_epoch)
            history.append({"epoch": epoch, "steps": b + 1, **{k: round(v / (b + 1), 6) for k, v in sums.items()}})
            log.info("knowledge distillation: step %d/%d, epoch %d, mean loss %.4f", step, total, epoch,
                     history[-1]["loss"])
            if ctx.on_epoch is not None and max_steps is None:
                ctx.on_epoch(epoch, val_score(model, tokenizer, ctx))
    finally:
        for hook in hooks:
            hook.remove()
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(True)
    model.eval()
    return history


def pick_layers(depth: int, keep: int) -> list[int]:
    """Evenly spaced layers, always including the last (it feeds the classifier)."""
    if not 1 <= keep <= depth:
        raise ValueError(f"cannot keep {keep} of {depth} layers")
    return sorted({int(round(x)) for x in np.linspace(depth - 1, 0, keep)})[-keep:] if keep > 1 else [depth - 1]


def distill(cand: Candidate, ctx: Context, *, layers: int, epochs: float = 2, lr: float = 2e-4,
            temperature: float = 2.0, alpha: float = 0.7, hidden_weight: float = 0.0,
            attention_weight: float = 0.0) -> Candidate:
    """A student of ``layers`` layers picked from the teacher (initialised from its weights), trained by KD on the
    teacher's logits and, with ``hidden_weight`` / ``attention_weight`` > 0, on the picked teacher layers' hidden
    states / attention relations (the teacher then runs on every batch; see ``kd_train``)."""
    import torch

    model = copy.deepcopy(cand.model)
    all_layers = encoder_layers(model)
    keep = pick_layers(len(all_layers), layers)
    model.base_model.encoder.layer = torch.nn.ModuleList([all_layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(model.base_model.encoder.layer):  # layer_idx indexes caches in transformers 5
        if hasattr(layer.attention.self, "layer_idx"):
            layer.attention.self.layer_idx = i
    losses = kd_train(model, cand.tokenizer, ctx, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha,
                      teacher=cand.model, layer_map=keep, hidden_weight=hidden_weight,
                      attention_weight=attention_weight)
    return Candidate(model, cand.tokenizer, cand.int8_backend, cand.steps + [
        {"method": "distill", "layers": keep, "epochs": epochs, "lr": lr, "temperature": temperature, "alpha": alpha,
         "hidden_weight": hidden_weight, "attention_weight": attention_weight,
         "transfer_texts": len(ctx.extra_texts), "losses": losses}])


def _importance(model: Any, tokenizer: Any, ctx: Context, kind: str, batches: int = 8) -> list[tuple[Any, Any]]:
    """Per-layer (head scores, neuron scores). taylor: sum |w * dL/dw| over a few train batches; magnitude: |w|."""
    import torch
    import torch.nn.functional as F

    layers = encoder_layers(model)
    if kind == "taylor":
        model.zero_grad()
        model.train()
        rng = np.random.default_rng(ctx.seed)
        rows = training_rows(tokenizer, ctx, extra=False)
        for _ in range(batches):
            batch = rows.batch(rng.choice(len(rows), size=min(ctx.batch_size, len(rows)), replace=False))
            F.cross_entropy(batch.rows(model(**batch.inputs).logits), batch.gold).backward()
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
        if spec["model"].get("merges"):  # BPE: a merge may only name kept tokens (see _kept_tokens)
            kept = spec["model"]["vocab"]
            spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                                       if all(t in kept for t in _merge_tokens(m, spec["model"]))]
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


def _merge_tokens(merge: str | list[str], model: dict[str, Any]) -> tuple[str, str, str]:
    """A BPE merge's (left, right, result) tokens; ``merge`` is ``"a b"`` or ``["a", "b"]``."""
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    prefix = model.get("continuing_subword_prefix") or ""
    return left, right, left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)


def _single_char_pieces(tok: Any, model: dict[str, Any], pre_tokenizer: str | None) -> set[str]:
    """The vocabulary's one-character pieces that a word can need (``model``: tokenizer.json's model section).

    WordPiece and BPE vocabularies are trained up from their one-character alphabet (byte-level BPE: the 256
    byte symbols), so with these kept every word the full vocabulary segments stays segmentable, and no
    [UNK] appears where the full vocabulary had none: WordPiece's greedy longest match always matches at least
    one character, and BPE starts from characters. Continuation pieces ("##?") of characters that always end
    up a word of their own (BertPreTokenizer splits off punctuation, BertNormalizer spaces out CJK characters)
    can never match and are left out.
    """
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""

    def body(piece: str) -> str:
        piece = piece[len(prefix):] if prefix and piece.startswith(prefix) else piece
        return piece[:-len(suffix)] if suffix and piece.endswith(suffix) else piece

    pieces = {piece for piece in model["vocab"] if len(body(piece)) == 1}
    if model["type"] == "WordPiece" and pre_tokenizer == "BertPreTokenizer":
        backend = tok.backend_tokenizer

        def always_alone(char: str) -> bool:  # BertPreTokenizer splits by the character alone, not its neighbours
            text = backend.normalizer.normalize_str(f"a{char}a") if backend.normalizer else f"a{char}a"
            words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
            return char in words and not any(char in w for w in words if w != char)

        pieces = {p for p in pieces if not (p.startswith(prefix) and always_alone(body(p)))}
    return pieces


def _kept_tokens(tok: Any, texts: list[Any]) -> tuple[list[int], int]:
    """Token ids trimming keeps: added and special tokens, the tokens of ``texts`` (strings, or a tagger's
    sentences as word lists), the one-character pieces (``_single_char_pieces``) and, for BPE, the merge parts
    of all of those, so that ``texts`` segment exactly as before. Returns (sorted ids, number of one-character
    pieces)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] not in ("WordPiece", "BPE"):
        raise ValueError(f"vocabulary trimming supports WordPiece/BPE tokenizers, not {model['type']}")
    vocab = model["vocab"]
    singles = _single_char_pieces(tok, model, (spec.get("pre_tokenizer") or {}).get("type"))
    keep = set(tok.all_special_ids) | {added["id"] for added in spec.get("added_tokens", [])}
    keep |= {vocab[p] for p in singles}
    words = bool(texts) and not isinstance(texts[0], str)  # a tagger's sentences: pieces as its windows make them
    for i in range(0, len(texts), 1024):
        chunk = [list(t) for t in texts[i:i + 1024]] if words else texts[i:i + 1024]
        for ids in tok(chunk, truncation=False, is_split_into_words=words)["input_ids"]:
            keep.update(ids)
    # BPE reaches a token through the merge that made it: keep both parts, recursively.
    parts: dict[str, list[str]] = {}
    for merge in model.get("merges") or []:
        left, right, result = _merge_tokens(merge, model)
        parts.setdefault(result, []).extend((left, right))
    by_id = {i: t for t, i in vocab.items()}
    todo = [by_id[i] for i in keep if i in by_id]
    while todo:
        for part in parts.get(todo.pop(), []):
            if vocab[part] not in keep:
                keep.add(vocab[part])
                todo.append(part)
    return sorted(keep), len(singles)


def trim_vocab(cand: Candidate, ctx: Context) -> Candidate:
    """Keeps the embedding rows of the tokens seen in the train texts, the special tokens and every
    one-character piece; remaps the tokenizer.

    WordPiece/BPE match greedily against the vocabulary, so on text whose tokens are all kept the new
    tokenizer produces the same pieces (renumbered) and the model gives identical logits. On other text a
    word may split into more pieces, but never into [UNK] where the full vocabulary had none.
    """
    import torch

    tok = cand.tokenizer
    keep, singles = _kept_tokens(tok, ctx.train_texts)
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
        {"method": "trim_vocab", "kept_tokens": len(keep), "original_tokens": len(tok), "single_char_pieces": singles}])


def quantize(cand: Candidate, ctx: Context, *, backend: str = "onnx-int8") -> Candidate:
    """Marks the candidate for int8 export: PyTorch dynamic int8, or ONNX Runtime dynamic int8 on the fused graph
    (``onnx-int8``) or on the plain export (``onnx-int8-unfused``, the one-step baseline)."""
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


def save_candidate(cand: Candidate, out: Path, max_length: int) -> Path:
    """Writes the candidate as an artifact the jobs/ loader reads; returns the weight file."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model = cand.model.eval()
    cand.tokenizer.save_pretrained(out)
    shapes = layer_shapes(model)
    config = model.config
    config.architectures = [type(model).__name__]  # what loaders read to tell a tagger from a classifier
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
    else:  # ONNX: the graph (fused or not) and its quantization go into the info (tuning/onnx_export.py)
        config.save_pretrained(out)
        info.update(write_onnx(model, cand.tokenizer, out, cand.int8_backend))
    info["files"] = file_records(out)  # checked at every load (jobs.modeling.check_model_folder)
    write_json(out / MODEL_INFO, info)
    return out / info["weights"]
