"""``report.md`` (every trial in a table) and ``pareto.png`` (accuracy against latency, size as marker area)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def describe_pipeline(pipeline: list[dict[str, Any]] | None) -> str:
    if not pipeline:
        return "fp32 (no change)"
    parts = []
    for step in pipeline:
        m = step["method"]
        if m == "distill":
            parts.append(f"distil {len(step['layers'])}L x{step['epochs']}ep T={step['temperature']:.1f} "
                         f"a={step['alpha']:.2f}")
        elif m == "prune":
            parts.append(f"prune heads {step['heads']:.0%} ffn {step['ffn']:.0%}"
                         + (f" +{step['recovery_steps']} KD steps" if step["recovery_steps"] else ""))
        elif m == "trim_vocab":
            parts.append(f"trim vocab {step['original_tokens']}->{step['kept_tokens']}")
        elif m == "quantize":
            parts.append(step["backend"])
    return " -> ".join(parts)


def plot_pareto(path: Path, rows: list[dict[str, Any]], base: dict[str, Any], chosen: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    area = lambda mb: 20 + 4 * mb  # noqa: E731  marker area grows with size in MB
    others = [r for r in rows if not r.get("pareto")]
    front = sorted([r for r in rows if r.get("pareto")], key=lambda r: r["latency_ms_b1"])
    ax.scatter([r["latency_ms_b1"] for r in others], [100 * r["val_accuracy"] for r in others],
               s=[area(r["size_mb"]) for r in others], alpha=0.45, color="tab:gray", label="candidate")
    ax.scatter([r["latency_ms_b1"] for r in front], [100 * r["val_accuracy"] for r in front],
               s=[area(r["size_mb"]) for r in front], alpha=0.8, color="tab:blue", label="Pareto front")
    ax.scatter([base["latency_ms_b1"]], [100 * base["val_accuracy"]], s=[area(base["size_mb"])], marker="s",
               color="tab:orange", alpha=0.8, label="fine-tuned fp32 (base)")
    if chosen is not None:
        ax.scatter([chosen["latency_ms_b1"]], [100 * chosen["val_accuracy"]], s=[area(chosen["size_mb"]) + 120],
                   facecolors="none", edgecolors="tab:red", linewidths=2, label="chosen")
    ax.set_xscale("log")
    ax.margins(0.12)
    ax.set_xlabel("latency at batch 1 (ms, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Compression candidates (marker area ~ size in MB)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, markerscale=0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, trials: list[dict[str, Any]], base: dict[str, Any], chosen: dict[str, Any] | None,
                 metrics: dict[str, Any] | None, cfg: Any) -> None:
    finished = [r for r in trials if r["status"] == "finished"]
    lines = [
        "# Compression search",
        "",
        f"Model `{cfg.model}`, data `{cfg.data}`; {len(trials)} trials ({len(finished)} finished). "
        f"Constraint: validation accuracy within {cfg.max_accuracy_drop} points of the base model, macro-F1 within "
        f"{2 * cfg.max_accuracy_drop} points. Latency: median of repeated passes, {cfg.threads} thread(s), "
        "tokenization excluded, padding to the longest text in each batch, measured one model after another "
        "after the search.",
        "",
    ]
    if metrics is not None and chosen is not None:
        b = metrics["base"]
        lines += [
            f"## Chosen: `{chosen['trial_id']}` — {describe_pipeline(chosen.get('pipeline'))}",
            "",
            "| | test accuracy | macro-F1 | latency b1 (ms) | latency b32 (ms) | size (MB) |",
            "|---|---|---|---|---|---|",
            f"| base (fine-tuned fp32) | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | {b['latency_ms_b1']:.2f} | "
            f"{b['latency_ms_b32']:.1f} | {b['size_mb']:.1f} |",
            f"| chosen | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['latency_ms_b1']:.2f} | "
            f"{metrics['latency_ms_b32']:.1f} | {metrics['size_mb']:.1f} |",
            f"| ratio | {-metrics['accuracy_drop_pts']:+.2f} pts | | {metrics['speedup_b1']:.1f}x faster | "
            f"{metrics['speedup_b32']:.1f}x faster | {metrics['size_reduction']:.1f}x smaller |",
            "",
        ]
    else:
        lines += ["## No candidate met the constraint", ""]
    lines += [
        "![Pareto plot](pareto.png)",
        "",
        "## Every trial",
        "",
        "| trial | status | pipeline | val accuracy | val macro-F1 | latency b1 (ms) | latency b32 (ms) | size (MB) | Pareto |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base | — | fine-tuned fp32 | {base['val_accuracy']:.4f} | {base['val_macro_f1']:.4f} | "
        f"{base['latency_ms_b1']:.2f} | {base['latency_ms_b32']:.1f} | {base['size_mb']:.1f} | |",
    ]
    for r in sorted(trials, key=lambda r: (r["status"] != "finished", -(r.get("val_accuracy") or 0))):
        if r["status"] == "finished":
            mark = "**chosen**" if chosen is not None and r["trial_id"] == chosen["trial_id"] else (
                "yes" if r.get("pareto") else "")
            lines.append(f"| {r['trial_id']} | finished | {describe_pipeline(r['pipeline'])} | {r['val_accuracy']:.4f} | "
                         f"{r['val_macro_f1']:.4f} | {r['latency_ms_b1']:.2f} | {r['latency_ms_b32']:.1f} | "
                         f"{r['size_mb']:.1f} | {mark} |")
        else:
            detail = r.get("error") or (f"val accuracy {r['val_accuracy']:.4f} after epoch {r['epoch']}"
                                        if r.get("val_accuracy") is not None else "")
            lines.append(f"| {r['trial_id']} | {r['status']} | {detail} | | | | | | |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The same rows for programs (``slimray run``'s report): every trial, base and chosen, measured.
    (out / "trials.json").write_text(json.dumps({"base": base, "chosen": chosen, "trials": trials}, indent=2,
                                                default=str) + "\n", encoding="utf-8")
    plot_pareto(out / "pareto.png", finished, base, chosen)
