"""Evaluate stage: score a model artifact on a prepared split and print a classification report.

    slimray evaluate --model runs/b77/ft --data runs/b77/data --split test --out runs/b77/eval

Writes ``metrics.json`` into ``--out`` (never into the model's own folder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cluster.storage import canonical, local_copy
from jobs.artifacts import atomic_dir, check_can_write, manifest, write_json
from jobs.config import Location, StrictModel, run_cli
from jobs.errors import InputError
from jobs.inference import load_inference_model
from jobs.prepare import load_prepared, read_split
from jobs.tasks import get_task

log = logging.getLogger("slimray.evaluate")


class EvaluateConfig(StrictModel):
    """Score a fine-tuned model on a prepared split; print a classification report."""

    model: Location = Field(description="Model artifact folder (fine-tuned or compressed): a path or a storage URI")
    data: Location = Field(description="Prepared data folder: a path or a storage URI")
    split: Literal["train", "validation", "test"] = Field(default="test", description="Split to score")
    out: Location | None = Field(default=None, description="Folder (path or storage URI) for metrics.json "
                                 "(default: print only)")
    batch_size: int = Field(default=64, ge=1, description="Texts per forward pass")
    threads: int | None = Field(default=None, ge=1, description="torch threads (default: torch's choice)")
    overwrite: bool = Field(default=False, description="Replace an existing --out folder")


def evaluate(model_dir: Path, data_dir: Path, split: str, batch_size: int = 64) -> tuple[dict, str]:
    """Returns (metrics, printable classification report)."""
    from sklearn.metrics import classification_report

    info = load_prepared(data_dir)
    task = get_task(info["task"])
    model = load_inference_model(model_dir, script=False)  # batches of 64: no trace to take and check
    if (model.kind == "tagging") != (task.kind == "tagging"):
        raise InputError(f"{model_dir} is a {'tagger' if model.kind == 'tagging' else 'text classifier'} but "
                         f"{data_dir} is prepared for task {task.name!r}")
    if task.kind == "tagging":
        return evaluate_tagger(model, data_dir, split, batch_size, task)
    rows = read_split(data_dir, split)
    names = model.labels
    unknown = sorted(set(rows["label"]) - set(names))
    if unknown:
        raise InputError(f"{split} split has labels the model does not know: {unknown[:5]}")
    name_to_id = {n: i for i, n in enumerate(names)}
    y_true = np.array([name_to_id[n] for n in rows["label"]])
    y_pred = model.logits(rows["text"], batch_size, by_length=True).argmax(-1)
    metrics = {"split": split, **task.metrics(y_true, y_pred, names)}
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    report = classification_report(y_true, y_pred, labels=present, target_names=[names[i] for i in present],
                                   digits=4, zero_division=0)
    return metrics, report


def evaluate_tagger(model: Any, data_dir: Path, split: str, batch_size: int, task: Any) -> tuple[dict, str]:
    """``evaluate`` for an entity tagger: entity-level metrics and seqeval's report (default and strict)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    rows = read_split(data_dir, split, ("tokens", "tags"))
    unknown = sorted({t for tags in rows["tags"] for t in tags} - set(model.labels))
    if unknown:
        raise InputError(f"{split} split has tags the model does not know: {unknown[:5]}")
    ids = {n: i for i, n in enumerate(model.labels)}
    pred = [w.argmax(-1).tolist() for w in model.tag(rows["tokens"], batch_size)]
    metrics = {"split": split, **task.metrics([[ids[t] for t in tags] for tags in rows["tags"]], pred, model.labels)}
    pred_tags = [[model.labels[i] for i in row] for row in pred]
    report = (classification_report(rows["tags"], pred_tags, digits=4, zero_division=0)
              + "\nstrict (IOB2) mode:\n"
              + classification_report(rows["tags"], pred_tags, digits=4, zero_division=0, mode="strict", scheme=IOB2))
    return metrics, report


def check_inputs(cfg: EvaluateConfig) -> tuple[Path, Path, dict[str, Any]]:
    """The output, the model folder (``check_model_folder``: nothing deserialised yet) and the data's split,
    checked; returns local copies of the model and data folders and the model's slimray_model.json."""
    from jobs.modeling import check_model_folder

    if cfg.out is not None and canonical(cfg.out) == canonical(cfg.model):
        raise InputError("--out must not be the model folder: its metrics.json belongs to the model")
    if cfg.out is not None:
        check_can_write(cfg.out, cfg.overwrite)
    model_dir, data_dir = local_copy(cfg.model), local_copy(cfg.data)
    if not Path(model_dir).is_dir():
        raise InputError(f"model folder {str(cfg.model)!r} does not exist")
    info = check_model_folder(Path(model_dir))
    load_prepared(Path(data_dir))
    if not (Path(data_dir) / f"{cfg.split}.parquet").is_file():
        raise InputError(f"{data_dir} has no {cfg.split}.parquet (split {cfg.split!r})")
    return Path(model_dir), Path(data_dir), info


def dry_run(cfg: EvaluateConfig) -> str:
    model_dir, data_dir, info = check_inputs(cfg)
    return f"would evaluate {model_dir} ({info.get('backend', 'torch')}) on {data_dir / (cfg.split + '.parquet')}"


def main(cfg: EvaluateConfig) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir, data_dir, _ = check_inputs(cfg)
    metrics, report = evaluate(model_dir, data_dir, cfg.split, cfg.batch_size)
    print(report)
    if "entity_f1" in metrics:
        print(f"{cfg.split}: entity F1 {metrics['entity_f1']:.4f} (strict {metrics['strict']['entity_f1']:.4f})  "
              f"precision {metrics['entity_precision']:.4f}  recall {metrics['entity_recall']:.4f}  "
              f"macro-F1 {metrics['macro_f1']:.4f}  sentences {metrics['n']}")
    else:
        print(f"{cfg.split}: accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  n {metrics['n']}")
    if cfg.out is not None:
        with atomic_dir(cfg.out, cfg.overwrite) as staging:
            write_json(staging / "metrics.json", metrics)
            write_json(staging / "manifest.json", manifest("evaluate", cfg.model_dump(mode="json"),
                                                           model=str(cfg.model), data=str(cfg.data)))
    return metrics


def cli(argv: list[str] | None = None) -> None:
    run_cli(EvaluateConfig, main, argv, prog="slimray evaluate", check=dry_run)


if __name__ == "__main__":
    cli()
