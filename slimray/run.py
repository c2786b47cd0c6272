"""``slimray run``: the whole pipeline in one command, ending in a report a person wants to read.

    slimray run                                                # built-in sample, quick profile (~10 min, 2 cores)
    slimray run --data ../shared/data/banking77 --profile full # the benchmark configuration
    slimray run --serve                                        # keep the assistant up at the end

prepare → fine-tune (Ray Train + DeepSpeed ZeRO) → compression search (Ray Tune) and choice → smoke test of
the Serve graph → ``report.md``. Each stage is the same ``main(cfg)`` that ``slimray <stage>`` runs; the
profile (``slimray/configs/run_<name>.yaml``, or a YAML path) holds each stage's options and ``--out`` the
paths. ``run_state.json`` records, per stage, a fingerprint of its inputs (its options and the hashes of
what it reads) and the hash of its output manifest: a re-run skips a stage whose fingerprint is unchanged
and whose output is intact, and resumes an interrupted fine-tune or search instead of starting it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, ValidationError

from jobs.artifacts import REPO_ROOT, file_sha256, now_iso, read_json, write_json
from jobs.config import ConfigError, StageConfig, format_validation_error, load_yaml

log = logging.getLogger("slimray.run")

PROFILES_DIR = Path(__file__).resolve().parent / "configs"
SAMPLE = REPO_ROOT / "jobs" / "samples" / "harbor_bank"
STAGES = ("prepare", "finetune", "compress", "smoke", "report")
# Paths given by `slimray run` itself (from --data and --out), never by a profile, per section.
PATH_KEYS = {"prepare": {"source", "out"}, "finetune": {"data", "out"}, "compress": {"model", "data", "out"}}


class SmokeOptions(StageConfig):
    """The smoke test of the served graph."""

    requests: int = Field(default=30, ge=1, description="Single messages sent to /v1/assist, one at a time")
    batch_requests: int = Field(default=5, ge=1, description="Requests of 32 texts sent to /v1/classify")


class Profile(StageConfig):
    """What ``slimray run`` runs: each stage's options, without paths (those come from --data and --out)."""

    prepare: dict[str, Any] = Field(default_factory=dict, description="PrepareConfig options")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig options")
    compress: dict[str, Any] = Field(default_factory=dict, description="CompressConfig options")
    smoke: SmokeOptions = Field(default_factory=SmokeOptions, description="Serving smoke test")


def load_profile(name_or_path: str) -> tuple[Profile, Path]:
    """A profile by name (``quick`` → slimray/configs/run_quick.yaml) or by YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"run_{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("run_") for p in PROFILES_DIR.glob("run_*.yaml"))
            raise ConfigError(f"unknown profile {name_or_path!r}; choose one of {', '.join(known)} or give a YAML path")
    try:
        profile = Profile.model_validate(load_yaml(path))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"profile ({path})")) from None
    for section in ("prepare", "finetune", "compress"):
        clash = PATH_KEYS[section] & set(getattr(profile, section))
        if clash:
            raise ConfigError(f"profile ({path}) {section}: {sorted(clash)} are set by `slimray run` "
                              "(--data, --out); remove them from the profile")
    return profile, path


def stage_configs(profile: Profile, source: str, out: Path, where: Path) -> dict[str, BaseModel]:
    """The three batch stages' configs, validated; paths under ``out``."""
    from jobs.finetune import FinetuneConfig
    from jobs.prepare import PrepareConfig
    from tuning.compress import CompressConfig

    wanted = {
        "prepare": (PrepareConfig, {**profile.prepare, "source": source, "out": out / "data"}),
        "finetune": (FinetuneConfig, {**profile.finetune, "data": out / "data", "out": out / "ft"}),
        "compress": (CompressConfig, {**profile.compress, "model": out / "ft", "data": out / "data",
                                      "out": out / "compress"}),
    }
    configs = {}
    for name, (cls, values) in wanted.items():
        try:
            configs[name] = cls.model_validate({**values, "overwrite": True})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"profile ({where}) section {name!r}")) from None
    return configs


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(source: str) -> dict[str, str]:
    """sha256 of every file of a local source (a file or a folder); a dataset id stands for itself."""
    path = Path(source).expanduser()
    if path.is_file():
        return {path.name: file_sha256(path)}
    if path.is_dir():
        return {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*"))
                if f.is_file() and not f.name.startswith(".")}
    return {"id": source}


