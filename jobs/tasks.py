"""The task registry: everything task-specific (columns, labels, model head, metrics) in one place per task.

A task is a plain record of functions; add one by writing its functions and a line in ``TASKS``.
Sequence tasks (intent, sentiment) share the sequence-classification head and metrics; they differ in how
raw label values become label names. The tagging task (ner) labels every word (``jobs.tagging``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from jobs.errors import InputError

TEXT_COLUMN_GUESSES = ("text", "sentence", "utterance", "query", "content", "message")
LABEL_COLUMN_GUESSES = ("label", "labels", "category", "intent", "class", "sentiment", "rating", "score")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    head: str  # transformers Auto class name of the model head
    label_column_guesses: tuple[str, ...]
    to_label_names: Callable[[Sequence[Any], str], list[str]]  # (raw values, column name) -> label names
    metrics: Callable[[Any, Any, list[str]], dict[str, Any]]  # (true ids, predicted ids, label names)
    kind: str = "sequence"  # "sequence": one label per text; "tagging": one tag per word
    score: str = "accuracy"  # the metrics key reported first (logs, history, the run's summary)
    second: str = "macro_f1"  # the metrics key reported beside it


def categorical_labels(values: Sequence[Any], column: str) -> list[str]:
    """Labels that are already names (or ids): kept as text, missing ones rejected."""
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
            raise InputError(f"label column {column!r} is empty in row {i}")
        out.append(str(v).strip())
    return out


def sentiment_labels(values: Sequence[Any], column: str) -> list[str]:
    """Names pass through; numeric ratings become negative / neutral / positive.

    The neutral band is chosen from the data: ratings within 10% of the observed range around the midpoint
    of the scale's observed extremes rounded to a whole number (0 for a −4…+4 scale, 3 for 1…5).
    """
    try:
        ratings = np.asarray([float(v) for v in values])
    except (TypeError, ValueError):
        return categorical_labels(values, column)
    if np.isnan(ratings).any():
        raise InputError(f"rating column {column!r} has {int(np.isnan(ratings).sum())} missing values")
    lo, hi = float(ratings.min()), float(ratings.max())
    mid = float(round((lo + hi) / 2))
    band = 0.1 * (hi - lo)
    return ["positive" if r > mid + band else "negative" if r < mid - band else "neutral" for r in ratings]


def accuracy_macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 as fractions: the one definition every stage and the search use.

    Macro-F1 averages over the classes present in ``y_true``, so a tiny slice is not penalised for
    classes it does not hold.
    """
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true.tolist())), average="macro",
                                       zero_division=0))}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 as fractions, plus per-class precision/recall/F1/support."""
    from sklearn.metrics import precision_recall_fscore_support

    ids = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        **accuracy_macro_f1(y_true, y_pred),
        "n": int(len(y_true)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
    }


def tagging_metrics(true_ids: Sequence[Sequence[int]], pred_ids: Sequence[Sequence[int]],
                    tag_names: list[str]) -> dict[str, Any]:
    """Entity-level metrics (``jobs.tagging.entity_metrics``) of per-word tag ids, one list per sentence, and
    the share of words tagged right (``accuracy``: mostly O, so it says little)."""
    from jobs.tagging import entity_metrics

    def names(rows: Sequence[Sequence[int]]) -> list[list[str]]:
        return [[tag_names[int(i)] for i in row] for row in rows]

    words = sum(len(row) for row in true_ids)
    right = sum(int(a == b) for t, p in zip(true_ids, pred_ids) for a, b in zip(t, p))
    return {**entity_metrics(names(true_ids), names(pred_ids)), "accuracy": right / words if words else 0.0,
            "n": len(true_ids)}


TASKS: dict[str, Task] = {
    "intent": Task(
        name="intent",
        description="Intent classification: one label per text (e.g. BANKING77).",
        head="AutoModelForSequenceClassification",
        label_column_guesses=LABEL_COLUMN_GUESSES,
        to_label_names=categorical_labels,
        metrics=classification_metrics,
    ),
    "sentiment": Task(
        name="sentiment",
        description="Sentiment classification: label names, or numeric ratings bucketed into "
        "negative / neutral / positive.",
        head="AutoModelForSequenceClassification",
        label_column_guesses=("sentiment", "rating", "score", "label", "labels"),
        to_label_names=sentiment_labels,
        metrics=classification_metrics,
    ),
    "ner": Task(
        name="ner",
        description="Entity tagging: one IOB2 tag per word (CoNLL token<TAB>tag files, or JSONL tokens + tags).",
        head="AutoModelForTokenClassification",
        label_column_guesses=("tags",),
        to_label_names=categorical_labels,
        metrics=tagging_metrics,
        kind="tagging",
        score="entity_f1",
    ),
    "generation": Task(
        name="generation",
        description="Answer generation: a causal LM fine-tuned on {question, passages, answer} records "
        "(jobs.generation); scored by next-token accuracy and loss on the answers.",
        head="AutoModelForCausalLM",
        label_column_guesses=(),
        to_label_names=categorical_labels,
        metrics=lambda *a: {},  # evaluated by jobs.generation.evaluate_distributed
        kind="generation",
        score="token_accuracy",
        second="loss",
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


def sequence_task(name: str, stage: str) -> Task:
    """The task, which must label whole texts: ``stage`` does not handle tagging data yet."""
    task = get_task(name)
    if task.kind != "sequence":
        raise InputError(f"the data is prepared for task {name!r} ({task.kind}); {stage} handles only "
                         f"{', '.join(n for n, t in TASKS.items() if t.kind == 'sequence')} data so far")
    return task
