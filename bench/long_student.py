"""A long-trained student, then its FFN pruned: the candidates the compression search needs past 2x, built
directly with ``tuning.methods`` (no search) and measured side by side against the one-step baseline.

    .venv/bin/python bench/long_student.py --model runs/bench/b77-ft --data runs/bench/b77-data \
        --out runs/bench/long-student

Distils a ``--layers`` student on the train texts plus ``--copies`` teacher-labelled augmentations of each
(``tuning.transfer``) for ``--epochs`` epochs (logit KD), then prunes each share of ``--ffn`` of its FFN
neurons with ``--recovery`` KD steps. Every candidate is vocabulary-trimmed and exported as fused ONNX int8,
its validation and test accuracy measured, and all of them timed against the teacher's own fused ONNX int8
export in interleaved rounds (``tuning.measure.latency_side_by_side``, 1 thread). Candidates already in
``--out`` are reused. Last line: ``long_student_best_speedup_within_1pt_test: <x>`` (the fastest candidate
within 1 test point of the fp32 teacher, against the baseline at batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from jobs.inference import build_torch_model, load_inference_model  # noqa: E402
from jobs.modeling import load_tokenizer  # noqa: E402
from jobs.prepare import read_split  # noqa: E402
from tuning.measure import accuracy_f1, latency_side_by_side  # noqa: E402
from tuning.methods import Candidate, Context, distill, prune, quantize, save_candidate, trim_vocab  # noqa: E402
from tuning.transfer import build_transfer_set  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/bench/b77-ft"), help="fine-tuned teacher folder")
    p.add_argument("--data", type=Path, default=Path("runs/bench/b77-data"), help="its prepared data")
    p.add_argument("--out", type=Path, default=Path("runs/bench/long-student"))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--copies", type=int, default=2, help="augmented copies per train text")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ffn", type=float, nargs="*", default=[0.25, 0.5], help="FFN shares to prune")
    p.add_argument("--recovery", type=int, default=300, help="KD steps after pruning")
    p.add_argument("--threads", type=int, default=2, help="threads for training (latency: 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    max_length = json.loads((args.data / "manifest.json").read_text())["max_length"]
    train = read_split(args.data, "train", ("text", "label_id"))
    val = read_split(args.data, "validation", ("text", "label_id", "label"))
    test = read_split(args.data, "test", ("text", "label"))
    tokenizer = load_tokenizer(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["student"] + [f"ffn{share:g}" for share in args.ffn]
    dirs = {"teacher fused ONNX int8 (baseline)": args.out / "baseline",
            **{name: args.out / name for name in names}}
    if not all((d / "slimray_model.json").is_file() for d in dirs.values()):
        teacher = load_inference_model(args.model, threads=args.threads)
        transfer = build_transfer_set(train["text"], val["text"] + test["text"], copies=args.copies, seed=args.seed,
                                      mask_token=tokenizer.mask_token or "[MASK]")
        started = time.perf_counter()
        ctx = Context(train_texts=train["text"], train_labels=np.asarray(train["label_id"]),
                      teacher_logits=teacher.logits(train["text"]), val_texts=val["text"],
                      val_labels=np.asarray(val["label_id"]), max_length=max_length, threads=args.threads,
                      seed=args.seed, extra_texts=transfer.texts, extra_logits=teacher.logits(transfer.texts),
                      on_epoch=lambda e, s: print(f"  epoch {e}: fp32 student val accuracy {s:.4f} "
                                                  f"({time.perf_counter() - started:.0f} s)", flush=True))
        print(f"transfer set: {len(transfer.texts)} texts; dropped {dict(transfer.dropped)}", flush=True)
        teacher_cand = Candidate(build_torch_model(args.model, {}), tokenizer)
        save_candidate(quantize(teacher_cand, ctx, backend="onnx-int8"), dirs["teacher fused ONNX int8 (baseline)"],
                       max_length)
        student = distill(teacher_cand, ctx, layers=args.layers, epochs=args.epochs, lr=args.lr, temperature=2.0,
                          alpha=0.7)
        ctx.on_epoch = None
        for name, share in zip(names, [None, *args.ffn]):
            cand = student if share is None else prune(student, ctx, heads=0.0, ffn=share,
                                                       recovery_steps=args.recovery, temperature=2.0, alpha=0.7)
            save_candidate(quantize(trim_vocab(cand, ctx), ctx, backend="onnx-int8"), dirs[name], max_length)

    fp32 = load_inference_model(args.model, threads=args.threads)
    ref = accuracy_f1(fp32, test["text"], test["label"])["accuracy"]
    rows = {}
    for name, d in dirs.items():
        m = load_inference_model(d, threads=args.threads)
        rows[name] = {"val": accuracy_f1(m, val["text"], val["label"])["accuracy"],
                      "test": accuracy_f1(m, test["text"], test["label"])["accuracy"]}
    latency = latency_side_by_side(dirs, test["text"][:64], threads=1)
    base = latency["teacher fused ONNX int8 (baseline)"]["latency_ms_b1"]
    print(f"\n{args.layers}-layer student, {args.epochs:g} epochs, {args.copies} augmented copies; fp32 teacher test "
          f"accuracy {ref:.4f}; latency at batch 1, 1 thread, side by side")
    print("| candidate (-> trim -> fused ONNX int8) | val acc | test acc | test vs fp32 (pts) | b1 ms | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ms = latency[name]["latency_ms_b1"]
        print(f"| {name} | {r['val']:.4f} | {r['test']:.4f} | {100 * (r['test'] - ref):+.2f} | {ms:.3f} | "
              f"{base / ms:.2f}x |")
    within = [base / latency[n]["latency_ms_b1"] for n in names if 100 * (ref - rows[n]["test"]) <= 1.0]
    print(f"load average after: {os.getloadavg()}")
    print(f"long_student_best_speedup_within_1pt_test: {max(within, default=0.0):.2f}")


if __name__ == "__main__":
    main()
