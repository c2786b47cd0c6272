"""Fine-tune stage: Ray Train runs DeepSpeed ZeRO across workers and writes a loadable model folder.

    slimray finetune --data runs/b77/data --model minilm --workers 2 --zero-stage 3 --max-steps 30 --out runs/b77/ft
    python -m jobs.finetune --config jobs/configs/finetune.yaml --set deepspeed.overlap_comm=true

Every worker runs ``train_loop_per_worker``: it builds a DeepSpeed engine, trains on its Ray Data shard,
evaluates and checkpoints every N steps and at each epoch end (each rank saves its own ZeRO shard; Ray
Train merges them into one checkpoint), and resumes from the latest checkpoint after a failure. Re-running
the same command after an interruption resumes too (same run name and storage). Rank 0 exports the
weights (gathered from the shards under ZeRO-3) in the final report; the driver turns it into ``--out``:
a Hugging Face model folder with ``metrics.json``, ``history.jsonl``, ``manifest.json`` and
``finetune_config.yaml`` beside the weights.

The DeepSpeed config is generated from the options below (``deepspeed_config``); ``deepspeed.extra`` is
deep-merged into it. Settings DeepSpeed would ignore, and extra keys that contradict an option, are
rejected when the config is validated, with the option to use instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from cluster import storage
from cluster.settings import get_settings
from jobs.artifacts import atomic_dir, check_can_write, file_records, file_sha256, manifest, read_json, write_json
from jobs.config import Location, NameOrPath, StrictModel, run_cli
from jobs.errors import InputError
from jobs.prepare import load_prepared, read_split
from jobs.tasks import get_task

log = logging.getLogger("slimray.finetune")

PERSISTENCE_THRESHOLD_DEFAULT = 100_000
SHUFFLE_BUFFER_MAX_ROWS = 200_000  # rows per worker shuffled together each epoch
LENGTH_GROUP_BATCHES = 50  # --group-by-length: batches per group sorted by length (Hugging Face's megabatch)
# Default epochs: about this many training examples per label in all (BANKING77's 117 texts per label give
# 9 epochs; the curve that set it is in the README), never fewer than MIN_EPOCHS or more than MAX_EPOCHS.
LABEL_PRESENTATIONS, MIN_EPOCHS, MAX_EPOCHS = 1000, 3, 20
GENERATION_MODEL = "smollm2"  # jobs.generation.PACKAGED_GGUF
# Default epochs of --task generation: about this many records seen in all, between 1 and MAX_GENERATION_EPOCHS.
GENERATION_PRESENTATIONS, MAX_GENERATION_EPOCHS = 1000, 5


class DeepSpeedOptions(StrictModel):
    """DeepSpeed options slimray exposes; anything else goes through ``extra``."""

    overlap_comm: bool = Field(default=True, description="Overlap gradient reduction with the backward pass "
                               "(measured 1.5x samples/s for ZeRO-2 on 2 CPU workers)")
    contiguous_gradients: bool = Field(default=True, description="Copy gradients into one contiguous buffer "
                                       "as they are produced (less fragmentation)")
    reduce_bucket_size: int = Field(default=50_000_000, ge=1, description="Elements per gradient "
                                    "all-reduce/reduce-scatter bucket")
    stage3_param_persistence_threshold: int = Field(
        default=PERSISTENCE_THRESHOLD_DEFAULT, ge=0,
        description="ZeRO-3 only: parameters smaller than this many elements stay whole on every rank; "
        "0 partitions every parameter")
    offload_optimizer: bool = Field(default=False, description="ZeRO-2/3 only: keep optimizer states in CPU "
                                    "memory (saves GPU memory; compiles DeepSpeedCPUAdam, ~70 s once)")
    bf16: bool = Field(default=True, description="Train in bf16 on GPUs that support it (ignored on CPU)")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw keys deep-merged last into the "
                                  "generated DeepSpeed config (see deepspeed.ai/docs/config-json); keys "
                                  "slimray sets from its own options must keep their value")


class FinetuneConfig(StrictModel):
    """Fine-tune a pretrained encoder with Ray Train + DeepSpeed ZeRO; --out is a Hugging Face model folder."""

    data: Location = Field(description="Prepared data folder (output of `slimray prepare`): a path or a "
                           "storage URI; with --task generation, a JSONL file of records {question, passages, "
                           "answer} or a folder of train.jsonl [+ validation.jsonl, test.jsonl]")
    task: Literal["auto", "generation"] = Field(
        default="auto", description="auto: the task the data was prepared for (an encoder with a classification "
        "or tagging head); generation: supervised fine-tuning of a causal LM (default model smollm2) on answer "
        "records, the loss on the answer tokens only")
    lora_rank: int = Field(default=16, ge=0, le=1024, description="--task generation: LoRA rank of the adapters on "
                           "every linear layer (0: train every weight); the output is the merged model plus "
                           "the adapter in adapter/")
    lora_alpha: int = Field(default=32, ge=1, description="--task generation: LoRA scaling numerator (alpha / rank)")
    out: Location = Field(description="Output model folder (written atomically): a path or a storage URI")
    model: NameOrPath = Field(default="minilm", description="Pretrained model: local folder, hub id, or 'minilm'")
    workers: int = Field(default=2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker (fractions allowed); "
                                   "torch threads = max(1, floor(this))")
    gpu: bool = Field(default=False, description="One GPU per worker, NCCL and bf16")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="How workers are placed on nodes (STRICT_SPREAD: one per node)")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage (0 = plain data parallel)")
    epochs: float | None = Field(default=None, gt=0, description="Passes over the train split (default: from the "
                                 f"data, enough that each label is seen about {LABEL_PRESENTATIONS:,} times, "
                                 f"between {MIN_EPOCHS} and {MAX_EPOCHS})")
    max_steps: int | None = Field(default=None, ge=1, description="Smoke knob: stop after this many optimizer "
                                     "steps, or after `epochs` if that comes first")
    batch_size: int = Field(default=32, ge=1, description="Micro-batch per worker (global batch = this x workers)")
    group_by_length: bool = Field(default=False, description="Batch rows of similar token length together, within "
                                  f"shuffled groups of {LENGTH_GROUP_BATCHES} batches (jobs.batching): less "
                                  "padding on texts of mixed length (README: what it measured)")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate of AdamW")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps with linear warm-up; "
                                "linear decay to 0 after")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping")
    max_length: int | None = Field(default=None, ge=8, le=4096, description="Token limit (default: chosen from "
                                   "the data: by prepare, or the longest generation record)")
    eval_every: int | None = Field(default=None, ge=1, description="Evaluate on validation every N steps "
                                   "(always at each epoch end)")
    checkpoint_every: int | None = Field(default=None, ge=1, description="Checkpoint every N steps "
                                         "(always at each epoch end)")
    eval_batch_size: int = Field(default=128, ge=1, description="Batch size for evaluation")
    log_every: int = Field(default=10, ge=1, description="Print loss and throughput every N steps (rank 0)")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts (from the last checkpoint) "
                              "before the run fails")
    seed: int = Field(default=0, description="Seed of weights init, shuffling and dropout")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="DeepSpeed options")
    overwrite: bool = Field(default=False, description="Replace an existing output folder")
    resume: bool = Field(default=True, description="Resume the Ray Train run of the same config and output if "
                         "one exists (an interrupted or finished run); --no-resume deletes its checkpoints first")

    @model_validator(mode="after")
    def _generation_defaults(self) -> "FinetuneConfig":
        """A causal LM's defaults where the encoder's would be wrong: the model, a LoRA learning rate, small
        batches (prompts hold whole passages)."""
        if self.task != "generation":
            if self.max_length and self.max_length > 512:
                raise ValueError(f"max_length {self.max_length}: encoders take at most 512 tokens")
            return self
        given = self.model_fields_set
        defaults = {"model": GENERATION_MODEL, "lr": 2e-4 if self.lora_rank else 2e-5, "batch_size": 2,
                    "eval_batch_size": 8}
        for name, value in defaults.items():
            if name not in given:
                object.__setattr__(self, name, value)
        return self

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_settings_take_effect(cls, ds: DeepSpeedOptions, info: ValidationInfo) -> DeepSpeedOptions:
        fields = {**info.data, "deepspeed": ds}
        if {"zero_stage", "workers", "batch_size", "grad_clip", "seed", "gpu"} <= fields.keys():  # else: already failed
            problem = deepspeed_problem(fields)
            if problem:
                raise ValueError(problem)
        return ds


# ----------------------------------------------------------------------------------------------------------
# The DeepSpeed config: generated from the options, checked so that no setting is silently lost.

# DeepSpeed keys slimray fills from its own options → the option to use instead of deepspeed.extra.
SET_BY = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "train_batch_size": "--batch-size and --workers (global batch = batch_size x workers)",
    "gradient_accumulation_steps": "nothing: slimray steps the optimizer after every micro-batch",
    "gradient_clipping": "--grad-clip",
    "seed": "--seed",
    "bf16.enabled": "--gpu with --set deepspeed.bf16=true|false",
    "zero_optimization.stage": "--zero-stage",
    "zero_optimization.overlap_comm": "--set deepspeed.overlap_comm=...",
    "zero_optimization.contiguous_gradients": "--set deepspeed.contiguous_gradients=...",
    "zero_optimization.reduce_bucket_size": "--set deepspeed.reduce_bucket_size=...",
    "zero_optimization.stage3_param_persistence_threshold":
        "--set deepspeed.stage3_param_persistence_threshold=... (ZeRO-3 only)",
    "zero_optimization.offload_optimizer.device": "--set deepspeed.offload_optimizer=true (ZeRO-2/3 only)",
}


def deepspeed_config(cfg: FinetuneConfig | Mapping[str, Any], use_bf16: bool, extra: bool = True) -> dict[str, Any]:
    """The config handed to ``deepspeed.initialize``: slimray's options, then ``deepspeed.extra`` deep-merged.

    Args:
        cfg: the fine-tune config, or a mapping of its field values (what its validator sees).
        use_bf16: whether bf16 is on (a GPU that supports it and ``deepspeed.bf16``).
        extra: merge ``deepspeed.extra`` (False gives what slimray alone sets).
    """
    f = dict(cfg)
    ds: DeepSpeedOptions = f["deepspeed"]
    zero: dict[str, Any] = {
        "stage": f["zero_stage"],
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if f["zero_stage"] == 3:
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    generated = {
        "train_micro_batch_size_per_gpu": f["batch_size"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": f["batch_size"] * f["workers"],  # Ray Train runs one rank per worker
        "gradient_clipping": f["grad_clip"],
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # slimray prints its own progress
        "wall_clock_breakdown": False,
        "seed": f["seed"],
    }
    return deep_merge(generated, ds.extra) if extra else generated


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in: nested mappings merge key by key; any other value replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return None
        config = config[part]
    return config


def deepspeed_problem(fields: Mapping[str, Any]) -> str | None:
    """Why DeepSpeed would not do what these options say (None when it would), naming the fix."""
    ds: DeepSpeedOptions = fields["deepspeed"]
    stage = fields["zero_stage"]
    if ds.offload_optimizer and stage < 2:
        return (f"deepspeed.offload_optimizer=true has no effect at ZeRO-{stage} (DeepSpeed offloads from "
                "ZeRO-2 on): use --zero-stage 2 or 3, or drop deepspeed.offload_optimizer")
    if ds.stage3_param_persistence_threshold != PERSISTENCE_THRESHOLD_DEFAULT and stage < 3:
        return (f"deepspeed.stage3_param_persistence_threshold={ds.stage3_param_persistence_threshold} has no "
                f"effect at ZeRO-{stage}: use --zero-stage 3, or drop it")
    use_bf16 = fields["gpu"] and ds.bf16
    ours, merged = deepspeed_config(fields, use_bf16, extra=False), deepspeed_config(fields, use_bf16)
    offload = _get(merged, "zero_optimization.offload_optimizer")
    if offload is not None and not ds.offload_optimizer:  # DeepSpeed's default device "none": no offload
        return (f"deepspeed.extra sets zero_optimization.offload_optimizer={offload!r}, but optimizer offload "
                f"is off: use {SET_BY['zero_optimization.offload_optimizer.device']} instead")
    for key, option in SET_BY.items():
        got, want = _get(merged, key), _get(ours, key)
        if got != want:
            change = f"sets {key}={got!r}" if got is not None else f"removes {key}"
            return (f"deepspeed.extra {change}, but slimray sets it to {want!r} from its options: use {option} "
                    "instead, and drop it from deepspeed.extra")
    return None


# ----------------------------------------------------------------------------------------------------------
# Worker side: small free helpers around one train_loop_per_worker.


def log_rank0(msg: str, *args: Any) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        log.info(msg, *args)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every rank agrees on before the first step."""

    world: int  # ranks
    steps_per_epoch: int  # optimizer steps per pass (drop_last: the same on every rank)
    total_steps: int
    max_length: int  # tokens
    shard_rows: int  # train rows per rank


