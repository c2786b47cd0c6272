"""``slimray run``: the whole pipeline in one command, ending in a report a person wants to read.

    slimray run                                                # built-in sample, quick profile (~10 min, 2 cores)
    slimray run --data ../shared/data/banking77 --profile full # the benchmark configuration
    slimray run --serve                                        # keep the assistant up at the end
    slimray run --task ner --data ../shared/data/wnut17        # an entity tagger, same stages

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from jobs.artifacts import REPO_ROOT, file_sha256, now_iso, read_json, write_json
from jobs.config import (ConfigError, NameOrPath, StrictModel, as_arguments, load_yaml, location_fields, run_cli,
                         validate)

log = logging.getLogger("slimray.run")

PROFILES_DIR = Path(__file__).resolve().parent / "configs"
SAMPLE = REPO_ROOT / "jobs" / "samples" / "harbor_bank"
STAGES = ("prepare", "finetune", "compress", "smoke", "report")

def stage_classes() -> dict[str, type[BaseModel]]:
    """The batch stages `slimray run` runs, with their config classes."""
    from jobs.finetune import FinetuneConfig
    from jobs.prepare import PrepareConfig
    from tuning.compress import CompressConfig

    return {"prepare": PrepareConfig, "finetune": FinetuneConfig, "compress": CompressConfig}


def run_paths(config_cls: type[BaseModel]) -> set[str]:
    """Fields that `slimray run` itself sets (from --data and --out), never a profile: the stage's locations
    (Path/Location fields), and prepare's source, which --data gives."""
    return {name for name, always in location_fields(config_cls).items() if always} | (
        {"source"} if "source" in config_cls.model_fields else set())


class SmokeOptions(StrictModel):
    """The smoke test of the served graph."""

    requests: int = Field(default=30, ge=1, description="Single messages sent to /v1/assist, one at a time")
    batch_requests: int = Field(default=5, ge=1, description="Requests of 32 texts sent to /v1/classify")


class KnowledgeOptions(StrictModel):
    """The assistant's knowledge base in the smoke test: documents indexed, a generator for what the playbook
    does not cover, and questions sent through /v1/assist?stream=true."""

    generator: str | None = Field(default="smollm2", description="Causal LM folder or 'smollm2' (its PyPI "
                                  "package); null: index and /v1/search only")
    questions: int = Field(default=4, ge=0, description="Questions sent: from the sample's question set, else "
                           "made from the passages' titles")
    max_new_tokens: int = Field(default=48, ge=1, le=1024, description="Longest generated reply, in tokens")


class RunConfig(StrictModel):
    """Run the whole pipeline: prepare -> fine-tune (DeepSpeed ZeRO) -> compression search -> serving smoke
    test -> report.md with figures."""

    data: NameOrPath | None = Field(default=None, description="Labelled text: anything `slimray prepare` reads "
                                    "(file, folder of splits, dataset id). Default: the built-in Harbor Lane "
                                    "Bank sample, offline")
    task: str | None = Field(default=None, description="Task of the data: intent, sentiment or ner (entity "
                             "tagging; needs --data). Default: the profile's prepare.task")
    profile: str = Field(default="quick", description="quick (every stage, small: about 5 min on 2 cores), full "
                         "(the benchmark configuration), or a profile YAML path")
    out: Path | None = Field(default=None, description="Run folder (default: runs/<data name>-<profile>). Running "
                             "again into the same folder skips the completed stages")
    docs: Path | None = Field(default=None, description="Documents of the assistant's knowledge base (Markdown, "
                              "text, HTML, CSV FAQ): indexed and served with a generator for what the playbook "
                              "does not cover. Default: the built-in sample's, when --data is not given")
    serve: bool = Field(default=False, description="Keep the assistant up at the end; prints a curl command")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the smoke test and of --serve")
    fresh: bool = Field(default=False, description="Run every stage again, even those complete for these inputs")


class Profile(StrictModel):
    """What ``slimray run`` runs: each stage's options, without paths (those come from --data and --out)."""

    prepare: dict[str, Any] = Field(default_factory=dict, description="PrepareConfig options")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig options")
    compress: dict[str, Any] = Field(default_factory=dict, description="CompressConfig options")
    smoke: SmokeOptions = Field(default_factory=SmokeOptions, description="Serving smoke test")
    knowledge: KnowledgeOptions = Field(default_factory=KnowledgeOptions, description="Knowledge base in the "
                                        "smoke test (with --docs, or the built-in sample)")


