"""The sentiment monitor's store (jobs.monitor), against both backends: the embedded SQLite file and a real
PostgreSQL server (Debian's binaries, started by the test on a Unix socket). Idempotent ingest, alerts that
depend only on the stored observations, trends, migrations, and errors that name the bad value."""

import os
import random
import shutil
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs.errors import InputError
from jobs.monitor import AlertRule, MonitorStore, Observation, parse_time, surge_score

from pgserver import PostgresServer, pg_bin  # tests/pgserver.py

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
RULE = AlertRule(window_s=3600, baseline_windows=6, min_count=10, threshold=3.0)


@pytest.fixture(scope="session")
def postgres():
    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: tests/run.sh installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="slimray-pg-"))
    server = PostgresServer(folder).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'monitor.db'}"
    return request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")


def obs(i, topic, hour, label, score=0.9, text=None, minute=None):
    minute = (i * 7) % 60 if minute is None else minute
    return Observation(id=f"{topic}-{i}", topic=topic, text=text or f"{topic} text {i}",
                       time=T0 + timedelta(hours=hour, minutes=minute), label=label, score=score,
                       model_version="sent-v1")


def surge_data(topic="acme", surge_hour=6, calm_hours=6, per_hour=20, calm_negative=2, surge_negative=14):
    """``calm_hours`` hours with a few negative texts each, then one hour where most are negative."""
    items, i = [], 0
    for hour in range(calm_hours):
        for j in range(per_hour):
            items.append(obs(i, topic, hour, "negative" if j < calm_negative else "positive"))
            i += 1
    for j in range(per_hour):
        items.append(obs(i, topic, surge_hour, "negative" if j < surge_negative else "neutral",
                         score=0.5 + j / 100))
        i += 1
    return items


def test_ids_are_idempotent_and_a_changed_item_is_a_conflict(store_url):
    store = MonitorStore.open(store_url)
    first = [obs(1, "acme", 0, "negative"), obs(2, "acme", 0, "positive")]
    assert store.add(first, RULE) == ["stored", "stored"]
    again = [obs(1, "acme", 0, "negative"), obs(2, "acme", 0, "positive", text="other words"),
             obs(3, "acme", 0, "neutral"), obs(3, "acme", 0, "neutral")]
    assert store.add(again, RULE) == ["duplicate", "conflict", "stored", "duplicate"]
    assert store.count() == 3 and store.texts(["acme-2"]) == {"acme-2": "acme text 2"}  # the conflict changed nothing


def test_a_surge_of_negative_texts_raises_one_alert_with_its_evidence(store_url):
    store = MonitorStore.open(store_url)
    store.add(surge_data() + surge_data(topic="calm", surge_negative=2), RULE)
    (alert,) = store.alerts(RULE)
    assert alert["topic"] == "acme" and (alert["n"], alert["negative"]) == (20, 14)
    assert alert["window_start"] == T0 + timedelta(hours=6) and alert["window_end"] == T0 + timedelta(hours=7)
    assert alert["baseline"] == pytest.approx((12 + 1) / (120 + 2))
    assert alert["score"] == pytest.approx(surge_score(14, 20, 12, 120, RULE)[1]) and alert["score"] >= 3
    assert alert["example_ids"] == [f"acme-{120 + j}" for j in (13, 12, 11, 10, 9)]  # most confident first
    assert store.alerts(RULE, topic="calm") == []
    assert store.alerts(RULE, since=T0 + timedelta(hours=7)) == []


def test_alerts_depend_only_on_what_is_stored_not_on_batches_order_or_restarts(store_url, tmp_path):
    items = surge_data() + surge_data(topic="beta", surge_hour=8)
    one = MonitorStore.open(store_url)
    one.add(items, RULE)
    expected = one.alerts(RULE)
    assert {a["topic"] for a in expected} == {"acme", "beta"}

    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    other = MonitorStore.open(f"sqlite:///{tmp_path / 'other.db'}")
    for k in range(0, len(shuffled), 17):  # other batches, another order, late data included
        other.add(shuffled[k:k + 17], RULE)
    assert other.alerts(RULE) == expected
    assert MonitorStore.open(store_url).alerts(RULE) == expected  # reopened: the same alerts


def test_late_texts_recompute_the_window_and_the_baselines_after_it(store_url):
    store = MonitorStore.open(store_url)
    store.add(surge_data(), RULE)
    assert len(store.alerts(RULE)) == 1
    # Late positive texts in the surge hour dilute it below the threshold: the alert goes.
    store.add([obs(1000 + j, "acme", 6, "positive", minute=59) for j in range(60)], RULE)
    assert store.alerts(RULE) == []
    # A milder rise three hours later stays under the threshold against a baseline that holds the surge ...
    store.add([obs(2000 + j, "acme", 9, "negative" if j < 5 else "positive") for j in range(12)], RULE)
    assert store.alerts(RULE) == []
    # ... until late positive texts in the hour before it lower its baseline: then it alerts.
    store.add([obs(3000 + j, "acme", 8, "positive") for j in range(200)], RULE)
    assert [a["window_start"] for a in store.alerts(RULE)] == [T0 + timedelta(hours=9)]


