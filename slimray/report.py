"""The report of ``slimray run``: ``report.md`` with linked PNG figures, and the summary table it prints.

Everything is read back from the artifacts the stages wrote (data manifest, fine-tune metrics and history,
the search's trials.json, chosen/metrics.json, smoke.json), so the report shows what is on disk.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.artifacts import read_json
from tuning.report import (METRIC_WORDS, SUMMARY_COLUMNS, describe_pipeline, summary_columns, summary_markdown,
                           summary_rows, trial_table)

__all__ = ["SUMMARY_COLUMNS", "goals_section", "print_summary", "summary_text", "write_report"]

# The one-step alternatives: ONNX Runtime int8 alone, of the fused or the plain export (the faster one counts).
ALTERNATIVES = [[{"method": "quantize", "backend": b}] for b in ("onnx-int8", "onnx-int8-unfused")]
# The project's goals (issues "Compression" and "Serving"), set against the measured figures in the report.
GOAL_SPEEDUP_VS_ALTERNATIVE = 2.0  # chosen vs ONNX Runtime int8 alone, at batch 1 ...
GOAL_SMALLER_VS_ALTERNATIVE = 3.0  # ... and in size, within the accuracy constraint
GOAL_SERVE_OVERHEAD_MS = 3.0  # p50 of a served single message minus the model's own batch-1 latency
GOAL_SERVE_BATCH_SHARE = 0.8  # served texts/s with 32-text requests over the raw batch-32 forward pass
STAGE_NAMES = ("prepare", "finetune", "compress", "smoke")


def summary_text(m: dict[str, Any]) -> str:
    """The table as aligned text; columns are separated by at least two spaces."""
    header = ["", *(title for title, _, _ in summary_columns(m.get("metric", "accuracy")))]
    rows = [header] + [[name, *cells] for name, cells in summary_rows(m)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def print_summary(m: dict[str, Any]) -> None:
    """Prints the base-vs-chosen table of ``chosen/metrics.json`` to stdout."""
    print(f"\nBase vs chosen ({m['split']} split, latency at {m['latency_threads']} thread(s); chosen/metrics.json):")
    print(summary_text(m), flush=True)


@dataclass
class RunArtifacts:
    """What the stages of one run wrote, read back once for every section of the report."""

    run: dict[str, Any]  # run.json: source, profile, command
    data: dict[str, Any]  # data/manifest.json
    ft_metrics: dict[str, Any]  # ft/metrics.json
    ft_manifest: dict[str, Any]  # ft/manifest.json
    history: list[dict[str, Any]]  # ft/history.jsonl, one record per logged step
    trials: dict[str, Any]  # compress/trials.json: base, chosen, trials
    chosen: dict[str, Any]  # compress/chosen/metrics.json
    chosen_manifest: dict[str, Any]  # compress/chosen/manifest.json
    compress_config: dict[str, Any]  # compress/compress_config.json
    smoke: dict[str, Any]  # smoke.json

    @classmethod
    def read(cls, out: Path) -> RunArtifacts:
        ft, comp = out / "ft", out / "compress"
        history = [json.loads(line) for line in (ft / "history.jsonl").read_text().splitlines() if line.strip()]
        return cls(run=read_json(out / "run.json"), data=read_json(out / "data" / "manifest.json"),
                   ft_metrics=read_json(ft / "metrics.json"), ft_manifest=read_json(ft / "manifest.json"),
                   history=history, trials=read_json(comp / "trials.json"),
                   chosen=read_json(comp / "chosen" / "metrics.json"),
                   chosen_manifest=read_json(comp / "chosen" / "manifest.json"),
                   compress_config=read_json(comp / "compress_config.json"), smoke=read_json(out / "smoke.json"))

    @property
    def metric(self) -> str:
        """The task's score: "accuracy", or an entity tagger's "entity_f1"."""
        return self.chosen.get("metric", "accuracy")

    @property
    def alternative(self) -> dict[str, Any] | None:
        """The fastest finished trial that is ONNX int8 alone (fused or plain export), if the search built one."""
        alone = [r for r in self.trials["trials"] if r.get("status") == "finished" and r.get("pipeline") in ALTERNATIVES]
        return min(alone, key=lambda r: r["latency_ms_b1"], default=None)


def write_report(out: Path, stages: dict[str, dict[str, Any]]) -> Path:
    """Writes ``out/report.md``, ``out/figures/*.png`` and ``out/configs/*.yaml`` (the resolved stage configs).

    Args:
        out: The run's folder (``data/``, ``ft/``, ``compress/``, ``smoke.json``, ``run.json``).
        stages: Stage name -> its bookkeeping record (``wall_s``, ``finished_at``).

    Returns:
        The path of ``report.md``.
    """
    art = RunArtifacts.read(out)
    write_figures(out / "figures", art)
    configs = write_configs(out / "configs", art)
    tagging = art.metric == "entity_f1"
    lines = [*title_section(art, stages), *data_section(art.data),
             *finetune_section(art), *compression_section(art),
             *(entities_smoke_section if tagging else smoke_section)(art.smoke),
             *goals_section(art.chosen, art.alternative, art.smoke), *reproduce_section(out, art, configs)]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_figures(figures: Path, art: RunArtifacts) -> None:
    """training.png, pareto.png (the search's) and comparison.png (base, alternative, chosen)."""
    figures.mkdir(exist_ok=True)
    plot_training(art.history, figures / "training.png")
    shutil.copy2(figures.parent / "compress" / "pareto.png", figures / "pareto.png")
    cm, alternative, metric = art.chosen, art.alternative, art.metric
    # Validation score: the alternative was scored on validation only, like every candidate.
    compared = {"base (fine-tuned)": {"score": cm["base"]["validation"][metric],
                                      "latency_ms_b1": cm["base"]["latency_ms_b1"], "size_mb": cm["base"]["size_mb"]}}
    if alternative is not None:
        compared["ONNX int8 alone"] = {"score": alternative["val_accuracy"],
                                       "latency_ms_b1": alternative["latency_ms_b1"], "size_mb": alternative["size_mb"]}
    compared["chosen"] = {"score": cm["validation"][metric], "latency_ms_b1": cm["latency_ms_b1"],
                          "size_mb": cm["size_mb"]}
    plot_comparison(compared, figures / "comparison.png", METRIC_WORDS[metric][0])


def write_configs(configs: Path, art: RunArtifacts) -> Path:
    """Each stage's resolved config as YAML, opening with the command that runs it; returns the folder."""
    configs.mkdir(exist_ok=True)
    resolved = {"prepare": art.data["config"], "finetune": art.ft_manifest["config"], "compress": art.compress_config}
    for name, cfg in resolved.items():
        (configs / f"{name}.yaml").write_text(
            f"# slimray {name} --config {configs / (name + '.yaml')}\n" + yaml.safe_dump(cfg, sort_keys=False),
            encoding="utf-8")
    return configs


def title_section(art: RunArtifacts, stages: dict[str, dict[str, Any]]) -> list[str]:
    """Title, lineage and the wall time of each stage."""
    run = art.run
    lines = [
        f"# slimray run: {Path(str(run['source']).rstrip('/')).name}, profile `{Path(run['profile']).stem.removeprefix('run_')}`",
        "",
        f"Source `{run['source']}`, task `{art.data['task']}`, code `{art.ft_manifest.get('code_version', 'unknown')}`.",
        "",
        "| stage | wall time | finished |",
        "|---|---|---|",
    ]
    for name in STAGE_NAMES:
        rec = stages.get(name, {})
        wall = f"{rec['wall_s']:.0f} s" if "wall_s" in rec else "—"
        lines.append(f"| {name} | {wall} | {rec.get('finished_at', 'not finished')} |")
    total = sum(stages.get(n, {}).get("wall_s", 0) for n in STAGE_NAMES)
    return lines + [f"| total | {total:.0f} s | |"]


def dropped_line(dm: dict[str, Any]) -> str:
    """What prepare dropped, per split, in one sentence."""
    dropped = {s: {k: v for k, v in d.items() if v} for s, d in dm["dropped"].items()}
    return "Dropped: " + ("; ".join(f"{s}: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in d.items())
                                    for s, d in dropped.items() if d) or "nothing") + "."


def data_section(dm: dict[str, Any]) -> list[str]:
    """Split sizes, sequence length, what prepare dropped, and the label counts per split (an entity tagger's:
    entities per type)."""
    splits = dm["splits"]
    if all("entity_counts" in i for i in splits.values()):  # tagging data
        names = sorted({k for i in splits.values() for k in i["entity_counts"]})
        key, title = "entity_counts", "entity type"
        summary = (f"{len(names)} entity types ({len(dm['labels'])} IOB2 tags); "
                   + ", ".join(f"{s} {i['rows']:,} sentences" for s, i in splits.items())
                   + f". Max sequence length {dm['max_length']} tokens (p{dm['percentile']:g} of train lengths; "
                   f"{dm.get('train_sentences_over_max_length', 0)} train sentences longer, tagged in windows of "
                   "whole words).")
    else:
        names, key, title = dm["labels"], "label_counts", "label"
        summary = (f"{len(dm['labels'])} labels; " + ", ".join(f"{s} {i['rows']:,} rows" for s, i in splits.items())
                   + f". Max sequence length {dm['max_length']} tokens (p{dm['percentile']:g} of train lengths; p50 "
                   f"{dm['token_lengths']['p50']:g}, max {dm['token_lengths']['max']}; {dm['truncated_train_rows']} "
                   "train rows truncated).")
    lines = ["", "## Data", "", summary, "", dropped_line(dm), "",
             f"| {title} | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(str(i[key].get(name, 0)) for i in splits.values()) + " |"
                    for name in names]


def per_type_table(fm: dict[str, Any]) -> list[str]:
    """seqeval's report of a tagger's metrics.json: per type, then micro and macro averages, strict F1 beside."""
    strict = fm.get("strict", {})
    lines = ["| type | precision | recall | F1 | strict F1 | support |", "|---|---|---|---|---|---|"]
    rows = [(k, v, strict.get("per_type", {}).get(k, {})) for k, v in sorted(fm["per_type"].items())]
    rows += [(f"*{k} avg*", v, strict.get("averages", {}).get(k, {})) for k, v in fm.get("averages", {}).items()]
    for name, v, st in rows:
        lines.append(f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | "
                     f"{st.get('f1', float('nan')):.4f} | {v['support']} |")
    return lines


def finetune_section(art: RunArtifacts) -> list[str]:
    """How the model was fine-tuned and how well it scored, with the training curves."""
    fm, dist = art.ft_metrics, art.ft_metrics["distributed"]
    if "entity_f1" in fm:
        scored = (f"{fm['split'].capitalize()} entity F1 **{fm['entity_f1']:.4f}** (seqeval default mode; strict "
                  f"{fm['strict']['entity_f1']:.4f}), precision {fm['entity_precision']:.4f}, recall "
                  f"{fm['entity_recall']:.4f}, macro-F1 {fm['macro_f1']:.4f} (validation entity F1 "
                  f"{fm['validation']['entity_f1']:.4f}).")
        table = ["", *per_type_table(fm)]
    else:
        scored = (f"{fm['split'].capitalize()} accuracy **{fm['accuracy']:.4f}**, macro-F1 {fm['macro_f1']:.4f} "
                  f"(validation {fm['validation']['accuracy']:.4f}).")
        table = []
    return [
        "",
        "## Fine-tuning",
        "",
        f"`{art.ft_manifest['base_model']}` with Ray Train, {dist['workers']} workers, DeepSpeed "
        f"ZeRO-{dist['zero_stage']}: {fm['steps']} optimizer steps, {fm['train_samples_per_s']:.1f} samples/s, "
        f"{fm['wall_s']:.0f} s"
        + (f", resumed from step {fm['resumed_from_step']}" if fm.get("resumed_from_step") else "")
        + (f", {fm['restarts']} worker-group restart(s)" if fm.get("restarts") else "") + ". " + scored,
        *table,
        "",
        "![Training curves](figures/training.png)",
        "",
    ]


def compression_section(art: RunArtifacts) -> list[str]:
    """The search (every trial, as in the search's own report) and the base-vs-chosen table."""
    cm, chosen_id = art.chosen, art.chosen_manifest.get("trial_id")
    return [
        "## Compression",
        "",
        f"{cm['trials']['total']} candidates searched with Ray Tune ({cm['trials']['finished']} finished); "
        f"choice: the fastest at batch 1 with validation {METRIC_WORDS[art.metric][0]} within "
        f"{art.compress_config['max_accuracy_drop']} points of the base model. Chosen: "
        f"**{describe_pipeline(art.chosen_manifest.get('method'))}** (trial `{chosen_id}`). "
        f"The search's own report: [compress/report.md](compress/report.md).",
        "",
        "![Pareto plot](figures/pareto.png)",
        "",
        *trial_table(art.trials["trials"], art.trials["base"], chosen_id),
        "",
        f"## Base vs chosen ({cm['split']} split, from `compress/chosen/metrics.json`)",
        "",
        summary_markdown(cm),
        "",
        f"Latency: median of repeated passes, {cm['latency_threads']} thread(s), tokenization excluded.",
        "",
        "![Base, alternative and chosen](figures/comparison.png)",
        "",
    ]


def smoke_section(smoke: dict[str, Any]) -> list[str]:
    """The serving smoke test's latency, throughput and accuracy next to the same model in-process."""
    return [
        "## Serving smoke test",
        "",
        "The chosen model behind the Serve graph (HTTP → Ingress → Model replica), requests one at a time from a "
        "client on the same machine; then the same texts through the same model in-process:",
        "",
        "| requests | p50 (ms) | p95 (ms) | served | in-process | served accuracy |",
        "|---|---|---|---|---|---|",
        f"| {smoke['assist_requests']} x `/v1/assist` (1 message) | {smoke['assist_p50_ms']:.1f} | "
        f"{smoke['assist_p95_ms']:.1f} | | p50 {smoke['raw_single_p50_ms']:.1f} ms | {smoke['assist_accuracy']:.3f} "
        f"(hand-off rate {smoke['handoff_rate']:.2f}) |",
        f"| {smoke['classify_requests']} x `/v1/classify` ({smoke['classify_batch_size']} texts) | "
        f"{smoke['classify_p50_ms']:.1f} | | {smoke['classify_texts_per_s']:.0f} texts/s | "
        f"{smoke['raw_texts_per_s']:.0f} texts/s | {smoke['classify_accuracy']:.3f} |",
        "",
        *knowledge_section(smoke.get("knowledge")),
    ]


def knowledge_section(knowledge: dict[str, Any] | None) -> list[str]:
    """The knowledge path of the smoke test: each question, where its answer came from, and the answer."""
    if not knowledge:
        return []

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    first = knowledge.get("generated_first_token_p50_ms")
    lines = [
        "### Answers from the knowledge base",
        "",
        f"The documents indexed in `{knowledge['index']}`, and `{knowledge['generator']}` answering what the "
        f"playbook does not cover (streamed, `/v1/assist?stream=true`): {knowledge['generated_answers']} of "
        f"{knowledge['questions']} answers generated, {knowledge['playbook_answers']} from the playbook, "
        f"{knowledge['handoff_answers']} handed off"
        + (f"; first token after {first:.0f} ms (p50 of the generated)." if first is not None else "."),
        "",
        "| question | intent | source | reply | citations |",
        "|---|---|---|---|---|",
    ]
    for a in knowledge["answers"]:
        lines.append(f"| {cell(a['question'])} | {a['intent']} | {a['source']} | {cell(a['reply'])} | "
                     f"{', '.join(a['citations'])} |")
    return lines + [""]


def entities_smoke_section(smoke: dict[str, Any]) -> list[str]:
    """An entity tagger's smoke test: /v1/entities latency and throughput next to the same model in-process,
    and how often the served entities equal the in-process ones."""
    return [
        "## Serving smoke test",
        "",
        "The chosen tagger behind the Serve graph (HTTP → Ingress → EntityModel replica), requests one at a time "
        "from a client on the same machine; then the same texts through the same model in-process (words split, "
        "tagged, spans built):",
        "",
        "| requests | p50 (ms) | p95 (ms) | served | in-process |",
        "|---|---|---|---|---|",
        f"| {smoke['entities_requests']} x `/v1/entities` (1 text) | {smoke['entities_p50_ms']:.1f} | "
        f"{smoke['entities_p95_ms']:.1f} | | p50 {smoke['raw_single_p50_ms']:.1f} ms |",
        f"| {smoke['entities_batch_requests']} x `/v1/entities` ({smoke['entities_batch_size']} texts) | "
        f"{smoke['entities_batch_p50_ms']:.1f} | | {smoke['entities_texts_per_s']:.0f} texts/s | "
        f"{smoke['raw_texts_per_s']:.0f} texts/s |",
        "",
        f"{smoke['entities_found']} entities served over {smoke['texts_checked']} texts; the served entities "
        f"(offsets, type, text) equal the in-process ones on {smoke['served_agreement']:.3f} of texts.",
        "",
    ]


def plot_training(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation score (accuracy, or a tagger's entity F1) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [r for r in history if "loss" in r]
    score = "val_entity_f1" if any("val_entity_f1" in r for r in history) else "val_accuracy"
    evals = [r for r in history if score in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    left.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="tab:blue")
    left.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    right.plot([r["step"] for r in evals], [100 * r[score] for r in evals], marker="o", color="tab:green",
               label=score.removeprefix("val_").replace("_", " "))
    right.plot([r["step"] for r in evals], [100 * r["val_macro_f1"] for r in evals], marker="s", color="tab:olive",
               label="macro-F1")
    right.set(xlabel="optimizer step", ylabel="%", title="Validation")
    right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_comparison(rows: dict[str, dict[str, float]], path: Path, score: str = "accuracy") -> None:
    """Batch-1 latency and size of the base model, the alternative and the chosen one, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:orange", "tab:gray", "tab:red"][: len(names)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=110)
    for ax, key, title in zip(axes, ("score", "latency_ms_b1", "size_mb"),
                              (f"validation {score} (%)", "latency at batch 1 (ms)", "size (MB)")):
        values = [100 * rows[n][key] if key == "score" else rows[n][key] for n in names]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.2f" if key != "size_mb" else "%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if key == "score":
            ax.set_ylim(max(0.0, min(values) - 10), 100)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _goal(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def goals_section(cm: dict[str, Any], alternative: dict[str, Any] | None, smoke: dict[str, Any]) -> list[str]:
    """The measured figures set against the project's goals, saying plainly which are missed."""
    lines = ["## Against the goals", "", "| goal | measured | |", "|---|---|---|"]
    if alternative is not None:
        speed = alternative["latency_ms_b1"] / cm["latency_ms_b1"]
        smaller = alternative["size_mb"] / cm["size_mb"]
        lines += [
            f"| compression: ≥ {GOAL_SPEEDUP_VS_ALTERNATIVE:g}x faster at batch 1 than ONNX int8 alone | "
            f"{speed:.2f}x | {_goal(speed >= GOAL_SPEEDUP_VS_ALTERNATIVE)} |",
            f"| compression: ≥ {GOAL_SMALLER_VS_ALTERNATIVE:g}x smaller than ONNX int8 alone | {smaller:.2f}x | "
            f"{_goal(smaller >= GOAL_SMALLER_VS_ALTERNATIVE)} |",
        ]
    else:
        lines.append("| compression vs ONNX int8 alone | the search did not build that candidate | **not measured** |")
    tagger = "entities_p50_ms" in smoke  # an entity tagger's smoke test: /v1/entities for both figures
    single = smoke["entities_p50_ms" if tagger else "assist_p50_ms"]
    batched = smoke["entities_texts_per_s" if tagger else "classify_texts_per_s"]
    overhead = single - smoke["raw_single_p50_ms"]
    share = batched / smoke["raw_texts_per_s"]
    lines += [
        f"| serving: p50 of one message ≤ the model's own latency on it + {GOAL_SERVE_OVERHEAD_MS:g} ms | "
        f"{single:.1f} vs {smoke['raw_single_p50_ms']:.1f} ms: +{overhead:.1f} ms | "
        f"{_goal(overhead <= GOAL_SERVE_OVERHEAD_MS)} |",
        f"| serving: texts/s with 32-text requests ≥ {GOAL_SERVE_BATCH_SHARE:g} of the model's own | "
        f"{batched:.0f} vs {smoke['raw_texts_per_s']:.0f} texts/s: {share:.2f} | "
        f"{_goal(share >= GOAL_SERVE_BATCH_SHARE)} |",
        "",
        "Serving figures: the smoke test's requests, one at a time from a client on the same machine, against "
        "the same texts through the same model in-process right after (tokenization included, 1 thread, as in "
        "a replica). Throughput under concurrent load against a plain server is `bench/serve.py`'s job.",
        "",
    ]
    return lines


def reproduce_section(out: Path, art: RunArtifacts, configs: Path) -> list[str]:
    """The commands that redo the run, each stage, and serve the chosen model."""
    return [
        "## Reproduce",
        "",
        "```bash",
        art.run["command"] + "      # the whole run (skips what is complete)",
        f"slimray prepare  --config {configs / 'prepare.yaml'}",
        f"slimray finetune --config {configs / 'finetune.yaml'}",
        f"slimray compress --config {configs / 'compress.yaml'}",
        "```",
        "",
        "Serve the chosen model:",
        "",
        "```bash",
        *([f"slimray serve --entity-model {out}/compress/chosen      # http://127.0.0.1:8000, docs at /docs",
           "curl -s -X POST http://127.0.0.1:8000/v1/entities -H 'content-type: application/json' "
           "-d '{\"texts\": [\"is the Leeds branch open on Sunday\"]}'"] if art.metric == "entity_f1" else
          [f"slimray serve --model {out}/compress/chosen --data {out / 'data'}      # http://127.0.0.1:8000, docs at /docs",
           "curl -s -X POST http://127.0.0.1:8000/v1/assist -H 'content-type: application/json' "
           "-d '{\"message\": \"my card has not arrived\"}'"]),
        "```",
        "",
    ]
