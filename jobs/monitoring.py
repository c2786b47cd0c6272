"""``slimray monitor``: the news-sentiment monitor's batch side, on the same store the served monitor uses.

    slimray monitor ingest --input news.jsonl --model runs/news/ft --store sqlite:///runs/news/monitor.db
    slimray monitor report --store sqlite:///runs/news/monitor.db --out runs/news/monitor_report

``ingest`` scores a file's texts with the sentiment model through Ray Data (actors, as ``slimray predict``)
and stores them batch by batch, each in one transaction, with the alerts they raise: ids already stored are
counted as duplicates (same content) or conflicts (other content), so running it twice stores nothing twice.
The file needs ``id``, ``topic`` and ``text`` columns and may have ``time`` (RFC 3339; default: now; a column
the file reader types as timestamps without a timezone is read as UTC).
``report`` draws each topic's sentiment trend with its alerts marked (one PNG per topic) and writes
``report.md`` with the alerts and their example texts.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from jobs.config import StrictModel, run_cli
from jobs.errors import InputError
from jobs.monitor import BUCKETS, AlertRule, MonitorStore, Observation, parse_time

log = logging.getLogger("slimray.monitor")


class IngestConfig(StrictModel):
    """Score a file of texts about topics with a sentiment model and keep them in the monitor's store."""

    input: Path = Field(description="CSV/TSV/JSONL/parquet file with id, topic and text columns (time optional)")
    model: Path = Field(description="Sentiment model artifact folder")
    store: str = Field(description="Monitor store URL: sqlite:///FILE or postgresql+psycopg://...")
    version: str | None = Field(default=None, description="Model version recorded with each text (default: "
                                "the model folder's name)")
    alerting: AlertRule = Field(default_factory=AlertRule, description="Alert rule to compute alerts with")
    batch_size: int = Field(default=256, ge=1, description="Texts per forward pass and per store transaction")
    replicas: int = Field(default=1, ge=1, description="Model replicas (Ray Data actors)")
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs per replica (torch threads = floor)")


class ReportConfig(StrictModel):
    """Draw each topic's sentiment trend with its alerts marked, and list the alerts."""

    store: str = Field(description="Monitor store URL: sqlite:///FILE or postgresql+psycopg://...")
    out: Path = Field(description="Output folder (one PNG per topic, report.md)")
    bucket: str = Field(default="1h", description=f"Trend bucket: one of {sorted(BUCKETS)}")
    alerting: AlertRule = Field(default_factory=AlertRule, description="Alert rule whose alerts are shown")


REQUIRED = ("id", "topic", "text")


def ingest(cfg: IngestConfig) -> dict[str, int]:
    """Scores and stores the file; returns the count of each status."""
    import ray.data

    from cluster.ray_env import connect
    from jobs.inference import load_inference_model
    from jobs.predict import Predictor
    from jobs.sources import read_table

    model = load_inference_model(cfg.model, script=False)  # a bad model fails here, before Ray starts
    if model.kind != "sequence":
        raise InputError(f"{cfg.model} is an entity tagger; the monitor needs a sentiment classifier")
    store = MonitorStore.open(cfg.store)
    table = read_table(Path(cfg.input))
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InputError(f"{cfg.input}: missing column(s) {missing}; it has {table.column_names}")
    times = table.column("time").to_pylist() if "time" in table.column_names else [None] * table.num_rows
    # A column the reader typed as timestamps has no timezone left (Arrow keeps UTC instants): it is UTC.
    parsed = [None if t in (None, "") else (t if isinstance(t, datetime) and t.tzinfo else
                                            t.replace(tzinfo=timezone.utc) if isinstance(t, datetime) else
                                            parse_time(str(t))) for t in times]
    table = table.select(list(REQUIRED)).append_column("row", pa.array(range(table.num_rows), type=pa.int64()))
    version = cfg.version or Path(cfg.model).resolve().name

    connect()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_arrow(table).map_batches(
        Predictor, fn_constructor_kwargs={"model_dir": str(Path(cfg.model).resolve()), "text_column": "text",
                                          "threads": max(1, int(cfg.cpus_per_replica))},
        batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
        num_cpus=cfg.cpus_per_replica)
    counts: Counter[str] = Counter()
    arrival = datetime.now(timezone.utc)
    done = 0
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
        items = [Observation(id=str(i), topic=str(topic), text=str(text),
                             time=parsed[int(row)] or arrival, label=str(label), score=float(score),
                             model_version=version, time_given=parsed[int(row)] is not None)
                 for i, topic, text, row, label, score in zip(batch["id"], batch["topic"], batch["text"],
                                                              batch["row"], batch["label"], batch["score"])]
        counts.update(store.add(items, cfg.alerting))
        done += len(items)
        log.info("ingested %d / %d texts (%s)", done, table.num_rows, dict(counts))
    alerts = store.alerts(cfg.alerting)
    log.info("store %s: %d texts; %d alerts under this rule", cfg.store.split("@")[-1], store.count(), len(alerts))
    return dict(counts)


