"""Fine-tuning benchmark on BANKING77: accuracy of one full run, and throughput side by side.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/finetune.py'   # (loopback-only netns here)
    python bench/finetune.py --skip-full --steps 20                            # throughput part only

1. Full run of the best configuration (MiniLM-L6, 2 workers, ZeRO-2, jobs/configs/finetune_banking77.yaml),
   test accuracy reported; the model is saved to <storage_root>/bench/b77-ft for bench/compress.py. The same
   command resumes an interrupted full run from its last checkpoint (``--fresh`` starts it over).
2. Fixed-step runs on the same cores, same model, same global batch (32) and max_length: a plain
   single-process PyTorch loop (2 threads), Ray Train DDP (2 workers x 1 thread) and slimray's DeepSpeed
   ZeRO-0/1/2/3 (2 workers x 1 thread). Samples/s count optimizer-step time only (no start-up, no eval).
3. Per-rank parameter and optimizer-state bytes for ZeRO 0/1/2/3, as reported from inside the workers.

Last line: ``finetune_test_accuracy: <fraction>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from cluster.settings import get_settings  # noqa: E402
from jobs.config import build_config  # noqa: E402
from jobs.finetune import FinetuneConfig  # noqa: E402
from jobs.finetune import main as finetune  # noqa: E402
from jobs.prepare import PrepareConfig  # noqa: E402
from jobs.prepare import main as prepare  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 32


def batches(texts, labels, tokenizer, max_length, batch_size, steps, offset=0, stride=1):
    """Deterministic batches: rows offset, offset+stride, ... cycled; tokenized like the real loop."""
    import torch

    idx = list(range(offset, len(texts), stride))
    for s in range(steps):
        rows = [idx[(s * batch_size + j) % len(idx)] for j in range(batch_size)]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([labels[i] for i in rows])
        yield enc


def plain_loop(data_dir: Path, steps: int, threads: int) -> float:
    """What a user writes without Ray: one process, AdamW, same batches. Returns samples/s."""
    import torch

    from jobs.modeling import load_pretrained_for_training, load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = json.loads((data_dir / "manifest.json").read_text())
    table = pq.read_table(data_dir / "train.parquet")
    tok = load_tokenizer("minilm")
    model = load_pretrained_for_training("minilm", info["labels"], "AutoModelForSequenceClassification")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    elapsed = 0.0
    for i, batch in enumerate(batches(table.column("text").to_pylist(), table.column("label_id").to_pylist(), tok,
                                      info["max_length"], GLOBAL_BATCH, steps + 2)):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # first steps warm up allocator and kernels
            elapsed += time.perf_counter() - t0
    return steps * GLOBAL_BATCH / elapsed


def ddp_worker(config):
    import ray.train
    import ray.train.torch
    import torch

    from jobs.modeling import load_pretrained_for_training, load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    info = config["info"]
    table = pq.read_table(config["train"])
    tok = load_tokenizer("minilm")
    model = load_pretrained_for_training("minilm", info["labels"], "AutoModelForSequenceClassification")
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    elapsed = 0.0
    for i, batch in enumerate(batches(table.column("text").to_pylist(), table.column("label_id").to_pylist(), tok,
                                      info["max_length"], GLOBAL_BATCH // world, config["steps"] + 2, rank, world)):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            elapsed += time.perf_counter() - t0
    # Train V2 keeps only metrics that come with a checkpoint: rank 0 sends a one-file checkpoint.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "result.json").write_text(json.dumps({"samples_per_s": config["steps"] * GLOBAL_BATCH / elapsed}))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def ray_ddp(data_dir: Path, steps: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.storage import canonical

    info = json.loads((data_dir / "manifest.json").read_text())
    trainer = TorchTrainer(
        ddp_worker,
        train_loop_config={"info": info, "train": str(data_dir / "train.parquet"), "steps": steps},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-ddp-{int(time.time())}",
                             storage_path=canonical(Path(get_settings().storage_root) / "ray_train")),
    )
    with trainer.fit().checkpoint.as_directory() as d:
        return json.loads(Path(d, "result.json").read_text())["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each fixed-step run")
    parser.add_argument("--skip-full", action="store_true", help="skip the full accuracy run")
    parser.add_argument("--skip-throughput", action="store_true", help="skip the fixed-step runs")
    parser.add_argument("--fresh", action="store_true",
                        help="start the full run over (deletes its checkpoints); by default an interrupted full run "
                             "resumes from its last checkpoint, and a finished one is read back")
    parser.add_argument("--full-config", type=Path, default=REPO / "jobs/configs/finetune_banking77.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from cluster.ray_env import connect

    settings = get_settings()
    root = Path(settings.storage_root).resolve() / "bench"
    data = root / "b77-data"
    if not (data / "manifest.json").is_file():
        prepare(PrepareConfig(source=str(settings.data_root / "banking77"), out=data, text_column="text",
                              label_column="category"))
    small = root / "b77-data-1k"  # fixed-step runs: enough rows for the steps, small eval at the end
    if not (small / "manifest.json").is_file():
        prepare(PrepareConfig(source=str(settings.data_root / "banking77"), out=small, limit=1000,
                              text_column="text", label_column="category"))
    connect(settings)

    results: dict[str, float] = {}
    footprints = {}
    if not args.skip_throughput:
        results["plain PyTorch loop (1 process, 2 threads)"] = plain_loop(small, args.steps, threads=2)
        results["Ray Train DDP (2 workers x 1 thread)"] = ray_ddp(small, args.steps)
    for stage in () if args.skip_throughput else (0, 1, 2, 3):
        out = root / f"zero{stage}"
        cfg = FinetuneConfig(data=small, out=out, model="minilm", workers=2, cpus_per_worker=1, zero_stage=stage,
                             max_steps=args.steps, batch_size=GLOBAL_BATCH // 2, log_every=10, overwrite=True, resume=False,
                             # ZeRO-3 only (rejected below): partition every parameter of the small model
                             deepspeed={"stage3_param_persistence_threshold": 0} if stage == 3 else {})
        finetune(cfg)
        m = json.loads((out / "metrics.json").read_text())
        results[f"DeepSpeed ZeRO-{stage} (2 workers x 1 thread)"] = m["train_samples_per_s"]
        footprints[stage] = m["distributed"]["per_rank"]

    accuracy = None
    if not args.skip_full:
        cfg = build_config(FinetuneConfig, file=args.full_config,
                           flags={"data": str(data), "out": str(root / "b77-ft"), "overwrite": True,
                                  "resume": not args.fresh})
        finetune(cfg)
        full = json.loads((root / "b77-ft" / "metrics.json").read_text())
        accuracy = full["accuracy"]

    if args.skip_throughput:
        resumed = f" (resumed from step {full['resumed_from_step']}: wall time of this command only)" \
            if full.get("resumed_from_step") else ""
        print(f"Full run: test accuracy {accuracy:.4f}, macro-F1 {full['macro_f1']:.4f}, {full['steps']} steps, "
              f"{full['wall_s']:.0f} s{resumed}, {full['train_samples_per_s']:.1f} samples/s; model in "
              f"{root / 'b77-ft'}")
        print(f"finetune_test_accuracy: {accuracy:.4f}")
        return
    base = results["plain PyTorch loop (1 process, 2 threads)"]
    print("\n## Training throughput, same 2 cores, global batch 32, MiniLM-L6, BANKING77")
    print("| setup | samples/s | vs plain loop |\n|---|---|---|")
    for name, sps in results.items():
        print(f"| {name} | {sps:.1f} | {sps / base:.2f}x |")
    print("\n## Per-rank memory of parameters and optimizer state (2 ranks, MiniLM-L6, fp32)")
    print("| ZeRO stage | params/rank (MB) | share of params | optimizer states/rank (MB) | fp32 master/rank (MB) |")
    print("|---|---|---|---|---|")
    for stage, ranks in footprints.items():
        r = ranks[0]
        print(f"| {stage} | {r['param_bytes_local'] / 1e6:.1f} | {r['param_numel_local'] / r['param_numel_total']:.2f} "
              f"| {r['optimizer_state_bytes'] / 1e6:.1f} | {r['optimizer_master_bytes'] / 1e6:.1f} |")
    if accuracy is not None:
        print(f"\nFull run ({args.full_config.name}): test accuracy {accuracy:.4f} "
              f"(goal >= 0.92), macro-F1 {full['macro_f1']:.4f}, {full['steps']} steps, {full['wall_s']:.0f} s, "
              f"{full['train_samples_per_s']:.1f} samples/s; model in {root / 'b77-ft'}")
        print(f"finetune_test_accuracy: {accuracy:.4f}")
    else:
        print(f"zero3_vs_plain_samples_per_s: {results['DeepSpeed ZeRO-3 (2 workers x 1 thread)'] / base:.2f}")


if __name__ == "__main__":
    main()