def init_worker(cfg: FinetuneConfig) -> bool:
    """Logging, warnings, seed and threads of this worker process; returns whether bf16 is on."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed calls torch.distributed's *_tensor collectives, deprecated in torch 2.13: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*Passing a function to `iter_torch_batches")
    torch.manual_seed(cfg.seed)
    if not cfg.gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    return bool(cfg.gpu and cfg.deepspeed.bf16 and torch.cuda.is_bf16_supported())


def default_epochs(train_rows: int, labels: int) -> int:
    """Epochs chosen from the data: each label seen about ``LABEL_PRESENTATIONS`` times over the run."""
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(LABEL_PRESENTATIONS * labels / max(1, train_rows)))))


def default_tagging_epochs(entity_counts: Mapping[str, int]) -> int:
    """A tagger's epochs: its rarest entity type seen about ``LABEL_PRESENTATIONS`` times over the run (most
    words are O, so rows say little; WNUT-17's rarest type, product, has 135 train entities: 8 epochs)."""
    rarest = min(entity_counts.values(), default=0)
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(LABEL_PRESENTATIONS / max(1, rarest)))))


def plan_steps(cfg: FinetuneConfig, info: dict[str, Any]) -> Plan:
    import ray.train

    world = ray.train.get_context().get_world_size()
    steps_per_epoch = info["train_rows"] // world // cfg.batch_size  # drop_last: equal steps on every rank
    if steps_per_epoch == 0:
        raise InputError(f"train split has {info['train_rows']} rows: fewer than one batch of {cfg.batch_size} "
                         f"per worker x {world} workers; lower --batch-size or --workers")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:  # a cap: small data still stops after `epochs`
        total_steps = min(total_steps, cfg.max_steps)
    return Plan(world, steps_per_epoch, total_steps, cfg.max_length or info["max_length"],
                math.ceil(info["train_rows"] / world))


