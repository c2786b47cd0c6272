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
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from cluster import storage
from cluster.settings import get_settings
from jobs.artifacts import atomic_dir, check_can_write, file_sha256, manifest, read_json, write_json
from jobs.config import Location, StageConfig, run_stage
from jobs.errors import InputError
from jobs.prepare import load_prepared

log = logging.getLogger("slimray.finetune")


class DeepSpeedOptions(StageConfig):
    """DeepSpeed options slimray exposes; anything else goes through ``extra``."""

    overlap_comm: bool = Field(default=True, description="Overlap gradient reduction with the backward pass "
                               "(measured 1.5x samples/s for ZeRO-2 on 2 CPU workers)")
    contiguous_gradients: bool = Field(default=True, description="Copy gradients into one contiguous buffer "
                                       "as they are produced (less fragmentation)")
    reduce_bucket_size: int = Field(default=50_000_000, ge=1, description="Elements per gradient "
                                    "all-reduce/reduce-scatter bucket")
    stage3_param_persistence_threshold: int = Field(
        default=100_000, ge=0,
        description="ZeRO-3: parameters smaller than this many elements stay whole on every rank; "
        "0 partitions every parameter")
    offload_optimizer: bool = Field(default=False, description="ZeRO-2/3: keep optimizer states in CPU memory "
                                    "(saves GPU memory; compiles DeepSpeedCPUAdam, ~70 s once)")
    bf16: bool = Field(default=True, description="Train in bf16 on GPUs that support it (ignored on CPU)")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw keys merged last into the "
                                  "generated DeepSpeed config (see deepspeed.ai/docs/config-json)")


class FinetuneConfig(StageConfig):
    """Fine-tune a pretrained encoder with Ray Train + DeepSpeed ZeRO; --out is a Hugging Face model folder."""

    data: Location = Field(description="Prepared data folder (output of `slimray prepare`): a path or a "
                           "storage URI")
    out: Location = Field(description="Output model folder (written atomically): a path or a storage URI")
    model: str = Field(default="minilm", description="Pretrained model: local folder, hub id, or 'minilm'")
    workers: int = Field(default=2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker (fractions allowed); "
                                   "torch threads = max(1, floor(this))")
    gpu: bool = Field(default=False, description="One GPU per worker, NCCL and bf16")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="How workers are placed on nodes (STRICT_SPREAD: one per node)")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage (0 = plain data parallel)")
    epochs: float = Field(default=3.0, gt=0, description="Passes over the train split")
    max_steps: int | None = Field(default=None, ge=1, description="Smoke knob: stop after this many optimizer "
                                     "steps, or after `epochs` if that comes first")
    batch_size: int = Field(default=32, ge=1, description="Micro-batch per worker (global batch = this x workers)")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate of AdamW")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps with linear warm-up; "
                                "linear decay to 0 after")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping")
    max_length: int | None = Field(default=None, ge=8, le=512, description="Token limit (default: chosen by prepare "
                                   "from the data)")
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
    fail_after_step: int | None = Field(
        default=None, ge=1,
        description="Testing only: on the first attempt, the last rank hard-exits after this step "
        "to exercise restart-and-resume")


# ----------------------------------------------------------------------------------------------------------
# Worker side: helpers around one train_loop_per_worker.


def log_rank0(msg: str, *args: Any) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        log.info(msg, *args)


def deepspeed_config(cfg: FinetuneConfig, world_size: int, use_bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": cfg.deepspeed.overlap_comm,
        "contiguous_gradients": cfg.deepspeed.contiguous_gradients,
        "reduce_bucket_size": cfg.deepspeed.reduce_bucket_size,
    }
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.stage3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.deepspeed.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # slimray prints its own progress
        "wall_clock_breakdown": False,
        "seed": cfg.seed,
    }
    config.update(cfg.deepspeed.extra)
    return config


def build_engine(cfg: FinetuneConfig, model: Any, total_steps: int, world_size: int, use_bf16: bool):
    """AdamW (no decay on biases/LayerNorm) with linear warm-up and decay, wrapped by deepspeed.initialize."""
    import deepspeed
    import torch
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    warmup = int(cfg.warmup_ratio * total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr),
        lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, warmup, total_steps),
        config=deepspeed_config(cfg, world_size, use_bf16),
    )
    return engine


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


