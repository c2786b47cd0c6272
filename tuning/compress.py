"""Compress stage: Ray Tune searches distillation / pruning / vocabulary trimming / int8 quantization and
chooses the fastest model on the accuracy x latency x size Pareto front that keeps the accuracy asked for.

    slimray compress --model runs/b77/ft --data runs/b77/data --out runs/b77/compress --trials 12
    python -m tuning.compress --config tuning/configs/compress_banking77.yaml

Each trial builds one candidate (``tuning.methods``), saves it as a loadable artifact in
``OUT/search/<trial>``, and reports validation accuracy, macro-F1, latency and size. Optuna's
multi-objective sampler proposes the next trials; ASHA stops distillations that fall behind after an epoch
(a trial stopped early never enters the Pareto front). Afterwards every finished candidate and the base
model are measured again, one after another, under the same protocol (``tuning.measure``), so the
comparison is not disturbed by trials running side by side. Output: ``OUT/chosen/`` (artifact, manifest,
metrics.json), ``OUT/report.md`` and ``OUT/pareto.png``. Re-running the same command resumes an
interrupted search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from cluster import storage
from cluster.storage import join, local_copy
from jobs.artifacts import atomic_dir, file_sha256, manifest, read_json, write_json
from jobs.config import Location, StageConfig, run_stage
from jobs.errors import InputError
from jobs.prepare import load_prepared

log = logging.getLogger("slimray.compress")


class SearchSpace(StageConfig):
    """The compression search space; a one-element list fixes a parameter."""

    distill_layers: list[int] | None = Field(
        default=None, description="Student depths to try (0 = no distillation); default: 0 and about 1/3, "
        "1/2 of the teacher's layers")
    distill_epochs: list[int] = Field(default=[1, 2, 3], description="Distillation epochs to try")
    temperature: tuple[float, float] = Field(default=(1.0, 6.0), description="KD temperature range")
    alpha: tuple[float, float] = Field(default=(0.3, 0.9), description="Weight of the KD term (rest: cross-entropy)")
    lr: tuple[float, float] = Field(default=(5e-5, 5e-4), description="Distillation learning-rate range (log)")
    prune_heads: list[float] = Field(default=[0.0, 0.25, 0.5], description="Shares of attention heads to remove")
    prune_ffn: list[float] = Field(default=[0.0, 0.25, 0.5], description="Shares of FFN neurons to remove")
    importance: list[str] = Field(default=["taylor"], description="Pruning importance: taylor (|w*grad|) or magnitude")
    recovery_steps: list[int] = Field(default=[0, 200], description="KD steps after pruning")
    trim_vocab: list[bool] = Field(default=[True, False], description="Trim the vocabulary to tokens seen in train")
    quantize: list[str] = Field(default=["onnx-int8", "torch-int8", "none"], description="int8 backend or none")


class CompressConfig(StageConfig):
    """Search compressions of a fine-tuned model with Ray Tune; choose on the Pareto front."""

    model: Location = Field(description="Fine-tuned model folder (output of `slimray finetune`): a path or a "
                            "storage URI")
    data: Location = Field(description="Prepared data folder (needs train, validation and test splits): a path "
                           "or a storage URI")
    out: Location = Field(description="Output folder: search/, chosen/, report.md, pareto.png; a path or a "
                          "storage URI (then Tune keeps its state there, and the working files in a local cache)")
    trials: int = Field(default=12, ge=1, description="Number of candidates to build")
    max_accuracy_drop: float = Field(default=1.0, ge=0, description="Allowed validation accuracy drop vs the "
                                     "base model, in percentage points (macro-F1 may drop twice that)")
    time_budget_s: float | None = Field(default=None, gt=0, description="Stop starting trials after this many seconds")
    threads: int = Field(default=1, ge=1, description="Threads for latency measurement (the same for every model)")
    trial_cpus: float = Field(default=1.0, gt=0, description="CPUs per trial; trials run in parallel on the rest")
    train_limit: int | None = Field(default=None, ge=1, description="Smoke knob: use at most this many train "
                                    "rows for distillation and pruning")
    latency_texts: int = Field(default=64, ge=32, description="Test texts used for latency (>= 32)")
    initial_points: list[dict[str, Any]] | None = Field(
        default=None, description="Trials to evaluate first (full parameter dicts); default: ONNX int8 alone "
        "(the one-step alternative) and a distil + trim + int8 combination")
    asha: bool = Field(default=True, description="Stop distillations that fall behind after each epoch (ASHA)")
    seed: int = Field(default=0, description="Seed of the sampler and of every trial")
    search: SearchSpace = Field(default_factory=SearchSpace, description="The search space")
    resume: bool = Field(default=True, description="Resume an interrupted search in the same output folder")
    overwrite: bool = Field(default=False, description="Replace an existing chosen/ model")


class NoCandidateError(InputError):
    """No candidate meets the accuracy constraint; the message lists the best ones."""


# ----------------------------------------------------------------------------------------------------------
# Trial side.


def _train_rows(data_dir: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(Path(data_dir) / "train.parquet", columns=["text", "label_id"])
    if limit:
        table = table.slice(0, limit)
    return table.column("text").to_pylist(), np.asarray(table.column("label_id").to_pylist())


def plan_from_params(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Search parameters -> {method: kwargs} for ``tuning.methods.run_pipeline``."""
    plan: dict[str, dict[str, Any]] = {}
    kd = {"lr": p["lr"], "temperature": p["temperature"], "alpha": p["alpha"]}
    if p["distill_layers"]:
        plan["distill"] = {"layers": p["distill_layers"], "epochs": p["distill_epochs"], **kd}
    if p["prune_heads"] or p["prune_ffn"]:
        plan["prune"] = {"heads": p["prune_heads"], "ffn": p["prune_ffn"], "importance": p["importance"],
                         "recovery_steps": p["recovery_steps"], **kd}
    if p["trim_vocab"]:
        plan["trim_vocab"] = {}
    if p["quantize"] != "none":
        plan["quantize"] = {"backend": p["quantize"]}
    return plan


