"""The sentiment monitor on real news sentences: a two-day stream with one injected surge, ingested and drawn by
the real commands (``slimray monitor ingest`` through Ray Data, then ``slimray monitor report``).

The stream is built from a prepared sentiment dataset's test split (texts the model never trained on, with
their human labels): per topic and hour, 40 sentences drawn at the split's own negative share, except in
the surge hours of one topic, where 90% are drawn from the human-negative sentences. The monitor sees only
the texts and their times; its labels come from the model. It should alert on the surge hours and nowhere
else.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/monitor_demo.py \\
        --model runs/vader/ft --data runs/vader/data --out runs/vader/monitor'

Writes OUT/stream.jsonl, OUT/monitor.db and OUT/report/ (one PNG per topic, report.md). Last line:
``surge_hours_alerted: <alerted surge hours>/<surge hours>, other_alerts: <n>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

START = datetime(2026, 11, 30, tzinfo=timezone.utc)


def build_stream(data: Path, hours: int, per_hour: int, surge: range, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(data / "test.parquet")
    labels = json.loads((data / "labels.json").read_text())
    rows = list(zip(table.column("text").to_pylist(), (labels[i] for i in table.column("label_id").to_pylist())))
    negative = [t for t, label in rows if label == "negative"]
    rng = random.Random(seed)
    items = []
    for topic in ("markets", "city"):
        for hour in range(hours):
            in_surge = topic == "markets" and hour in surge
            for j in range(per_hour):
                text = rng.choice(negative) if in_surge and rng.random() < 0.9 else rng.choice(rows)[0]
                when = START + timedelta(hours=hour, seconds=rng.randrange(3600))
                items.append({"id": f"{topic}-{hour:03d}-{j:03d}", "topic": topic, "text": text,
                              "time": when.isoformat().replace("+00:00", "Z")})
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="sentiment model artifact (a --task sentiment fine-tune)")
    p.add_argument("--data", required=True, help="its prepared data folder (the test split feeds the stream)")
    p.add_argument("--out", required=True)
    p.add_argument("--hours", type=int, default=48)
    p.add_argument("--per-hour", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from jobs.monitor import AlertRule, MonitorStore
    from jobs.monitoring import IngestConfig, ReportConfig, ingest, report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    surge = range(30, 33)
    items = build_stream(Path(args.data), args.hours, args.per_hour, surge, args.seed)
    stream = out / "stream.jsonl"
    stream.write_text("".join(json.dumps(it) + "\n" for it in items))
    rule = AlertRule(window_s=3600, baseline_windows=24, min_count=20, threshold=3.0)
    db = out / "monitor.db"
    db.unlink(missing_ok=True)
    url = f"sqlite:///{db.resolve()}"
    counts = ingest(IngestConfig(input=stream, model=Path(args.model), store=url, alerting=rule))
    print(f"ingested {len(items)} texts: {counts}")
    report(ReportConfig(store=url, out=out / "report", alerting=rule))
    alerts = MonitorStore.open(url).alerts(rule)
    hours = {(a["topic"], int((a["window_start"] - START).total_seconds() // 3600)) for a in alerts}
    for a in alerts:
        print(f"  alert {a['topic']} {a['window_start']:%m-%d %H:%M}: {a['negative']}/{a['n']} negative, "
              f"baseline {a['baseline']:.3f}, z {a['score']:.1f}")
    hit = sum(("markets", h) in hours for h in surge)
    other = len(hours - {("markets", h) for h in surge})
    print(f"report: {out / 'report' / 'report.md'}; load average after: {os.getloadavg()}")
    print(f"surge_hours_alerted: {hit}/{len(surge)}, other_alerts: {other}")


if __name__ == "__main__":
    main()