def evaluate_distributed(engine: Any, tokenizer: Any, parquet_path: str, max_length: int, batch_size: int,
                         label_names: list[str], metrics_fn: Any) -> dict[str, Any]:
    """Every rank scores a strided slice (same number of batches on each, as ZeRO-3 needs); rank 0 scores all."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    table = pq.read_table(parquet_path, columns=["text", "label_id"])
    texts, labels = table.column("text").to_pylist(), np.asarray(table.column("label_id").to_pylist())
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
    return metrics_fn(labels, y_pred, label_names)


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


def maybe_resume(engine: Any) -> dict[str, Any] | None:
    """Loads the latest checkpoint into the engine; returns its train state (None on a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        state = read_json(Path(ckpt_dir) / "train_state.json")
        if not state.get("finished"):
            engine.load_checkpoint(ckpt_dir, tag="deepspeed")
    return state


def export_model(engine: Any, tokenizer: Any, zero_stage: int, out_dir: Path) -> None:
    """Rank 0 writes fp32 safetensors; under ZeRO-3 every rank joins the gather of the partitions."""
    import contextlib

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from jobs.modeling import load_pretrained_for_training, load_tokenizer
    from jobs.tasks import get_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed calls torch.distributed's *_tensor collectives, deprecated in torch 2.13: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*Passing a function to `iter_torch_batches")
    cfg = FinetuneConfig.model_validate(config["cfg"])
    info = config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    if not cfg.gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    use_bf16 = cfg.gpu and cfg.deepspeed.bf16 and torch.cuda.is_bf16_supported()
    task = get_task(info["task"])
    label_names: list[str] = info["labels"]
    max_length = cfg.max_length or info["max_length"]

    steps_per_epoch = info["train_rows"] // world // cfg.batch_size  # drop_last: equal steps on every rank
    if steps_per_epoch == 0:
        raise InputError(f"train split has {info['train_rows']} rows: fewer than one batch of {cfg.batch_size} "
                         f"per worker x {world} workers; lower --batch-size or --workers")
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:  # a cap: small data still stops after `epochs`
        total_steps = min(total_steps, cfg.max_steps)

    tokenizer = load_tokenizer(cfg.model)
    model = load_pretrained_for_training(cfg.model, label_names, task.head)
    engine = build_engine(cfg, model, total_steps, world, use_bf16)
    footprints: list[Any] = [None] * world  # filled after the first step, once optimizer states exist

    state = maybe_resume(engine) or {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "restarts": 0}
    resumed_from = state["step"] if state["step"] else None
    if resumed_from:
        state["restarts"] = state.get("restarts", 0) + 1
        log_rank0("resumed from checkpoint at step %d (epoch %d)", state["step"], state["epoch"])
    if state.get("finished"):
        log_rank0("this run already finished at step %d: reusing its final model (--no-resume retrains)",
                  state["step"])
        return  # the final report (and its model) is already in storage

    log_rank0("training: %d workers x %d threads, ZeRO-%d, %d steps (%d per epoch), global batch %d, max_length %d",
              world, torch.get_num_threads(), cfg.zero_stage, total_steps, steps_per_epoch, cfg.batch_size * world,
              max_length)
    shard = ray.train.get_dataset_shard("train")

    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        enc = tokenizer(list(batch["text"]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor(batch["label_id"], dtype=torch.long)
        return {k: v.to(engine.device) for k, v in enc.items()}

    def evaluate(split: str) -> dict[str, Any]:
        return evaluate_distributed(engine, tokenizer, info["paths"][split], max_length, cfg.eval_batch_size,
                                    label_names, task.metrics)

    train_time, train_samples = 0.0, 0
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
    step = state["step"]
    engine.train()
    while step < total_steps:
        epoch = state["epoch"]
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, collate_fn=collate,
                                           local_shuffle_buffer_size=max(cfg.batch_size * 8, 256),
                                           local_shuffle_seed=cfg.seed + epoch, device="cpu")
        for i, batch in enumerate(batches):
            if i < state["batch_in_epoch"]:
                continue  # resumed mid-epoch: skip what the checkpoint already trained on
            t0 = time.perf_counter()
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            train_time += time.perf_counter() - t0
            train_samples += cfg.batch_size * world
            step += 1
            if footprints[0] is None:
                dist.all_gather_object(footprints, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                                    **memory_footprint(engine, cfg.zero_stage)})
            state.update(step=step, batch_in_epoch=i + 1)
            window_loss += loss.item()
            window_n += 1
            epoch_end = i + 1 == steps_per_epoch or step == total_steps

            if step % cfg.log_every == 0 or step == total_steps:
                mean = torch.tensor([window_loss / window_n])
                dist.all_reduce(mean)
                rate = window_n * cfg.batch_size * world / (time.perf_counter() - window_start)
                row = {"step": step, "epoch": round(epoch + (i + 1) / steps_per_epoch, 3),
                       "loss": round(mean.item() / world, 5), "lr": engine.get_lr()[0],
                       "samples_per_s": round(rate, 1)}
                state["history"].append(row)
                log_rank0("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f samples/s", step, total_steps,
                          row["epoch"], row["loss"], row["lr"], rate)
                window_loss, window_n, window_start = 0.0, 0, time.perf_counter()

            do_eval = epoch_end or (cfg.eval_every and step % cfg.eval_every == 0)
            do_ckpt = epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if do_eval or do_ckpt:
                pause = time.perf_counter()
                metrics = {"step": step, "epoch": epoch}
                if do_eval:
                    val = evaluate("validation")
                    state["history"].append({"step": step, "val_accuracy": val["accuracy"],
                                             "val_macro_f1": val["macro_f1"]})
                    metrics.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
                    log_rank0("step %d  validation accuracy %.4f  macro-F1 %.4f", step, val["accuracy"],
                              val["macro_f1"])
                if epoch_end:
                    state.update(epoch=epoch + 1, batch_in_epoch=0)
                save_checkpoint(engine, state, metrics)
                if cfg.fail_after_step and resumed_from is None and step >= cfg.fail_after_step \
                        and rank == world - 1:
                    # Testing only. Ray polls reports every 2 s; wait so this checkpoint is registered first.
                    time.sleep(4)
                    log.error("fail_after_step=%d: rank %d exits on purpose", cfg.fail_after_step, rank)
                    os._exit(1)
                window_start += time.perf_counter() - pause  # the log's samples/s counts training only
            if epoch_end:
                break
        else:  # the shard ran out before steps_per_epoch batches: count the epoch as done
            log_rank0("epoch %d ended after %d batches (expected %d)", epoch, state["batch_in_epoch"], steps_per_epoch)
            state.update(epoch=epoch + 1, batch_in_epoch=0)

    if footprints[0] is None:  # resumed after the last step: no step ran in this attempt
        dist.all_gather_object(footprints, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                            **memory_footprint(engine, cfg.zero_stage)})
    val = evaluate("validation")
    test = evaluate("test") if "test" in info["paths"] else None
    state["finished"] = True
    final = {
        "step": step,
        "validation": val,
        "test": test,
        "history": state["history"],
        "resumed_from_step": resumed_from,
        "restarts": state.get("restarts", 0),
        # Throughput of this attempt's optimizer steps alone (no eval, checkpoint or start-up).
        "train_samples_per_s": train_samples / train_time if train_time else None,
        "per_rank": footprints,
    }
    tmp = Path(tempfile.mkdtemp(prefix="slimray-final-"))
    try:
        export_model(engine, tokenizer, cfg.zero_stage, tmp / "model")
        if rank == 0:
            write_json(tmp / "train_state.json", state)
            write_json(tmp / "final.json", final)
        summary = {"step": step, "finished": True, "val_accuracy": val["accuracy"],
                   "test_accuracy": test["accuracy"] if test else None}
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Driver side.