def test_rules_keep_their_alerts_apart_and_a_new_rule_is_computed_over_the_stored_texts(store_url):
    store = MonitorStore.open(store_url)
    ratio = AlertRule(window_s=3600, baseline_windows=6, min_count=10, method="ratio", threshold=4.0)
    store.add(surge_data(), RULE)
    assert store.alerts(ratio) == []
    store.recompute(ratio)
    (alert,) = store.alerts(ratio)
    assert alert["score"] == pytest.approx((14 / 20) / ((12 + 1) / 122))
    assert len(store.alerts(RULE)) == 1


def test_trend_counts_each_label_per_bucket(store_url):
    store = MonitorStore.open(store_url)
    store.add(surge_data(calm_hours=2), RULE)
    points = store.trend("acme", bucket="1h")
    assert [p["start"] for p in points] == [T0, T0 + timedelta(hours=1), T0 + timedelta(hours=6)]
    assert [(p["n"], p["negative"], p["neutral"], p["positive"]) for p in points] == [
        (20, 2, 0, 18), (20, 2, 0, 18), (20, 14, 6, 0)]
    (day,) = store.trend("acme", bucket="1d")
    assert day["n"] == 60 and day["negative"] == 18
    assert len(store.trend("acme", bucket="5m", since=T0 + timedelta(hours=6))) == len(
        {(it.time.minute // 5) for it in surge_data(calm_hours=2)[-20:]})
    assert store.topics() == ["acme"]
    with pytest.raises(InputError, match="bucket '2h' is not one of"):
        store.trend("acme", bucket="2h")


def test_the_schema_is_alembics_and_opening_again_migrates_nothing(store_url):
    import sqlalchemy

    MonitorStore.open(store_url)
    store = MonitorStore.open(store_url)
    with store.engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select version_num from alembic_version")).scalar_one() == "0001"
        assert {"observations", "alerts"} <= set(sqlalchemy.inspect(conn).get_table_names())


def test_sqlite_store_runs_in_wal_mode(tmp_path):
    import sqlalchemy

    store = MonitorStore.open(f"sqlite:///{tmp_path / 'sub' / 'm.db'}")  # its folder is created
    with store.engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar_one() == "wal"


def test_errors_name_the_bad_value(tmp_path):
    with pytest.raises(InputError, match="'nosuch://x': use sqlite"):
        MonitorStore.open("nosuch://x")
    with pytest.raises(InputError, match="use sqlite:///FILE or postgresql"):
        MonitorStore.open("mysql+pymysql://u:secret@h/db")
    with pytest.raises(InputError, match="unreachable") as e:
        MonitorStore.open(f"postgresql+psycopg://u:secret@/db?host={tmp_path}")  # no server on that socket
    assert "secret" not in str(e.value)
    with pytest.raises(InputError, match="has no timezone"):
        parse_time("2026-12-06T10:00:00")
    with pytest.raises(InputError, match="is not RFC 3339"):
        parse_time("yesterday")
    assert parse_time("2026-12-06T10:00:00Z") == datetime(2026, 12, 6, 10, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="ratio threshold must be > 1"):
        AlertRule(method="ratio", threshold=0.5)


# --- the served monitor and the batch commands (integration: real Ray) ----------------------------------------

def _news(topic: str, hours: range, label: str, per_hour: int, start: int) -> list[dict]:
    from conftest import SENTIMENT_TEMPLATES  # tests/conftest.py

    templates = SENTIMENT_TEMPLATES[label]
    return [{"id": f"{topic}-{start + h * per_hour + j}", "topic": topic,
             "text": templates[j % len(templates)].format(c=topic.title(), e=["phone", "car", "chip"][j % 3]),
             "time": (T0 + timedelta(hours=h, minutes=5 * j)).isoformat().replace("+00:00", "Z")}
            for h in hours for j in range(per_hour)]


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


LIVE_RULE = AlertRule(window_s=3600, baseline_windows=3, min_count=5, threshold=2.0)


@pytest.mark.integration
def test_the_served_monitor_scores_stores_and_alerts_and_a_restart_loses_nothing(ray_session, tiny_sentiment, postgres):
    """On PostgreSQL, the store a deployment with several replicas would use. The deployment's code is the same
    for SQLite (the embedded default): the store's unit tests run on both, and the Ray Data ingest below runs
    on SQLite."""
    import httpx
    from ray import serve

    from raycluster import free_port  # tests/raycluster.py
    from serve_app.app import AppArgs
    from serve_app.run import deploy

    url = postgres.create_database(f"served_{uuid.uuid4().hex[:8]}")
    args = AppArgs(sentiment_model=str(tiny_sentiment), monitor_store=url, alerting=LIVE_RULE)
    port = free_port()
    items = _news("acme", range(3), "positive", 8, 0) + _news("acme", range(3, 4), "negative", 8, 100)
    items += _news("globex", range(4), "neutral", 6, 0)
    try:
        base = deploy(args, port=port)
        r = httpx.post(f"{base}/v1/observations", json={"items": items}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["id"] for x in results] == [it["id"] for it in items]
        assert {x["status"] for x in results} == {"stored"} and {x["label"] for x in results} <= {
            "negative", "neutral", "positive"}
        labels = {x["id"]: x["label"] for x in results}
        surge = [labels[it["id"]] for it in items if it["id"].startswith("acme-1")]
        assert surge.count("negative") >= 6, surge  # the model reads the surge hour as negative
        changed = {**items[0], "text": "Acme quietly changes the story"}
        again = httpx.post(f"{base}/v1/observations", json={"items": [items[0], changed, items[1]]}, timeout=60)
        assert [x["status"] for x in again.json()["results"]] == ["duplicate", "conflict", "duplicate"]

        served = httpx.get(f"{base}/v1/alerts", params={"topic": "acme"}, timeout=30).json()["alerts"]
        expected = MonitorStore.open(url).alerts(LIVE_RULE, topic="acme")
        assert len(served) == len(expected) >= 1
        assert [(_when(a["window_start"]), a["n"], a["negative"], a["example_ids"]) for a in served] == [
            (e["window_start"], e["n"], e["negative"], e["example_ids"]) for e in expected]
        assert _when(served[-1]["window_start"]) == T0 + timedelta(hours=3)
        points = httpx.get(f"{base}/v1/topics/acme/trend", params={"bucket": "1h"}, timeout=30).json()["points"]
        assert [p["n"] for p in points] == [8, 8, 8, 8]
        assert sum(p["negative"] for p in points) == sum(
            labels[it["id"]] == "negative" for it in items if it["topic"] == "acme")
        models = httpx.get(f"{base}/v1/models", timeout=30).json()
        assert models["sentiment_model"]["alerting"]["min_count"] == 5 and models["versions"] == []

        assert httpx.post(f"{base}/v1/observations", json={"items": items[:1] * 1001}).status_code == 422
        naive = {**items[0], "time": "2026-12-01T10:00:00"}
        bad = httpx.post(f"{base}/v1/observations", json={"items": [naive]})
        assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "items[0].time"

        serve.delete("slimray")  # a restart: state lives in the store only
        base = deploy(args, port=port)
        after = httpx.get(f"{base}/v1/alerts", params={"topic": "acme"}, timeout=30).json()["alerts"]
        assert after == served
    finally:
        serve.shutdown()


@pytest.mark.integration
def test_monitor_ingest_through_ray_data_is_idempotent_and_the_report_draws_each_topic(ray_session, tiny_sentiment,
                                                                                      tmp_path):
    import json

    from jobs.monitoring import IngestConfig, ReportConfig, ingest, report

    items = _news("acme", range(3), "positive", 8, 0) + _news("acme", range(3, 4), "negative", 8, 100)
    items += _news("globex", range(2), "neutral", 6, 0)
    items[-1] = {k: v for k, v in items[-1].items() if k != "time"}  # arrival time
    source = tmp_path / "news.jsonl"
    source.write_text("".join(json.dumps(it) + "\n" for it in items))
    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    cfg = IngestConfig(input=source, model=tiny_sentiment, store=url, alerting=LIVE_RULE, batch_size=10)
    assert ingest(cfg) == {"stored": len(items)}
    assert ingest(cfg) == {"duplicate": len(items)}  # a second run stores nothing twice
    store = MonitorStore.open(url)
    assert store.count() == len(items) and store.topics() == ["acme", "globex"]
    assert len(store.alerts(LIVE_RULE, topic="acme")) >= 1

    out = report(ReportConfig(store=url, out=tmp_path / "report", alerting=LIVE_RULE))
    assert (tmp_path / "report" / "acme.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "globex.png").is_file()
    text = out.read_text()
    assert "## acme" in text and "| window (UTC) |" in text and "Acme" in text  # the alert with example texts


def test_monitor_ingest_names_missing_columns_before_starting_ray(tiny_sentiment, tmp_path):
    from jobs.monitoring import IngestConfig, ingest

    source = tmp_path / "news.csv"
    source.write_text("id,headline\n1,Acme slumps\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['topic', 'text'\]"):
        ingest(IngestConfig(input=source, model=tiny_sentiment, store=f"sqlite:///{tmp_path / 'm.db'}"))


def test_concurrent_writers_of_one_topic_store_each_id_once_and_agree_on_the_alerts(store_url, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    items = surge_data() + surge_data(topic="beta", surge_hour=8)
    batches = [items[i::4] + items[:10] for i in range(4)]  # interleaved, and the first 10 ids in every batch
    store = MonitorStore.open(store_url)
    with ThreadPoolExecutor(4) as pool:
        statuses = [s for batch in pool.map(lambda b: MonitorStore.open(store_url).add(b, RULE), batches)
                    for s in batch]
    assert statuses.count("stored") == len(items) and store.count() == len(items)
    serial = MonitorStore.open(f"sqlite:///{tmp_path / 'serial.db'}")
    serial.add(items, RULE)
    assert store.alerts(RULE) == serial.alerts(RULE)
