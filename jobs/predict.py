"""Predict stage: batch inference over a CSV/TSV/JSONL/parquet file through Ray Data.

    slimray predict --model runs/b77/ft --input new_messages.csv --output predictions.parquet

The output keeps every input column and adds ``label`` (the predicted name) and ``score`` (its
probability); an entity tagger's output adds ``entities`` instead: per row, ``{start, end, type, text,
score}`` with character offsets into the text (``jobs.tagging.char_spans``). Model replicas are Ray Data
actors (``--replicas``), each with ``--cpus-per-replica`` threads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from jobs.config import StrictModel, run_cli
from jobs.errors import InputError

log = logging.getLogger("slimray.predict")


class PredictConfig(StrictModel):
    """Label every text of a file (or tag its entities) with a fine-tuned model, through Ray Data."""

    model: Path = Field(description="Model artifact folder")
    input: Path = Field(description="CSV/TSV/JSONL/parquet file with a text column")
    output: Path = Field(description="Output file (.parquet, .csv or .jsonl)")
    text_column: str | None = Field(default=None, description="Text column (default: guessed from common names)")
    batch_size: int = Field(default=64, ge=1, description="Texts per forward pass")
    replicas: int = Field(default=1, ge=1, description="Model replicas (Ray Data actors)")
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs per replica (torch threads = floor)")
    overwrite: bool = Field(default=False, description="Replace an existing output file")


class Predictor:
    """One model replica: loads the artifact once, labels batches of texts."""

    def __init__(self, model_dir: str, text_column: str, threads: int):
        from jobs.inference import load_inference_model

        self.model = load_inference_model(model_dir, threads=threads)
        self.names = np.array(self.model.labels)
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from jobs.inference import softmax

        texts = ["" if t is None else str(t) for t in batch[self.text_column]]
        if self.model.kind == "tagging":
            return self.tag(batch, texts)
        probs = softmax(self.model.logits(texts, batch_size=len(texts), by_length=True))
        best = probs.argmax(-1)
        batch["label"] = self.names[best]
        batch["score"] = probs[np.arange(len(best)), best].astype(np.float32)
        return batch

    def tag(self, batch: dict[str, np.ndarray], texts: list[str]) -> dict[str, np.ndarray]:
        entities = np.empty(len(texts), dtype=object)  # filled one by one: numpy would nest equal-length lists
        for i, found in enumerate(self.model.entities(texts, batch_size=len(texts))):
            entities[i] = found
        batch["entities"] = entities
        return batch


def write_table(table: pa.Table, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    elif suffix == ".jsonl":
        import json

        with open(path, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    else:
        raise InputError(f"output {str(path)!r}: unsupported format {suffix!r}; use .parquet, .csv or .jsonl")


def check_inputs(cfg: PredictConfig) -> tuple[Path, pa.Table, str]:
    """The output (new, or --overwrite; a known format), the model folder (nothing deserialised yet), the
    input file read and its text column found; returns the output path, the input table and the column."""
    from jobs.modeling import check_model_folder
    from jobs.prepare import pick_column
    from jobs.sources import read_table
    from jobs.tasks import TEXT_COLUMN_GUESSES

    output = Path(cfg.output).expanduser().resolve()
    if output.exists() and not cfg.overwrite:
        raise InputError(f"output {str(output)!r} already exists; pass --overwrite to replace it")
    if output.suffix.lower() not in (".parquet", ".csv", ".jsonl"):
        raise InputError(f"output {str(output)!r}: unsupported format; use .parquet, .csv or .jsonl")
    model = Path(cfg.model).expanduser()
    if not model.is_dir():
        raise InputError(f"model folder {str(cfg.model)!r} does not exist")
    check_model_folder(model)
    table = read_table(Path(cfg.input))
    return output, table, pick_column(table, cfg.text_column, TEXT_COLUMN_GUESSES, "text", str(cfg.input))


def dry_run(cfg: PredictConfig) -> str:
    output, table, column = check_inputs(cfg)
    return (f"would label {table.num_rows} rows of column {column!r} with {cfg.model} on {cfg.replicas} replicas "
            f"into {output}")


def main(cfg: PredictConfig) -> Path:
    import ray.data

    from cluster.ray_env import connect
    from jobs.inference import load_inference_model

    output, table, text_column = check_inputs(cfg)
    load_inference_model(cfg.model, script=False)  # fail on weights that do not load before starting Ray

    connect()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output rows match input rows
    ds = ray.data.from_arrow(table).map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": str(Path(cfg.model).resolve()), "text_column": text_column,
                               "threads": max(1, int(cfg.cpus_per_replica))},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
        num_cpus=cfg.cpus_per_replica,
    )
    result = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    tmp = output.parent / f".{output.name}.partial"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_table(result, tmp.with_suffix(tmp.suffix + output.suffix))
    tmp.with_suffix(tmp.suffix + output.suffix).replace(output)
    if "entities" in result.column_names:
        from collections import Counter

        kinds = Counter(e["type"] for row in result.column("entities").to_pylist() for e in row or [])
        log.info("tagged %d rows into %s; entities %s", result.num_rows, output, dict(kinds.most_common()))
        return output
    counts = dict(zip(*np.unique(result.column("label").to_numpy(zero_copy_only=False), return_counts=True)))
    log.info("labelled %d rows into %s; top labels %s", result.num_rows, output,
             dict(sorted(counts.items(), key=lambda kv: -kv[1])[:5]))
    return output


def cli(argv: list[str] | None = None) -> None:
    run_cli(PredictConfig, main, argv, prog="slimray predict", check=dry_run)


if __name__ == "__main__":
    cli()
