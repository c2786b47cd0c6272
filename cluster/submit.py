"""Run slimray stages as Ray jobs on a running cluster: submit, follow, list, stop.

    slimray submit --address http://head:8265 finetune --data /shared/b77/data --out /shared/b77/ft
    slimray jobs list|status JOB|logs JOB [--follow]|stop JOB

A job runs ``python -m <stage module> <args>`` on the cluster, in a temporary copy of this project (the
runtime env's ``working_dir``; outputs, environments and weights stay behind, see WORKING_DIR_EXCLUDES).
So every location a job reads or writes must be an absolute path or a storage URI; a relative path is
fine only for an existing input inside the project that travels with the code (``--config
jobs/configs/x.yaml``, ``--source jobs/samples/harbor_bank``). ``job_locations`` enforces this before
anything is uploaded, and ``resolve=True`` (``--resolve-paths``) makes relative paths absolute against
the current folder instead, for a cluster that shares this filesystem.

The client is Ray's ``JobSubmissionClient`` (HTTP to the dashboard, port 8265 by default). With token
authentication (on by default in Ray 2.60) it sends ``Authorization: Bearer <token>``; Ray's own client adds
that header only when ``RAY_AUTH_MODE=token`` is set in this process, so slimray finds the token itself,
where Ray's token loader looks for it: ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token``. Every failure becomes one ``SubmitError`` line; the CLI exits with status 2.

This module knows nothing about stages: the CLI parses the stage's arguments into its config and passes
the values, where each came from, and which fields are locations (``jobs.config.location_fields``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shlex
import socket
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO
from urllib.parse import urlsplit

# The checkout that travels as the job's working_dir (cluster/ sits at its top).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Left out of the job's copy of the project (gitignore syntax, matched at any depth). Ray also applies
# .gitignore; this list stands on its own so that an odd checkout cannot upload gigabytes.
WORKING_DIR_EXCLUDES = [
    # Environments and caches: the cluster brings its own.
    ".venv/", "venv/", ".git/", "__pycache__/", ".pytest_cache/", ".hypothesis/", ".mypy_cache/", ".ruff_cache/",
    ".torch_extensions/", "*.egg-info/", "build/", "dist/",
    # Outputs, data and weights: they reach a job by absolute path or URI, never inside the code package
    # (Ray caps a package at its gRPC message size, 512 MiB).
    "runs/", "*.parquet", "*.arrow", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.gguf",
]

# SLIMRAY_* settings of this machine that must not reach the job: the job joins the cluster it runs on
# (this machine's address for it may not work there), the embedded-cluster size means nothing there, and a
# secret in a runtime env is readable by anyone who can list jobs (set SLIMRAY_API_TOKEN on the cluster instead).
LOCAL_ONLY_SETTINGS = {"SLIMRAY_RAY_ADDRESS", "SLIMRAY_RAY_NUM_CPUS", "SLIMRAY_API_TOKEN"}


class SubmitError(Exception):
    """A submission or job query that cannot go on; the message is one line that says what to change."""


# ----------------------------------------------------------------------------------------------------------
# Where the cluster is and how to authenticate.


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``--address``, else ``RAY_ADDRESS``, else ``SLIMRAY_RAY_ADDRESS``, else the local dashboard.

    An ``http(s)://`` URL names the dashboard; anything else (``host:6379``, ``ray://host:10001``, ``auto``)
    is a cluster address that Ray resolves to its dashboard through the GCS.
    """
    for value in (address, environ.get("RAY_ADDRESS"), environ.get("SLIMRAY_RAY_ADDRESS")):
        if value and value.strip():
            return value.strip().rstrip("/")
    return DEFAULT_ADDRESS


