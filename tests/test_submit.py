"""`slimray submit` / `slimray jobs`: the path rule, the runtime env, the address and token, the error lines
(against Ray's real client: a closed port and a tiny HTTP server). The round trip on a real `ray start` cluster
is in tests/test_cluster.py."""

import contextlib
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from cluster import submit as sub
from cluster.ray_env import runtime_env_vars
from cluster.settings import Settings
from jobs.config import as_arguments, location_fields, parse_args, parse_command_line
from jobs.finetune import FinetuneConfig
from jobs.prepare import PrepareConfig
from raycluster import free_port, slimray  # tests/raycluster.py
from serve_app.run import ServeConfig
from slimray.cli import STAGES

ROOT = sub.PROJECT_ROOT
SAMPLE = ROOT / "jobs" / "samples" / "harbor_bank"


# ----------------------------------------------------------------------------------------------------------
# The path rule, applied to the parsed config. Each test asserts on the config the job would run with:
# the job's arguments (as `slimray submit` builds them) parsed again by the stage's own parser.


def job_config(args, cls=FinetuneConfig, cwd=ROOT, **kw):
    with contextlib.chdir(cwd):  # a relative --config file is read from the current folder
        parsed = parse_command_line(cls, args, "t")
    values = parsed.config.model_dump(mode="json", exclude_unset=True)
    job_args = as_arguments(cls, sub.job_locations(values, parsed.sources, location_fields(cls), cwd=cwd, **kw))
    return parse_args(cls, job_args, "job")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_location_fields(stage):
    from slimray.cli import stage_config_class

    fields = location_fields(stage_config_class(stage))
    assert any(fields.values()), f"{stage}'s config has no Path/Location field: the path rule would check nothing"


def test_relative_location_is_rejected_with_one_line_naming_flag_value_and_fix():
    with pytest.raises(sub.SubmitError) as e:
        job_config(["--data", "/shared/d", "--out", "runs/b77/ft", "--model", "minilm"])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "--out 'runs/b77/ft' is a relative path" in msg and f"--out {ROOT}/runs/b77/ft" in msg
    assert "--resolve-paths" in msg


def test_absolute_paths_uris_and_names_pass_unchanged():
    args = ["--data", "/shared/d", "--out", "s3://bucket/ft", "--model", "minilm", "--workers", "2", "--overwrite"]
    assert job_config(args) == parse_args(FinetuneConfig, args, "t")
    cfg = job_config(["--data=file:///x", "--out=gs://b/o"])
    assert cfg.data == Path("/x") and cfg.out == "gs://b/o"
    # a name-or-path field whose value names nothing here is a name (hub id, registry name), not a path
    assert job_config(["--source", "org/some-dataset", "--out", "/o"], PrepareConfig).source == "org/some-dataset"


def test_resolve_paths_rewrites_every_form(tmp_path):
    cfg = job_config(["--data=d", "--ou", "o", "--set", "deepspeed.overlap_comm=false", "--model", "minilm"],
                     cwd=tmp_path, resolve=True)
    assert (cfg.data, cfg.out, cfg.deepspeed.overlap_comm, cfg.model) == (tmp_path / "d", tmp_path / "o", False, "minilm")
    # --set is applied after the flags, so it is the one that counts (and the one checked)
    assert job_config(["--out", "o", "--set", "out=/abs/o", "--data", "/d"], cwd=tmp_path).out == Path("/abs/o")
    with pytest.raises(sub.SubmitError, match=r"--set out 'rel' is a relative path.*--set out=.*/rel\)"):
        job_config(["--out", "/abs", "--set", "out=rel", "--data", "/d"], cwd=tmp_path)


def test_inputs_inside_the_project_travel_but_outputs_and_excluded_folders_do_not(tmp_path):
    assert job_config(["--source", "jobs/samples/harbor_bank", "--out", "/o"], PrepareConfig).source == \
        "jobs/samples/harbor_bank"
    # from a subfolder: rewritten relative to the project root, the job's current folder
    assert job_config(["--source", "samples/harbor_bank", "--out", "/o"], PrepareConfig, cwd=ROOT / "jobs").source == \
        "jobs/samples/harbor_bank"
    assert job_config(["--serve-config", "serve_app/serve_config.yaml", "--model", "/m"], ServeConfig).serve_config == \
        Path("serve_app/serve_config.yaml")
    (tmp_path / "data").mkdir()
    with pytest.raises(sub.SubmitError, match="--source 'data' is a relative path"):
        job_config(["--source", "data", "--out", "/o"], PrepareConfig, cwd=tmp_path)  # exists, but outside the project
    with pytest.raises(sub.SubmitError, match="--out 'jobs/new' is a relative path"):
        job_config(["--out", "jobs/new", "--data", "/d"])  # inside, but an output: it would stay in the job's copy
    project = tmp_path / "project"  # a stand-in checkout with an output folder
    (project / "runs" / "b77" / "data").mkdir(parents=True)
    with pytest.raises(sub.SubmitError, match="--data 'runs/b77/data' is a relative path"):
        job_config(["--data", "runs/b77/data", "--out", "/o"], cwd=project, root=project)  # runs/ never travels
    assert not sub.travels(ROOT / ".venv" / "lib") and not sub.travels(ROOT / "jobs" / "model.safetensors")


