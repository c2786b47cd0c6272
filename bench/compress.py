"""Compression benchmark on the BANKING77 model saved by bench/finetune.py, side by side in one run.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/compress.py'

Every model goes through the same protocol (tuning.measure: test texts, tokenization excluded, padding to the
longest, 1 thread, warm-up, median of repeats, batch 1 and 32; size = weight-file bytes), one after another:
the fine-tuned fp32 model, the one-step alternative a user tries first (ONNX Runtime dynamic int8), each
method alone (PyTorch dynamic int8, distillation, structured pruning, vocabulary trimming), one hand-made
combination, and the model chosen by the Ray Tune search (`slimray compress`). Ratios are against fp32 and
against the ONNX int8 alternative. Goal: chosen 2x faster at batch 1 and 2x smaller than the alternative,
test accuracy at most 1.0 point below fp32.

Last line: ``chosen_speedup_b1_vs_onnx_int8: <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from cluster.settings import get_settings  # noqa: E402
from jobs.inference import build_torch_model  # noqa: E402
from jobs.modeling import load_tokenizer  # noqa: E402
from jobs.prepare import read_split  # noqa: E402
from tuning.compress import CompressConfig, teacher_logits, train_rows  # noqa: E402
from tuning.compress import main as compress  # noqa: E402
from tuning.measure import measure  # noqa: E402
from tuning.methods import Candidate, Context, run_pipeline, save_candidate  # noqa: E402

BASE, ALTERNATIVE, CHOSEN = ("fine-tuned fp32 (base)", "ONNX Runtime dynamic int8 (the alternative)",
                             "chosen by the search")
DISTILLED, COMBINED = "distillation to 2 layers (2 epochs), fp32", "distil 2 layers + trim + ONNX int8"
# Each method alone, and one hand-made combination, built here with the same context.
PLANS: dict[str, dict[str, dict[str, Any]]] = {
    ALTERNATIVE: {"quantize": {"backend": "onnx-int8"}},
    "PyTorch dynamic int8": {"quantize": {"backend": "torch-int8"}},
    DISTILLED: {"distill": {"layers": 2, "epochs": 2, "lr": 2e-4, "temperature": 2.0, "alpha": 0.7}},
    "pruning 50% heads + 50% FFN (+200 KD steps), fp32": {"prune": {"heads": 0.5, "ffn": 0.5, "recovery_steps": 200}},
    "vocabulary trimming, fp32": {"trim_vocab": {}},
}
PLANS[COMBINED] = {**PLANS[DISTILLED], "trim_vocab": {}, "quantize": {"backend": "onnx-int8"}}


def parse_args() -> argparse.Namespace:
    root = Path(get_settings().storage_root).resolve() / "bench"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=root / "b77-ft", help="fine-tuned model (bench/finetune.py)")
    parser.add_argument("--data", type=Path, default=root / "b77-data", help="its prepared data")
    parser.add_argument("--out", type=Path, default=root / "b77-compress")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="threads for every latency measurement")
    return parser.parse_args()


def build_alone(args: argparse.Namespace) -> dict[str, Path]:
    """Builds every plan of ``PLANS`` into ``OUT/alone/m<i>``; returns name -> folder."""
    max_length = json.loads((args.model / "manifest.json").read_text())["max_length"]
    texts, labels = train_rows(args.data, None)
    val = read_split(args.data, "validation", ("text", "label_id"))
    # The search cached the teacher's logits in OUT/inputs (same model, data and no limit: same key).
    ctx = Context(train_texts=texts, train_labels=labels,
                  teacher_logits=np.load(teacher_logits(args.model, args.data, args.out / "inputs", None)),
                  val_texts=val["text"], val_labels=np.asarray(val["label_id"]), max_length=max_length, threads=2)
    tokenizer = load_tokenizer(args.model)
    dirs: dict[str, Path] = {}
    for i, (name, plan) in enumerate(PLANS.items()):
        if name == COMBINED:  # reuse the distilled student built above rather than training it twice
            student = Candidate(build_torch_model(dirs[DISTILLED], {}), load_tokenizer(dirs[DISTILLED]))
            cand = run_pipeline(student, ctx, {k: v for k, v in plan.items() if k != "distill"})
        else:
            cand = run_pipeline(Candidate(build_torch_model(args.model, {}), tokenizer), ctx, plan)
        dirs[name] = args.out / "alone" / f"m{i}"
        save_candidate(cand, dirs[name], max_length)
    return dirs


def print_table(rows: dict[str, dict[str, Any]], threads: int) -> None:
    """Every model's test accuracy, latency and size, with ratios against fp32 and the alternative."""
    base, alt = rows[BASE], rows[ALTERNATIVE]
    print(f"\n## Compression of MiniLM-L6 fine-tuned on BANKING77 ({threads} thread, test split, one run)")
    print("| model | test acc | vs fp32 (pts) | b1 ms | b32 ms | MB | b1 speed-up vs fp32 | vs ONNX int8 "
          "| b32 speed-up vs fp32 | vs ONNX int8 | smaller vs fp32 | vs ONNX int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_accuracy']:.4f} | {100 * (r['test_accuracy'] - base['test_accuracy']):+.2f} "
              f"| {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.1f} | {r['size_mb']:.1f} "
              f"| {base['latency_ms_b1'] / r['latency_ms_b1']:.1f}x | {alt['latency_ms_b1'] / r['latency_ms_b1']:.2f}x "
              f"| {base['latency_ms_b32'] / r['latency_ms_b32']:.1f}x | {alt['latency_ms_b32'] / r['latency_ms_b32']:.2f}x "
              f"| {base['size_mb'] / r['size_mb']:.1f}x | {alt['size_mb'] / r['size_mb']:.2f}x |")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.model / "metrics.json").is_file():
        raise SystemExit(f"{args.model} not found: run bench/finetune.py first (or pass --model)")
    started = time.time()
    # 1. The search (writes OUT/chosen, report.md, pareto.png).
    compress(CompressConfig(model=args.model, data=args.data, out=args.out, trials=args.trials, threads=args.threads,
                            overwrite=True, search={"distill_epochs": [1, 2], "recovery_steps": [0, 200]}))
    chosen = json.loads((args.out / "chosen" / "metrics.json").read_text())
    # 2. Each method alone; 3. every model measured under the same protocol, one after another.
    dirs = {BASE: args.model, **build_alone(args), CHOSEN: args.out / "chosen"}
    test = read_split(args.data, "test")
    latency_texts = json.loads((args.out / "inputs" / "latency_texts.json").read_text())
    rows = {name: measure(d, latency_texts, args.threads, {"test": (test["text"], test["label"])})
            for name, d in dirs.items()}
    print_table(rows, args.threads)
    base, alt, c = rows[BASE], rows[ALTERNATIVE], rows[CHOSEN]
    pipeline = json.loads((args.out / "chosen" / "slimray_model.json").read_text())["pipeline"]
    print(f"\nchosen: {args.out / 'chosen'} — pipeline {json.dumps(pipeline)}")
    print(f"goals: >= 2x faster than ONNX int8 at batch 1: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}x; "
          f">= 2x smaller: {alt['size_mb'] / c['size_mb']:.2f}x; accuracy drop <= 1.0 pt: "
          f"{100 * (base['test_accuracy'] - c['test_accuracy']):.2f} pts "
          f"(search's own metrics.json: {chosen['speedup_b1']:.1f}x faster, {chosen['size_reduction']:.1f}x smaller "
          f"than fp32); wall {time.time() - started:.0f} s")
    print(f"chosen_speedup_b1_vs_onnx_int8: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}")


if __name__ == "__main__":
    main()
