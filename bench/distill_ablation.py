"""Distillation ablation at one student depth and one epoch budget, side by side in one run.

    .venv/bin/python bench/distill_ablation.py --model runs/bench/b77-ft --data runs/bench/b77-data --layers 2 --epochs 2

Four students of the same depth, initialised from the same teacher layers and trained for the same
epochs with the same seed: logit KD alone, + intermediate layers (hidden-state and attention-relation
losses), + the transfer set (teacher-labelled augmentations of train, ``tuning.transfer``), + both.
Validation and test accuracy of each fp32 student (no quantization, so only distillation differs).
Each result is appended to ``--out`` as it finishes; a re-run skips the variants already measured.
Last line: ``ablation_best_minus_logit_kd_test_pts: <points>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from jobs.inference import build_torch_model, load_inference_model  # noqa: E402
from jobs.modeling import load_tokenizer  # noqa: E402
from jobs.prepare import read_split  # noqa: E402
from tuning.methods import Candidate, Context, accuracy, distill  # noqa: E402
from tuning.transfer import build_transfer_set  # noqa: E402

VARIANTS = {
    "logit KD alone": {"hidden_weight": 0.0, "attention_weight": 0.0, "augment": False},
    "+ intermediate layers": {"hidden_weight": 1.0, "attention_weight": 1.0, "augment": False},
    "+ augmentation": {"hidden_weight": 0.0, "attention_weight": 0.0, "augment": True},
    "+ both": {"hidden_weight": 1.0, "attention_weight": 1.0, "augment": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/bench/b77-ft"), help="fine-tuned teacher folder")
    p.add_argument("--data", type=Path, default=Path("runs/bench/b77-data"), help="its prepared data")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--copies", type=int, default=1, help="augmented copies per train text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench/distill_ablation.jsonl"))
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="run only these (repeatable)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    print(f"load average before: {os.getloadavg()}", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    max_length = json.loads((args.data / "manifest.json").read_text())["max_length"]
    train = read_split(args.data, "train", ("text", "label_id"))
    val = read_split(args.data, "validation", ("text", "label_id"))
    test = read_split(args.data, "test", ("text", "label_id"))
    teacher = load_inference_model(args.model, threads=args.threads)
    tokenizer = load_tokenizer(args.model)
    transfer = build_transfer_set(train["text"], val["text"] + test["text"], copies=args.copies, seed=args.seed,
                                  mask_token=tokenizer.mask_token or "[MASK]")
    print(f"transfer set: {len(transfer.texts)} texts {dict(transfer.sources)}; dropped {dict(transfer.dropped)}",
          flush=True)
    train_logits = teacher.logits(train["text"], batch_size=64)
    extra_logits = teacher.logits(transfer.texts, batch_size=64)
    teacher_model = build_torch_model(args.model, {})
    rows = [json.loads(line) for line in open(args.out)] if args.out.is_file() else []
    setting = {"layers": args.layers, "epochs": args.epochs, "lr": args.lr, "copies": args.copies, "seed": args.seed,
               "model": str(args.model)}
    done = {r["variant"]: r for r in rows if r["setting"] == setting}
    teacher_row = {"variant": "teacher (fp32, all layers)", "val_accuracy": accuracy(
        teacher_model, tokenizer, val["text"], val["label_id"], max_length), "test_accuracy": accuracy(
        teacher_model, tokenizer, test["text"], test["label_id"], max_length)}
    for name in args.variant or list(VARIANTS):
        if name in done:
            continue
        v = VARIANTS[name]
        ctx = Context(train_texts=train["text"], train_labels=np.asarray(train["label_id"]), teacher_logits=train_logits,
                      val_texts=val["text"], val_labels=np.asarray(val["label_id"]), max_length=max_length,
                      threads=args.threads, seed=args.seed,
                      **({"extra_texts": transfer.texts, "extra_logits": extra_logits} if v["augment"] else {}))
        t0 = time.perf_counter()
        student = distill(Candidate(build_torch_model(args.model, {}), tokenizer), ctx, layers=args.layers,
                          epochs=args.epochs, lr=args.lr, temperature=2.0, alpha=0.7,
                          hidden_weight=v["hidden_weight"], attention_weight=v["attention_weight"]).model
        row = {"variant": name, "setting": setting, **v, "train_s": round(time.perf_counter() - t0, 1),
               "val_accuracy": accuracy(student, tokenizer, val["text"], val["label_id"], max_length),
               "test_accuracy": accuracy(student, tokenizer, test["text"], test["label_id"], max_length),
               "load_avg": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[name] = row

    print(f"\n## Distillation ablation: {args.layers}-layer students, {args.epochs:g} epochs, lr {args.lr:g}, seed "
          f"{args.seed}, {args.threads} threads; transfer set {len(transfer.texts)} texts")
    print("| variant | val acc | test acc | test vs logit KD (pts) | train s |\n|---|---|---|---|---|")
    print(f"| {teacher_row['variant']} | {teacher_row['val_accuracy']:.4f} | {teacher_row['test_accuracy']:.4f} | | |")
    ref = done.get("logit KD alone")
    for name in VARIANTS:
        if name in done:
            r = done[name]
            delta = f"{100 * (r['test_accuracy'] - ref['test_accuracy']):+.2f}" if ref else ""
            print(f"| {name} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {delta} | {r['train_s']:.0f} |")
    print(f"load average after: {os.getloadavg()}")
    if ref:
        best = max(done.values(), key=lambda r: r["val_accuracy"])  # chosen on validation, reported on test
        print(f"ablation_best_minus_logit_kd_test_pts: {100 * (best['test_accuracy'] - ref['test_accuracy']):.2f}")


if __name__ == "__main__":
    main()
