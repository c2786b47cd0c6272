"""Compress stage: Ray Tune searches distillation / pruning / vocabulary trimming / int8 quantization and
chooses the fastest model on the accuracy x latency x size Pareto front that keeps the accuracy asked for.

    slimray compress --model runs/b77/ft --data runs/b77/data --out runs/b77/compress --trials 12
    python -m tuning.compress --config tuning/configs/compress_banking77.yaml

Each trial builds one candidate (``tuning.methods``), saves it as a loadable artifact in
``OUT/search/<trial>``, and reports validation accuracy, macro-F1, latency and size. An entity tagger
(``--task ner`` data) goes through the same search with entity F1 and macro entity F1 in place of accuracy and
macro-F1 (the ``val_accuracy`` / ``val_macro_f1`` keys of the search hold the task's score; ``metric`` says
which), per-token KD, and no transfer set. Optuna's
multi-objective sampler proposes the next trials; ASHA stops distillations that fall behind after an epoch
(a trial stopped early never enters the Pareto front). Afterwards every finished candidate and the base
model are measured again under the same protocol (``tuning.measure``; latency in interleaved rounds, every
model in each), so the comparison is disturbed neither by trials running side by side nor by a change in the
machine's speed while one model is timed. Output: ``OUT/chosen/`` (artifact, manifest,
metrics.json), ``OUT/report.md`` and ``OUT/pareto.png``. Re-running the same command resumes an
interrupted search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from cluster import storage
from cluster.storage import join, local_copy
from jobs.artifacts import atomic_dir, file_sha256, manifest, read_json, write_json
from jobs.config import Location, StrictModel, run_cli
from jobs.errors import InputError
from jobs.prepare import load_prepared, read_split
from jobs.tasks import get_task
from tuning.report import METRIC_WORDS

log = logging.getLogger("slimray.compress")


class SearchSpace(StrictModel):
    """The compression search space; a one-element list fixes a parameter."""

    distill_layers: list[int] | None = Field(
        default=None, description="Student depths to try (0 = no distillation); default: 0 and about 1/3, "
        "1/2 of the teacher's layers")
    distill_epochs: list[int] = Field(default=[1, 2, 3], description="Distillation epochs to try")
    temperature: tuple[float, float] = Field(default=(1.0, 6.0), description="KD temperature range")
    alpha: tuple[float, float] = Field(default=(0.3, 0.9), description="Weight of the KD term (rest: cross-entropy)")
    lr: tuple[float, float] = Field(default=(5e-5, 5e-4), description="Distillation learning-rate range (log)")
    hidden_weight: list[float] = Field(default=[0.0, 1.0, 3.0], description="Weights of the hidden-state loss "
                                       "(student layer -> mapped teacher layer, MSE); 0 = logits only")
    attention_weight: list[float] = Field(default=[0.0, 1.0], description="Weights of the attention-relation "
                                          "loss of mapped layers (MiniLM / TinyBERT style); 0 = off")
    augment: list[bool] = Field(default=[True, False], description="Distil on the transfer set too (teacher-"
                                "labelled augmentations of train and --unlabelled texts)")
    prune_heads: list[float] = Field(default=[0.0, 0.25, 0.5], description="Shares of attention heads to remove")
    prune_ffn: list[float] = Field(default=[0.0, 0.25, 0.5], description="Shares of FFN neurons to remove")
    importance: list[str] = Field(default=["taylor"], description="Pruning importance: taylor (|w*grad|) or magnitude")
    recovery_steps: list[int] = Field(default=[0, 200], description="KD steps after pruning")
    trim_vocab: list[bool] = Field(default=[True, False], description="Trim the vocabulary to tokens seen in train")
    quantize: list[str] = Field(default=["onnx-int8", "onnx-int8-per-channel", "onnx-int8-unfused", "torch-int8",
                                         "none"],
                                description="int8 backend or none: onnx-int8 (fused graph), onnx-int8-per-channel "
                                "(fused, a scale per output channel: half the logit error at the same latency), "
                                "onnx-int8-unfused, torch-int8")


class CompressConfig(StrictModel):
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
    time_budget_s: float | None = Field(default=None, gt=0, description="Create no new trial after this many "
                                        "seconds of the search; the trials already created finish")
    threads: int = Field(default=1, ge=1, description="Threads for latency measurement (the same for every model)")
    trial_cpus: float = Field(default=1.0, gt=0, description="CPUs per trial; trials run in parallel on the rest")
    train_limit: int | None = Field(default=None, ge=1, description="Smoke knob: use at most this many train "
                                    "rows for distillation and pruning")
    latency_texts: int = Field(default=64, ge=32, description="Texts used for latency: test texts, topped up from "
                               "validation then train when the test split has fewer")
    latency_rounds: int = Field(default=15, ge=1, description="Interleaved rounds of the final side-by-side latency "
                                "measurement (the median over rounds; fewer is a smoke knob)")
    augment_copies: int = Field(default=1, ge=0, description="Augmented copies of each train text in the "
                                "transfer set (masking, deletion, swaps, span mixing; teacher-labelled; "
                                "0 = none)")
    unlabelled: Path | None = Field(default=None, description="In-domain texts without labels for the teacher to "
                                    "label (.txt, one per line, or CSV/TSV/JSONL/parquet with a text column); "
                                    "texts in validation or test are dropped and counted")
    initial_points: list[dict[str, Any]] | None = Field(
        default=None, description="Trials to evaluate first (parameter dicts; a parameter left out takes the value of "
        "the ONNX-int8-alone point); default: ONNX int8 alone "
        "(fused and plain export: the one-step alternatives), then distil + trim + int8 at each student depth")
    asha: bool = Field(default=True, description="Stop distillations that fall behind after each epoch (ASHA)")
    asha_grace_epochs: int | None = Field(default=None, ge=1, description="Epochs every distillation runs before "
                                          "ASHA may stop it (default: half the longest epoch budget, rounded up: "
                                          "a long student is not judged by its first epoch)")
    seed: int = Field(default=0, description="Seed of the sampler and of every trial")
    search: SearchSpace = Field(default_factory=SearchSpace, description="The search space")
    resume: bool = Field(default=True, description="Resume an interrupted search in the same output folder")
    overwrite: bool = Field(default=False, description="Replace an existing chosen/ model")


class NoCandidateError(InputError):
    """No candidate meets the accuracy constraint; the message lists the best ones."""


# ----------------------------------------------------------------------------------------------------------
# Trial side.

SHARED = "shared"  # the key of the param space holding what every trial shares (locations, limits, seed)


def train_rows(data_dir: Path | str, limit: int | None, kind: str = "sequence") -> tuple[list[Any], Any]:
    """The first ``limit`` train rows (all without a limit): texts and their label ids, or a tagger's sentences
    (word lists) and their tag ids (a list per sentence)."""
    if kind == "tagging":
        rows = read_split(data_dir, "train", ("tokens", "tag_ids"))
        return [list(t) for t in rows["tokens"][:limit]], [list(t) for t in rows["tag_ids"][:limit]]
    rows = read_split(data_dir, "train", ("text", "label_id"))
    return rows["text"][:limit], np.asarray(rows["label_id"][:limit])


def eval_rows(data_dir: Path | str, split: str, kind: str) -> tuple[list[Any], list[Any]]:
    """(texts, label names) of a split, or a tagger's (sentences, tag names per word)."""
    if kind == "tagging":
        rows = read_split(data_dir, split, ("tokens", "tags"))
        return [list(t) for t in rows["tokens"]], [list(t) for t in rows["tags"]]
    rows = read_split(data_dir, split, ("text", "label"))
    return rows["text"], rows["label"]