def find_token(environ: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """(token, where it came from), or (None, None): looked up in the order of Ray's token loader.

    ``RAY_AUTH_MODE=disabled`` sends no token at all.
    """
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH names {str(path)!r}, which cannot be read or is empty: "
                              "point it at the file that holds the cluster's token")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast on a dashboard URL nobody answers (Ray's client has no timeout: it would hang)."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https"):
        return  # a cluster address: Ray looks the dashboard up through the GCS
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise SubmitError(_unreachable(address, e)) from None


def _unreachable(address: str, err: BaseException) -> str:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"cannot reach the Ray dashboard at {address} ({reason}): check that the cluster is up, that this "
            "is its dashboard address (http://HEAD:8265) and that this machine can reach it; set it with "
            "--address, RAY_ADDRESS or SLIMRAY_RAY_ADDRESS")


def _auth_failed(address: str, token_source: str | None) -> str:
    if token_source is None:
        return (f"the Ray cluster at {address} requires an auth token and none was found: set RAY_AUTH_TOKEN to the "
                "cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token); "
                "`ray get-auth-token` on the head node prints it")
    return (f"the Ray cluster at {address} rejected the auth token from {token_source}: set it to the cluster's "
            "token; `ray get-auth-token` on the head node prints it")


def _explain(err: Exception, address: str, token_source: str | None, job_id: str | None) -> str | None:
    """One line for what Ray's client raised, or None for an error slimray has no better words for."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    # HTTP 401 (no token) and 403 (wrong token) come as AuthenticationError, which Ray also raises itself when
    # RAY_AUTH_MODE=token is set and it finds no token; the log stream's websocket raises its own error.
    if isinstance(err, AuthenticationError) or (
            isinstance(err, aiohttp.WSServerHandshakeError) and err.status in (401, 403)):
        return _auth_failed(address, token_source)
    if isinstance(err, (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        aiohttp.ClientConnectionError)):
        return _unreachable(address, err)
    text = str(err)
    if job_id and ("status code 404" in text or "does not exist" in text):
        return f"no job {job_id!r} on the cluster at {address}: `slimray jobs list` shows the jobs it knows"
    if isinstance(err, (RuntimeError, ValueError)):  # Ray's "Request failed with status code N: ..."
        return f"the Ray cluster at {address} refused the request: {text.splitlines()[0] if text else err!r}"
    return None


class JobClient:
    """Ray's JobSubmissionClient for one address, with the token attached and errors explained."""

    def __init__(self, address: str | None = None, environ: Mapping[str, str] = os.environ):
        from ray.job_submission import JobSubmissionClient

        _quiet_ray_client_logs()
        self.address = resolve_address(address, environ)
        token, self.token_source = find_token(environ)
        _probe(self.address)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        # Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; the address
        # was chosen above, so hide them while it connects.
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"), self.explain():
            self.ray = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def explain(self, job_id: str | None = None) -> Iterator[None]:
        """Turns what Ray's client raises inside the block into one SubmitError line."""
        try:
            yield
        except SubmitError:
            raise
        except Exception as err:
            message = _explain(err, self.address, self.token_source, job_id)
            if message is None:
                raise
            raise SubmitError(message) from None

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], submission_id: str,
               metadata: dict[str, str]) -> str:
        with self.explain():
            return self.ray.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                       submission_id=submission_id, metadata=metadata)

    def info(self, job_id: str) -> Any:
        with self.explain(job_id):
            return self.ray.get_job_info(job_id)

    def list_jobs(self) -> list[Any]:
        with self.explain():
            return self.ray.list_jobs()

    def logs(self, job_id: str) -> str:
        with self.explain(job_id):
            return self.ray.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self.explain(job_id):
            return self.ray.stop_job(job_id)

    def follow(self, job_id: str, out: TextIO = sys.stdout) -> Any:
        """Prints the job's output as it arrives until the job ends; returns its final JobDetails."""

        async def tail() -> None:
            async for chunk in self.ray.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self.info(job_id)  # an unknown id fails here with a clear line, not inside the websocket
        with self.explain(job_id):
            try:
                asyncio.run(tail())
            except RuntimeError as e:  # the log stream broke off; the job itself may still be fine
                print(f"slimray: log stream ended early ({e}); waiting for the job's status", file=sys.stderr)
        while True:  # the stream closes as the job ends; its status can trail by a moment
            details = self.info(job_id)
            if details.status.is_terminal():
                return details
            time.sleep(1.0)


