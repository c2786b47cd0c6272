"""``slimray submit STAGE ...`` and ``slimray jobs list|status|logs|stop``: stages as Ray jobs
(``cluster/submit.py`` does the work). slimray's own options come before STAGE; everything after STAGE is
the stage's, parsed here into its config (so a bad value fails before anything is uploaded) and handed to
the job as the resolved values, with every location checked on the parsed config.
"""

from __future__ import annotations

import sys

from pydantic import Field

from jobs.config import (ConfigError, StrictModel, as_arguments, exit_with_error, location_fields,
                         parse_command_line)

# Stages that keep Ray Train / Tune state under SLIMRAY_STORAGE_ROOT (resumable runs and searches).
STORAGE_STAGES = ("finetune", "compress")
ADDRESS_HELP = ("Ray dashboard URL (http://HEAD:8265), or a cluster address Ray resolves to it "
                "(default: $RAY_ADDRESS, else $SLIMRAY_RAY_ADDRESS, else http://127.0.0.1:8265)")
JOB_ID_HELP = "Submission id printed by `slimray submit`"


class SubmitArgs(StrictModel):
    """Run a stage as a Ray job on a running cluster, in a copy of this project: prints the job id, follows its
    output, exits with its status (0 SUCCEEDED, 1 FAILED or STOPPED, 2 not submitted).

    slimray's options come before STAGE; everything after STAGE goes to the stage (`slimray submit STAGE
    --help` lists its options). Every location must be an absolute path or a storage URI, since the job's
    folder is a temporary copy of the project."""

    stage: str = Field(description="Stage to run (prepare, finetune, evaluate, predict, compress, serve); "
                       "its arguments follow it", json_schema_extra={"positional": True})
    stage_args: list[str] = Field(default_factory=list, description="The stage's arguments",
                                  json_schema_extra={"positional": "remainder"})
    address: str | None = Field(default=None, description=ADDRESS_HELP)
    wait: bool = Field(default=True, description="Follow the job until it ends; --no-wait prints the job id "
                       "and returns")
    resolve_paths: bool = Field(default=False, description="Make relative paths absolute against the current "
                                "folder (for a cluster that shares this filesystem)")
    pip: bool = Field(default=False, description="Install slimray's pinned dependencies (constraints.txt, without "
                      "ray and torch) in the job's runtime env; off: the cluster image carries them")


class JobsListArgs(StrictModel):
    """Every job the cluster knows: id, status, start time, command."""

    address: str | None = Field(default=None, description=ADDRESS_HELP)


class JobArgs(StrictModel):
    """One job: its status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""

    job_id: str = Field(description=JOB_ID_HELP, json_schema_extra={"positional": True})
    address: str | None = Field(default=None, description=ADDRESS_HELP)


class JobLogsArgs(JobArgs):
    """A job's output so far (stdout and stderr of the stage and its workers)."""

    follow: bool = Field(default=False, description="Keep printing until the job ends; exit with its status "
                         "(0 SUCCEEDED, 1 FAILED or STOPPED)", json_schema_extra={"short": "-f"})


def _parse(model_cls: type, argv: list[str], prog: str):
    try:
        return parse_command_line(model_cls, argv, prog, config_flags=False).config
    except ConfigError as e:
        exit_with_error(prog, e)


def stage_job_arguments(stage: str, stage_args: list[str], resolve: bool) -> list[str]:
    """The stage's arguments parsed and validated here, locations checked, as the job's command line."""
    from cluster import submit as sub
    from slimray.cli import stage_config_class

    config_cls = stage_config_class(stage)
    parsed = parse_command_line(config_cls, stage_args, f"slimray submit {stage}")
    values = parsed.config.model_dump(mode="json", exclude_unset=True)
    return as_arguments(config_cls, sub.job_locations(values, parsed.sources, location_fields(config_cls),
                                                      resolve=resolve))


