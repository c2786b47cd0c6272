"""Compression benchmark on the BANKING77 model saved by bench/finetune.py (or any fine-tuned classifier or
entity tagger with --model/--data), side by side in one run.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/compress.py'
    ... bench/compress.py --model runs/wnut/ft --data runs/wnut/data --out runs/wnut/compress   # a tagger

A tagger's score is entity F1 (seqeval's default mode) wherever a classifier's is accuracy.

Every model goes through the same protocol (tuning.measure: test texts, tokenization excluded, padding to the
longest, warm-up, batch 1 and 32; size = weight-file bytes), at 1 and at 2 threads; latency in interleaved
rounds, every model timed once per round, the median over rounds (tuning.measure.latency_side_by_side):
- the fine-tuned fp32 teacher;
- the two one-step baselines a user gets without slimray: ONNX Runtime dynamic int8 of the plain export,
  and the stronger one, ONNX Runtime's transformer optimizer (attention / LayerNorm / GELU fusion) then
  dynamic int8 (what optimum's ORT optimizer + quantizer produce);
- each method alone (PyTorch dynamic int8, distillation, structured pruning, vocabulary trimming);
- the model chosen by the Ray Tune search (`slimray compress`, the full profile's search space), and every
  candidate the search finished, for the frontier.
Ratios are against fp32 and against the stronger baseline (the faster of the two at batch 1, 1 thread).
Goal: chosen >= 2x faster at batch 1 (1 thread) and >= 3x smaller than the stronger baseline, test accuracy
at most 1.0 point below fp32. When it is not met, the frontier is printed: the best speed-up within 1.0
point, and the accuracy drop of the cheapest candidate that reaches 2x.

The search resumes when the run is interrupted (same --out); the models built here are rebuilt.
Last line: ``chosen_speedup_b1_vs_best_onnx_baseline: <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from cluster.settings import get_settings  # noqa: E402
from jobs.artifacts import read_json  # noqa: E402
from jobs.inference import build_torch_model, load_inference_model  # noqa: E402
from jobs.modeling import load_tokenizer  # noqa: E402
from jobs.prepare import read_split  # noqa: E402
from tuning.compress import CompressConfig, eval_rows, train_rows  # noqa: E402
from tuning.compress import main as compress  # noqa: E402
from tuning.measure import latency_side_by_side, measure  # noqa: E402
from tuning.methods import Candidate, Context, run_pipeline, save_candidate  # noqa: E402
from tuning.report import METRIC_WORDS, describe_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE, CHOSEN = "fine-tuned fp32 (teacher)", "chosen by the search"
UNFUSED, FUSED = "ONNX Runtime dynamic int8 (plain export)", "ONNX fused graph + dynamic int8 (one-step optimum-style)"
DISTILLED = "distillation to 2 layers (KD + intermediate layers + the transfer set, if the task has one), fp32"
# The baselines, and each method alone, built here with the same context.
PLANS: dict[str, dict[str, dict[str, Any]]] = {
    UNFUSED: {"quantize": {"backend": "onnx-int8-unfused"}},
    FUSED: {"quantize": {"backend": "onnx-int8"}},
    "PyTorch dynamic int8": {"quantize": {"backend": "torch-int8"}},
    DISTILLED: {"distill": {"layers": 2, "epochs": 3, "lr": 2e-4, "temperature": 2.0, "alpha": 0.7,
                            "hidden_weight": 1.0, "attention_weight": 1.0}},
    "pruning 50% heads + 50% FFN (+200 KD steps), fp32": {"prune": {"heads": 0.5, "ffn": 0.5, "recovery_steps": 200}},
    "vocabulary trimming, fp32": {"trim_vocab": {}},
}
NEEDS_TRANSFER = {DISTILLED}


def parse_args() -> argparse.Namespace:
    root = Path(get_settings().storage_root).resolve() / "bench"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=root / "b77-ft", help="fine-tuned model (bench/finetune.py)")
    parser.add_argument("--data", type=Path, default=root / "b77-data", help="its prepared data")
    parser.add_argument("--out", type=Path, default=root / "b77-compress")
    parser.add_argument("--profile", type=Path, default=REPO / "slimray/configs/run_full.yaml",
                        help="the run profile whose `compress:` section configures the search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a compress option, e.g. --set trials=4 --set time_budget_s=1800")
    parser.add_argument("--skip-alone", action="store_true", help="measure only the baselines and the search")
    return parser.parse_args()


def build_alone(args: argparse.Namespace, skip: bool) -> dict[str, Path]:
    """Builds every plan of ``PLANS`` into ``OUT/alone/m<i>``; returns name -> folder."""
    max_length = read_json(args.model / "manifest.json")["max_length"]
    kind = args.kind
    texts, labels = train_rows(args.data, None, kind)
    val = read_split(args.data, "validation", ("tokens", "tag_ids") if kind == "tagging" else ("text", "label_id"))
    inputs = args.out / "inputs"
    shared = read_json(args.out / "compress_config.json")
    logits = sorted(inputs.glob("teacher_logits-*.npy"))[-1]  # what the search computed (same model, data)
    transfer = sorted(inputs.glob("transfer_logits-*.npy"))
    ctx = Context(train_texts=texts, train_labels=labels,
                  teacher_logits=np.load(logits) if kind == "tagging" else np.load(logits)[: len(texts)],
                  val_texts=val["tokens" if kind == "tagging" else "text"],
                  val_labels=val["tag_ids"] if kind == "tagging" else np.asarray(val["label_id"]),
                  max_length=max_length, threads=2, seed=shared["seed"], kind=kind)
    transfer_ctx = Context(**{**ctx.__dict__, "extra_texts": read_json(inputs / "transfer_texts.json"),
                              "extra_logits": np.load(transfer[-1])}) if transfer else ctx
    tokenizer = load_tokenizer(args.model)
    dirs: dict[str, Path] = {}
    for i, (name, plan) in enumerate(PLANS.items()):
        if skip and name not in (UNFUSED, FUSED):
            continue
        dirs[name] = args.out / "alone" / f"m{i}"
        if (dirs[name] / "slimray_model.json").is_file():  # built by an earlier, interrupted run
            continue
        t0 = time.perf_counter()
        cand = run_pipeline(Candidate(build_torch_model(args.model, {}), tokenizer),
                            transfer_ctx if name in NEEDS_TRANSFER else ctx, plan)
        save_candidate(cand, dirs[name], max_length)
        logging.info("built %s in %.0f s", name, time.perf_counter() - t0)
    return dirs


def search_config(args: argparse.Namespace) -> CompressConfig:
    section = yaml.safe_load(args.profile.read_text())["compress"]
    for item in args.set:
        key, _, value = item.partition("=")
        section[key] = json.loads(value)
    return CompressConfig(model=args.model, data=args.data, out=args.out, overwrite=True, **section)


def measure_all(dirs: dict[str, Path], latency_texts: list[str], test: tuple[list, list]) -> dict[str, dict]:
    rows = {}
    for name, d in dirs.items():
        rows[name] = measure(d, latency_texts, 1, {"test": test}, timed=False)
    for threads, suffix in ((1, ""), (2, "_2t")):  # every model in each round, so that drift hits all alike
        for name, lat in latency_side_by_side(dirs, latency_texts, threads).items():
            rows[name].update({f"{key}{suffix}": value for key, value in lat.items()})
    return rows


def print_table(rows: dict[str, dict[str, Any]], strong: str, data: Path) -> None:
    base, alt = rows[BASE], rows[strong]
    score = METRIC_WORDS[base["metric"]][0]
    print(f"\n## Compression of the model fine-tuned on {data} (test split, one run; ratios vs fp32 and vs "
          f"'{strong}')")
    print(f"| model | test {score} | vs fp32 (pts) | b1 ms 1t | b1 ms 2t | b32 ms 1t | b32 ms 2t | MB | b1 1t vs fp32 "
          "| b1 1t vs baseline | b1 2t vs baseline | b32 1t vs baseline | smaller vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_accuracy']:.4f} | {100 * (r['test_accuracy'] - base['test_accuracy']):+.2f} "
              f"| {r['latency_ms_b1']:.2f} | {r['latency_ms_b1_2t']:.2f} | {r['latency_ms_b32']:.1f} "
              f"| {r['latency_ms_b32_2t']:.1f} | {r['size_mb']:.1f} | {base['latency_ms_b1'] / r['latency_ms_b1']:.1f}x "
              f"| {alt['latency_ms_b1'] / r['latency_ms_b1']:.2f}x | {alt['latency_ms_b1_2t'] / r['latency_ms_b1_2t']:.2f}x "
              f"| {alt['latency_ms_b32'] / r['latency_ms_b32']:.2f}x | {alt['size_mb'] / r['size_mb']:.2f}x |")


def frontier(rows: dict[str, dict[str, Any]], strong: str) -> str:
    base, alt = rows[BASE], rows[strong]
    speed = {n: alt["latency_ms_b1"] / r["latency_ms_b1"] for n, r in rows.items()}
    drop = {n: 100 * (base["test_accuracy"] - r["test_accuracy"]) for n, r in rows.items()}
    within = [n for n in rows if drop[n] <= 1.0 and n != BASE]
    fast = [n for n in rows if speed[n] >= 2.0]
    best = max(within, key=lambda n: speed[n]) if within else None
    cheapest = min(fast, key=lambda n: drop[n]) if fast else None
    return ("frontier: best speed-up within 1.0 point: "
            + (f"{speed[best]:.2f}x ({best}, {drop[best]:+.2f} pts drop)" if best else "none")
            + "; smallest drop among candidates >= 2x: "
            + (f"{drop[cheapest]:.2f} pts ({cheapest}, {speed[cheapest]:.2f}x)" if cheapest else "none reached 2x"))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    print(f"load average before: {os.getloadavg()}", flush=True)
    if not (args.model / "metrics.json").is_file():
        raise SystemExit(f"{args.model} not found: run bench/finetune.py first (or pass --model)")
    started = time.time()
    args.kind = load_inference_model(args.model, script=False).kind
    cfg = search_config(args)
    # 1. The search (writes OUT/chosen, report.md, pareto.png; resumes an interrupted search).
    compress(cfg)
    trials = read_json(args.out / "trials.json")["trials"]
    # 2. The baselines and each method alone; 3. every model under the same protocol, side by side.
    dirs = {BASE: args.model, **build_alone(args, args.skip_alone), CHOSEN: args.out / "chosen"}
    for r in trials:
        if r["status"] == "finished":
            dirs[f"search {r['trial_id']}: {describe_pipeline(r['pipeline'])}"] = Path(r["artifact"])
    print(f"load average before the side-by-side measurement: {os.getloadavg()}", flush=True)
    rows = measure_all(dirs, read_json(args.out / "inputs" / "latency_texts.json"),
                       eval_rows(args.data, "test", args.kind))
    strong = min((UNFUSED, FUSED), key=lambda n: rows[n]["latency_ms_b1"])
    print_table(rows, strong, args.data)
    base, alt, c = rows[BASE], rows[strong], rows[CHOSEN]
    pipeline = read_json(args.out / "chosen" / "slimray_model.json")["pipeline"]
    print(f"\nchosen: {describe_pipeline(pipeline)}")
    print(f"goals vs '{strong}': >= 2x faster at batch 1, 1 thread: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}x; "
          f">= 3x smaller: {alt['size_mb'] / c['size_mb']:.2f}x; test {METRIC_WORDS[base['metric']][0]} drop <= 1.0 pt: "
          f"{100 * (base['test_accuracy'] - c['test_accuracy']):.2f} pts; teacher (>= 0.925 on BANKING77): "
          f"{base['test_accuracy']:.4f}; "
          f"wall {time.time() - started:.0f} s")
    print(frontier(rows, strong))
    print(f"load average after: {os.getloadavg()}")
    print(f"chosen_speedup_b1_vs_best_onnx_baseline: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}")


if __name__ == "__main__":
    main()
