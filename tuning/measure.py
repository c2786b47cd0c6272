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
from typing import Any, Sequence

import numpy as np

from jobs.inference import InferenceModel, load_inference_model
from jobs.tasks import accuracy_macro_f1, tagging_metrics

WEIGHT_FILES = ("model.safetensors", "model_int8.pt", "model.onnx", "pytorch_model.bin")


def weight_bytes(model_dir: Path) -> int:
    """Bytes of an artifact's weight files (tokenizer and config not counted)."""
    return sum((Path(model_dir) / f).stat().st_size for f in WEIGHT_FILES if (Path(model_dir) / f).is_file())


def latency_ms(model: InferenceModel, texts: Sequence[str], batch_size: int, warmup: int = 3,
               repeats: int = 5, max_batches: int = 20) -> float:
    """Median milliseconds per batch of ``batch_size`` over repeated passes through pre-tokenized batches."""
    batches = [model.encode(texts[i:i + batch_size]) for i in range(0, len(texts) - batch_size + 1, batch_size)]
    batches = batches[:max_batches]
    if not batches:
        raise ValueError(f"need at least {batch_size} texts to time batch {batch_size}, got {len(texts)}")
    for _ in range(warmup):
        model.forward(batches[0])
    per_pass = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for batch in batches:
            model.forward(batch)
        per_pass.append((time.perf_counter() - t0) / len(batches))
    return 1000 * statistics.median(per_pass)


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
            repeats: int = 5) -> dict[str, Any]:
    """Accuracy/macro-F1 on each eval set, batch-1 and batch-32 latency, and size of one artifact."""
    model = load_inference_model(model_dir, threads=threads)
    out: dict[str, Any] = {
        "latency_ms_b1": latency_ms(model, latency_texts, 1, repeats=repeats),
        "latency_ms_b32": latency_ms(model, latency_texts, 32, repeats=repeats, max_batches=4),
        "size_mb": weight_bytes(model_dir) / 1e6,
        "backend": model.backend,
        "metric": metric_name(model),
    }
    for name, (texts, labels) in (eval_sets or {}).items():
        scores = accuracy_f1(model, texts, labels)
        out[f"{name}_accuracy"], out[f"{name}_macro_f1"] = scores["accuracy"], scores["macro_f1"]
    return out
