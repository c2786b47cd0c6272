"""The sentiment monitor's store: scored texts per topic, alerts computed from them, and trends.

    store = MonitorStore.open("sqlite:///runs/news/monitor.db")          # embedded default: a file, WAL mode
    store = MonitorStore.open("postgresql+psycopg://monitor@db/monitor")  # a real server, same schema
    store.add([Observation(...), ...], rule)  # one transaction: stored | duplicate | conflict per id
    store.alerts(topic="acme", since=...); store.trend("acme", bucket="1h")

The schema is created and upgraded by alembic (``jobs/monitor_migrations``) whenever a store is opened, so an
older store is migrated in place. All state lives in the database: any number of serving replicas or batch
jobs may share one (PostgreSQL; SQLite serialises writers).

Alerts use event times only. Windows are tumbling, aligned to multiples of ``AlertRule.window_s`` since the
Unix epoch; a window alerts when its negative share is far above the topic's baseline, the share over the
``baseline_windows`` windows before it. Each ``add`` recomputes the windows its items touch (and those whose
baseline they change) from the stored rows, so the alerts table is a function of the observations: a
restarted monitor, or the same items ingested in another order or in other batches, has the same alerts.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import Field, model_validator

from jobs.config import StrictModel
from jobs.errors import InputError

MIGRATIONS = Path(__file__).resolve().parent / "monitor_migrations"
BUCKETS = {"5m": 300, "1h": 3600, "1d": 86400}
STATUSES = ("stored", "duplicate", "conflict")


class AlertRule(StrictModel):
    """When a topic's negative share in a window counts as a surge (live through the monitor's user_config)."""

    window_s: int = Field(default=3600, ge=60, description="Window length in seconds (windows are aligned to it)")
    baseline_windows: int = Field(default=24, ge=1, description="Windows before it that make the topic's baseline")
    min_count: int = Field(default=20, ge=1, description="Fewest texts in the window, and in its baseline, to judge")
    method: Literal["zscore", "ratio"] = Field(default="zscore", description="zscore: (share - baseline) / its "
                                               "binomial standard error; ratio: share / baseline")
    threshold: float = Field(default=3.0, gt=0, description="Alert when the score reaches this")
    negative_label: str = Field(default="negative", description="The sentiment model's label for negative texts")
    examples: int = Field(default=5, ge=0, le=50, description="Example ids kept with an alert (most confident first)")

    @model_validator(mode="after")
    def _ratio_above_one(self) -> "AlertRule":
        if self.method == "ratio" and self.threshold <= 1:
            raise ValueError(f"a ratio threshold must be > 1 (a surge), got {self.threshold}")
        return self


@dataclass(frozen=True)
class Observation:
    """One scored text. ``time`` is its event time (timezone-aware)."""

    id: str
    topic: str
    text: str
    time: datetime
    label: str
    score: float
    model_version: str
    time_given: bool = True  # False: ``time`` is the arrival time; it then takes no part in the content hash

    def content_sha256(self) -> str:
        """What makes a repeated id a duplicate rather than a conflict: topic, text and a given event time."""
        parts = [self.topic, self.text, _utc(self.time).isoformat() if self.time_given else ""]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise InputError(f"time {t.isoformat()} has no timezone: give an RFC 3339 time such as 2026-12-06T10:00:00Z")
    return t.astimezone(timezone.utc)


def _naive(t: datetime) -> datetime:
    """UTC without tzinfo: how both databases store it."""
    return _utc(t).replace(tzinfo=None)


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _epoch(t: datetime) -> float:
    return _aware(t).timestamp()


def _tables():
    from sqlalchemy import (Column, DateTime, Float, Integer, MetaData, String, Table, Text, UniqueConstraint,
                            Index)

    metadata = MetaData()
    observations = Table(
        "observations", metadata,
        Column("id", String(200), primary_key=True),
        Column("topic", String(200), nullable=False),
        Column("text", Text, nullable=False),
        Column("content_sha256", String(64), nullable=False),
        Column("time", DateTime, nullable=False),  # UTC
        Column("label", String(64), nullable=False),
        Column("score", Float, nullable=False),
        Column("model_version", String(200), nullable=False),
        Column("ingested_at", DateTime, nullable=False),
        Index("ix_observations_topic_time", "topic", "time"),
    )
    alerts = Table(
        "alerts", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("topic", String(200), nullable=False),
        Column("window_start", DateTime, nullable=False),
        Column("window_end", DateTime, nullable=False),
        Column("rule", String(64), nullable=False),  # AlertRule's fingerprint: alerts of other rules stay apart
        Column("n", Integer, nullable=False),
        Column("negative", Integer, nullable=False),
        Column("baseline", Float, nullable=False),
        Column("score", Float, nullable=False),
        Column("example_ids", Text, nullable=False),  # JSON list
        UniqueConstraint("topic", "window_start", "rule", name="uq_alerts_topic_window_rule"),
        Index("ix_alerts_window_start", "window_start"),
    )
    return metadata, observations, alerts


METADATA, OBSERVATIONS, ALERTS = _tables()


def rule_key(rule: AlertRule) -> str:
    """A short fingerprint of what decides an alert (not how many examples it keeps)."""
    fields = rule.model_dump(exclude={"examples"})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def surge_score(negative: int, n: int, base_negative: int, base_n: int, rule: AlertRule) -> tuple[float, float]:
    """(baseline share, score) of a window against its baseline. The baseline share is smoothed (+1 / +2) so
    that a topic with no negative text yet has a finite score."""
    p0 = (base_negative + 1) / (base_n + 2)
    p = negative / n
    if rule.method == "ratio":
        return p0, p / p0
    return p0, (p - p0) / math.sqrt(p0 * (1 - p0) / n)


class MonitorStore:
    """A monitor database, migrated to the current schema; open with ``MonitorStore.open(url)``."""

    def __init__(self, engine: Any, url: str):
        self.engine, self.url = engine, url
        self.writer = engine.execution_options(writer=True)  # transactions that write (SQLite: BEGIN IMMEDIATE)

    @classmethod
    def open(cls, url: str) -> "MonitorStore":
        """Connects to ``url`` (``sqlite:///FILE`` or a SQLAlchemy PostgreSQL URL) and upgrades its schema.

        Raises:
            InputError: the URL cannot be parsed, names an unknown driver, or the database is unreachable.
        """
        from sqlalchemy import create_engine, event
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError as e:
            raise InputError(f"monitor store URL {_safe(url)!r} is not usable: {e}") from None
        if backend not in ("sqlite", "postgresql"):
            raise InputError(f"monitor store URL {_safe(url)!r}: use sqlite:///FILE or postgresql+psycopg://...")
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise InputError(f"monitor store URL {_safe(url)!r} is not usable: {e}") from None
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # SQLAlchemy's begin event below starts transactions
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
                cur.execute("PRAGMA busy_timeout=30000")  # writers from several replicas take turns
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn: Any) -> None:
                # A writer takes the write lock up front: a deferred one that read first would fail at once
                # (SQLITE_BUSY_SNAPSHOT) when another writer committed in between, whatever the busy timeout.
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")
        try:
            upgrade(engine)
        except OperationalError as e:
            raise InputError(f"monitor store {_safe(url)!r} is unreachable: {e.orig}") from None
        return cls(engine, url)

    # --- writing ---------------------------------------------------------------------------------------------

    def add(self, items: Sequence[Observation], rule: AlertRule, now: datetime | None = None) -> list[str]:
        """Stores the items in one transaction and refreshes the alerts of the windows they touch.

        Returns, per item in order: ``stored``; ``duplicate`` (the id exists with the same content, or repeats
        earlier in ``items``); ``conflict`` (the id exists with other content; nothing is changed).
        """
        from sqlalchemy.exc import IntegrityError

        for attempt in range(3):
            try:
                return self._add(items, rule, now)
            except IntegrityError:  # another writer stored one of these ids meanwhile: its row is now visible
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _add(self, items: Sequence[Observation], rule: AlertRule, now: datetime | None) -> list[str]:
        from sqlalchemy import select

        now = _naive(now or datetime.now(timezone.utc))
        ids = [it.id for it in items]
        statuses: list[str] = []
        with self.writer.begin() as conn:
            self._lock_topics(conn, {it.topic for it in items})
            existing = {}
            for chunk in _chunks(sorted(set(ids)), 500):
                rows = conn.execute(select(OBSERVATIONS.c.id, OBSERVATIONS.c.content_sha256)
                                    .where(OBSERVATIONS.c.id.in_(chunk))).all()
                existing.update({r.id: r.content_sha256 for r in rows})
            new_rows = []
            for it in items:
                digest = it.content_sha256()
                if it.id in existing:
                    statuses.append("duplicate" if existing[it.id] == digest else "conflict")
                    continue
                existing[it.id] = digest
                statuses.append("stored")
                new_rows.append({"id": it.id, "topic": it.topic, "text": it.text, "content_sha256": digest,
                                 "time": _naive(it.time), "label": it.label, "score": float(it.score),
                                 "model_version": it.model_version, "ingested_at": now})
            if new_rows:
                conn.execute(OBSERVATIONS.insert(), new_rows)
                touched: dict[str, set[int]] = {}
                for r in new_rows:
                    touched.setdefault(r["topic"], set()).add(int(_epoch(r["time"]) // rule.window_s))
                for topic, windows in touched.items():
                    self._refresh_alerts(conn, topic, windows, rule)
        return statuses

    def recompute(self, rule: AlertRule, topic: str | None = None) -> None:
        """Computes ``rule``'s alerts over every stored window (of ``topic``, or of all): for a rule that was
        changed or added after the texts were stored."""
        from sqlalchemy import select

        with self.writer.begin() as conn:
            query = select(OBSERVATIONS.c.topic, OBSERVATIONS.c.time)
            if topic is not None:
                query = query.where(OBSERVATIONS.c.topic == topic)
            windows: dict[str, set[int]] = {}
            for t, time in conn.execute(query):
                windows.setdefault(t, set()).add(int(_epoch(time) // rule.window_s))
            self._lock_topics(conn, set(windows))
            for t, ks in windows.items():
                self._refresh_alerts(conn, t, ks, rule)

    def _lock_topics(self, conn: Any, topics: set[str]) -> None:
        """On PostgreSQL, holds each topic's advisory lock until the transaction ends (in one order, so two
        writers cannot deadlock): writers of one topic take turns, so each recomputes its alerts over the
        other's rows. SQLite has one writer at a time anyway."""
        if self.engine.dialect.name != "postgresql":
            return
        from sqlalchemy import text

        for topic in sorted(topics):
            key = int.from_bytes(hashlib.sha256(topic.encode()).digest()[:8], "big", signed=True)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def _refresh_alerts(self, conn: Any, topic: str, windows: set[int], rule: AlertRule) -> None:
        """Recomputes the alerts of ``windows`` and of the windows whose baseline holds one of them."""
        from sqlalchemy import delete, select

        w, b = rule.window_s, rule.baseline_windows
        lo, hi = min(windows), max(windows) + b  # window indices to judge
        start = datetime.fromtimestamp((lo - b) * w, timezone.utc)
        end = datetime.fromtimestamp((hi + 1) * w, timezone.utc)
        rows = conn.execute(select(OBSERVATIONS.c.id, OBSERVATIONS.c.time, OBSERVATIONS.c.label,
                                   OBSERVATIONS.c.score)
                            .where(OBSERVATIONS.c.topic == topic, OBSERVATIONS.c.time >= _naive(start),
                                   OBSERVATIONS.c.time < _naive(end))).all()
        per_window: dict[int, list[Any]] = {}
        for r in rows:
            per_window.setdefault(int(_epoch(r.time) // w), []).append(r)
        key = rule_key(rule)
        # each touched window and the b after it, whose baselines hold it: O(windows x b), not O(span x windows)
        judged = sorted({k + d for k in windows for d in range(b + 1)})
        conn.execute(delete(ALERTS).where(
            ALERTS.c.topic == topic, ALERTS.c.rule == key,
            ALERTS.c.window_start.in_([_naive(datetime.fromtimestamp(k * w, timezone.utc)) for k in judged])))
        for k in judged:
            window = per_window.get(k, [])
            base = [r for j in range(k - b, k) for r in per_window.get(j, [])]
            if len(window) < rule.min_count or len(base) < rule.min_count:
                continue
            negative = [r for r in window if r.label == rule.negative_label]
            base_negative = sum(r.label == rule.negative_label for r in base)
            baseline, score = surge_score(len(negative), len(window), base_negative, len(base), rule)
            if score < rule.threshold:
                continue
            examples = [r.id for r in sorted(negative, key=lambda r: (-r.score, r.id))[:rule.examples]]
            conn.execute(ALERTS.insert().values(
                topic=topic, window_start=_naive(datetime.fromtimestamp(k * w, timezone.utc)),
                window_end=_naive(datetime.fromtimestamp((k + 1) * w, timezone.utc)), rule=key, n=len(window),
                negative=len(negative), baseline=baseline, score=score, example_ids=json.dumps(examples)))

    # --- reading ---------------------------------------------------------------------------------------------

    def alerts(self, rule: AlertRule, topic: str | None = None, since: datetime | None = None) -> list[dict]:
        """Alerts of ``rule``, oldest window first: topic, window, counts, baseline, score, example ids."""
        from sqlalchemy import select

        query = select(ALERTS).where(ALERTS.c.rule == rule_key(rule)).order_by(ALERTS.c.window_start, ALERTS.c.topic)
        if topic is not None:
            query = query.where(ALERTS.c.topic == topic)
        if since is not None:
            query = query.where(ALERTS.c.window_end > _naive(since))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"topic": r.topic, "window_start": _aware(r.window_start), "window_end": _aware(r.window_end),
                 "n": r.n, "negative": r.negative, "baseline": r.baseline, "score": r.score,
                 "example_ids": json.loads(r.example_ids)} for r in rows]

    def trend(self, topic: str, bucket: str = "1h", since: datetime | None = None,
              labels: Iterable[str] = ("negative", "neutral", "positive")) -> list[dict]:
        """Per time bucket with texts (oldest first): its start, count and count per label."""
        from sqlalchemy import select

        if bucket not in BUCKETS:
            raise InputError(f"bucket {bucket!r} is not one of {sorted(BUCKETS)}")
        size = BUCKETS[bucket]
        query = select(OBSERVATIONS.c.time, OBSERVATIONS.c.label).where(OBSERVATIONS.c.topic == topic)
        if since is not None:
            query = query.where(OBSERVATIONS.c.time >= _naive(since))
        labels = list(labels)
        points: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for t, label in conn.execute(query):
                k = int(_epoch(t) // size)
                point = points.setdefault(k, {"start": datetime.fromtimestamp(k * size, timezone.utc), "n": 0,
                                              **{name: 0 for name in labels}})
                point["n"] += 1
                if label in point:
                    point[label] += 1
        return [points[k] for k in sorted(points)]

    def topics(self) -> list[str]:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(OBSERVATIONS.c.topic).distinct().order_by(OBSERVATIONS.c.topic))]

    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        """The stored text of each id that exists."""
        from sqlalchemy import select

        out = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(ids), 500):
                out.update({r.id: r.text for r in conn.execute(
                    select(OBSERVATIONS.c.id, OBSERVATIONS.c.text).where(OBSERVATIONS.c.id.in_(chunk)))})
        return out

    def count(self) -> int:
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(OBSERVATIONS)).scalar_one()


_MIGRATING = threading.Lock()  # alembic's migration context is process-global: one upgrade at a time


def upgrade(engine: Any, revision: str = "head") -> None:
    """Brings the database's schema to ``revision`` with alembic (``jobs/monitor_migrations``)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _MIGRATING, engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # replicas starting together migrate one after the other
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_xact_lock(7415120001)"))
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def _chunks(values: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(values), size):
        yield values[i:i + size]


def _safe(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given, less anything after '@'
        return url.split("@")[-1]


def parse_time(value: str) -> datetime:
    """An RFC 3339 time (``Z`` or an offset required)."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InputError(f"time {value!r} is not RFC 3339 (e.g. 2026-12-06T10:00:00Z)") from None
    if t.tzinfo is None:
        raise InputError(f"time {value!r} has no timezone (e.g. 2026-12-06T10:00:00Z)")
    return t

