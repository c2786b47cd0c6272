"""``slimray``: one command per stage. Each stage parses its own flags from its typed config, so
``slimray finetune --help`` lists every field with its description and default, and
``python -m jobs.finetune`` takes exactly the same arguments.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

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


@app.command(name="run")
def run_pipeline(
    data: Optional[str] = typer.Option(None, "--data", help="Labelled text: anything `slimray prepare` reads "
                                       "(file, folder of splits, dataset id). Default: the built-in Harbor Lane "
                                       "Bank sample, offline."),
    profile: str = typer.Option("quick", "--profile", help="quick (every stage, small: about 10 min on 2 cores), "
                                "full (the benchmark configuration), or a profile YAML path."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<data name>-<profile>). "
                                       "Running again into the same folder skips the completed stages."),
    serve: bool = typer.Option(False, "--serve", help="Keep the assistant up at the end; prints a curl command."),
    port: int = typer.Option(8000, "--port", help="HTTP port of the smoke test and of --serve."),
    fresh: bool = typer.Option(False, "--fresh", help="Run every stage again, even those complete for these inputs."),
) -> None:
    """Run the whole pipeline: prepare -> fine-tune (DeepSpeed ZeRO) -> compression search -> serving smoke
    test -> report.md with figures."""
    import logging
    import sys

    from jobs.config import ConfigError
    from jobs.errors import InputError
    from slimray.run import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main(data=data, profile_name=profile, out=out, serve=serve, port=port, fresh=fresh)
    except (ConfigError, InputError) as e:
        print(f"slimray run: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None


# ----------------------------------------------------------------------------------------------------------
# Ray job submission (cluster/submit.py). slimray's own options come before STAGE; everything after STAGE
# goes to the stage unchanged, exactly as `slimray STAGE ...` would take it.

ADDRESS_OPTION = typer.Option(
    None, "--address", help="Ray dashboard URL (http://HEAD:8265), or a cluster address Ray resolves to it",
    show_default="$RAY_ADDRESS, else $SLIMRAY_RAY_ADDRESS, else http://127.0.0.1:8265")
# Stages that keep Ray Train / Tune state under SLIMRAY_STORAGE_ROOT (resumable runs and searches).
STORAGE_STAGES = ("finetune", "compress")

jobs_app = typer.Typer(help="List, inspect, follow and stop slimray jobs on a Ray cluster.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _exit_with(prog: str, err: Exception) -> typer.Exit:
    """Prints a SubmitError line by line as `prog: error: ...`; the caller raises the returned Exit(2)."""
    import sys

    for line in str(err).splitlines():
        print(f"{prog}: error: {line}", file=sys.stderr)
    return typer.Exit(2)


@app.command(
    name="submit",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
def submit_stage(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help=f"Stage to run: {', '.join(STAGES)}; its arguments follow it."),
    address: Optional[str] = ADDRESS_OPTION,
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return without following the job."),
    resolve_paths: bool = typer.Option(False, "--resolve-paths", help="Make relative paths absolute against the "
                                       "current folder (for a cluster that shares this filesystem)."),
    pip: bool = typer.Option(False, "--pip", help="Install slimray's pinned dependencies (constraints.txt, without "
                             "ray and torch) in the job's runtime env; off: the cluster image carries them."),
) -> None:
    """Run a stage as a Ray job on a running cluster, in a copy of this project: prints the job id, follows
    its output, exits with its status (0 SUCCEEDED, 1 FAILED or STOPPED, 2 not submitted).

    slimray's options come before STAGE; everything after STAGE goes to the stage (`slimray submit STAGE
    --help` lists its options). Every location must be an absolute path or a storage URI, since the job's
    folder is a temporary copy of the project.
    """
    import sys

    from cluster import submit as sub

    if stage not in STAGES:
        raise _exit_with("slimray submit", sub.SubmitError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}"))
    module = STAGES[stage][0]
    args = list(ctx.args)
    if "-h" in args or "--help" in args:
        importlib.import_module(module).cli(["--help"])
    try:
        args = sub.check_locations(args, sub.stage_config_class(importlib.import_module(module)),
                                   resolve=resolve_paths)
        runtime_env = sub.build_runtime_env(sub.job_env_vars(resolve=resolve_paths), pip=pip)
        client = sub.JobClient(address)
        command = sub.entrypoint(module, args)
        job_id = client.submit(command, runtime_env, sub.submission_id(stage), {"slimray_stage": stage})
        print(job_id, flush=True)
        print(f"slimray submit: {job_id} submitted to {client.address}: {command}", file=sys.stderr)
        if stage in STORAGE_STAGES and "SLIMRAY_STORAGE_ROOT" not in runtime_env["env_vars"]:
            print("slimray submit: note: SLIMRAY_STORAGE_ROOT is not set, so the job keeps its checkpoints in "
                  "its temporary folder and cannot resume; set it to shared storage (absolute path or URI)",
                  file=sys.stderr)
        if no_wait:
            print(f"slimray submit: follow it with `slimray jobs logs {job_id} --follow`", file=sys.stderr)
            return
        details = client.follow(job_id)
    except sub.SubmitError as e:
        raise _exit_with("slimray submit", e) from None
    except KeyboardInterrupt:
        print(f"\nslimray submit: stopped following; {job_id} keeps running "
              f"(`slimray jobs stop {job_id}` stops it)", file=sys.stderr)
        raise typer.Exit(130) from None
    print(f"slimray submit: {job_id} {details.status}" + (f": {details.message}" if details.message else ""),
          file=sys.stderr)
    raise typer.Exit(sub.exit_status(details.status))


@jobs_app.command(name="list")
def jobs_list(address: Optional[str] = ADDRESS_OPTION) -> None:
    """Every job the cluster knows: id, status, start time, command."""
    from cluster import submit as sub

    try:
        print(sub.format_jobs(sub.JobClient(address).list_jobs()))
    except sub.SubmitError as e:
        raise _exit_with("slimray jobs list", e) from None


@jobs_app.command(name="status")
def jobs_status(job_id: str = typer.Argument(..., help="Submission id printed by `slimray submit`"),
                address: Optional[str] = ADDRESS_OPTION) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""
    from cluster import submit as sub

    try:
        details = sub.JobClient(address).info(job_id)
    except sub.SubmitError as e:
        raise _exit_with("slimray jobs status", e) from None
    print(f"{job_id}: {details.status}" + (f" ({details.message})" if details.message else ""))


@jobs_app.command(name="logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Submission id printed by `slimray submit`"),
              follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends; exit with "
                                          "its status (0 SUCCEEDED, 1 FAILED or STOPPED)."),
              address: Optional[str] = ADDRESS_OPTION) -> None:
    """A job's output so far (stdout and stderr of the stage and its workers)."""
    import sys

    from cluster import submit as sub

    try:
        client = sub.JobClient(address)
        if not follow:
            sys.stdout.write(client.logs(job_id))
            return
        details = client.follow(job_id)
    except sub.SubmitError as e:
        raise _exit_with("slimray jobs logs", e) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    print(f"slimray jobs logs: {job_id} {details.status}", file=sys.stderr)
    raise typer.Exit(sub.exit_status(details.status))


@jobs_app.command(name="stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Submission id printed by `slimray submit`"),
              address: Optional[str] = ADDRESS_OPTION) -> None:
    """Ask a job to stop (SIGTERM to the stage, then SIGKILL after Ray's grace period)."""
    from cluster import submit as sub

    try:
        client = sub.JobClient(address)
        stopped = client.stop(job_id)
        status = client.info(job_id).status
    except sub.SubmitError as e:
        raise _exit_with("slimray jobs stop", e) from None
    print(f"{job_id}: stop requested ({status})" if stopped else f"{job_id}: was not running ({status})")