def _quiet_ray_client_logs() -> None:
    """Ray's client logs every ignore file it reads and every websocket close at INFO, and warns that it
    skips .git and .venv (WORKING_DIR_EXCLUDES leaves them out anyway); slimray prints its own progress."""
    import logging

    for name, level in (("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray._private.runtime_env.working_dir", logging.ERROR),
                        ("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING)):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def exit_status(status: Any) -> int:
    """0 for a job that SUCCEEDED, 1 for FAILED or STOPPED (as ``ray job submit`` does)."""
    return 0 if str(status) == "SUCCEEDED" else 1


def format_jobs(jobs: list[Any]) -> str:
    """One line per job, oldest first: id, status, start time (local), entrypoint."""
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = dt.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") \
            if job.start_time else "-"
        rows.append((job.submission_id or job.job_id or "-", str(job.status), started, job.entrypoint or ""))
    if not rows:
        return "no jobs"
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:<9}  {r[2]}  {r[3]}" for r in rows)


# ----------------------------------------------------------------------------------------------------------
# What travels with the job.


def job_env_vars(environ: Mapping[str, str] = os.environ, cwd: Path | None = None,
                 resolve: bool = False) -> dict[str, str]:
    """Environment of the job's driver (and, through Ray, of its workers): the SLIMRAY_* settings set here.

    The job carries *settings*, not the worker environment that ``cluster.ray_env.runtime_env_vars`` derives
    from them: the driver's ``connect()`` derives it on the cluster (home folders differ there), and Ray
    refuses to start a driver whose ``ray.init`` env_vars share a key with the job's env_vars ("Failed to
    merge the Job's runtime env"). ``connect()`` in a job's driver joins the cluster the job runs on by itself
    (address ``auto``: Ray gives the driver that cluster's address in RAY_ADDRESS); ``SLIMRAY_RAY_ADDRESS=auto``
    says so explicitly, and wins over a SLIMRAY_RAY_ADDRESS that the cluster's nodes may set.
    Settings that name a location must be absolute or a URI, like the stage's own flags.
    """
    from cluster.settings import Settings

    cwd = cwd or Path.cwd()
    location_settings = {"SLIMRAY_" + name.upper() for name, f in Settings.model_fields.items()
                         if Path in {f.annotation, *typing.get_args(f.annotation)}} | {"SLIMRAY_STORAGE_ROOT"}
    env = {"SLIMRAY_RAY_ADDRESS": "auto"}
    for key, value in sorted(environ.items()):
        if not key.startswith("SLIMRAY_") or key in LOCAL_ONLY_SETTINGS:
            continue
        if key in location_settings and value:
            value = _check_location(key, value, fix=key + "={}", cwd=cwd, resolve=resolve, may_travel=False)
        env[key] = value
    return env


def pinned_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """slimray's runtime dependencies (pyproject.toml) at the versions in constraints.txt, without ray and torch.

    Ray must be the cluster's own, and torch's build (CPU or CUDA) belongs to the image.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SubmitError("--pip reads pyproject.toml with tomllib: it needs Python 3.11 or later") from None
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[canonicalize_name(Requirement(line).name)] = line
    wanted = []
    for spec in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = canonicalize_name(Requirement(spec).name)
        if name not in ("ray", "torch"):
            wanted.append(pins.get(name, spec))
    return wanted


def build_runtime_env(env_vars: dict[str, str], pip: bool = False, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The job's runtime env: this project as working_dir (minus WORKING_DIR_EXCLUDES), the settings, and,
    with ``pip``, slimray's pinned dependencies.

    ``pip`` is off by default: the cluster image already carries the stack at these versions
    (k8s/Dockerfile), while a pip runtime env builds a fresh virtualenv on every node for every new set of
    requirements (minutes; DeepSpeed builds from source) and needs PyPI from the nodes. Turn it on for a bare
    Ray cluster that can reach PyPI.
    """
    if not (root / "pyproject.toml").is_file() or not (root / "jobs").is_dir():
        raise SubmitError(f"{root} is not a slimray checkout: `slimray submit` ships the project folder as the job's "
                          "working_dir, so run it from a source checkout (pip install -e .)")
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES),
                                   "env_vars": dict(env_vars)}
    if pip:
        runtime_env["pip"] = {"packages": pinned_requirements(root), "pip_check": False}
    return runtime_env


