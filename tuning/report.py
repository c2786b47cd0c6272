"""The search's report: ``report.md`` (every trial in a table), ``trials.json`` and ``pareto.png``.

The tables here are the only ones of their kind: ``slimray run``'s report renders its compression
section with the same ``trial_table`` and ``summary_markdown``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The words for the task's score (``metric`` in the measurements): a classifier's, a tagger's.
METRIC_WORDS = {"accuracy": ("accuracy", "macro-F1"), "entity_f1": ("entity F1", "macro entity F1")}


def summary_columns(metric: str = "accuracy") -> tuple[tuple[str, str, int], ...]:
    """(column title, metrics.json key, decimals) of the base-vs-chosen table."""
    score, macro = METRIC_WORDS[metric]
    return ((score, metric, 4), (macro, "macro_f1", 4), ("latency b1 (ms)", "latency_ms_b1", 3),
            ("latency b32 (ms)", "latency_ms_b32", 2), ("size (MB)", "size_mb", 2))


def trial_table_header(metric: str = "accuracy") -> list[str]:
    score, macro = METRIC_WORDS[metric]
    return [f"| trial | status | pipeline | val {score} | val {macro} | latency b1 (ms) | latency b32 (ms) | size (MB) "
            "| Pareto |", "|---|---|---|---|---|---|---|---|---|"]


SUMMARY_COLUMNS = summary_columns()
TRIAL_TABLE_HEADER = trial_table_header()


def describe_pipeline(pipeline: list[dict[str, Any]] | None) -> str:
    """One line naming each compression step and its main parameters, in order applied."""
    if not pipeline:
        return "fp32 (no change)"
    parts = []
    for step in pipeline:
        m = step["method"]
        if m == "distill":
            extras = "".join(f" {short}={step[key]:g}" for key, short in
                             (("hidden_weight", "hid"), ("attention_weight", "att")) if step.get(key))
            if step.get("transfer_texts"):
                extras += f" +{step['transfer_texts']} transfer texts"
            parts.append(f"distil {len(step['layers'])}L x{step['epochs']}ep T={step['temperature']:.1f} "
                         f"a={step['alpha']:.2f}{extras}")
        elif m == "prune":
            parts.append(f"prune heads {step['heads']:.0%} ffn {step['ffn']:.0%}"
                         + (f" +{step['recovery_steps']} KD steps" if step["recovery_steps"] else ""))
        elif m == "trim_vocab":
            parts.append(f"trim vocab {step['original_tokens']}->{step['kept_tokens']}")
        elif m == "quantize":
            parts.append(step["backend"])
    return " -> ".join(parts)


def _measured_cells(r: dict[str, Any]) -> str:
    return (f"{r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} | {r['latency_ms_b1']:.2f} | "
            f"{r['latency_ms_b32']:.1f} | {r['size_mb']:.1f}")


def _trial_row(r: dict[str, Any], chosen_id: str | None, metric: str) -> str:
    if r["status"] == "finished":
        mark = "**chosen**" if r["trial_id"] == chosen_id else ("yes" if r.get("pareto") else "")
        return f"| {r['trial_id']} | finished | {describe_pipeline(r['pipeline'])} | {_measured_cells(r)} | {mark} |"
    detail = r.get("error") or (f"val {METRIC_WORDS[metric][0]} {r['val_accuracy']:.4f} after epoch {r['epoch']}"
                                if r.get("val_accuracy") is not None else "")
    return f"| {r['trial_id']} | {r['status']} | {detail} | | | | | | |"


def trial_table(trials: list[dict[str, Any]], base: dict[str, Any], chosen_id: str | None) -> list[str]:
    """Markdown lines of the table of every trial: the base model first, then finished trials by validation
    score (accuracy, or a tagger's entity F1: the base's ``metric``), then those stopped early or failed (with
    the reason).

    Args:
        trials: Rows as ``tuning.compress`` collects them (``trials.json``'s ``trials``).
        base: The base model's measurements (``val_accuracy``, ``latency_ms_b1``, ...).
        chosen_id: Trial id marked **chosen**; None when nothing was chosen.
    """
    metric = base.get("metric", "accuracy")
    lines = trial_table_header(metric) + [f"| base | — | fine-tuned fp32 | {_measured_cells(base)} | |"]
    ordered = sorted(trials, key=lambda r: (r["status"] != "finished", -(r.get("val_accuracy") or 0)))
    return lines + [_trial_row(r, chosen_id, metric) for r in ordered]


def summary_rows(m: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Rows of the base-vs-chosen table, straight from ``chosen/metrics.json``."""
    base, metric = m["base"], m.get("metric", "accuracy")
    columns = summary_columns(metric)
    return [
        ("base (fine-tuned)", [f"{base[k]:.{d}f}" for _, k, d in columns]),
        ("chosen", [f"{m[k]:.{d}f}" for _, k, d in columns]),
        ("ratio", [f"{-m[f'{metric}_drop_pts']:+.2f} pts", f"{100 * (m['macro_f1'] - base['macro_f1']):+.2f} pts",
                   f"{m['speedup_b1']:.2f}x faster", f"{m['speedup_b32']:.2f}x faster",
                   f"{m['size_reduction']:.2f}x smaller"]),
    ]


def summary_markdown(m: dict[str, Any]) -> str:
    """The base-vs-chosen table of ``chosen/metrics.json`` as markdown."""
    columns = summary_columns(m.get("metric", "accuracy"))
    lines = ["| | " + " | ".join(t for t, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in summary_rows(m)]
    return "\n".join(lines)


def plot_pareto(path: Path, rows: list[dict[str, Any]], base: dict[str, Any], chosen: dict[str, Any] | None) -> None:
    """Validation score (accuracy, or entity F1) against batch-1 latency (log scale), marker area growing with
    size."""
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
    ax.set_ylabel(f"validation {METRIC_WORDS[base.get('metric', 'accuracy')][0]} (%)")
    ax.set_title("Compression candidates (marker area ~ size in MB)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, markerscale=0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _chosen_section(chosen: dict[str, Any] | None, metrics: dict[str, Any] | None) -> list[str]:
    if metrics is None or chosen is None:
        return ["## No candidate met the constraint", ""]
    return [f"## Chosen: `{chosen['trial_id']}` — {describe_pipeline(chosen.get('pipeline'))}", "",
            f"On the {metrics['split']} split (`chosen/metrics.json`):", "", summary_markdown(metrics), ""]


def _transfer_section(path: Path) -> list[str]:
    if not path.is_file():
        return []
    t = json.loads(path.read_text(encoding="utf-8"))
    dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(t["dropped"].items())) or "none"
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(t["sources"].items())) or "empty"
    return [f"Transfer set (teacher-labelled texts for distillation): {t['texts']} texts ({kinds}); dropped: "
            f"{dropped}.", ""]


def write_report(out: Path, trials: list[dict[str, Any]], base: dict[str, Any], chosen: dict[str, Any] | None,
                 metrics: dict[str, Any] | None, cfg: Any) -> None:
    """Writes ``out/report.md``, ``out/trials.json`` and ``out/pareto.png``.

    Args:
        out: Local folder to write into.
        trials: Every trial's row (finished ones measured after the search).
        base: The base model's measurements.
        chosen: The chosen row, or None when no candidate met the constraint.
        metrics: ``chosen/metrics.json``'s content, or None with ``chosen``.
        cfg: The ``CompressConfig`` of the search.
    """
    finished = [r for r in trials if r["status"] == "finished"]
    score, macro = METRIC_WORDS[base.get("metric", "accuracy")]
    lines = [
        "# Compression search",
        "",
        f"Model `{cfg.model}`, data `{cfg.data}`; {len(trials)} trials ({len(finished)} finished). "
        f"Constraint: validation {score} within {cfg.max_accuracy_drop} points of the base model, {macro} within "
        f"{2 * cfg.max_accuracy_drop} points. Latency: median of repeated passes, {cfg.threads} thread(s), "
        "tokenization excluded, padding to the longest text in each batch, measured after the search in "
        "interleaved rounds (every model in each round; the median over rounds).",
        "",
        *_transfer_section(out / "inputs" / "transfer.json"),
        *_chosen_section(chosen, metrics),
        "![Pareto plot](pareto.png)",
        "",
        "## Every trial",
        "",
        *trial_table(trials, base, chosen["trial_id"] if chosen is not None else None),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The same rows for programs (``slimray run``'s report): every trial, base and chosen, measured.
    (out / "trials.json").write_text(json.dumps({"base": base, "chosen": chosen, "trials": trials}, indent=2,
                                                default=str) + "\n", encoding="utf-8")
    plot_pareto(out / "pareto.png", finished, base, chosen)