def load_profile(name_or_path: str) -> tuple[Profile, Path]:
    """A profile by name (``quick`` → slimray/configs/run_quick.yaml) or by YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"run_{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("run_") for p in PROFILES_DIR.glob("run_*.yaml"))
            raise ConfigError(f"unknown profile {name_or_path!r}; choose one of {', '.join(known)} or give a YAML path")
    profile = validate(Profile, load_yaml(path), f"profile ({path})")
    for section, config_cls in stage_classes().items():
        clash = run_paths(config_cls) & set(getattr(profile, section))
        if clash:
            raise ConfigError(f"profile ({path}) {section}: {sorted(clash)} are set by `slimray run` "
                              "(--data, --out); remove them from the profile")
    return profile, path


def stage_configs(profile: Profile, source: str, out: Path, where: Path) -> dict[str, BaseModel]:
    """The three batch stages' configs, validated; paths under ``out``."""
    paths = {
        "prepare": {"source": source, "out": out / "data"},
        "finetune": {"data": out / "data", "out": out / "ft"},
        "compress": {"model": out / "ft", "data": out / "data", "out": out / "compress"},
    }
    return {name: validate(cls, {**getattr(profile, name), **paths[name], "overwrite": True},
                           f"profile ({where}) section {name!r}")
            for name, cls in stage_classes().items()}


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
    return cfgs[stage].model_dump(mode="json", exclude=run_paths(type(cfgs[stage])) | {"overwrite", "resume"})


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