def skip_shm_comm_build() -> None:
    """Keeps DeepSpeed from compiling its shared-memory all-reduce op for a training run.

    On the CPU accelerator, DeepSpeed's communication backend JIT-compiles ``deepspeed_shm_comm`` (C++) the first
    time a process group starts in an environment: 45-135 s on 2 cores here, and it needs a C++ compiler on every
    node. Only DeepSpeed's inference all-reduce (tensor-parallel inference) uses that op; training reduces through
    torch.distributed. Marking the op unavailable is what DeepSpeed does on platforms without it: the backend then
    keeps torch.distributed's collectives. (``__compatible_ops__`` is the table DeepSpeed probes at import; there is
    no public switch for this op.) Where the accelerator has no such op (CUDA), there is nothing to skip, and the
    table is not probed.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def build_engine(cfg: FinetuneConfig, info: dict[str, Any], total_steps: int,
                 ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(tokenizer, engine): the pretrained model with the task's head and AdamW (no decay on biases/LayerNorm,
    linear warm-up and decay), wrapped by deepspeed.initialize."""
    import deepspeed
    import torch
    from transformers import get_linear_schedule_with_warmup

    from jobs.modeling import load_pretrained_for_training, load_tokenizer

    skip_shm_comm_build()  # before anything below starts DeepSpeed's communication backend
    if info["task"] == "generation":
        from jobs import generation

        model = generation.build_model(info["model_folder"], cfg.lora_rank, cfg.lora_alpha, ds_config)
        tokenizer = generation.load_tokenizer(info["model_folder"])  # a causal LM's: pad token, chat template
    else:
        model = load_pretrained_for_training(cfg.model, info["labels"], get_task(info["task"]).head)
        tokenizer = load_tokenizer(cfg.model)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # LoRA: the adapters only
    groups = [
        {"params": [p for n, p in trained if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trained if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    warmup = int(cfg.warmup_ratio * total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr),
        lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, warmup, total_steps),
        config=ds_config,
    )
    return tokenizer, engine


def memory_footprint(engine: Any, zero_stage: int) -> dict[str, Any]:
    """This rank's share of the parameters and optimizer state (what ZeRO partitions)."""
    import torch

    params = list(engine.module.parameters())
    if zero_stage == 3:  # each parameter's local partition lives in ds_tensor
        local = [p.ds_tensor.numel() for p in params]
        local_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    else:
        local = [p.numel() for p in params]
        local_bytes = sum(p.numel() * p.element_size() for p in params)
    full = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params]
    fractions = [lo / fu for lo, fu in zip(local, full) if fu > 0]

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    # ZeRO keeps an fp32 master copy of its partition of the weights, part of the optimizer's memory.
    masters = (getattr(opt, "single_partition_of_fp32_groups", None)
               or getattr(opt, "fp32_partitioned_groups_flat", None) or [])
    master_bytes = sum(t.numel() * t.element_size() for t in masters if isinstance(t, torch.Tensor))
    return {
        "param_numel_local": int(sum(local)),
        "param_numel_total": int(sum(full)),
        "param_bytes_local": int(local_bytes),
        "param_fraction_min": float(min(fractions)),
        "param_fraction_max": float(max(fractions)),
        "optimizer_state_bytes": int(state_bytes),
        "optimizer_master_bytes": int(master_bytes),
    }