def submit_cli(argv: list[str]) -> None:
    from cluster import submit as sub
    from slimray.cli import STAGES

    prog = "slimray submit"
    args = _parse(SubmitArgs, argv, prog)
    if args.stage not in STAGES:
        exit_with_error(prog, ConfigError(f"unknown stage {args.stage!r}; stages: {', '.join(STAGES)}"))
    module = STAGES[args.stage][0]
    if "-h" in args.stage_args or "--help" in args.stage_args:
        __import__(module, fromlist=["cli"]).cli(["--help"])
    try:
        job_args = stage_job_arguments(args.stage, args.stage_args, args.resolve_paths)
        runtime_env = sub.build_runtime_env(sub.job_env_vars(resolve=args.resolve_paths), pip=args.pip)
        client = sub.JobClient(args.address)
        command = sub.entrypoint(module, job_args)
        job_id = client.submit(command, runtime_env, sub.submission_id(args.stage), {"slimray_stage": args.stage})
        print(job_id, flush=True)
        print(f"{prog}: {job_id} submitted to {client.address}: {command}", file=sys.stderr)
        if args.stage in STORAGE_STAGES and "SLIMRAY_STORAGE_ROOT" not in runtime_env["env_vars"]:
            print(f"{prog}: note: SLIMRAY_STORAGE_ROOT is not set, so the job keeps its checkpoints in its "
                  "temporary folder and cannot resume; set it to shared storage (absolute path or URI)",
                  file=sys.stderr)
        if not args.wait:
            print(f"{prog}: follow it with `slimray jobs logs {job_id} --follow`", file=sys.stderr)
            return
        details = client.follow(job_id)
    except (sub.SubmitError, ConfigError) as e:
        exit_with_error(prog, e)
    except KeyboardInterrupt:
        print(f"\n{prog}: stopped following; {job_id} keeps running (`slimray jobs stop {job_id}` stops it)",
              file=sys.stderr)
        raise SystemExit(130) from None
    print(f"{prog}: {job_id} {details.status}" + (f": {details.message}" if details.message else ""),
          file=sys.stderr)
    raise SystemExit(sub.exit_status(details.status))


def jobs_cli(argv: list[str]) -> None:
    from slimray.cli import dispatch

    dispatch("slimray jobs", {
        "list": ("slimray.submit:jobs_list", JobsListArgs.__doc__.splitlines()[0]),
        "status": ("slimray.submit:jobs_status", JobArgs.__doc__.splitlines()[0]),
        "logs": ("slimray.submit:jobs_logs", JobLogsArgs.__doc__.splitlines()[0]),
        "stop": ("slimray.submit:jobs_stop", "Ask a job to stop (SIGTERM to the stage, then SIGKILL after Ray's "
                 "grace period)."),
    }, argv)


def jobs_list(argv: list[str]) -> None:
    from cluster import submit as sub

    args = _parse(JobsListArgs, argv, "slimray jobs list")
    try:
        print(sub.format_jobs(sub.JobClient(args.address).list_jobs()))
    except sub.SubmitError as e:
        exit_with_error("slimray jobs list", e)


def jobs_status(argv: list[str]) -> None:
    from cluster import submit as sub

    args = _parse(JobArgs, argv, "slimray jobs status")
    try:
        details = sub.JobClient(args.address).info(args.job_id)
    except sub.SubmitError as e:
        exit_with_error("slimray jobs status", e)
    print(f"{args.job_id}: {details.status}" + (f" ({details.message})" if details.message else ""))


def jobs_logs(argv: list[str]) -> None:
    from cluster import submit as sub

    prog = "slimray jobs logs"
    args = _parse(JobLogsArgs, argv, prog)
    try:
        client = sub.JobClient(args.address)
        if not args.follow:
            sys.stdout.write(client.logs(args.job_id))
            return
        details = client.follow(args.job_id)
    except sub.SubmitError as e:
        exit_with_error(prog, e)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(f"{prog}: {args.job_id} {details.status}", file=sys.stderr)
    raise SystemExit(sub.exit_status(details.status))


def jobs_stop(argv: list[str]) -> None:
    from cluster import submit as sub

    args = _parse(JobArgs, argv, "slimray jobs stop")
    try:
        client = sub.JobClient(args.address)
        stopped = client.stop(args.job_id)
        status = client.info(args.job_id).status
    except sub.SubmitError as e:
        exit_with_error("slimray jobs stop", e)
    print(f"{args.job_id}: stop requested ({status})" if stopped else f"{args.job_id}: was not running ({status})")
