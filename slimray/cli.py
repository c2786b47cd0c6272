"""``slimray``: one command per stage, plus ``run``, ``submit`` and ``jobs``. Every command parses its
arguments the same way, from its typed config (``jobs.config``): ``slimray finetune --help`` lists every
field with its description and default, and ``python -m jobs.finetune`` takes exactly the same arguments.
"""

from __future__ import annotations

import importlib
import sys

from jobs.config import ConfigError, exit_with_error

# Stages: name -> (module with cli(argv) and main(cfg), its config class, one-line help)
STAGES = {
    "prepare": ("jobs.prepare", "PrepareConfig",
                "Clean, de-duplicate, label-map and split labelled text into parquet."),
    "finetune": ("jobs.finetune", "FinetuneConfig", "Fine-tune a pretrained encoder (or, with --task generation, a "
                 "causal LM) with Ray Train + DeepSpeed ZeRO."),
    "index": ("jobs.knowledge", "IndexConfig",
              "Split documents into passages, embed them, and write a Qdrant knowledge index (updates in place)."),
    "evaluate": ("jobs.evaluate", "EvaluateConfig",
                 "Score a model artifact on a prepared split; print a classification report."),
    "predict": ("jobs.predict", "PredictConfig", "Label every text of a file with a model, through Ray Data."),
    "compress": ("tuning.compress", "CompressConfig",
                 "Search distillation/pruning/trimming/int8 with Ray Tune; choose on the Pareto front."),
    "serve": ("serve_app.run", "ServeConfig",
              "Serve a model over HTTP: FastAPI assistant -> batched, autoscaling Ray Serve replicas."),
}

# Every command: name -> ("module:function" taking argv, one-line help)
COMMANDS = {
    **{name: (f"{module}:cli", help_text) for name, (module, _, help_text) in STAGES.items()},
    "run": ("slimray.run:cli", "Run the whole pipeline: prepare -> fine-tune -> compression search -> serving "
            "smoke test -> report.md."),
    "submit": ("slimray.submit:submit_cli", "Run a stage as a Ray job on a running cluster and follow it."),
    "jobs": ("slimray.submit:jobs_cli", "List, inspect, follow and stop slimray jobs on a Ray cluster."),
    "monitor": ("slimray.monitor:cli", "The sentiment monitor's batch side: ingest a file of texts, draw the "
                "trends and alerts."),
}


def stage_config_class(stage: str) -> type:
    module, class_name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), class_name)


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> None:
    """Runs ``commands[argv[0]]`` with the rest of ``argv``; ``--help`` (or nothing) lists the commands."""
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        print(f"usage: {prog} COMMAND [ARGS]...\n\ncommands:")
        for name, (_, help_text) in commands.items():
            print(f"  {name:<{width}}  {help_text}")
        print(f"\n`{prog} COMMAND --help` lists a command's options.")
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in commands:
        exit_with_error(prog, ConfigError(f"unknown command {name!r}; commands: {', '.join(commands)}"))
    module, function = commands[name][0].split(":")
    getattr(importlib.import_module(module), function)(rest)


def main(argv: list[str] | None = None) -> None:
    dispatch("slimray", COMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