def gather_footprints(engine: Any, zero_stage: int) -> list[dict[str, Any]]:
    """Every rank's memory footprint, on every rank (a collective: all ranks call it at the same point)."""
    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    footprints: list[Any] = [None] * ctx.get_world_size()
    dist.all_gather_object(footprints, {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
                                        **memory_footprint(engine, zero_stage)})
    return footprints


def evaluate_distributed(engine: Any, tokenizer: Any, info: dict[str, Any], max_length: int, batch_size: int,
                         split: str) -> dict[str, Any]:
    """Every rank scores a strided slice (same number of batches on each, as ZeRO-3 needs); rank 0 scores all."""
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    if get_task(info["task"]).kind == "tagging":
        return evaluate_tagging_distributed(engine, tokenizer, info, max_length, batch_size, split)
    if get_task(info["task"]).kind == "generation":
        from jobs import generation

        return generation.evaluate_distributed(engine, tokenizer, info["data"], split, max_length, batch_size)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows = read_split(info["data"], split, columns=("text", "label_id"))
    texts, labels = rows["text"], np.asarray(rows["label_id"])
    mine = list(range(rank, len(texts), world))
    per_rank = math.ceil(len(texts) / world)
    padded = mine + [0] * (per_rank - len(mine))  # padding rows are scored and thrown away
    preds = []
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, batch_size):
            idx = padded[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(engine.device)
            preds.append(engine(**batch).logits.argmax(-1).cpu())
    engine.train()
    local_preds = torch.cat(preds).tolist()[: len(mine)] if preds else []
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, local_preds))
    y_pred = np.empty(len(texts), dtype=np.int64)
    for idx, p in gathered:
        y_pred[idx] = p
    return get_task(info["task"]).metrics(labels, y_pred, info["labels"])


def evaluate_tagging_distributed(engine: Any, tokenizer: Any, info: dict[str, Any], max_length: int,
                                 batch_size: int, split: str) -> dict[str, Any]:
    """``evaluate_distributed`` for a tagger: each rank tags a strided slice of sentences, window by window
    (ranks with fewer windows run padding batches, so that every rank runs as many forwards: ZeRO-3 gathers
    parameters in each); every word's tag is the argmax at its first piece."""
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from jobs.tagging import encode_windows, word_logits, word_windows

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows = read_split(info["data"], split, columns=("tokens", "tag_ids"))
    mine = list(range(rank, len(rows["tokens"]), world))
    sentences = [rows["tokens"][i] for i in mine]
    windows = word_windows(tokenizer, sentences, max_length)
    batches = torch.tensor([math.ceil(len(windows) / batch_size)])
    dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    logits: list[np.ndarray] = []
    width = max((len(w.ids) for w in windows), default=1)
    engine.eval()
    with torch.no_grad():
        for b in range(int(batches.item())):
            part = windows[b * batch_size:(b + 1) * batch_size] or windows[:1] or word_windows(tokenizer, [["."]],
                                                                                             max_length)
            enc = encode_windows(part, tokenizer.pad_token_id)
            out = engine(**{k: torch.from_numpy(v).to(engine.device) for k, v in enc.items()}).logits.float().cpu()
            if b * batch_size < len(windows):  # a padding batch is thrown away
                logits += [np.pad(x, ((0, width - x.shape[0]), (0, 0))) for x in out.numpy()]
    engine.train()
    stacked = np.stack(logits) if logits else np.zeros((0, 1, len(info["labels"])), np.float32)
    local = [w.argmax(-1).tolist() for w in word_logits(windows, stacked, [len(s) for s in sentences])]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, local))
    y_pred: list[list[int]] = [[] for _ in rows["tokens"]]
    for idx, preds in gathered:
        for i, p in zip(idx, preds):
            y_pred[i] = p
    return get_task(info["task"]).metrics(rows["tag_ids"], y_pred, info["labels"])


