"""Hand-off calibration: the confidence below which an assistant passes a message to a human.

``calibrate_handoff(model, data_dir)`` scores the validation split and picks the lowest threshold at which
the answers given automatically (confidence >= threshold) reach a target precision. Each model version
stores its own result as ``calibration.json`` beside its weights (``write_calibration``), so fine-tuning,
compression and serving agree on it; serving reads it back with ``read_calibration``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from jobs.artifacts import file_sha256, now_iso, read_json, write_json
from jobs.errors import InputError

CALIBRATION_FILE = "calibration.json"


class Scorer(Protocol):
    """What calibration needs from a model: ``jobs.inference.InferenceModel`` is one."""

    labels: list[str]

    def logits(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> dict[str, Any]:
    """Lowest threshold t such that the predictions with confidence >= t are right at least
    ``target_precision`` of the time. Returns threshold, precision and coverage (share answered) at t.

    With no such t (even the single most confident prediction is wrong), t is 1.0: everything below
    certainty goes to a human, and precision is None.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, ok = confidence[order], correct[order].astype(np.float64)
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)  # precision of the top-(i+1) most confident
    # A threshold equal to conf[i] answers every prediction tied with it too: only the last of a run of
    # ties is a real cut.
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    good = np.flatnonzero(last_of_tie & (precision >= target_precision))
    if len(good) == 0:
        return {"threshold": 1.0, "precision": None, "coverage": 0.0}
    i = good[-1]  # the most answers, i.e. the lowest threshold
    threshold = 0.0 if i == len(conf) - 1 else float(conf[i])
    return {"threshold": threshold, "precision": float(precision[i]), "coverage": float((i + 1) / len(conf))}


def calibrate_handoff(model: Scorer, data_dir: str | Path, target_precision: float = 0.9,
                      split: str = "validation", batch_size: int = 64) -> dict[str, Any]:
    """Scores ``split`` of a prepared data folder and chooses the hand-off threshold for this model.

    Args:
        model: a loaded model (``load_inference_model``); its label names must cover the split's labels.
        data_dir: prepared data folder (``slimray prepare`` output) holding ``<split>.parquet``.
        target_precision: precision (fraction) the automatic answers must reach, e.g. 0.9.
        split: split to calibrate on; never the test split, which stays for reporting.
        batch_size: texts per forward pass.

    Returns:
        ``threshold`` (answer automatically when the top probability is >= it), ``precision`` and
        ``coverage`` (fraction of messages answered automatically) on the split at that threshold,
        the accuracy with no hand-off, ``n`` and the data's lineage. The same model and data give the same
        dict (no timestamp), so a Serve app built twice from them does not restart its replicas.
    """
    from jobs.inference import softmax
    from jobs.prepare import read_split

    if not 0 < target_precision <= 1:
        raise InputError(f"target_precision must be in (0, 1], got {target_precision!r}")
    data_dir = Path(data_dir).expanduser()
    rows = read_split(data_dir, split)
    if not rows["text"]:
        raise InputError(f"{str(data_dir)!r}: the {split!r} split is empty: nothing to calibrate on")
    name_to_id = {n: i for i, n in enumerate(model.labels)}
    unknown = sorted(set(rows["label"]) - set(name_to_id))
    if unknown:
        raise InputError(f"{split} split has labels the model does not know: {unknown[:5]}")

    probs = softmax(model.logits(rows["text"], batch_size, by_length=True))
    y_true = np.array([name_to_id[n] for n in rows["label"]])
    correct = probs.argmax(-1) == y_true
    chosen = choose_threshold(probs.max(-1), correct, target_precision)
    manifest = data_dir / "manifest.json"
    return {
        **chosen,
        "target_precision": target_precision,
        "accuracy": float(correct.mean()),
        "n": len(rows["text"]),
        "split": split,
        "data": str(data_dir.resolve()),
        "data_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
    }


def write_calibration(model_dir: str | Path, calibration: dict[str, Any]) -> Path:
    """Stores a calibration beside the model's weights (atomically: a reader never sees half a file)."""
    model_dir = Path(model_dir).expanduser()
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f".{CALIBRATION_FILE}.")
    os.close(fd)
    write_json(Path(tmp), {**calibration, "created_at": now_iso()})
    target = model_dir / CALIBRATION_FILE
    os.replace(tmp, target)
    return target


def read_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The calibration stored with a model version, or None if it has none."""
    path = Path(model_dir).expanduser() / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    threshold = data.get("threshold") if isinstance(data, dict) else None
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise InputError(f"{path}: 'threshold' must be a number in [0, 1], got {threshold!r}")
    return data
