"""The measurement protocol every candidate and the base model go through, in the same run.

Quality: the task's score under the keys ``<set>_accuracy`` and ``<set>_macro_f1`` (the search compares and
constrains these): accuracy and macro-F1 of a classifier; entity F1 and macro entity F1 (seqeval's default
mode) of a tagger, whose eval sets are sentences (word lists) with their tags. ``metric`` names which.

Latency: real texts from the test split (a tagger's sentences joined by spaces: the same pieces),
tokenization excluded (inputs are tokenized up front), padding to the longest text in each batch, ``threads`` intra-op threads (1 by default), a warm-up, then the median of
repeated timed passes, at batch 1 and batch 32. Size: bytes of the weight files (MB = 10^6 bytes).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jobs.inference import InferenceModel, load_inference_model
from jobs.tasks import accuracy_macro_f1, tagging_metrics

WEIGHT_FILES = ("model.safetensors", "model_int8.pt", "model.onnx", "pytorch_model.bin")


def weight_bytes(model_dir: Path) -> int:
    """Bytes of an artifact's weight files (tokenizer and config not counted)."""
    return sum((Path(model_dir) / f).stat().st_size for f in WEIGHT_FILES if (Path(model_dir) / f).is_file())


def _batches(model: InferenceModel, texts: Sequence[str], batch_size: int, max_batches: int) -> list[Any]:
    batches = [model.encode(texts[i:i + batch_size]) for i in range(0, len(texts) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"need at least {batch_size} texts to time batch {batch_size}, got {len(texts)}")
    return batches[:max_batches]


def _pass_ms(model: InferenceModel, batches: list[Any]) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        model.forward(batch)
    return 1000 * (time.perf_counter() - t0) / len(batches)


def latency_ms(model: InferenceModel, texts: Sequence[str], batch_size: int, warmup: int = 3,
               repeats: int = 5, max_batches: int = 20) -> float:
    """Median milliseconds per batch of ``batch_size`` over repeated passes through pre-tokenized batches."""
    batches = _batches(model, texts, batch_size, max_batches)
    for _ in range(warmup):
        model.forward(batches[0])
    return statistics.median(_pass_ms(model, batches) for _ in range(repeats))


def latency_side_by_side(model_dirs: Mapping[str, Path | str], texts: Sequence[str], threads: int = 1,
                         rounds: int = 15, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Batch-1 and batch-32 latency of several artifacts measured side by side: each is loaded once, then every
    round times one pass of each (batch 1: up to 50 batches, batch 32: up to 4), visiting them in order in even
    rounds and in reverse in odd ones; each figure is the median over rounds. A change in the machine's speed
    while they are measured (another process, a neighbour on the host) then lands on every model alike,
    instead of on whichever was being timed: measured one after another, two copies of the same ONNX file
    once differed by 1.5x here. Every model is in memory at once."""
    models = {name: load_inference_model(Path(d), threads=threads) for name, d in model_dirs.items()}
    batches = {name: {bs: _batches(m, texts, bs, 50 if bs == 1 else 4) for bs in (1, 32)} for name, m in models.items()}
    for name, m in models.items():
        for _ in range(warmup):
            m.forward(batches[name][1][0])
            m.forward(batches[name][32][0])
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for bs in (1, 32):
                samples[name][bs].append(_pass_ms(models[name], batches[name][bs]))
    return {name: {"latency_ms_b1": statistics.median(s[1]), "latency_ms_b32": statistics.median(s[32])}
            for name, s in samples.items()}


def metric_name(model: InferenceModel) -> str:
    """What ``accuracy_f1``'s "accuracy" is for this model: accuracy, or a tagger's entity F1."""
    return "entity_f1" if model.kind == "tagging" else "accuracy"


def accuracy_f1(model: InferenceModel, texts: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """Accuracy and macro-F1 (``jobs.tasks.accuracy_macro_f1``) of a classifier on texts with label names; of a
    tagger on sentences (word lists) with tag names per word, entity F1 and macro entity F1 in their place."""
    name_to_id = {n: i for i, n in enumerate(model.labels)}
    if model.kind == "tagging":
        true = [[name_to_id[t] for t in tags] for tags in labels]
        pred = [w.argmax(-1) for w in model.tag([list(s) for s in texts])]
        scores = tagging_metrics(true, pred, model.labels)
        return {"accuracy": scores["entity_f1"], "macro_f1": scores["macro_f1"]}
    y_true = np.array([name_to_id[n] for n in labels])
    return accuracy_macro_f1(y_true, model.logits(list(texts), batch_size=64, by_length=True).argmax(-1))


def measure(model_dir: Path, latency_texts: Sequence[str], threads: int = 1,
            eval_sets: dict[str, tuple[Sequence[str], Sequence[str]]] | None = None,
            repeats: int = 5, timed: bool = True) -> dict[str, Any]:
    """Accuracy/macro-F1 on each eval set, batch-1 and batch-32 latency (unless not ``timed``: for models whose
    latency ``latency_side_by_side`` measures: they load eagerly, not as a trace), and size of one artifact."""
    model = load_inference_model(model_dir, threads=threads, script=timed)
    out: dict[str, Any] = {
        "size_mb": weight_bytes(model_dir) / 1e6,
        "backend": model.backend,
        "metric": metric_name(model),
    }
    if timed:
        out["latency_ms_b1"] = latency_ms(model, latency_texts, 1, repeats=repeats)
        out["latency_ms_b32"] = latency_ms(model, latency_texts, 32, repeats=repeats, max_batches=4)
    for name, (texts, labels) in (eval_sets or {}).items():
        scores = accuracy_f1(model, texts, labels)
        out[f"{name}_accuracy"], out[f"{name}_macro_f1"] = scores["accuracy"], scores["macro_f1"]
    return out