def options(cfgs: dict[str, BaseModel], stage: str) -> dict[str, Any]:
    """A stage config without its paths and run controls: what decides the output, besides the inputs."""
    return cfgs[stage].model_dump(mode="json", exclude=PATH_KEYS[stage] | {"overwrite", "resume"})


class RunState:
    """``run_state.json``: per stage its input fingerprint, status, output hash and wall time."""

    def __init__(self, out: Path):
        self.path = out / "run_state.json"
        self.stages: dict[str, dict[str, Any]] = read_json(self.path)["stages"] if self.path.is_file() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        write_json(tmp, {"stages": self.stages})
        os.replace(tmp, self.path)

    def is_done(self, stage: str, fingerprint: str, marker: Path) -> bool:
        rec = self.stages.get(stage, {})
        return (rec.get("status") == "done" and rec.get("fingerprint") == fingerprint and marker.is_file()
                and file_sha256(marker) == rec.get("output_sha256"))

    def same_inputs_as_last_attempt(self, stage: str, fingerprint: str) -> bool:
        return self.stages.get(stage, {}).get("fingerprint") == fingerprint


def run_stage_once(state: RunState, number: int, stage: str, title: str, fingerprint: str, marker: Path,
                   work: Callable[[bool], Any]) -> None:
    """Runs ``work(resume)`` unless the stage is complete for these inputs; records the outcome.

    ``resume`` is true when an earlier attempt with the same inputs was interrupted: the fine-tune then
    continues from its last checkpoint and the search from its experiment state.
    """
    header = f"[{number}/{len(STAGES)}] {stage}"
    if state.is_done(stage, fingerprint, marker):
        print(f"{header}: skipped — complete, inputs unchanged ({marker.parent})", flush=True)
        state.stages[stage]["skipped_at"] = now_iso()
        state.save()
        return
    resume = state.same_inputs_as_last_attempt(stage, fingerprint)
    note = " (continuing the last, unfinished attempt with these inputs)" if resume else ""
    print(f"{header}: {title}{note}", flush=True)
    state.stages[stage] = {"status": "started", "fingerprint": fingerprint, "started_at": now_iso()}
    state.save()
    started = time.time()
    work(resume)
    wall = time.time() - started
    state.stages[stage].update(status="done", output_sha256=file_sha256(marker), wall_s=round(wall, 1),
                               finished_at=now_iso())
    state.save()
    print(f"{header}: done in {wall:.0f} s", flush=True)


def default_out(source: str, profile_path: Path) -> Path:
    name = Path(source.rstrip("/")).stem or "data"
    return Path("runs") / f"{name}-{profile_path.stem.removeprefix('run_')}"