def test_config_file_locations_are_checked_and_its_values_travel_inline(tmp_path):
    cfg = "jobs/configs/finetune_banking77.yaml"  # data: runs/b77/data, out: runs/b77/ft
    with pytest.raises(sub.SubmitError) as e:
        job_config(["--config", cfg])
    assert [line.split(":")[0] for line in str(e.value).splitlines()] == [f"data in --config {cfg}", f"out in --config {cfg}"]
    assert "(e.g. --data " in str(e.value)
    from_file = parse_args(FinetuneConfig, ["--config", cfg, "--data", "/d", "--out", "/o"], "t")
    assert job_config(["--config", cfg, "--data", "/d", "--out", "/o"]) == from_file
    # resolved: the file's relative locations become absolute, its other values are kept
    resolved = job_config(["--config", cfg], resolve=True)
    assert (resolved.data, resolved.out) == (ROOT / "runs/b77/data", ROOT / "runs/b77/ft")
    assert resolved.model_dump(exclude={"data", "out"}) == from_file.model_dump(exclude={"data", "out"})
    # a config file outside the project is read here: the job gets its values, not the file
    (tmp_path / "ft.yaml").write_text("data: /d\nout: /o\nworkers: 3\n")
    job = job_config(["--config", "ft.yaml"], cwd=tmp_path)
    assert (job.data, job.out, job.workers) == (Path("/d"), Path("/o"), 3)


# ----------------------------------------------------------------------------------------------------------
# What travels.