def trial(config: dict[str, Any]) -> None:
    """One Tune trial: build the candidate, save it, measure it, report."""
    import ray.tune
    import torch

    from jobs.inference import build_torch_model
    from tuning.measure import measure
    from tuning.methods import Candidate, Context, run_pipeline, save_candidate

    ctx_cfg, params = config["ctx"], {k: v for k, v in config.items() if k != "ctx"}
    threads = max(1, int(ctx_cfg["trial_cpus"]))
    torch.set_num_threads(threads)
    trial_id = ray.tune.get_context().get_trial_id()
    # Inputs by path or URI, so a trial runs on any node (a URI is downloaded once per node, then cached).
    data_dir, teacher_dir, inputs = (local_copy(ctx_cfg[k]) for k in ("data", "model", "inputs"))
    texts, labels = _train_rows(data_dir, ctx_cfg["train_limit"])
    val = pq.read_table(data_dir / "validation.parquet", columns=["text", "label", "label_id"])
    max_epoch = ctx_cfg["max_epoch"]

    def on_epoch(epoch: int, acc: float) -> None:
        if epoch < params["distill_epochs"]:  # the last epoch's result comes with the full report
            ray.tune.report({"epoch": epoch, "val_accuracy": acc, "final": False})

    ctx = Context(
        train_texts=texts, train_labels=labels,
        teacher_logits=np.load(inputs / ctx_cfg["teacher_logits"])[: len(texts)],
        val_texts=val.column("text").to_pylist(), val_labels=np.asarray(val.column("label_id").to_pylist()),
        max_length=ctx_cfg["max_length"], threads=threads, seed=ctx_cfg["seed"], on_epoch=on_epoch)
    cand = Candidate(build_torch_model(teacher_dir, {}), _tokenizer(teacher_dir))
    started = time.perf_counter()
    cand = run_pipeline(cand, ctx, plan_from_params(params))
    build_s = time.perf_counter() - started
    search_dir = ctx_cfg["search_dir"]
    remote = storage.is_uri(search_dir)
    out = (Path(tempfile.mkdtemp(prefix="slimray-candidate-")) if remote else Path(search_dir)) / trial_id
    if out.exists():
        shutil.rmtree(out)
    save_candidate(cand, out, ctx_cfg["max_length"])
    metrics = measure(out, read_json(inputs / "latency_texts.json"), threads=threads, repeats=3,
                      eval_sets={"val": (ctx.val_texts, val.column("label").to_pylist())})
    artifact = str(out)
    if remote:  # the driver may be on another node: the candidate goes to the output URI
        artifact = join(search_dir, trial_id)
        storage.upload_dir(out, artifact)
        shutil.rmtree(out.parent, ignore_errors=True)
    ray.tune.report({
        "epoch": max_epoch, "final": True, "artifact": artifact, "build_s": build_s,
        "val_accuracy": metrics["val_accuracy"], "val_macro_f1": metrics["val_macro_f1"],
        "latency_ms_b1": metrics["latency_ms_b1"], "latency_ms_b32": metrics["latency_ms_b32"],
        "size_mb": metrics["size_mb"], "pipeline": json.dumps(cand.steps),
    })


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# Selection (pure functions).


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated on (accuracy max, batch-1 latency min, size min)."""
    def dominates(a: dict, b: dict) -> bool:
        ge = (a["val_accuracy"] >= b["val_accuracy"] and a["latency_ms_b1"] <= b["latency_ms_b1"]
              and a["size_mb"] <= b["size_mb"])
        gt = (a["val_accuracy"] > b["val_accuracy"] or a["latency_ms_b1"] < b["latency_ms_b1"]
              or a["size_mb"] < b["size_mb"])
        return ge and gt
    return [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def choose(rows: list[dict[str, Any]], base: dict[str, Any], max_drop_pts: float) -> dict[str, Any]:
    """The fastest (batch 1) Pareto candidate within the accuracy and macro-F1 limits."""
    floor_acc = base["val_accuracy"] - max_drop_pts / 100
    floor_f1 = base["val_macro_f1"] - 2 * max_drop_pts / 100
    front = pareto_front(rows)
    eligible = [r for r in front if r["val_accuracy"] >= floor_acc and r["val_macro_f1"] >= floor_f1]
    if not eligible:
        best = sorted(rows, key=lambda r: -r["val_accuracy"])[:5]
        listing = "; ".join(f"{r['trial_id']}: val accuracy {r['val_accuracy']:.4f}, macro-F1 {r['val_macro_f1']:.4f}, "
                            f"{r['latency_ms_b1']:.2f} ms" for r in best)
        raise NoCandidateError(
            f"no candidate keeps validation accuracy >= {floor_acc:.4f} (base {base['val_accuracy']:.4f} - "
            f"{max_drop_pts} points) and macro-F1 >= {floor_f1:.4f}; best candidates: {listing or 'none finished'}. "
            "Raise --max-accuracy-drop, run more --trials, or widen the search space")
    return min(eligible, key=lambda r: (r["latency_ms_b1"], r["size_mb"]))


# ----------------------------------------------------------------------------------------------------------
# Driver.


def default_layers(depth: int) -> list[int]:
    return sorted({0, *(d for d in (max(1, round(depth / 3)), max(1, round(depth / 2))) if d < depth)})


def param_space(space: SearchSpace, depth: int) -> dict[str, Any]:
    from ray import tune

    return {
        "distill_layers": tune.choice(space.distill_layers or default_layers(depth)),
        "distill_epochs": tune.choice(space.distill_epochs),
        "temperature": tune.uniform(*space.temperature),
        "alpha": tune.uniform(*space.alpha),
        "lr": tune.loguniform(*space.lr),
        "prune_heads": tune.choice(space.prune_heads),
        "prune_ffn": tune.choice(space.prune_ffn),
        "importance": tune.choice(space.importance),
        "recovery_steps": tune.choice(space.recovery_steps),
        "trim_vocab": tune.choice(space.trim_vocab),
        "quantize": tune.choice(space.quantize),
    }


def default_points(space: SearchSpace, depth: int) -> list[dict[str, Any]]:
    """The one-step alternative (ONNX int8 alone) and a distil + trim + int8 combination, evaluated first.

    Every value is taken from the space (Optuna rejects points outside it): where the space has no
    "off" value for a method, the point keeps that method on.
    """
    layers = space.distill_layers or default_layers(depth)

    def off(values: list[Any], value: Any) -> Any:
        return value if value in values else values[0]

    base = {"distill_layers": off(layers, 0), "distill_epochs": max(space.distill_epochs), "temperature": 2.0,
            "alpha": 0.7, "lr": min(max(2e-4, space.lr[0]), space.lr[1]), "prune_heads": off(space.prune_heads, 0.0),
            "prune_ffn": off(space.prune_ffn, 0.0), "importance": space.importance[0],
            "recovery_steps": off(space.recovery_steps, 0), "trim_vocab": off(space.trim_vocab, False),
            "quantize": off(space.quantize, "onnx-int8")}
    points = [base]
    if any(d > 0 for d in layers) and True in space.trim_vocab:
        points.append({**base, "distill_layers": max(layers), "trim_vocab": True})
    return points


def teacher_logits(model_dir: Path, data_dir: Path, out: Path, limit: int | None) -> Path:
    """The fine-tuned model's logits on the train texts, computed once per (model, data) and cached."""
    from jobs.inference import load_inference_model

    key = hashlib.sha256((file_sha256(Path(model_dir) / "model.safetensors") if (Path(model_dir) / "model.safetensors").is_file()
                          else str(model_dir)).encode() + file_sha256(Path(data_dir) / "manifest.json").encode()
                         + str(limit).encode()).hexdigest()[:12]
    path = out / f"teacher_logits-{key}.npy"
    if not path.is_file():
        texts, _ = _train_rows(data_dir, limit)
        log.info("teacher logits on %d train texts (once; cached in %s)", len(texts), path.name)
        logits = load_inference_model(model_dir).logits(texts, batch_size=64)
        np.save(out / f".{path.name}.partial.npy", logits)
        (out / f".{path.name}.partial.npy").rename(path)
    return path