def run_name(cfg: FinetuneConfig) -> str:
    """Same output and config → same Ray Train run, so re-running an interrupted command resumes it."""
    key = cfg.model_dump(mode="json", exclude={"overwrite", "resume", "fail_after_step", "max_failures"})
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


def main(cfg: FinetuneConfig) -> Path | str:
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_env import connect
    from jobs.modeling import resolve_model
    from jobs.tasks import get_task

    started = time.time()
    out = cfg.out if storage.is_uri(cfg.out) else Path(cfg.out).expanduser().resolve()
    check_can_write(out, cfg.overwrite)
    settings = get_settings()
    # Ray Train checkpoints straight to the storage root (a shared path or a URI): check it before any work.
    ray_storage = storage.canonical(storage.join(settings.storage_root, "ray_train"))
    storage.check_writable(ray_storage)
    data_dir = storage.local_copy(cfg.data).resolve()  # a URI is downloaded (cached) for the driver's checks
    data_manifest = load_prepared(data_dir)
    get_task(data_manifest["task"])
    resolve_model(cfg.model)  # a bad model path fails here, before any worker starts
    # Workers and Ray Data read the splits where every node can: the URI itself, or the shared path.
    data_location = storage.canonical(cfg.data)
    paths = {s: storage.join(data_location, f"{s}.parquet") for s in ("train", "validation", "test")
             if (data_dir / f"{s}.parquet").is_file()}
    if "validation" not in paths:
        raise InputError(f"{data_dir} has no validation.parquet; re-run `slimray prepare`")
    data_info = {
        "task": data_manifest["task"],
        "labels": data_manifest["labels"],
        "max_length": data_manifest["max_length"],
        "train_rows": data_manifest["splits"]["train"]["rows"],
        "paths": paths,
    }

    connect(settings)
    # Read before the workers start: with every CPU held by a worker, no read task could run afterwards.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds = ray.data.read_parquet(paths["train"]).select_columns(["text", "label_id"]).materialize()
    name = run_name(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": data_info},
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
    if not cfg.resume:
        delete_run(ray_storage, name)
    log.info("Ray Train run %s (storage %s)", name, storage.redact(ray_storage))
    try:
        result = trainer.fit()
    except Exception as e:  # WorkerGroupError / ControllerError carry the worker's traceback
        raise RuntimeError(f"fine-tuning failed after {cfg.max_failures} restarts: {e}") from e
    if result.checkpoint is None or not result.metrics.get("finished"):
        raise RuntimeError(f"fine-tuning ended without a final model (run {name}, storage "
                           f"{storage.redact(ray_storage)})")

    with atomic_dir(out, cfg.overwrite) as staging, result.checkpoint.as_directory() as ckpt:
        final = read_json(Path(ckpt) / "final.json")
        for f in (Path(ckpt) / "model").iterdir():
            shutil.copy2(f, staging / f.name)
        evaluated = final["test"] or final["validation"]
        metrics = {
            "split": "test" if final["test"] else "validation",
            "accuracy": evaluated["accuracy"],
            "macro_f1": evaluated["macro_f1"],
            "n": evaluated["n"],
            "per_class": evaluated["per_class"],
            "validation": {k: final["validation"][k] for k in ("accuracy", "macro_f1", "n")},
            "train_samples_per_s": final["train_samples_per_s"],
            "wall_s": round(time.time() - started, 1),
            "steps": final["step"],
            "resumed_from_step": final["resumed_from_step"],
            "restarts": final["restarts"],
            "distributed": {"workers": cfg.workers, "zero_stage": cfg.zero_stage, "per_rank": final["per_rank"]},
        }
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
            task=data_info["task"],
            base_model=cfg.model,
            base_model_path=resolve_model(cfg.model),
            data=data_location,
            data_manifest_sha256=file_sha256(data_dir / "manifest.json"),
            labels=data_info["labels"],
            max_length=cfg.max_length or data_info["max_length"],
            ray_train_run=name,
        ))
    log.info("wrote %s: %s accuracy %.4f, macro-F1 %.4f (%d steps, %.0f s)", out, metrics["split"],
             metrics["accuracy"], metrics["macro_f1"], metrics["steps"], metrics["wall_s"])
    return out


def cli(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_stage(FinetuneConfig, main, argv, prog="slimray finetune")


if __name__ == "__main__":
    cli()