def slug(topic: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", topic).strip("_") or "topic"


def report(cfg: ReportConfig) -> Path:
    """One PNG per topic (counts per label per bucket, the negative share, alerts shaded) and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg.bucket not in BUCKETS:
        raise InputError(f"bucket {cfg.bucket!r} is not one of {sorted(BUCKETS)}")
    store = MonitorStore.open(cfg.store)
    topics = store.topics()
    if not topics:
        raise InputError(f"store {cfg.store.split('@')[-1]!r} holds no texts yet: run `slimray monitor ingest`")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    width_days = BUCKETS[cfg.bucket] / 86400
    lines = ["# Sentiment monitor", "", f"Store: `{cfg.store.split('@')[-1]}`; bucket {cfg.bucket}; alert rule: "
             f"{cfg.alerting.method} >= {cfg.alerting.threshold} over {cfg.alerting.window_s} s windows against "
             f"the {cfg.alerting.baseline_windows} before (at least {cfg.alerting.min_count} texts each).", ""]
    for topic in topics:
        points = store.trend(topic, cfg.bucket)
        alerts = store.alerts(cfg.alerting, topic=topic)
        fig, (counts_ax, share_ax) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True,
                                                  gridspec_kw={"height_ratios": [2, 1]})
        starts = [p["start"] for p in points]
        bottom = [0] * len(points)
        for label, color in (("negative", "#c0392b"), ("neutral", "#95a5a6"), ("positive", "#27ae60")):
            values = [p[label] for p in points]
            counts_ax.bar(starts, values, width=width_days, bottom=bottom, color=color, label=label, align="edge")
            bottom = [b + v for b, v in zip(bottom, values)]
        middle = timedelta(seconds=BUCKETS[cfg.bucket] / 2)  # each share at its bucket's middle, over its bar
        share_ax.plot([s + middle for s in starts], [p["negative"] / p["n"] for p in points], color="#c0392b",
                      marker=".", label="negative share")
        for ax in (counts_ax, share_ax):
            for a in alerts:
                ax.axvspan(a["window_start"], a["window_end"], color="#f39c12", alpha=0.3,
                           label="alert" if ax is counts_ax and a is alerts[0] else None)
            ax.grid(alpha=0.3)
        counts_ax.set(title=f"{topic}: texts per {cfg.bucket} by sentiment, alerts shaded", ylabel="texts")
        share_ax.set(ylabel="negative share", ylim=(0, 1), xlabel="event time (UTC)")
        counts_ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
        fig.tight_layout()
        png = out / f"{slug(topic)}.png"
        fig.savefig(png, dpi=100)
        plt.close(fig)
        lines += [f"## {topic}", "", f"![{topic}]({png.name})", "",
                  f"{sum(p['n'] for p in points)} texts, {len(alerts)} alert(s).", ""]
        if alerts:
            texts = store.texts([i for a in alerts for i in a["example_ids"]])
            lines += ["| window (UTC) | texts | negative | baseline share | score | examples |", "|---|---|---|---|---|---|"]
            for a in alerts:
                examples = "; ".join(_cell(texts.get(i, i)) for i in a["example_ids"][:3])
                lines.append(f"| {a['window_start']:%Y-%m-%d %H:%M} – {a['window_end']:%H:%M} | {a['n']} | "
                             f"{a['negative']} | {a['baseline']:.3f} | {a['score']:.2f} | {examples} |")
            lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    log.info("monitor report for %d topic(s): %s", len(topics), out / "report.md")
    return out / "report.md"


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def ingest_cli(argv: list[str] | None = None) -> None:
    run_cli(IngestConfig, ingest, argv, prog="slimray monitor ingest")


def report_cli(argv: list[str] | None = None) -> None:
    run_cli(ReportConfig, report, argv, prog="slimray monitor report")