def check_inputs(cfg: CompressConfig) -> tuple[dict[str, Any], Any]:
    from jobs.inference import load_inference_model

    model_dir, data_dir = local_copy(cfg.model), local_copy(cfg.data)
    data_manifest = load_prepared(data_dir)
    for split in ("validation", "test"):
        if not (data_dir / f"{split}.parquet").is_file():
            raise InputError(f"{cfg.data} has no {split} split: compression chooses on validation and reports on "
                             "test; re-run `slimray prepare` (it cuts both from train when the source has none)")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{str(cfg.model)!r} is not a model folder (no config.json)")
    base = load_inference_model(model_dir)
    if base.backend != "torch":
        raise InputError(f"{cfg.model} is a {base.backend} artifact; compress the fine-tuned PyTorch model")
    missing = sorted(set(data_manifest["labels"]) - set(base.labels))
    if missing:
        raise InputError(f"the model does not know labels of {cfg.data}: {missing[:5]}; was it fine-tuned on this data?")
    return data_manifest, base


def main(cfg: CompressConfig) -> Path | str:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cluster.ray_env import connect
    from jobs.modeling import encoder_layers, load_classifier
    from tuning.measure import measure
    from tuning.report import write_report

    started = time.time()
    # Output at a URI: the working files live in a local folder keyed by it and are published at the end;
    # Tune's state and the candidates go to the URI directly, so trials and the driver may be on any node.
    remote = storage.is_uri(cfg.out)
    dest = cfg.out if remote else Path(cfg.out).expanduser().resolve()
    out = storage.work_dir(cfg.out) if remote else dest
    if remote:
        storage.check_writable(cfg.out)
    if storage.exists(join(dest, "chosen")) and not cfg.overwrite:
        raise InputError(f"{storage.redact(join(dest, 'chosen'))} already exists; pass --overwrite to search again")
    data_manifest, base_model = check_inputs(cfg)
    model_dir, data_dir = local_copy(cfg.model).resolve(), local_copy(cfg.data).resolve()
    depth = len(encoder_layers(load_classifier(model_dir)[0]))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compress_config.json", cfg.model_dump(mode="json"))
    max_length = int(base_model.max_length)
    test = pq.read_table(data_dir / "test.parquet", columns=["text", "label"])
    val = pq.read_table(data_dir / "validation.parquet", columns=["text", "label"])
    rng = np.random.default_rng(cfg.seed)
    test_texts = test.column("text").to_pylist()
    latency_texts = [test_texts[i] for i in rng.permutation(len(test_texts))[: cfg.latency_texts]]
    if len(latency_texts) < 32:
        raise InputError(f"the test split has {len(test_texts)} texts; latency at batch 32 needs at least 32")

    # Trial inputs in one folder, passed by location: trial configs are printed, customer texts must not be.
    inputs = out / "inputs"
    inputs.mkdir(exist_ok=True)
    logits_path = teacher_logits(model_dir, data_dir, inputs, cfg.train_limit)
    write_json(inputs / "latency_texts.json", latency_texts)
    inputs_location = str(inputs)
    if remote:
        inputs_location = join(cfg.out, "inputs")
        storage.upload_dir(inputs, inputs_location)
    connect()
    space = cfg.search
    max_epoch = max(space.distill_epochs)
    ctx = {"model": storage.canonical(cfg.model), "data": storage.canonical(cfg.data), "inputs": inputs_location,
           "teacher_logits": logits_path.name, "search_dir": join(dest, "search"), "max_length": max_length,
           "train_limit": cfg.train_limit, "trial_cpus": cfg.trial_cpus, "seed": cfg.seed, "max_epoch": max_epoch}
    # Epoch reports carry only val_accuracy (for ASHA); multi-objective Optuna reads only the final report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(trial, {"cpu": cfg.trial_cpus})
    tune_dir = join(dest, "tune")
    if cfg.resume and tune.Tuner.can_restore(tune_dir):
        log.info("resuming the search in %s", storage.redact(tune_dir))
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space={**param_space(space, depth), "ctx": ctx})
    else:
        storage.delete(tune_dir)
        searcher = OptunaSearch(metric=["val_accuracy", "latency_ms_b1", "size_mb"], mode=["max", "min", "min"],
                                points_to_evaluate=cfg.initial_points or default_points(space, depth), seed=cfg.seed)
        scheduler = (ASHAScheduler(metric="val_accuracy", mode="max", time_attr="epoch", max_t=max_epoch,
                                   grace_period=1, reduction_factor=2) if cfg.asha and max_epoch > 1 else None)
        cpus = ray.cluster_resources().get("CPU", 1)
        tuner = tune.Tuner(
            trainable,
            param_space={**param_space(space, depth), "ctx": ctx},
            tune_config=tune.TuneConfig(num_samples=cfg.trials, search_alg=searcher, scheduler=scheduler,
                                        max_concurrent_trials=max(1, int(cpus // cfg.trial_cpus)),
                                        time_budget_s=cfg.time_budget_s),
            run_config=tune.RunConfig(name="tune", storage_path=str(dest),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                      # Copy the experiment state to OUT often (default: every 5 min), so a
                                      # killed search resumes without redoing finished trials.
                                      sync_config=tune.SyncConfig(sync_period=5)),
        )
    grid = tuner.fit()

    trials = []
    for result in grid:
        m = result.metrics or {}
        row = {"trial_id": m.get("trial_id") or Path(result.path).name, "config": {
            k: v for k, v in (result.config or {}).items() if k != "ctx"}}
        if result.error is not None:
            row.update(status="error", error=str(result.error).strip().splitlines()[-1][:300])
        elif not m.get("final"):
            row.update(status="stopped early (ASHA)", val_accuracy=m.get("val_accuracy"), epoch=m.get("epoch"))
        else:
            row.update(status="finished", artifact=m["artifact"], pipeline=json.loads(m["pipeline"]),
                       trial_latency_ms_b1=m["latency_ms_b1"], build_s=m["build_s"])
        trials.append(row)
    finished = [r for r in trials if r["status"] == "finished"]
    log.info("search done: %d finished, %d stopped early, %d failed; measuring them and the base model again",
             len(finished), sum(r["status"].startswith("stopped") for r in trials),
             sum(r["status"] == "error" for r in trials))

    val_set = (val.column("text").to_pylist(), val.column("label").to_pylist())
    test_set = (test_texts, test.column("label").to_pylist())
    base = measure(model_dir, latency_texts, cfg.threads, {"val": val_set, "test": test_set})
    for r in finished:
        r.update(measure(local_copy(r["artifact"]), latency_texts, cfg.threads, {"val": val_set}))
    try:
        chosen = choose(finished, base, cfg.max_accuracy_drop)
    except NoCandidateError:
        write_report(out, trials, base, None, None, cfg)
        publish_summary(out, dest)
        raise
    for r in finished:
        r["pareto"] = any(r is p for p in pareto_front(finished))
    scores = measure(local_copy(chosen["artifact"]), latency_texts, cfg.threads, {"test": test_set}, repeats=5)
    metrics = {
        "accuracy": scores["test_accuracy"], "macro_f1": scores["test_macro_f1"],
        "latency_ms_b1": chosen["latency_ms_b1"], "latency_ms_b32": chosen["latency_ms_b32"],
        "size_mb": chosen["size_mb"], "split": "test", "backend": chosen["backend"],
        "validation": {"accuracy": chosen["val_accuracy"], "macro_f1": chosen["val_macro_f1"]},
        "base": {"accuracy": base["test_accuracy"], "macro_f1": base["test_macro_f1"],
                 "latency_ms_b1": base["latency_ms_b1"], "latency_ms_b32": base["latency_ms_b32"],
                 "size_mb": base["size_mb"],
                 "validation": {"accuracy": base["val_accuracy"], "macro_f1": base["val_macro_f1"]}},
        "speedup_b1": base["latency_ms_b1"] / chosen["latency_ms_b1"],
        "speedup_b32": base["latency_ms_b32"] / chosen["latency_ms_b32"],
        "size_reduction": base["size_mb"] / chosen["size_mb"],
        "accuracy_drop_pts": 100 * (base["test_accuracy"] - scores["test_accuracy"]),
        "latency_threads": cfg.threads,
        "trials": {"finished": len(finished), "total": len(trials)},
        "wall_s": round(time.time() - started, 1),
    }
    with atomic_dir(join(dest, "chosen"), overwrite=True) as staging:
        for f in local_copy(chosen["artifact"]).iterdir():
            shutil.copy2(f, staging / f.name)
        write_json(staging / "metrics.json", metrics)
        ft_manifest = read_json(model_dir / "manifest.json") if (model_dir / "manifest.json").is_file() else {}
        write_json(staging / "manifest.json", manifest(
            "compress", cfg.model_dump(mode="json"),
            task=data_manifest["task"], labels=base_model.labels, max_length=max_length,
            parent=storage.canonical(cfg.model), parent_manifest=ft_manifest,
            data=storage.canonical(cfg.data), data_manifest_sha256=file_sha256(data_dir / "manifest.json"),
            trial_id=chosen["trial_id"], method=chosen["pipeline"], parameters=chosen["config"]))
    write_report(out, trials, base, chosen, metrics, cfg)
    publish_summary(out, dest)
    log.info("chosen %s: test accuracy %.4f (base %.4f), %.2f ms at batch 1 (%.1fx faster), %.1f MB (%.1fx smaller)",
             chosen["trial_id"], metrics["accuracy"], metrics["base"]["accuracy"], metrics["latency_ms_b1"],
             metrics["speedup_b1"], metrics["size_mb"], metrics["size_reduction"])
    return join(dest, "chosen") if remote else out / "chosen"


def publish_summary(out: Path, dest: Path | str) -> None:
    """Copies the report files from the local working folder to an output URI (a local output is the folder)."""
    if storage.is_uri(dest):
        for f in sorted(out.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                storage.upload_file(f, join(dest, f.name))


def cli(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_stage(CompressConfig, main, argv, prog="slimray compress")


if __name__ == "__main__":
    cli()