def save_checkpoint(engine: Any, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Each rank saves its own ZeRO shard; Ray Train merges the folders into one checkpoint."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    tmp = tempfile.mkdtemp(prefix="slimray-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag="deepspeed")
        if rank == 0:
            write_json(Path(tmp) / "train_state.json", state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def maybe_resume(engine: Any) -> dict[str, Any]:
    """Loads the latest checkpoint into the engine and returns its train state (a fresh one on a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "restarts": 0, "resumed_from_step": None}
    with checkpoint.as_directory() as ckpt_dir:
        state = read_json(Path(ckpt_dir) / "train_state.json")
        if state.get("finished"):
            log_rank0("this run already finished at step %d: reusing its final model (--no-resume retrains)",
                      state["step"])
            return state
        engine.load_checkpoint(ckpt_dir, tag="deepspeed")
    state.update(resumed_from_step=state["step"], restarts=state.get("restarts", 0) + 1)
    log_rank0("resumed from checkpoint at step %d (epoch %d)", state["step"], state["epoch"])
    return state


@dataclasses.dataclass
class Meter:
    """Loss and throughput of the optimizer steps since the last progress row, and of this whole attempt."""

    global_batch: int  # samples per optimizer step, all ranks
    train_s: float = 0.0  # optimizer steps only: no eval, checkpoint or start-up
    train_samples: int = 0
    window_loss: float = 0.0  # this rank's summed loss since the last row
    window_n: int = 0
    window_start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, seconds: float) -> None:
        self.train_s += seconds
        self.train_samples += self.global_batch
        self.window_loss += loss
        self.window_n += 1

    def take_window(self) -> tuple[float, float]:
        """(mean loss on this rank, samples/s) since the last call; starts a new window."""
        now = time.perf_counter()
        mean, rate = self.window_loss / self.window_n, self.window_n * self.global_batch / (now - self.window_start)
        self.window_loss, self.window_n, self.window_start = 0.0, 0, now
        return mean, rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count in the window's samples/s (evaluation, checkpoints)."""
        start = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - start


def train_columns(info: dict[str, Any]) -> tuple[str, ...]:
    """The train split's columns the loop reads: text and label id, or a tagger's words and tag ids."""
    kind = get_task(info["task"]).kind
    return {"tagging": ("text", "tokens", "tag_ids"), "generation": ("text",)}.get(kind, ("text", "label_id"))


def make_collate(tokenizer: Any, task: Any, max_length: int, device: Any):
    """Rows (column -> values) to a model batch with ``labels``: one label per text, or, for a tagger, a tag on
    each word's first piece with long sentences cut into windows (``jobs.tagging.word_windows``)."""
    import torch

    def sequence(batch: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(list(batch["text"]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor(batch["label_id"], dtype=torch.long)
        return {k: v.to(device) for k, v in enc.items()}

    def tagging(batch: dict[str, Any]) -> dict[str, Any]:
        from jobs.tagging import encode_windows, word_windows

        words = [[str(w) for w in row] for row in batch["tokens"]]
        windows = word_windows(tokenizer, words, max_length)
        enc = encode_windows(windows, tokenizer.pad_token_id, [list(map(int, t)) for t in batch["tag_ids"]])
        return {k: torch.from_numpy(v).to(device) for k, v in enc.items()}

    if task.kind == "generation":
        from jobs import generation

        return generation.collate(tokenizer, max_length, device)
    return tagging if task.kind == "tagging" else sequence


def epoch_batches(shard: Any, tokenizer: Any, cfg: FinetuneConfig, plan: Plan, epoch: int, device: Any,
                  info: dict[str, Any]):
    """This rank's tokenized batches of one pass over its shard (shuffled per epoch, last partial batch dropped;
    grouped by length with ``group_by_length``)."""
    import numpy as np

    collate = make_collate(tokenizer, get_task(info["task"]), plan.max_length, device)

    # A full shuffle of the shard every epoch: a buffer of a few batches over a file in label order gives
    # batches of two or three labels. Text rows are small (100k rows ~ 10 MB), so the cap is rarely reached.
    buffer = min(max(plan.shard_rows, cfg.batch_size), SHUFFLE_BUFFER_MAX_ROWS)
    if not cfg.group_by_length:
        return shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, collate_fn=collate,
                                        local_shuffle_buffer_size=buffer,
                                        local_shuffle_seed=cfg.seed + epoch, device="cpu")

    def grouped() -> Iterator[dict[str, Any]]:
        from jobs.batching import length_grouped_batches, token_lengths

        rng = np.random.default_rng(cfg.seed + epoch)
        for group in shard.iter_batches(batch_size=cfg.batch_size * LENGTH_GROUP_BATCHES, batch_format="numpy",
                                        local_shuffle_buffer_size=buffer, local_shuffle_seed=cfg.seed + epoch):
            lengths = token_lengths(tokenizer, list(group["text"]), plan.max_length)
            for idx in length_grouped_batches(lengths, cfg.batch_size, rng, megabatch=LENGTH_GROUP_BATCHES):
                if len(idx) == cfg.batch_size:  # only the shard's last group can leave a partial batch
                    yield collate({k: [v[i] for i in idx] for k, v in group.items()})

    return grouped()


def train_steps(engine: Any, batches: Any, state: dict[str, Any], meter: Meter) -> Iterator[None]:
    """One optimizer step per batch, yielding after each (``state`` counts them); skips the batches of this
    epoch that a resumed checkpoint already trained on."""
    for i, batch in enumerate(batches):
        if i < state["batch_in_epoch"]:
            continue
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        meter.add(loss.item(), time.perf_counter() - t0)
        state.update(step=state["step"] + 1, batch_in_epoch=i + 1)
        yield


def log_progress(engine: Any, meter: Meter, state: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Averages the window's loss over ranks (a collective), logs it on rank 0; returns the history row."""
    import torch
    import torch.distributed as dist

    loss, rate = meter.take_window()
    mean = torch.tensor([loss])
    dist.all_reduce(mean)
    row = {"step": state["step"], "epoch": round(state["epoch"] + state["batch_in_epoch"] / plan.steps_per_epoch, 3),
           "loss": round(mean.item() / dist.get_world_size(), 5), "lr": engine.get_lr()[0],
           "samples_per_s": round(rate, 1)}
    log_rank0("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f samples/s", row["step"], plan.total_steps,
              row["epoch"], row["loss"], row["lr"], rate)
    return row


def evaluate_and_checkpoint(engine: Any, evaluate: Any, state: dict[str, Any], epoch_end: bool,
                            score: str = "accuracy", second: str = "macro_f1") -> None:
    """Scores validation (when ``evaluate`` is given; ``score`` is the task's headline metric), closes the
    epoch if it ended, and checkpoints."""
    metrics: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"]}
    if evaluate:
        val = evaluate("validation")
        row = {f"val_{score}": val[score], f"val_{second}": val[second]}
        state["history"].append({"step": state["step"], **row})
        metrics.update(row)
        log_rank0("step %d  validation %s %.4f  %s %.4f", state["step"], score.replace("_", " "), val[score],
                  second.replace("_", " "), val[second])
    if epoch_end:
        state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
    save_checkpoint(engine, state, metrics)


def export_model(engine: Any, tokenizer: Any, zero_stage: int, out_dir: Path) -> None:
    """Rank 0 writes fp32 safetensors; under ZeRO-3 every rank joins the gather of the partitions."""
    import deepspeed
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3
              else contextlib.nullcontext())
    with gather:
        if rank == 0:
            state_dict = {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}
            engine.module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)


def final_report(engine: Any, tokenizer: Any, evaluate: Any, cfg: FinetuneConfig, info: dict[str, Any],
                 state: dict[str, Any], footprints: list[dict[str, Any]], meter: Meter) -> None:
    """Scores validation and test, exports the model, and reports both as the run's last checkpoint."""
    import ray.train

    val = evaluate("validation")
    test = evaluate("test") if "test" in info["splits"] else None
    state["finished"] = True
    final = {
        "step": state["step"],
        "validation": val,
        "test": test,
        "history": state["history"],
        "resumed_from_step": state.get("resumed_from_step"),
        "restarts": state.get("restarts", 0),
        # Throughput of this attempt's optimizer steps alone (no eval, checkpoint or start-up).
        "train_samples_per_s": meter.train_samples / meter.train_s if meter.train_s else None,
        "per_rank": footprints,
    }
    rank0 = ray.train.get_context().get_world_rank() == 0
    tmp = Path(tempfile.mkdtemp(prefix="slimray-final-"))
    try:
        export_model(engine, tokenizer, cfg.zero_stage, tmp / "model")
        if rank0:
            write_json(tmp / "train_state.json", state)
            write_json(tmp / "final.json", final)
        score = get_task(info["task"]).score
        summary = {"step": state["step"], "finished": True, f"val_{score}": val[score],
                   f"test_{score}": test[score] if test else None}
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker, one DeepSpeed rank: set up, resume, train epoch by epoch, report the final model."""
    import ray.train
    import torch

    cfg, info = FinetuneConfig.model_validate(config["cfg"]), config["data"]
    use_bf16 = init_worker(cfg)
    plan = plan_steps(cfg, info)
    tokenizer, engine = build_engine(cfg, info, plan.total_steps, deepspeed_config(cfg, use_bf16))
    state = maybe_resume(engine)
    if state.get("finished"):
        return  # its final report (and model) is already in storage
    log_rank0("training: %d workers x %d threads, ZeRO-%d, %d steps (%d per epoch), global batch %d, max_length %d",
              plan.world, torch.get_num_threads(), cfg.zero_stage, plan.total_steps, plan.steps_per_epoch,
              cfg.batch_size * plan.world, plan.max_length)
    evaluate = functools.partial(evaluate_distributed, engine, tokenizer, info, plan.max_length, cfg.eval_batch_size)
    score = get_task(info["task"]).score
    shard, meter = ray.train.get_dataset_shard("train"), Meter(global_batch=cfg.batch_size * plan.world)
    footprints = None  # gathered after the first step, once optimizer states exist
    engine.train()
    while state["step"] < plan.total_steps:
        epoch = state["epoch"]
        for _ in train_steps(engine, epoch_batches(shard, tokenizer, cfg, plan, epoch, engine.device, info), state, meter):
            footprints = footprints or gather_footprints(engine, cfg.zero_stage)
            step, last = state["step"], state["step"] == plan.total_steps
            epoch_end = state["batch_in_epoch"] == plan.steps_per_epoch or last
            if due(step, cfg.log_every) or last:
                state["history"].append(log_progress(engine, meter, state, plan))
            do_eval = epoch_end or due(step, cfg.eval_every)
            if do_eval or due(step, cfg.checkpoint_every):
                with meter.paused():  # the log's samples/s counts training only
                    evaluate_and_checkpoint(engine, evaluate if do_eval else None, state, epoch_end, score,
                                            get_task(info["task"]).second)
            if epoch_end:
                break
        else:  # the shard ran out before steps_per_epoch batches: count the epoch as done
            log_rank0("epoch %d ended after %d batches (expected %d)", epoch, state["batch_in_epoch"],
                      plan.steps_per_epoch)
            state.update(epoch=epoch + 1, batch_in_epoch=0)
    footprints = footprints or gather_footprints(engine, cfg.zero_stage)  # resumed after the last step
    final_report(engine, tokenizer, evaluate, cfg, info, state, footprints, meter)


# ----------------------------------------------------------------------------------------------------------
# Driver side.


def run_name(cfg: FinetuneConfig) -> str:
    """Same output and config → same Ray Train run, so re-running an interrupted command resumes it."""
    key = cfg.model_dump(mode="json", exclude={"overwrite", "resume", "max_failures"})
    key["out"] = storage.canonical(cfg.out)
    key["data"] = storage.canonical(cfg.data)
    return "finetune-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def delete_run(storage_path: str, name: str) -> None:
    """Removes a run's checkpoints from local or remote storage (pyarrow.fs), so it starts fresh."""
    import pyarrow.fs

    fs, root = storage.filesystem(storage_path)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        log.info("--no-resume: deleting the previous checkpoints of run %s", name)
        fs.delete_dir(path)


def check_data(cfg: FinetuneConfig) -> tuple[Path, dict[str, Any]]:
    """Checks the data folder and the model before any worker starts; returns (local copy, data info).

    The data info travels to the workers: task, labels, max_length, train rows, the data location every
    node can read (the URI itself, or the shared path) and the splits it holds.
    """
    from jobs.modeling import resolve_model

    if cfg.task == "generation":
        return check_generation_data(cfg)
    data_dir = storage.local_copy(cfg.data).resolve()  # a URI is downloaded (cached) for the driver's checks
    data_manifest = load_prepared(data_dir)
    get_task(data_manifest["task"])
    resolve_model(cfg.model)  # a bad model path fails here, before any worker starts
    splits = [s for s in ("train", "validation", "test") if (data_dir / f"{s}.parquet").is_file()]
    if "validation" not in splits:
        raise InputError(f"{data_dir} has no validation.parquet; re-run `slimray prepare`")
    return data_dir, {
        "task": data_manifest["task"],
        "labels": data_manifest["labels"],
        "max_length": data_manifest["max_length"],
        "train_rows": data_manifest["splits"]["train"]["rows"],
        "entity_counts": data_manifest["splits"]["train"].get("entity_counts"),  # a tagger's data only
        "data": storage.canonical(cfg.data),
        "splits": splits,
    }


def base_model_path(model: str, task: str) -> str:
    from jobs.modeling import resolve_model

    if task == "generation":
        from jobs.generation import causal_lm_source

        source, kwargs = causal_lm_source(model)
        return str(Path(source) / kwargs["gguf_file"]) if "gguf_file" in kwargs else source
    return resolve_model(model)


def check_generation_data(cfg: FinetuneConfig) -> tuple[Path, dict[str, Any]]:
    """``check_data`` for --task generation: the JSONL records checked and written as parquet splits under the
    storage root (every node reads them there)."""
    from jobs import generation

    if storage.is_uri(cfg.data):
        raise InputError("--task generation reads --data from a local (or shared) path, not a storage URI")
    data = Path(cfg.data).expanduser().resolve()
    if not data.exists():
        raise InputError(f"--data {str(cfg.data)!r} does not exist")
    tokenizer = generation.load_tokenizer(cfg.model)  # a bad model fails here, before any worker starts
    if storage.is_uri(get_settings().storage_root):
        raise InputError("--task generation needs a local or shared storage root (SLIMRAY_STORAGE_ROOT), not a URI")
    root = Path(get_settings().storage_root).expanduser().resolve()  # absolute: workers run elsewhere
    folder, found = generation.prepare_records(data, root / "generation_data", tokenizer, cfg.seed)
    model_folder = generation.plain_folder(cfg.model, root / "models")
    log.info("generation records: %s; max_length %d tokens (the longest record)",
             ", ".join(f"{s} {n}" for s, n in found["rows"].items()), found["max_length"])
    return folder, {"task": "generation", "labels": [], "max_length": found["max_length"],
                    "train_rows": found["train_rows"], "entity_counts": None, "data": str(folder),
                    "splits": found["splits"], "model_folder": model_folder}


def build_trainer(cfg: FinetuneConfig, info: dict[str, Any], ray_storage: str, name: str):
    """The TorchTrainer of this run: one worker per rank, its train split already read by Ray Data."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Read before the workers start: with every CPU held by a worker, no read task could run afterwards.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds = ray.data.read_parquet(storage.join(info["data"], "train.parquet")).select_columns(
        list(train_columns(info))).materialize()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": info},
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds},
    )


def artifact_metrics(final: dict[str, Any], cfg: FinetuneConfig, started: float) -> dict[str, Any]:
    """metrics.json: the test split's scores (validation's when there is no test split) and how the run went."""
    evaluated = final["test"] or final["validation"]
    headline = [k for k in ("accuracy", "macro_f1", "n", "entity_f1", "entity_precision", "entity_recall",
                            "token_accuracy", "loss", "tokens")
                if k in final["validation"]]
    return {
        "split": "test" if final["test"] else "validation",
        **evaluated,  # accuracy, macro_f1, n, per_class; a tagger's entity_f1, per_type, strict... too
        "validation": {k: final["validation"][k] for k in headline},
        "train_samples_per_s": final["train_samples_per_s"],
        "wall_s": round(time.time() - started, 1),
        "steps": final["step"],
        "resumed_from_step": final["resumed_from_step"],
        "restarts": final["restarts"],
        "distributed": {"workers": cfg.workers, "zero_stage": cfg.zero_stage, "per_rank": final["per_rank"]},
    }


def write_artifact(staging: Path, ckpt: Path, out: Path | str, cfg: FinetuneConfig, data_dir: Path,
                   info: dict[str, Any], name: str, started: float) -> dict[str, Any]:
    """Fills the output folder from the final checkpoint: weights, metrics, history, config, manifest."""
    final = read_json(ckpt / "final.json")
    if info["task"] == "generation" and cfg.lora_rank:
        from jobs import generation

        log.info("merging the LoRA adapter into %s", cfg.model)
        generation.merge_adapter(info["model_folder"], ckpt / "model", staging)
        shutil.copytree(ckpt / "model", staging / "adapter")
    else:
        for f in (ckpt / "model").iterdir():
            shutil.copy2(f, staging / f.name)
    metrics = artifact_metrics(final, cfg, started)
    write_json(staging / "metrics.json", metrics)
    with open(staging / "history.jsonl", "w", encoding="utf-8") as f:
        for row in final["history"]:
            f.write(json.dumps(row) + "\n")
    (staging / "finetune_config.yaml").write_text(
        f"# Resolved config of this model. Re-run: slimray finetune --config "
        f"{storage.join(out, 'finetune_config.yaml')}\n"
        + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    write_json(staging / "manifest.json", manifest(
        "finetune", cfg.model_dump(mode="json"),
        task=info["task"],
        base_model=cfg.model,
        base_model_path=base_model_path(cfg.model, info["task"]),
        data=info["data"],
        data_manifest_sha256=file_sha256(data_dir / "manifest.json"),
        labels=info["labels"],
        max_length=cfg.max_length or info["max_length"],
        ray_train_run=name,
        files=file_records(staging),  # checked at every load (jobs.modeling.check_model_folder)
    ))
    return metrics


def check_inputs(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Path | str, str, Path, dict[str, Any]]:
    """Everything checked before Ray starts: the output, the checkpoint storage, the data and the model.
    Returns the config with its epochs chosen from the data, the output, the Ray Train storage, the local
    data folder and the data info."""
    out = cfg.out if storage.is_uri(cfg.out) else Path(cfg.out).expanduser().resolve()
    check_can_write(out, cfg.overwrite)
    # Ray Train checkpoints straight to the storage root (a shared path or a URI): check it before any work.
    ray_storage = storage.canonical(storage.join(get_settings().storage_root, "ray_train"))
    storage.check_writable(ray_storage)
    data_dir, info = check_data(cfg)
    if cfg.epochs is None and info.get("entity_counts") is not None:
        cfg = cfg.model_copy(update={"epochs": default_tagging_epochs(info["entity_counts"])})
        log.info("epochs: %g, chosen from the data (rarest entity type: %d train entities)", cfg.epochs,
                 min(info["entity_counts"].values(), default=0))
    elif cfg.epochs is None and info["task"] == "generation":
        epochs = min(MAX_GENERATION_EPOCHS, max(1, math.ceil(GENERATION_PRESENTATIONS / max(1, info["train_rows"]))))
        cfg = cfg.model_copy(update={"epochs": epochs})
        log.info("epochs: %g, chosen from the data (%d train records)", epochs, info["train_rows"])
    elif cfg.epochs is None:
        cfg = cfg.model_copy(update={"epochs": default_epochs(info["train_rows"], len(info["labels"]))})
        log.info("epochs: %g, chosen from the data (%d train rows, %d labels)", cfg.epochs, info["train_rows"],
                 len(info["labels"]))
    return cfg, out, ray_storage, data_dir, info


def resumable_step(ray_storage: str, name: str) -> int | None:
    """The step of the latest checkpoint Ray Train registered for run ``name``, if it has one."""
    fs, root = storage.filesystem(ray_storage)
    try:
        with fs.open_input_stream(f"{root}/{name}/checkpoint_manager_snapshot.json") as f:
            latest = json.loads(f.read().decode("utf-8")).get("latest_checkpoint_result")
        return int(latest["metrics"]["step"]) if latest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dry_run(cfg: FinetuneConfig) -> str:
    """``--dry-run``: the checks of ``main``, and what it would run (or resume)."""
    name = run_name(cfg)
    cfg, out, ray_storage, _, info = check_inputs(cfg)
    step = resumable_step(ray_storage, name) if cfg.resume else None
    return (f"would {f'resume run {name} from its step-{step} checkpoint, ' if step else ''}fine-tune {cfg.model} "
            f"for {info['task']} on {info['train_rows']} train rows for {cfg.epochs:g} "
            f"epochs{f' (at most {cfg.max_steps} steps)' if cfg.max_steps else ''} with {cfg.workers} workers, "
            f"ZeRO-{cfg.zero_stage}, checkpoints in {storage.redact(ray_storage)}, model to "
            f"{storage.redact(out) if storage.is_uri(out) else out}")


def main(cfg: FinetuneConfig) -> Path | str:
    """Checks the inputs, runs (or resumes) the Ray Train run, and writes the model folder at ``cfg.out``."""
    # torch (through Ray Train's torch integration) is imported before Ray connects. Imported after
    # connecting, the driver of a Ray job on the 2-node test cluster (tests/test_cluster.py) died with
    # "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"; the cause inside oneMKL was not found.
    from ray.train.torch import TorchTrainer  # noqa: F401

    from cluster.ray_env import connect

    started = time.time()
    name = run_name(cfg)  # of the config as given (before epochs are chosen): the same command finds its run
    cfg, out, ray_storage, data_dir, info = check_inputs(cfg)
    settings = get_settings()
    connect(settings)
    trainer = build_trainer(cfg, info, ray_storage, name)
    if not cfg.resume:
        delete_run(ray_storage, name)
    log.info("Ray Train run %s (storage %s)", name, storage.redact(ray_storage))
    if (step := resumable_step(ray_storage, name) if cfg.resume else None) is not None:
        log.info("resuming run %s from its step-%d checkpoint (a finished run is read back; --no-resume starts "
                 "over)", name, step)
    try:
        result = trainer.fit()
    except Exception as e:  # WorkerGroupError / ControllerError carry the worker's traceback
        raise RuntimeError(f"fine-tuning failed after {cfg.max_failures} restarts: {e}") from e
    if result.checkpoint is None or not result.metrics.get("finished"):
        raise RuntimeError(f"fine-tuning ended without a final model (run {name}, storage "
                           f"{storage.redact(ray_storage)})")

    with atomic_dir(out, cfg.overwrite) as staging, result.checkpoint.as_directory() as ckpt:
        metrics = write_artifact(staging, Path(ckpt), out, cfg, data_dir, info, name, started)
    task = get_task(info["task"])
    log.info("wrote %s: %s %s %.4f, %s %.4f (%d steps, %.0f s)", out, metrics["split"], task.score.replace("_", " "),
             metrics[task.score], task.second.replace("_", " "), metrics[task.second], metrics["steps"],
             metrics["wall_s"])
    return out


def cli(argv: list[str] | None = None) -> None:
    run_cli(FinetuneConfig, main, argv, prog="slimray finetune", check=dry_run)


if __name__ == "__main__":
    cli()