def plan_from_params(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Search parameters -> {method: kwargs} for ``tuning.methods.run_pipeline``."""
    plan: dict[str, dict[str, Any]] = {}
    kd = {"lr": p["lr"], "temperature": p["temperature"], "alpha": p["alpha"]}
    if p["distill_layers"]:
        plan["distill"] = {"layers": p["distill_layers"], "epochs": p["distill_epochs"], **kd,
                           "hidden_weight": p.get("hidden_weight", 0.0),
                           "attention_weight": p.get("attention_weight", 0.0)}
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
    from jobs.modeling import load_tokenizer
    from tuning.methods import Candidate, run_pipeline

    shared, params = config[SHARED], {k: v for k, v in config.items() if k != SHARED}
    threads = max(1, int(shared["trial_cpus"]))
    torch.set_num_threads(threads)
    trial_id = ray.tune.get_context().get_trial_id()
    # Inputs by path or URI, so a trial runs on any node (a URI is downloaded once per node, then cached).
    data_dir, teacher_dir, inputs = (local_copy(shared[k]) for k in ("data", "model", "inputs"))
    val = eval_rows(data_dir, "validation", shared["kind"])

    def on_epoch(epoch: int, acc: float) -> None:
        if epoch < params["distill_epochs"]:  # the last epoch's result comes with the full report
            ray.tune.report({"epoch": epoch, "val_accuracy": acc, "final": False})

    ctx = _method_context(shared, data_dir, inputs, val, threads, on_epoch, bool(params.get("augment")))
    started = time.perf_counter()
    cand = run_pipeline(Candidate(build_torch_model(teacher_dir, {}), load_tokenizer(teacher_dir)), ctx,
                        plan_from_params(params))
    build_s = time.perf_counter() - started
    artifact, metrics = _save_and_measure(cand, shared, trial_id, read_json(inputs / "latency_texts.json"), val,
                                          threads)
    ray.tune.report({
        "epoch": shared["max_epoch"], "final": True, "artifact": artifact, "build_s": build_s,
        "val_accuracy": metrics["val_accuracy"], "val_macro_f1": metrics["val_macro_f1"],
        "latency_ms_b1": metrics["latency_ms_b1"], "latency_ms_b32": metrics["latency_ms_b32"],
        "size_mb": metrics["size_mb"], "pipeline": json.dumps(cand.steps),
    })


def _method_context(shared: dict[str, Any], data_dir: Path, inputs: Path, val: tuple[list, list], threads: int,
                    on_epoch: Any, augment: bool) -> Any:
    """The ``tuning.methods.Context`` of a trial: train rows, the teacher's logits on them, validation (label
    names as ids of the teacher's labels), and (with ``augment``) the transfer set with the teacher's logits."""
    from tuning.methods import Context

    kind = shared["kind"]
    texts, labels = train_rows(data_dir, shared["train_limit"], kind)
    ids = {name: i for i, name in enumerate(shared["labels"])}
    val_labels: Any = ([[ids[t] for t in tags] for tags in val[1]] if kind == "tagging"
                       else np.array([ids[name] for name in val[1]]))
    # The teacher's rows for these train rows: one per text, or a tagger's one per word, sentence after sentence.
    logits = np.load(inputs / shared["teacher_logits"])[: sum(map(len, texts)) if kind == "tagging" else len(texts)]
    extra: dict[str, Any] = {}
    if augment and shared["transfer_logits"]:
        extra = {"extra_texts": read_json(inputs / "transfer_texts.json"),
                 "extra_logits": np.load(inputs / shared["transfer_logits"])}
    return Context(
        train_texts=texts, train_labels=labels, teacher_logits=logits,
        val_texts=val[0], val_labels=val_labels, max_length=shared["max_length"], threads=threads,
        seed=shared["seed"], on_epoch=on_epoch, kind=kind, **extra)


def _save_and_measure(cand: Any, shared: dict[str, Any], trial_id: str, latency_texts: list[str],
                      val_set: tuple[list[Any], list[Any]], threads: int) -> tuple[str, dict[str, Any]]:
    """Saves the candidate in ``search/<trial>``, measures it there; returns (its location, metrics)."""
    from tuning.measure import measure
    from tuning.methods import save_candidate

    search_dir = shared["search_dir"]
    remote = storage.is_uri(search_dir)
    local = (Path(tempfile.mkdtemp(prefix="slimray-candidate-")) if remote else Path(search_dir)) / trial_id
    if local.exists():
        shutil.rmtree(local)
    save_candidate(cand, local, shared["max_length"])
    metrics = measure(local, latency_texts, threads=threads, repeats=3, eval_sets={"val": val_set})
    if not remote:
        return str(local), metrics
    # The driver may be on another node: the candidate goes to the output URI.
    artifact = join(search_dir, trial_id)
    storage.upload_dir(local, artifact)
    shutil.rmtree(local.parent, ignore_errors=True)
    return artifact, metrics


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
        name = METRIC_WORDS[base.get("metric", "accuracy")]
        best = sorted(rows, key=lambda r: -r["val_accuracy"])[:5]
        listing = "; ".join(f"{r['trial_id']}: val {name[0]} {r['val_accuracy']:.4f}, {name[1]} "
                            f"{r['val_macro_f1']:.4f}, {r['latency_ms_b1']:.2f} ms" for r in best)
        raise NoCandidateError(
            f"no candidate keeps validation {name[0]} >= {floor_acc:.4f} (base {base['val_accuracy']:.4f} - "
            f"{max_drop_pts} points) and {name[1]} >= {floor_f1:.4f}; best candidates: {listing or 'none finished'}. "
            "Raise --max-accuracy-drop, run more --trials, or widen the search space")
    return min(eligible, key=lambda r: (r["latency_ms_b1"], r["size_mb"]))


# ----------------------------------------------------------------------------------------------------------
# Driver.


def default_layers(depth: int) -> list[int]:
    """Student depths tried by default: none (0), about a third and half of the teacher's ``depth``."""
    return sorted({0, *(d for d in (max(1, round(depth / 3)), max(1, round(depth / 2))) if d < depth)})


def param_space(space: SearchSpace, depth: int) -> dict[str, Any]:
    """The Tune param space of ``space`` for a teacher of ``depth`` layers."""
    from ray import tune

    return {
        "distill_layers": tune.choice(space.distill_layers or default_layers(depth)),
        "distill_epochs": tune.choice(space.distill_epochs),
        "temperature": tune.uniform(*space.temperature),
        "alpha": tune.uniform(*space.alpha),
        "lr": tune.loguniform(*space.lr),
        "hidden_weight": tune.choice(space.hidden_weight),
        "attention_weight": tune.choice(space.attention_weight),
        "augment": tune.choice(space.augment),
        "prune_heads": tune.choice(space.prune_heads),
        "prune_ffn": tune.choice(space.prune_ffn),
        "importance": tune.choice(space.importance),
        "recovery_steps": tune.choice(space.recovery_steps),
        "trim_vocab": tune.choice(space.trim_vocab),
        "quantize": tune.choice(space.quantize),
    }


def default_points(space: SearchSpace, depth: int, tagger: bool = False) -> list[dict[str, Any]]:
    """The one-step alternatives (ONNX int8 alone, fused and plain export), then distil + trim + int8
    combinations at each student depth of the space, deepest first (the deepest twice: as it is, and with its FFN
    pruned by the smallest share of the space); evaluated first.

    A tagger's combinations leave the vocabulary whole (the space still searches trimming): on WNUT-17,
    trimming alone cost 9.1 points of test entity F1, because the entity words train never saw split into
    other pieces (README).

    The combinations distil on the transfer set with the logit loss only: in the ablation
    (``bench/distill_ablation.py``, README) augmentation added 1.3 test points and the intermediate-layer
    losses none, at twice the cost per step; the search still tries them. Every value is taken from the space
    (Optuna rejects points outside it): where the space has no "off" value for a method, the point keeps that
    method on.
    """
    layers = space.distill_layers or default_layers(depth)

    def prefer(values: list[Any], value: Any) -> Any:
        return value if value in values else values[0]

    base = {"distill_layers": prefer(layers, 0), "distill_epochs": max(space.distill_epochs), "temperature": 2.0,
            "alpha": 0.7, "lr": min(max(2e-4, space.lr[0]), space.lr[1]),
            "prune_heads": prefer(space.prune_heads, 0.0), "prune_ffn": prefer(space.prune_ffn, 0.0),
            "importance": space.importance[0], "recovery_steps": prefer(space.recovery_steps, 0),
            "trim_vocab": prefer(space.trim_vocab, False), "quantize": prefer(space.quantize, "onnx-int8"),
            "hidden_weight": prefer(space.hidden_weight, 0.0), "attention_weight": prefer(space.attention_weight, 0.0),
            "augment": prefer(space.augment, False)}
    points = [base]
    if base["quantize"] == "onnx-int8" and "onnx-int8-unfused" in space.quantize:  # both one-step baselines
        points.append({**base, "quantize": "onnx-int8-unfused"})
    students = sorted((d for d in layers if d > 0), reverse=True)
    # Per-channel scales: on MiniLM-L6 (BANKING77 head) the mean logit error of the fused int8 graph fell from
    # 0.0107 to 0.0056 and argmax agreement with fp32 rose from 0.903 to 0.946, at the same latency (README).
    combined = "onnx-int8-per-channel" if "onnx-int8-per-channel" in space.quantize else base["quantize"]
    if True in space.trim_vocab or (tagger and students):
        ffn = [share for share in space.prune_ffn if share > 0]
        for i, d in enumerate(students):
            points.append({**base, "distill_layers": d, "trim_vocab": prefer(space.trim_vocab, not tagger),
                           "augment": prefer(space.augment, True), "quantize": combined})
            if i == 0 and ffn:
                # The deepest student again, its FFN then cut by the smallest share (with the longest recovery):
                # depth sets latency (about 0.29 ms per layer of ONNX int8 MiniLM at 1 thread). On BANKING77 a
                # 3-layer student was 1.94x the one-step baseline at -0.55 test points, and 2.10x at -0.94 with a
                # quarter of its FFN cut (README). Second, so that a time budget does not cut it.
                points.append({**points[-1], "prune_ffn": min(ffn), "recovery_steps": max(space.recovery_steps)})
    return points


def first_points(cfg: CompressConfig, depth: int, tagger: bool = False) -> list[dict[str, Any]]:
    """``--initial-points`` (a parameter a point leaves out takes the ONNX-int8-alone point's value), or
    ``default_points``."""
    defaults = default_points(cfg.search, depth, tagger)
    return [{**defaults[0], **p} for p in cfg.initial_points] if cfg.initial_points else defaults


def teacher_logits(model_dir: Path, texts: list[Any], out: Path, name: str) -> Path:
    """The fine-tuned model's logits on ``texts``, computed once per (model, texts) and cached in ``out``: (texts,
    labels), or a tagger's (words, tags) on sentences (word lists), sentence after sentence."""
    from jobs.inference import load_inference_model

    weights = Path(model_dir) / "model.safetensors"
    model_key = file_sha256(weights) if weights.is_file() else str(model_dir)
    key = hashlib.sha256(model_key.encode())
    for text in texts:
        key.update((text if isinstance(text, str) else "\x1f".join(text)).encode() + b"\0")
    path = out / f"{name}-{key.hexdigest()[:12]}.npy"
    if not path.is_file():
        log.info("teacher logits on %d %s texts (once; cached in %s)", len(texts), name.split("_")[0], path.name)
        model = load_inference_model(model_dir, script=False)
        if model.kind == "tagging":
            logits = np.concatenate(model.tag(texts, batch_size=64) or [np.zeros((0, len(model.labels)), np.float32)])
        else:
            logits = model.logits(texts, batch_size=64, by_length=True)
        partial = out / f".{path.name}.partial.npy"
        np.save(partial, logits)
        partial.rename(path)
    return path


def transfer_set(cfg: CompressConfig, inputs: SearchInputs, train: list[str], folder: Path) -> dict[str, Any]:
    """Builds the transfer set (``tuning.transfer``) into ``folder``: its texts, the teacher's logits on them;
    returns what it holds and dropped (the logits' file name under "logits", None when it is empty)."""
    from jobs.modeling import load_tokenizer
    from tuning.transfer import build_transfer_set

    if inputs.kind == "tagging":  # augmenting a tagged sentence would need tag-aware edits: not built
        log.info("transfer set: none (an entity tagger distils on its train sentences)")
        return {"logits": None, "texts": 0, "sources": {}, "dropped": {}}
    mask_token = load_tokenizer(inputs.model_dir).mask_token or "[MASK]"
    built = build_transfer_set(train, inputs.val[0] + inputs.test[0], copies=cfg.augment_copies, seed=cfg.seed,
                               mask_token=mask_token, unlabelled=inputs.unlabelled)
    if cfg.unlabelled is not None and not built.sources["unlabelled"]:
        raise InputError(f"--unlabelled {str(cfg.unlabelled)!r}: none of its {len(inputs.unlabelled)} texts is usable "
                         f"({dict(built.dropped)}); every one is a train, validation or test text")
    write_json(folder / "transfer_texts.json", built.texts)
    logits = teacher_logits(inputs.model_dir, built.texts, folder, "transfer_logits") if built.texts else None
    log.info("transfer set: %d texts (%s); dropped %s", len(built.texts), dict(built.sources) or "none",
             dict(built.dropped) or "none")
    return {"logits": logits.name if logits else None, "texts": len(built.texts), "sources": dict(built.sources),
            "dropped": dict(built.dropped)}


def check_inputs(cfg: CompressConfig) -> tuple[dict[str, Any], Any]:
    """Checks the model and data folders fit together; returns (data manifest, base inference model)."""
    from jobs.inference import load_inference_model

    model_dir, data_dir = local_copy(cfg.model), local_copy(cfg.data)
    data_manifest = load_prepared(data_dir)
    task = get_task(data_manifest["task"])
    if task.kind == "tagging" and cfg.unlabelled is not None:
        raise InputError(f"--unlabelled {str(cfg.unlabelled)!r}: the data is prepared for entity tagging "
                         f"(task {task.name!r}); unlabelled text distils only intent and sentiment classifiers")
    for split in ("validation", "test"):
        if not (data_dir / f"{split}.parquet").is_file():
            raise InputError(f"{cfg.data} has no {split} split: compression chooses on validation and reports on "
                             "test; re-run `slimray prepare` (it cuts both from train when the source has none)")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{str(cfg.model)!r} is not a model folder (no config.json)")
    base = load_inference_model(model_dir, script=False)
    if base.backend != "torch":
        raise InputError(f"{cfg.model} is a {base.backend} artifact; compress the fine-tuned PyTorch model")
    if (base.kind == "tagging") != (task.kind == "tagging"):
        raise InputError(f"{cfg.model} is {'an entity tagger' if base.kind == 'tagging' else 'a text classifier'} "
                         f"but {cfg.data} is prepared for task {task.name!r} ({task.kind})")
    missing = sorted(set(data_manifest["labels"]) - set(base.labels))
    if missing:
        raise InputError(f"the model does not know labels of {cfg.data}: {missing[:5]}; was it fine-tuned on this data?")
    return data_manifest, base


@dataclass
class Output:
    """Where the search writes.

    ``dest`` is the output as given (a path, or a storage URI): Tune's state, the candidates and ``chosen/``
    go there directly, so trials and the driver may be on any node. ``work`` is the local folder for the
    working files (the output itself when it is a path; a cache keyed by the URI otherwise); its report
    files are published to ``dest`` at the end.
    """

    dest: Path | str
    work: Path

    @property
    def remote(self) -> bool:
        return storage.is_uri(self.dest)

    @property
    def chosen(self) -> Path | str:
        return join(self.dest, "chosen")

    def publish_reports(self) -> None:
        """Copies the report files of ``work`` to an output URI (a local output is ``work`` itself)."""
        if self.remote:
            for f in sorted(self.work.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    storage.upload_file(f, join(self.dest, f.name))


def open_output(cfg: CompressConfig) -> Output:
    """The output of ``cfg``, checked writable and without a ``chosen/`` (unless ``--overwrite``)."""
    if storage.is_uri(cfg.out):
        storage.check_writable(cfg.out)
        output = Output(cfg.out, storage.work_dir(cfg.out))
    else:
        local = Path(cfg.out).expanduser().resolve()
        output = Output(local, local)
    if storage.exists(output.chosen) and not cfg.overwrite:
        raise InputError(f"{storage.redact(output.chosen)} already exists; pass --overwrite to search again")
    return output


@dataclass
class SearchInputs:
    """What the driver reads once, before the search, and uses again to measure and describe the choice."""

    model_dir: Path
    data_dir: Path
    data_manifest: dict[str, Any]
    labels: list[str]  # the base model's label names, in id order
    max_length: int  # tokens
    depth: int  # the base model's encoder layers
    val: tuple[list[str], list[str]]  # (texts, label names)
    test: tuple[list[str], list[str]]
    latency_texts: list[str]  # test texts, the same for every model
    unlabelled: list[str]  # --unlabelled's texts (empty without it)
    kind: str = "sequence"  # or "tagging": val and test hold sentences (word lists) and tag names per word


def load_inputs(cfg: CompressConfig) -> SearchInputs:
    """Checks the inputs (``check_inputs``) and reads what the search and the choice need."""
    from jobs.modeling import encoder_layers, load_classifier
    from tuning.transfer import read_unlabelled

    unlabelled = read_unlabelled(cfg.unlabelled) if cfg.unlabelled is not None else []
    data_manifest, base_model = check_inputs(cfg)
    model_dir, data_dir = local_copy(cfg.model).resolve(), local_copy(cfg.data).resolve()
    kind = base_model.kind
    val, test = eval_rows(data_dir, "validation", kind), eval_rows(data_dir, "test", kind)
    latency_texts = pick_latency_texts(data_dir, cfg.latency_texts, cfg.seed)
    return SearchInputs(model_dir=model_dir, data_dir=data_dir, data_manifest=data_manifest,
                        labels=base_model.labels, max_length=int(base_model.max_length),
                        depth=len(encoder_layers(load_classifier(model_dir)[0])), val=val, test=test,
                        latency_texts=latency_texts, unlabelled=unlabelled, kind=kind)


def pick_latency_texts(data_dir: Path, count: int, seed: int) -> list[str]:
    """``count`` texts to time every model on: test texts in seeded order, topped up from validation, then train,
    when the test split is smaller (a tagger's texts are its words joined by spaces: the same pieces)."""
    rng = np.random.default_rng(seed)
    picked: list[str] = []
    for split in ("test", "validation", "train"):
        texts = read_split(data_dir, split, ("text",))["text"]
        picked += [texts[i] for i in rng.permutation(len(texts))[: count - len(picked)]]
        if len(picked) >= count:
            return picked
    raise InputError(f"{data_dir} has {len(picked)} texts in all; latency at batch 32 needs at least 32")


def write_trial_inputs(cfg: CompressConfig, inputs: SearchInputs, output: Output) -> dict[str, Any]:
    """Writes the resolved config and the trials' inputs; returns what every trial gets under ``SHARED``.

    The inputs go to one folder passed by location: trial configs are printed, customer texts must not be.
    """
    output.work.mkdir(parents=True, exist_ok=True)
    write_json(output.work / "compress_config.json", cfg.model_dump(mode="json"))
    folder = output.work / "inputs"
    folder.mkdir(exist_ok=True)
    train, _ = train_rows(inputs.data_dir, cfg.train_limit, inputs.kind)
    logits_path = teacher_logits(inputs.model_dir, train, folder, "teacher_logits")
    transfer = transfer_set(cfg, inputs, train, folder)
    write_json(folder / "transfer.json", {k: v for k, v in transfer.items() if k != "logits"})
    write_json(folder / "latency_texts.json", inputs.latency_texts)
    location = str(folder)
    if output.remote:
        location = join(output.dest, "inputs")
        storage.upload_dir(folder, location)
    return {"model": storage.canonical(cfg.model), "data": storage.canonical(cfg.data), "inputs": location,
            "teacher_logits": logits_path.name, "transfer_logits": transfer["logits"], "search_dir": join(output.dest, "search"),
            "max_length": inputs.max_length, "train_limit": cfg.train_limit, "trial_cpus": cfg.trial_cpus,
            "seed": cfg.seed, "max_epoch": max(cfg.search.distill_epochs), "kind": inputs.kind,
            "labels": inputs.labels}


def run_search(cfg: CompressConfig, shared: dict[str, Any], depth: int, dest: Path | str) -> Any:
    """Runs (or resumes) the Tune search of ``cfg``; returns its ResultGrid."""
    from ray import tune

    from cluster.ray_env import connect

    connect()
    # Epoch reports carry only val_accuracy (for ASHA); multi-objective Optuna reads only the final report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(trial, {"cpu": cfg.trial_cpus})
    space = {**param_space(cfg.search, depth), SHARED: shared}
    tune_dir = join(dest, "tune")
    if cfg.resume and tune.Tuner.can_restore(tune_dir):
        log.info("resuming the search in %s", storage.redact(tune_dir))
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=space)
    else:
        storage.delete(tune_dir)
        tagger = shared["kind"] == "tagging"
        tuner = tune.Tuner(trainable, param_space=space, tune_config=_tune_config(cfg, depth, tagger),
                           run_config=tune.RunConfig(name="tune", storage_path=str(dest),
                                                     failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                                     # Copy the experiment state to OUT often (default: every
                                                     # 5 min), so a killed search resumes without redoing
                                                     # finished trials.
                                                     sync_config=tune.SyncConfig(sync_period=5)))
    return tuner.fit()


def _tune_config(cfg: CompressConfig, depth: int, tagger: bool = False) -> Any:
    """Optuna's multi-objective sampler, ASHA on distillation epochs, as many trials at once as CPUs allow."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    max_epoch = max(cfg.search.distill_epochs)
    optuna = OptunaSearch(metric=["val_accuracy", "latency_ms_b1", "size_mb"], mode=["max", "min", "min"],
                            points_to_evaluate=first_points(cfg, depth, tagger), seed=cfg.seed)
    scheduler = (ASHAScheduler(metric="val_accuracy", mode="max", time_attr="epoch", max_t=max_epoch,
                               grace_period=min(max_epoch, cfg.asha_grace_epochs or math.ceil(max_epoch / 2)),
                               reduction_factor=2) if cfg.asha and max_epoch > 1 else None)
    cpus = ray.cluster_resources().get("CPU", 1)
    searcher = budgeted_search(optuna, max(1, int(cpus // cfg.trial_cpus)), cfg.time_budget_s)
    return tune.TuneConfig(num_samples=cfg.trials, search_alg=searcher, scheduler=scheduler)


def budgeted_search(searcher: Any, max_concurrent: int, budget_s: float | None) -> Any:
    """``searcher`` limited to ``max_concurrent`` trials at once, creating none once ``budget_s`` seconds have
    passed since the search began; the trials created by then (running, or pending for a CPU) finish.

    Tune's own ``time_budget_s`` stops every running trial at the deadline: with students that train for tens
    of minutes, the longest (and best) ones would be cut after they had used most of the budget.

    Resumed (``Tuner.restore``): a search interrupted before its budget ran out gets it afresh (the clock of the
    new process starts at the restore); one interrupted after it ran out stays finished (Tune restores its
    search generator as finished) and only completes the trials it had created.
    """
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class BudgetedSearch(ConcurrencyLimiter):
        def __init__(self, searcher: Any, max_concurrent: int, budget_s: float | None):
            super().__init__(searcher, max_concurrent)
            self.budget_s, self.started, self.spent = budget_s, time.monotonic(), False

        def suggest(self, trial_id: str) -> Any:
            if self.budget_s is not None and time.monotonic() - self.started > self.budget_s:
                if not self.spent:
                    log.info("time budget of %.0f s spent: no more trials start; the running ones finish",
                             self.budget_s)
                    self.spent = True
                return Searcher.FINISHED
            return super().suggest(trial_id)

        def set_state(self, state: dict) -> None:  # restored: the clock of this process starts now
            super().set_state(state)
            self.started, self.spent = time.monotonic(), False

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state, started=time.monotonic(), spent=False)

    return BudgetedSearch(searcher, max_concurrent, budget_s)


def collect_trials(grid: Any) -> list[dict[str, Any]]:
    """One row per trial: finished (with its artifact), stopped early by ASHA, or failed (with the error)."""
    trials = []
    for result in grid:
        m = result.metrics or {}
        row = {"trial_id": m.get("trial_id") or Path(result.path).name,
               "config": {k: v for k, v in (result.config or {}).items() if k != SHARED}}
        if result.error is not None:
            row.update(status="error", error=str(result.error).strip().splitlines()[-1][:300])
        elif not m.get("final"):
            row.update(status="stopped early (ASHA)", val_accuracy=m.get("val_accuracy"), epoch=m.get("epoch"))
        else:
            row.update(status="finished", artifact=m["artifact"], pipeline=json.loads(m["pipeline"]),
                       trial_latency_ms_b1=m["latency_ms_b1"], build_s=m["build_s"])
        trials.append(row)
    log.info("search done: %d finished, %d stopped early, %d failed; measuring them and the base model again",
             sum(r["status"] == "finished" for r in trials), sum(r["status"].startswith("stopped") for r in trials),
             sum(r["status"] == "error" for r in trials))
    return trials


def measure_again(finished: list[dict[str, Any]], inputs: SearchInputs, threads: int,
                  rounds: int) -> dict[str, Any]:
    """Measures every finished candidate (in place) and the base model: scores one after another, latency side by
    side (``tuning.measure.latency_side_by_side``: the choice must not depend on when each was timed); returns
    the base's."""
    from tuning.measure import latency_side_by_side, measure

    base = measure(inputs.model_dir, inputs.latency_texts, threads, {"val": inputs.val, "test": inputs.test},
                   timed=False)
    dirs = {"base": inputs.model_dir}
    for r in finished:
        dirs[r["trial_id"]] = local_copy(r["artifact"])
        r.update(measure(dirs[r["trial_id"]], inputs.latency_texts, threads, {"val": inputs.val}, timed=False))
    latency = latency_side_by_side(dirs, inputs.latency_texts, threads, rounds=rounds)
    base.update(latency.pop("base"))
    for r in finished:
        r.update(latency[r["trial_id"]])
    return base


def chosen_metrics(chosen: dict[str, Any], base: dict[str, Any], inputs: SearchInputs, cfg: CompressConfig,
                   trials: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """``chosen/metrics.json``: the chosen model on test against the base, and the search's size."""
    from tuning.measure import measure

    scores = measure(local_copy(chosen["artifact"]), inputs.latency_texts, cfg.threads, {"test": inputs.test},
                     timed=False)  # its latency is measure_again's, taken side by side with the base's
    metric = scores["metric"]  # "accuracy", or a tagger's "entity_f1": the key of the score below
    return {
        "metric": metric, metric: scores["test_accuracy"], "macro_f1": scores["test_macro_f1"],
        "latency_ms_b1": chosen["latency_ms_b1"], "latency_ms_b32": chosen["latency_ms_b32"],
        "size_mb": chosen["size_mb"], "split": "test", "backend": chosen["backend"],
        "validation": {metric: chosen["val_accuracy"], "macro_f1": chosen["val_macro_f1"]},
        "base": {metric: base["test_accuracy"], "macro_f1": base["test_macro_f1"],
                 "latency_ms_b1": base["latency_ms_b1"], "latency_ms_b32": base["latency_ms_b32"],
                 "size_mb": base["size_mb"],
                 "validation": {metric: base["val_accuracy"], "macro_f1": base["val_macro_f1"]}},
        "speedup_b1": base["latency_ms_b1"] / chosen["latency_ms_b1"],
        "speedup_b32": base["latency_ms_b32"] / chosen["latency_ms_b32"],
        "size_reduction": base["size_mb"] / chosen["size_mb"],
        f"{metric}_drop_pts": 100 * (base["test_accuracy"] - scores["test_accuracy"]),
        "latency_threads": cfg.threads,
        "trials": {"finished": sum(r["status"] == "finished" for r in trials), "total": len(trials)},
        "wall_s": round(time.time() - started, 1),
    }


def write_chosen(output: Output, chosen: dict[str, Any], metrics: dict[str, Any], cfg: CompressConfig,
                 inputs: SearchInputs) -> None:
    """``chosen/``: the candidate's files, metrics.json and a manifest with lineage, replaced atomically."""
    ft_manifest_path = inputs.model_dir / "manifest.json"
    with atomic_dir(output.chosen, overwrite=True) as staging:
        for f in local_copy(chosen["artifact"]).iterdir():
            shutil.copy2(f, staging / f.name)
        write_json(staging / "metrics.json", metrics)
        write_json(staging / "manifest.json", manifest(
            "compress", cfg.model_dump(mode="json"),
            task=inputs.data_manifest["task"], labels=inputs.labels, max_length=inputs.max_length,
            parent=storage.canonical(cfg.model),
            parent_manifest=read_json(ft_manifest_path) if ft_manifest_path.is_file() else {},
            data=storage.canonical(cfg.data), data_manifest_sha256=file_sha256(inputs.data_dir / "manifest.json"),
            trial_id=chosen["trial_id"], method=chosen["pipeline"], parameters=chosen["config"]))


def write_reports(output: Output, trials: list[dict[str, Any]], base: dict[str, Any], chosen: dict[str, Any] | None,
                  metrics: dict[str, Any] | None, cfg: CompressConfig) -> None:
    """report.md, trials.json and pareto.png in the working folder, published to the output."""
    from tuning.report import write_report

    write_report(output.work, trials, base, chosen, metrics, cfg)
    output.publish_reports()


def main(cfg: CompressConfig) -> Path | str:
    """Runs the search of ``cfg`` and writes ``chosen/`` and the reports; returns the location of ``chosen/``.

    Raises:
        InputError: An input does not fit (the message says which and how to fix it).
        NoCandidateError: No candidate met the accuracy constraint (the reports are written first).
    """
    started = time.time()
    output = open_output(cfg)
    inputs = load_inputs(cfg)
    if inputs.kind == "tagging" and cfg.search.augment != [False]:
        log.info("search.augment: [False] for an entity tagger (it has no transfer set)")
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"augment": [False]})})
    shared = write_trial_inputs(cfg, inputs, output)
    trials = collect_trials(run_search(cfg, shared, inputs.depth, output.dest))
    finished = [r for r in trials if r["status"] == "finished"]
    base = measure_again(finished, inputs, cfg.threads, cfg.latency_rounds)
    try:
        chosen = choose(finished, base, cfg.max_accuracy_drop)
    except NoCandidateError:
        write_reports(output, trials, base, None, None, cfg)
        raise
    front = pareto_front(finished)
    for r in finished:
        r["pareto"] = any(r is p for p in front)
    metrics = chosen_metrics(chosen, base, inputs, cfg, trials, started)
    write_chosen(output, chosen, metrics, cfg, inputs)
    write_reports(output, trials, base, chosen, metrics, cfg)
    metric = metrics["metric"]
    log.info("chosen %s: test %s %.4f (base %.4f), %.2f ms at batch 1 (%.1fx faster), %.1f MB (%.1fx smaller)",
             chosen["trial_id"], METRIC_WORDS[metric][0], metrics[metric], metrics["base"][metric],
             metrics["latency_ms_b1"],
             metrics["speedup_b1"], metrics["size_mb"], metrics["size_reduction"])
    return output.chosen if output.remote else output.work / "chosen"


def dry_run(cfg: CompressConfig) -> str:
    """``--dry-run``: the output, the model and data (``check_inputs``) and --unlabelled, as ``main`` checks
    them before the search."""
    from tuning.transfer import read_unlabelled

    output = open_output(cfg)
    unlabelled = read_unlabelled(cfg.unlabelled) if cfg.unlabelled is not None else []
    data_manifest, base = check_inputs(cfg)
    return (f"would search {cfg.trials} trials compressing {cfg.model} ({base.kind}, {len(base.labels)} labels) "
            f"for {data_manifest['task']}{f' with {len(unlabelled)} unlabelled texts' if unlabelled else ''}, "
            f"at most {cfg.max_accuracy_drop:g} points below it, into {storage.redact(str(output.dest))}")


def cli(argv: list[str] | None = None) -> None:
    run_cli(CompressConfig, main, argv, prog="slimray compress", check=dry_run)


if __name__ == "__main__":
    cli()