def travels(path: Path, root: Path = PROJECT_ROOT) -> bool:
    """True when ``path`` lies inside the project and is not left out of the job's copy."""
    import fnmatch

    try:
        rel = Path(os.path.abspath(path)).relative_to(root)
    except ValueError:
        return False
    parts = rel.parts
    for i, part in enumerate(parts):
        is_dir = i < len(parts) - 1 or (root / rel).is_dir()
        for pattern in WORKING_DIR_EXCLUDES:
            if pattern.endswith("/") and not is_dir:
                continue
            if fnmatch.fnmatchcase(part, pattern.rstrip("/")):
                return False
    return True


def entrypoint(module: str, args: list[str]) -> str:
    """The job's shell command: the stage module with its arguments, quoted."""
    return shlex.join(["python", "-m", module, *args])


def submission_id(stage: str) -> str:
    return f"slimray-{stage}-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------------------------------------
# The path rule, applied to the stage's parsed config (the CLI parses it with jobs.config).


def _check_location(label: str, value: str, *, fix: str, cwd: Path, resolve: bool, root: Path = PROJECT_ROOT,
                    may_travel: bool = True) -> str:
    """The value the job should get for one location, or a SubmitError that says how to fix it.

    ``fix`` shows the corrected setting with ``{}`` for the absolute path, e.g. ``"--out {}"``.
    """
    if "://" in value or Path(value).is_absolute():
        return value
    local = Path(os.path.abspath(Path(value).expanduser() if value.startswith("~") else cwd / value))
    if may_travel and not value.startswith("~") and local.exists() and travels(local, root):
        return str(local.relative_to(root))  # travels with the code; the job's current folder is its copy
    if resolve:
        return str(local)
    raise SubmitError(f"{label} {value!r} is a relative path, but a submitted job runs in a temporary copy of the "
                      f"project: give an absolute path or a storage URI (e.g. {fix.format(local)}), or add "
                      "--resolve-paths if the cluster shares this filesystem")


def _names_local_path(value: str, cwd: Path) -> bool:
    """A name-or-path value counts as a location when it is a URI, absolute, or names something here."""
    return "://" in value or Path(value).is_absolute() or value.startswith("~") or (cwd / value).exists()


def job_locations(values: Mapping[str, Any], sources: Mapping[str, str], fields: Mapping[str, bool], *,
                  cwd: Path | None = None, resolve: bool = False, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The stage's config values as the job should get them: every location checked and, where needed,
    rewritten. SubmitError lists every location that cannot work, one line each.

    Args:
        values: the parsed config's top-level values (``model_dump(mode="json")``).
        sources: field → how the user gave it (``--out``, ``--set out``, ``out in --config F:``), for messages.
        fields: field → True for a location (a Path/Location field), False for a name-or-path field, which
            counts only when its value names something here (``--model minilm`` passes).

    A relative path to an existing input inside the project that travels is rewritten relative to the
    project root (the job's current folder); with ``resolve`` other relative paths become absolute against
    ``cwd``; otherwise they are refused.
    """
    cwd = cwd or Path.cwd()
    out, problems = dict(values), []
    for name, strict in fields.items():
        value = values.get(name)
        if not isinstance(value, str) or (not strict and not _names_local_path(value, cwd)):
            continue
        flag = "--" + name.replace("_", "-")
        how = sources.get(name, flag)
        label, fix = (f"--set {name}", f"--set {name}={{}}") if how.startswith("--set") else (how, flag + " {}")
        try:
            out[name] = _check_location(label, value, fix=fix, cwd=cwd, resolve=resolve, root=root)
        except SubmitError as e:
            problems.append(str(e))
    if problems:
        raise SubmitError("\n".join(problems))
    return out
