"""Learning curves of the fine-tune recipe: validation and test accuracy after every epoch, per recipe.

    .venv/bin/python bench/teacher_curves.py --data runs/b77/data --epochs 8 --recipe shuffled
    .venv/bin/python bench/teacher_curves.py --data runs/b77/data --epochs 2 --recipe window256

A single process (2 threads) runs the same recipe as ``slimray finetune`` (AdamW, no decay on biases and
LayerNorm, linear warm-up then decay, gradient clipping, global batch 32): what it finds about epochs,
learning rate and data order carries over to the Ray Train job, which only splits the same steps over
workers. Recipes:

- ``shuffled``: every epoch visits the train split in a fresh seeded random order;
- ``window256``: the order of the train file, shuffled only within a 256-row buffer (what the fine-tune
  job did before: a label-sorted train file then gives batches of two or three labels).

Each epoch's row is appended to ``--out`` (JSONL) as it finishes; a re-run skips recipes already complete.
Last line: ``teacher_best_test_accuracy: <fraction>``.
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

from jobs.prepare import read_split  # noqa: E402
from tuning.methods import accuracy  # noqa: E402


def epoch_order(n: int, recipe: str, rng: np.random.Generator) -> np.ndarray:
    if recipe == "shuffled":
        return rng.permutation(n)
    if recipe == "window256":  # a 256-row local shuffle buffer over the file's order
        order, buffer = [], []
        for i in range(n):
            buffer.append(i)
            if len(buffer) == 256:
                order.append(buffer.pop(int(rng.integers(len(buffer)))))
        rng.shuffle(buffer)
        return np.asarray(order + buffer)
    raise SystemExit(f"unknown recipe {recipe!r}; use shuffled or window256")


def run(args: argparse.Namespace, recipe: str, done: set[tuple[str, int]]) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    from jobs.modeling import load_pretrained_for_training, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read_split(args.data, "train", ("text", "label_id"))
    val = read_split(args.data, "validation", ("text", "label_id"))
    test = read_split(args.data, "test", ("text", "label_id"))
    labels = json.loads((Path(args.data) / "labels.json").read_text())
    max_length = json.loads((Path(args.data) / "manifest.json").read_text())["max_length"]
    model = load_pretrained_for_training(args.model, labels, "AutoModelForSequenceClassification")
    tok = load_tokenizer(args.model)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr)
    n = len(train["text"])
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    rng = np.random.default_rng(args.seed)
    y = torch.tensor(train["label_id"])
    best = 0.0
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = epoch_order(n, recipe, rng)
        t0, losses = time.perf_counter(), []
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            enc = tok([train["text"][i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            loss = F.cross_entropy(model(**enc).logits, y[idx], label_smoothing=args.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        row = {"recipe": recipe, "lr": args.lr, "label_smoothing": args.label_smoothing, "epochs": args.epochs,
               "epoch": epoch, "train_loss_last_quarter": float(np.mean(losses[-len(losses) // 4:])),
               "val_accuracy": accuracy(model, tok, val["text"], val["label_id"], max_length),
               "test_accuracy": accuracy(model, tok, test["text"], test["label_id"], max_length),
               "epoch_s": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg()[0]}
        model.train()
        best = max(best, row["test_accuracy"])
        print(json.dumps(row), flush=True)
        if (recipe, epoch) not in done:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if args.save:  # a Hugging Face folder (weights, config with label names, tokenizer)
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="runs/b77/data")
    p.add_argument("--model", default="minilm")
    p.add_argument("--recipe", action="append", help="shuffled or window256 (repeatable; default: shuffled)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/teacher_curves.jsonl")
    p.add_argument("--save", help="write the last recipe's final model to this folder")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in open(args.out)] if Path(args.out).is_file() else []
    key = lambda r: (r["recipe"], r["lr"], r["label_smoothing"], r["epochs"])  # noqa: E731
    best = max([r["test_accuracy"] for r in rows] or [0.0])
    print(f"load average before: {os.getloadavg()}", flush=True)
    for recipe in args.recipe or ["shuffled"]:
        mine = [r for r in rows if key(r) == (recipe, args.lr, args.label_smoothing, args.epochs)]
        if len(mine) >= args.epochs:
            print(f"{recipe}: already complete in {args.out}")
            continue
        if mine:  # an interrupted recipe restarts from scratch (no checkpoints here); its rows are replaced
            rows = [r for r in rows if r not in mine]
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        best = max(best, run(args, recipe, set()))
    print(f"load average after: {os.getloadavg()}")
    print(f"teacher_best_test_accuracy: {best:.4f}")


if __name__ == "__main__":
    main()