def test_runtime_env_ships_the_project_without_environments_outputs_or_weights(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = sub.build_runtime_env({"SLIMRAY_RAY_ADDRESS": "auto"})
    assert env["working_dir"] == str(ROOT) and "pip" not in env
    assert {".venv/", ".git/", "runs/", "__pycache__/", "*.safetensors", "*.parquet"} <= set(env["excludes"])
    # what Ray's own packager puts in the zip with these excludes
    create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=True, excludes=env["excludes"])
    names = [n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")]
    assert {"jobs/finetune.py", "cluster/submit.py", "jobs/configs/finetune_banking77.yaml",
            "jobs/samples/harbor_bank/train.csv", "serve_app/serve_config.yaml"} <= set(names)
    bad = [n for n in names if n.split("/")[0] in (".venv", ".git", "runs") or "__pycache__" in n
           or n.endswith((".safetensors", ".parquet", ".pt"))]
    assert not bad
    assert all(sub.travels(ROOT / n) for n in names)  # the path rule agrees with the packager
    assert sum(zipfile.ZipFile(tmp_path / "pkg.zip").getinfo(n).file_size for n in names) < 20e6


def test_pip_requirements_are_pinned_and_leave_ray_and_torch_to_the_image():
    env = sub.build_runtime_env({}, pip=True)
    packages = env["pip"]["packages"]
    assert packages and all("==" in p for p in packages), packages
    names = {p.split("==")[0].lower() for p in packages}
    assert "deepspeed" in names and "transformers" in names and not names & {"ray", "torch"}


def test_job_env_carries_settings_not_worker_env():
    env = sub.job_env_vars({"SLIMRAY_STORAGE_ROOT": "s3://bucket/runs", "SLIMRAY_API_TOKEN": "secret",
                            "SLIMRAY_RAY_ADDRESS": "http://head:8265", "SLIMRAY_RAY_NUM_CPUS": "2", "PATH": "/bin"})
    assert env == {"SLIMRAY_RAY_ADDRESS": "auto", "SLIMRAY_STORAGE_ROOT": "s3://bucket/runs"}
    # Ray refuses a driver whose ray.init env_vars share a key with the job's ("Failed to merge ...")
    assert not set(env) & set(runtime_env_vars(Settings(ray_address="auto")))
    with pytest.raises(sub.SubmitError, match="SLIMRAY_STORAGE_ROOT 'runs' is a relative path.*SLIMRAY_STORAGE_ROOT=/"):
        sub.job_env_vars({"SLIMRAY_STORAGE_ROOT": "runs"})
    assert sub.job_env_vars({"SLIMRAY_STORAGE_ROOT": "runs"}, cwd=Path("/data"), resolve=True)[
        "SLIMRAY_STORAGE_ROOT"] == "/data/runs"


def test_entrypoint_quotes_arguments():
    cmd = sub.entrypoint("jobs.finetune", ["--out", "/a b/o", "--set", "deepspeed.extra={'x': 1}"])
    assert shlex.split(cmd) == ["python", "-m", "jobs.finetune", "--out", "/a b/o", "--set", "deepspeed.extra={'x': 1}"]


# ----------------------------------------------------------------------------------------------------------
# Address and token.


def test_address_precedence():
    env = {"RAY_ADDRESS": "http://a:8265/", "SLIMRAY_RAY_ADDRESS": "http://b:8265"}
    assert sub.resolve_address("http://c:8265", env) == "http://c:8265"
    assert sub.resolve_address(None, env) == "http://a:8265"
    assert sub.resolve_address(None, {"RAY_ADDRESS": " ", "SLIMRAY_RAY_ADDRESS": "http://b:8265"}) == "http://b:8265"
    assert sub.resolve_address(None, {}) == "http://127.0.0.1:8265"


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """A clean token environment (HOME without a token). Ray's own token loader is process-wide (a running
    driver's core aborts if it is reset), so it is only ever asked in a fresh process (``ray_says``)."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield monkeypatch


def ray_says() -> str | None:
    """The token Ray's own loader finds in this environment, asked in a fresh process."""
    code = ("from ray._raylet import AuthenticationTokenLoader as L; "
            "h = L.instance().get_token_for_http_header(ignore_auth_mode=True); "
            "print(h.get('authorization', '').removeprefix('Bearer '))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip() or None


def test_token_lookup_matches_rays_loader(token_env, tmp_path):
    assert sub.find_token(os.environ) == (None, None) and ray_says() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert sub.find_token(os.environ) == ("from-home", str(tmp_path / ".ray" / "auth_token")) and ray_says() == "from-home"
    (tmp_path / "tok").write_text("  from-path \n")
    token_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sub.find_token(os.environ)[0] == "from-path" == ray_says()
    token_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.find_token(os.environ) == ("from-env", "RAY_AUTH_TOKEN") and ray_says() == "from-env"
    assert sub.find_token({**os.environ, "RAY_AUTH_MODE": "disabled"}) == (None, None)
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN_PATH names .*cannot be read or is empty"):
        sub.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


# ----------------------------------------------------------------------------------------------------------
# Error lines, from Ray's real client.


@pytest.fixture
def fake_dashboard():
    """A dashboard that answers /api/version and guards the rest like Ray's token middleware:
    401 without a token, 403 with a wrong one, 404 for an unknown job with the right one."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            auth = self.headers.get("Authorization")
            if self.path == "/api/version":
                code, body = 200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x",
                                              "session_name": "s"})
            elif not auth:
                code, body = 401, "Unauthorized: Missing authentication token"
            elif auth != "Bearer right":
                code, body = 403, "Forbidden: Invalid authentication token"
            else:
                code, body = 404, f"Job {self.path.rsplit('/', 1)[-1]} does not exist"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_closed_port_names_the_address(token_env):
    from ray.job_submission import JobSubmissionClient

    address = f"http://127.0.0.1:{free_port()}"
    expected = rf"cannot reach the Ray dashboard at {address} \(.*\): check that the cluster is up"
    with pytest.raises(sub.SubmitError, match=expected):
        sub.JobClient(address, environ=os.environ)  # caught by the connect probe
    with pytest.raises(ConnectionError) as raised:
        # what Ray's own client raises maps to the same line (a header, so that Ray looks up no token)
        JobSubmissionClient(address, headers={"Authorization": "Bearer x"})
    assert re.match(expected, sub._explain(raised.value, address, None, None))


def test_missing_wrong_token_and_unknown_job(token_env, fake_dashboard):
    with pytest.raises(sub.SubmitError, match="requires an auth token and none was found: set RAY_AUTH_TOKEN"):
        sub.JobClient(fake_dashboard, environ=os.environ).list_jobs()
    token_env.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(sub.SubmitError, match="rejected the auth token from RAY_AUTH_TOKEN: set it"):
        sub.JobClient(fake_dashboard, environ=os.environ).list_jobs()
    token_env.setenv("RAY_AUTH_TOKEN", "right")
    with pytest.raises(sub.SubmitError, match=r"no job 'slimray-x' on the cluster at .*`slimray jobs list`"):
        sub.JobClient(fake_dashboard, environ=os.environ).info("slimray-x")


def test_cli_errors_are_one_line_exit_2(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    r = slimray("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env=env)
    assert r.returncode == 2 and r.stderr.startswith("slimray jobs list: error: cannot reach")
    assert len(r.stderr.strip().splitlines()) == 1
    r = slimray("submit", "finetuen", "--data", "/d", env=env)
    assert r.returncode == 2 and "unknown stage 'finetuen'; stages: prepare, finetune" in r.stderr
    # slimray's options go before the stage; everything after it is the stage's (checked before connecting)
    r = slimray("submit", "--address", "http://127.0.0.1:1", "finetune", "--data", "/d", "--out", "ft", env=env)
    assert r.returncode == 2 and r.stderr.startswith("slimray submit: error: --out 'ft' is a relative path")
    assert "Traceback" not in r.stderr
    r = slimray("submit", "finetune", "--help", env=env)
    assert r.returncode == 0 and "--zero-stage" in r.stdout