def main(data: str | None = None, profile_name: str = "quick", out: Path | None = None, serve: bool = False,
         port: int = 8000, fresh: bool = False) -> Path:
    """Runs (or resumes) the pipeline; returns the report's path."""
    import shutil

    from cluster.ray_env import connect
    from jobs.finetune import main as finetune
    from jobs.prepare import main as prepare
    from serve_app.run import apply_serve_env
    from tuning.compress import main as compress

    source = data or str(SAMPLE)
    if not data:
        print(f"no --data: using the built-in sample {SAMPLE.relative_to(REPO_ROOT)} (Harbor Lane Bank, offline)")
    profile, profile_path = load_profile(profile_name)
    out = (out or default_out(source, profile_path)).expanduser().resolve()
    cfgs = stage_configs(profile, source, out, profile_path)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        (out / "run_state.json").unlink(missing_ok=True)
    state = RunState(out)
    write_json(out / "run.json", {"command": command_line(data, profile_name, out, serve, port),
                                  "source": source, "profile": str(profile_path),
                                  "profile_values": profile.model_dump(mode="json")})
    apply_serve_env()  # read when Ray starts: the cluster the fine-tune starts also serves the smoke test
    print(f"slimray run: {source} with profile {profile_path.stem.removeprefix('run_')!r} → {out}", flush=True)

    data_dir, ft_dir, comp_dir = out / "data", out / "ft", out / "compress"
    fp_prepare = sha256_json({"options": options(cfgs, "prepare"), "source": source_fingerprint(source)})
    run_stage_once(state, 1, "prepare", "clean, de-duplicate, label-map and split", fp_prepare,
                   data_dir / "manifest.json", lambda resume: prepare(cfgs["prepare"]))

    fp_finetune = sha256_json({"options": options(cfgs, "finetune"), "data": file_sha256(data_dir / "manifest.json")})
    ft_cfg = cfgs["finetune"]
    run_stage_once(state, 2, "finetune",
                   f"Ray Train, {ft_cfg.workers} workers, DeepSpeed ZeRO-{ft_cfg.zero_stage}", fp_finetune,
                   ft_dir / "manifest.json",
                   lambda resume: finetune(ft_cfg.model_copy(update={"resume": resume})))

    fp_compress = sha256_json({"options": options(cfgs, "compress"), "model": file_sha256(ft_dir / "manifest.json"),
                               "data": file_sha256(data_dir / "manifest.json")})

    def search(resume: bool) -> None:
        if not resume and comp_dir.exists():
            shutil.rmtree(comp_dir)  # a search of other inputs must not be resumed
        compress(cfgs["compress"].model_copy(update={"resume": resume}))

    run_stage_once(state, 3, "compress", f"Ray Tune search of {cfgs['compress'].trials} compressions, then the "
                   "choice on the Pareto front", fp_compress, comp_dir / "chosen" / "manifest.json", search)

    chosen = comp_dir / "chosen"
    fp_smoke = sha256_json({"options": profile.smoke.model_dump(), "model": file_sha256(chosen / "manifest.json")})
    smoke_path = out / "smoke.json"

    def smoke(resume: bool) -> None:
        from serve_app.smoke import raw_baseline, serve_model, smoke_test

        connect()
        texts, labels = read_test_split(data_dir)
        n, batches = profile.smoke.requests, profile.smoke.batch_requests
        with serve_model(str(chosen), str(data_dir), port=port) as url:
            result = smoke_test(url, texts, labels, requests=n, batch_requests=batches)
        # The same texts through the same model in this process, right after: what serving adds.
        result.update(raw_baseline(str(chosen), texts, requests=n, batch_requests=batches))
        write_json(smoke_path, result)

    run_stage_once(state, 4, "smoke", "deploy the Serve graph and send real requests", fp_smoke, smoke_path, smoke)

    from slimray.report import print_summary, write_report

    # The report is a view of the artifacts above: always rewritten (seconds), so it shows what is on disk.
    print(f"[5/{len(STAGES)}] report: report.md and figures", flush=True)
    write_report(out, state.stages)
    print_summary(read_json(chosen / "metrics.json"))
    print(f"\nReport: {out / 'report.md'}")
    if serve:
        keep_serving(chosen, data_dir, port)
    return out / "report.md"


def command_line(data: str | None, profile: str, out: Path, serve: bool, port: int) -> str:
    parts = ["slimray run"] + ([f"--data {data}"] if data else []) + [f"--profile {profile}", f"--out {out}"]
    return " ".join(parts + (["--serve"] if serve else []) + ([f"--port {port}"] if port != 8000 else []))


def read_test_split(data_dir: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir / "test.parquet", columns=["text", "label"])
    return table.column("text").to_pylist(), table.column("label").to_pylist()


def keep_serving(chosen: Path, data_dir: Path, port: int) -> None:
    """Serves the chosen model until Ctrl-C, after printing a ready curl command."""
    from ray import serve

    from cluster.ray_env import connect
    from serve_app.smoke import serve_model

    connect()
    texts, _ = read_test_split(data_dir)
    with serve_model(str(chosen), str(data_dir), port=port, keep_running=True) as url:
        body = shlex.quote(json.dumps({"message": texts[0]}))
        print(f"\nServing {chosen} at {url} (API docs: {url}/docs). Try:\n"
              f"  curl -s -X POST {url}/v1/assist -H 'content-type: application/json' -d {body}\n"
              "Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
