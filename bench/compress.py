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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from cluster.settings import get_settings  # noqa: E402
from jobs.inference import build_torch_model  # noqa: E402
from tuning.compress import CompressConfig, _train_rows, teacher_logits  # noqa: E402
from tuning.compress import main as compress  # noqa: E402
from tuning.measure import measure  # noqa: E402
from tuning.methods import Candidate, Context, run_pipeline, save_candidate  # noqa: E402


def main() -> None:
    root = Path(get_settings().storage_root).resolve() / "bench"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=root / "b77-ft", help="fine-tuned model (bench/finetune.py)")
    parser.add_argument("--data", type=Path, default=root / "b77-data", help="its prepared data")
    parser.add_argument("--out", type=Path, default=root / "b77-compress")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="threads for every latency measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.model / "metrics.json").is_file():
        raise SystemExit(f"{args.model} not found: run bench/finetune.py first (or pass --model)")
    from transformers import AutoTokenizer

    started = time.time()
    # 1. The search (writes OUT/chosen, report.md, pareto.png).
    search = CompressConfig(model=args.model, data=args.data, out=args.out, trials=args.trials, threads=args.threads,
                            overwrite=True, search={"distill_epochs": [1, 2], "recovery_steps": [0, 200]})
    compress(search)
    chosen = json.loads((args.out / "chosen" / "metrics.json").read_text())

    # 2. Each method alone, and one hand-made combination, built here with the same context.
    info = json.loads((args.model / "manifest.json").read_text())
    max_length = info["max_length"]
    texts, labels = _train_rows(args.data, None)
    val = pq.read_table(args.data / "validation.parquet")
    ctx = Context(train_texts=texts, train_labels=labels,
                  teacher_logits=np.load(teacher_logits(args.model, args.data, args.out, None)),
                  val_texts=val.column("text").to_pylist(), val_labels=np.asarray(val.column("label_id").to_pylist()),
                  max_length=max_length, threads=2)
    plans = {
        "ONNX Runtime dynamic int8 (the alternative)": {"quantize": {"backend": "onnx-int8"}},
        "PyTorch dynamic int8": {"quantize": {"backend": "torch-int8"}},
        "distillation to 2 layers (2 epochs), fp32": {"distill": {"layers": 2, "epochs": 2, "lr": 2e-4,
                                                                  "temperature": 2.0, "alpha": 0.7}},
        "pruning 50% heads + 50% FFN (+200 KD steps), fp32": {"prune": {"heads": 0.5, "ffn": 0.5, "recovery_steps": 200}},
        "vocabulary trimming, fp32": {"trim_vocab": {}},
    }
    plans["distil 2 layers + trim + ONNX int8"] = {**plans["distillation to 2 layers (2 epochs), fp32"],
                                                    "trim_vocab": {}, "quantize": {"backend": "onnx-int8"}}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dirs = {"fine-tuned fp32 (base)": args.model}
    for i, (name, plan) in enumerate(plans.items()):
        out = args.out / "alone" / f"m{i}"
        if name.startswith("distil 2 layers + trim") and (args.out / "alone" / "m2").is_dir():
            # reuse the distilled student of the row above rather than training it twice
            student = Candidate(build_torch_model(args.out / "alone" / "m2", {}),
                                AutoTokenizer.from_pretrained(args.out / "alone" / "m2"))
            cand = run_pipeline(student, ctx, {k: v for k, v in plan.items() if k != "distill"})
        else:
            cand = run_pipeline(Candidate(build_torch_model(args.model, {}), tokenizer), ctx, plan)
        save_candidate(cand, out, max_length)
        dirs[name] = out
    dirs["chosen by the search"] = args.out / "chosen"

    test = pq.read_table(args.data / "test.parquet", columns=["text", "label"])
    test_set = (test.column("text").to_pylist(), test.column("label").to_pylist())
    latency_texts = json.loads((args.out / "latency_texts.json").read_text())
    rows = {name: measure(d, latency_texts, args.threads, {"test": test_set}) for name, d in dirs.items()}

    base, alt = rows["fine-tuned fp32 (base)"], rows["ONNX Runtime dynamic int8 (the alternative)"]
    print(f"\n## Compression of MiniLM-L6 fine-tuned on BANKING77 ({args.threads} thread, test split, one run)")
    print("| model | test acc | vs fp32 (pts) | b1 ms | b32 ms | MB | b1 speed-up vs fp32 | vs ONNX int8 "
          "| b32 speed-up vs fp32 | vs ONNX int8 | smaller vs fp32 | vs ONNX int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_accuracy']:.4f} | {100 * (r['test_accuracy'] - base['test_accuracy']):+.2f} "
              f"| {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.1f} | {r['size_mb']:.1f} "
              f"| {base['latency_ms_b1'] / r['latency_ms_b1']:.1f}x | {alt['latency_ms_b1'] / r['latency_ms_b1']:.2f}x "
              f"| {base['latency_ms_b32'] / r['latency_ms_b32']:.1f}x | {alt['latency_ms_b32'] / r['latency_ms_b32']:.2f}x "
              f"| {base['size_mb'] / r['size_mb']:.1f}x | {alt['size_mb'] / r['size_mb']:.2f}x |")
    c = rows["chosen by the search"]
    print(f"\nchosen: {args.out / 'chosen'} — pipeline {json.dumps(json.loads((args.out / 'chosen' / 'slimray_model.json').read_text())['pipeline'])}")
    print(f"goals: >= 2x faster than ONNX int8 at batch 1: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}x; "
          f">= 2x smaller: {alt['size_mb'] / c['size_mb']:.2f}x; accuracy drop <= 1.0 pt: "
          f"{100 * (base['test_accuracy'] - c['test_accuracy']):.2f} pts "
          f"(search's own metrics.json: {chosen['speedup_b1']:.1f}x faster, {chosen['size_reduction']:.1f}x smaller "
          f"than fp32); wall {time.time() - started:.0f} s")
    print(f"chosen_speedup_b1_vs_onnx_int8: {alt['latency_ms_b1'] / c['latency_ms_b1']:.2f}")


if __name__ == "__main__":
    main()