def run_or_skip(state: RunState, number: int, stage: str, title: str, fingerprint: str, marker: Path,
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


@dataclass
class Run:
    """One `slimray run`: its resolved inputs, the stage configs and the state file, shared by its steps."""

    cfg: RunConfig
    source: str
    profile: Profile
    out: Path
    stages: dict[str, BaseModel]  # prepare / finetune / compress configs, paths under out
    state: RunState

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def chosen(self) -> Path:
        return self.out / "compress" / "chosen"

    @property
    def docs(self) -> Path | None:
        """The knowledge base's documents: --docs, else the sample's with the sample (none for a tagger)."""
        if self.tagging:
            return None
        if self.cfg.docs is not None:
            return self.cfg.docs.expanduser().resolve()
        return SAMPLE / "knowledge" if not self.cfg.data else None

    @property
    def tagging(self) -> bool:
        """The run builds an entity tagger (served as the entity model, smoke-tested on /v1/entities)."""
        from jobs.tasks import get_task

        return get_task(self.stages["prepare"].task).kind == "tagging"


def plan(cfg: RunConfig) -> tuple[Profile, Path, str, Path, dict[str, Any]]:
    """The profile (and its file), the source, the output folder and every stage's validated config; reads
    the profile, writes nothing."""
    from jobs.tasks import get_task

    profile, profile_path = load_profile(cfg.profile)
    if cfg.task is not None:
        task = get_task(cfg.task)
        if task.kind == "tagging" and not cfg.data:
            raise ConfigError(f"task: {cfg.task!r} needs --data (CoNLL or JSONL tagged text); the built-in sample "
                              "holds intents")
        profile = profile.model_copy(update={"prepare": {**profile.prepare, "task": cfg.task}})
    source = cfg.data or str(SAMPLE)
    out = (cfg.out or default_out(source, profile_path)).expanduser().resolve()
    return profile, profile_path, source, out, stage_configs(profile, source, out, profile_path)


def dry_run(cfg: RunConfig) -> str:
    """``--dry-run``: the profile and every stage's config validated, the source read and its columns found,
    the base model found; the later stages' inputs are the earlier stages' outputs, so they are not checked."""
    from jobs.modeling import resolve_model
    from jobs.prepare import dry_run as prepare_dry_run

    _, profile_path, source, out, stages = plan(cfg)
    prepare = stages["prepare"]
    if not (out / "data" / "manifest.json").is_file():  # else the stage is skipped or redone over its own output
        prepare_dry_run(prepare)
    resolve_model(stages["finetune"].model)
    return (f"would run prepare → finetune ({stages['finetune'].model}) → compress ({stages['compress'].trials} "
            f"trials) → smoke test → report on {source} with profile {profile_path.stem.removeprefix('run_')!r} "
            f"into {out}")


def start(cfg: RunConfig) -> Run:
    """Resolves the source, profile and output folder; records the command in run.json."""
    from serve_app.run import apply_serve_env

    profile, profile_path, source, out, stages = plan(cfg)
    if not cfg.data:
        print(f"no --data: using the built-in sample {SAMPLE.relative_to(REPO_ROOT)} (Harbor Lane Bank, offline)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.fresh:
        (out / "run_state.json").unlink(missing_ok=True)
    command = shlex.join(["slimray", "run", *as_arguments(
        RunConfig, {**cfg.model_dump(mode="json", exclude_unset=True), "out": str(out)})])
    write_json(out / "run.json", {"command": command, "source": source, "profile": str(profile_path),
                                  "profile_values": profile.model_dump(mode="json")})
    apply_serve_env(cfg.port)  # read when Ray starts: the cluster the fine-tune starts also serves the smoke test
    print(f"slimray run: {source} with profile {profile_path.stem.removeprefix('run_')!r} → {out}", flush=True)
    return Run(cfg, source, profile, out, stages, RunState(out))


def run_prepare(run: Run) -> None:
    from jobs.prepare import main as prepare

    fingerprint = sha256_json({"options": options(run.stages, "prepare"), "source": source_fingerprint(run.source)})
    run_or_skip(run.state, 1, "prepare", "clean, de-duplicate, label-map and split", fingerprint,
                run.data_dir / "manifest.json", lambda resume: prepare(run.stages["prepare"]))


def run_finetune(run: Run) -> None:
    from jobs.finetune import main as finetune

    cfg = run.stages["finetune"]
    fingerprint = sha256_json({"options": options(run.stages, "finetune"),
                               "data": file_sha256(run.data_dir / "manifest.json")})
    run_or_skip(run.state, 2, "finetune", f"Ray Train, {cfg.workers} workers, DeepSpeed ZeRO-{cfg.zero_stage}",
                fingerprint, run.out / "ft" / "manifest.json",
                lambda resume: finetune(cfg.model_copy(update={"resume": resume})))


def run_compress(run: Run) -> None:
    import shutil

    from tuning.compress import main as compress

    cfg = run.stages["compress"]
    fingerprint = sha256_json({"options": options(run.stages, "compress"),
                               "model": file_sha256(run.out / "ft" / "manifest.json"),
                               "data": file_sha256(run.data_dir / "manifest.json")})

    def search(resume: bool) -> None:
        if not resume and cfg.out.exists():
            shutil.rmtree(cfg.out)  # a search of other inputs must not be resumed
        compress(cfg.model_copy(update={"resume": resume}))

    run_or_skip(run.state, 3, "compress", f"Ray Tune search of {cfg.trials} compressions, then the choice on "
                "the Pareto front", fingerprint, run.chosen / "manifest.json", search)


def sample_questions(docs: Path, index: Path, n: int) -> list[str]:
    """Questions for the knowledge smoke test: the sample's (``rag/smoke.jsonl``: three about documents the
    playbook's intents do not cover, one the documents do not answer), else one per passage title."""
    if docs == SAMPLE / "knowledge":
        rows = [json.loads(line) for line in (SAMPLE / "rag" / "smoke.jsonl").read_text().splitlines()]
        answerable = [r["question"] for r in rows if r["passage_id"]]
        other = [r["question"] for r in rows if not r["passage_id"]]
        return (answerable[:max(0, n - 1)] + other[:1])[:n]
    titles = [json.loads(line)["title"] for line in (index / "passages.jsonl").read_text().splitlines()]
    return [f"What can you tell me about {t.split(' - ')[-1].lower()}?" for t in titles[:n]]


def build_knowledge_index(run: Run) -> Path:
    from jobs.knowledge import IndexConfig
    from jobs.knowledge import main as index

    calibration = SAMPLE / "rag" / "calibration.jsonl" if run.docs == SAMPLE / "knowledge" else None
    return index(IndexConfig(docs=run.docs, out=run.out / "kb", calibration=calibration))


def run_smoke(run: Run) -> None:
    smoke_path = run.out / "smoke.json"
    knowledge = run.profile.knowledge
    fingerprint = sha256_json({"options": run.profile.smoke.model_dump(),
                               "model": file_sha256(run.chosen / "manifest.json"),
                               "knowledge": (knowledge.model_dump(), source_fingerprint(str(run.docs)))
                               if run.docs else None})

    def smoke(resume: bool) -> None:
        from serve_app.smoke import raw_baseline, serve_model, smoke_test, smoke_test_entities, smoke_test_knowledge

        texts, labels = read_test_split(run.data_dir)  # a tagger's: sentences as text (words joined by spaces)
        n, batches = run.profile.smoke.requests, run.profile.smoke.batch_requests
        size = min(32, len(texts))  # texts per batched request: fewer only on a tiny test split
        index = build_knowledge_index(run) if run.docs else None
        generator = knowledge.generator if index else None
        with serve_model(str(run.chosen), str(run.data_dir), port=run.cfg.port, entity=run.tagging,
                         index=str(index) if index else None, generator=generator,
                         max_new_tokens=knowledge.max_new_tokens) as url:
            if run.tagging:
                result = smoke_test_entities(url, str(run.chosen), texts, requests=n, batch_requests=batches,
                                             batch_size=size)
            else:
                result = smoke_test(url, texts, labels, requests=n, batch_requests=batches, batch_size=size)
            if index and generator and knowledge.questions:
                result["knowledge"] = {"index": str(index), "generator": generator, **smoke_test_knowledge(
                    url, sample_questions(run.docs, index, knowledge.questions))}
        # The same texts through the same model in this process, right after: what serving adds.
        result.update(raw_baseline(str(run.chosen), texts, requests=n, batch_requests=batches, batch_size=size))
        write_json(smoke_path, result)

    run_or_skip(run.state, 4, "smoke", "deploy the Serve graph and send real requests", fingerprint, smoke_path,
                smoke)


def run_report(run: Run) -> Path:
    """The report is a view of the artifacts: always rewritten (seconds), so it shows what is on disk."""
    from slimray.report import print_summary, write_report

    print(f"[5/{len(STAGES)}] report: report.md and figures", flush=True)
    write_report(run.out, run.state.stages)
    print_summary(read_json(run.chosen / "metrics.json"))
    print(f"\nReport: {run.out / 'report.md'}")
    return run.out / "report.md"


def main(cfg: RunConfig) -> Path:
    """Runs (or resumes) the pipeline; returns the report's path."""
    run = start(cfg)
    run_prepare(run)
    run_finetune(run)
    run_compress(run)
    run_smoke(run)
    report = run_report(run)
    if cfg.serve:
        index = run.out / "kb" if run.docs and (run.out / "kb" / "index.json").is_file() else None
        keep_serving(run.chosen, run.data_dir, cfg.port, run.tagging, index, run.profile.knowledge.generator)
    return report


def cli(argv: list[str] | None = None) -> None:
    run_cli(RunConfig, main, argv, prog="slimray run", check=dry_run)


def read_test_split(data_dir: Path) -> tuple[list[str], list[Any]]:
    """The test split's texts and labels (a tagger's: its sentences as text, and their tags)."""
    from jobs.prepare import read_split

    import pyarrow.parquet as pq

    columns = pq.read_schema(data_dir / "test.parquet").names
    test = read_split(data_dir, "test", ("text", "label" if "label" in columns else "tags"))
    return test["text"], test.get("label") or test["tags"]


def keep_serving(chosen: Path, data_dir: Path, port: int, tagging: bool = False, index: Path | None = None,
                 generator: str | None = None) -> None:
    """Serves the chosen model (as the entity model, when ``tagging``; with the knowledge index and generator
    when given) until Ctrl-C, after printing a ready curl command."""
    from serve_app.app import AppArgs
    from serve_app.run import deploy, serving_until_interrupted

    texts, _ = read_test_split(data_dir)
    args = AppArgs(entity_model=str(chosen)) if tagging else AppArgs(
        model=str(chosen), data=str(data_dir), index=str(index) if index else None,
        generator=generator if index else None)
    path, body = ("/v1/entities", {"texts": [texts[0]]}) if tagging else ("/v1/assist", {"message": texts[0]})
    with serving_until_interrupted():
        url = deploy(args, port=port)
        body = shlex.quote(json.dumps(body))
        tries = f"  curl -s -X POST {url}{path} -H 'content-type: application/json' -d {body}\n"
        if index is not None:
            question = shlex.quote(json.dumps({"message": "What are your branch opening hours on Saturday?"}))
            tries += (f"  curl -s -X POST {url}/v1/search -H 'content-type: application/json' "
                      f"-d '{{\"query\": \"opening hours\", \"k\": 3}}'\n")
            if generator:
                tries += (f"  curl -N -X POST '{url}/v1/assist?stream=true' -H 'content-type: application/json' "
                          f"-d {question}\n")
        print(f"\nServing {chosen} at {url}: open {url}/ in a browser to try it (API docs: {url}/docs), or:\n"
              f"{tries}Ctrl-C stops it.", flush=True)
