"""``slimray``: one command per stage. Each stage parses its own flags from its typed config, so
``slimray finetune --help`` lists every field with its description and default, and
``python -m jobs.finetune`` takes exactly the same arguments.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="Fine-tune transformers on Ray (DeepSpeed ZeRO), compress them, serve them.",
    no_args_is_help=True,
    add_completion=False,
)

# command name -> (module with cli(argv), one-line help)
STAGES = {
    "prepare": ("jobs.prepare", "Clean, de-duplicate, label-map and split labelled text into parquet."),
    "finetune": ("jobs.finetune", "Fine-tune a pretrained encoder with Ray Train + DeepSpeed ZeRO."),
    "evaluate": ("jobs.evaluate", "Score a model artifact on a prepared split; print a classification report."),
    "predict": ("jobs.predict", "Label every text of a file with a model, through Ray Data."),
    "compress": ("tuning.compress", "Search distillation/pruning/trimming/int8 with Ray Tune; choose on the Pareto front."),
    "serve": ("serve_app.run", "Serve a model over HTTP: FastAPI assistant -> batched, autoscaling Ray Serve replicas."),
}


def _add_stage(name: str, module: str, help_text: str) -> None:
    @app.command(
        name=name,
        help=f"{help_text} Run `slimray {name} --help` for its options.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    def _command(ctx: typer.Context) -> None:
        importlib.import_module(module).cli(list(ctx.args))


for _name, (_module, _help) in STAGES.items():
    _add_stage(_name, _module, _help)
