"""Serving: calibration, playbook, the HTTP API (in-process, no Ray) and, marked integration, the real Serve
graph with a small fine-tuned model (both versions, playbook replies, hand-off, canary split, live knobs,
validation, auth, metrics, fuzzing, no texts in logs)."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import SecretStr

from raycluster import free_port  # tests/raycluster.py

from jobs.calibration import calibrate_handoff, choose_threshold, read_calibration, write_calibration
from jobs.config import ConfigError
from jobs.errors import InputError
from serve_app.api import Classification, Limits, Tagging, make_api, parse_server_timing
from serve_app.app import CANARY, ENTITY, INGRESS, MODEL, MONITOR, SENTIMENT, AppArgs, BatchKnobs, RoutingKnobs
from serve_app.assistant import (GENERATED_REPLY, Playbook, decide, find_playbook, load_playbook, render,
                                 topic_of)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"
SERVE_CONFIG = REPO / "serve_app" / "serve_config.yaml"


# --- calibration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conf, correct, target, expected", [
    # precision of the top 1..4: 1, 1, .67, .75 -> answering everything already reaches 0.75
    ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], 0.75, {"threshold": 0.0, "precision": 0.75, "coverage": 1.0}),
    ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], 0.8, {"threshold": 0.8, "precision": 1.0, "coverage": 0.5}),
    # 0.8 is tied: answering one 0.8 answers both, so the cut after the first 0.8 does not exist
    ([0.9, 0.8, 0.8], [1, 1, 0], 0.9, {"threshold": 0.9, "precision": 1.0, "coverage": 1 / 3}),
    ([0.9, 0.5], [0, 1], 0.9, {"threshold": 1.0, "precision": None, "coverage": 0.0}),
])
def test_choose_threshold_is_the_lowest_that_reaches_the_target(conf, correct, target, expected):
    got = choose_threshold(np.array(conf), np.array(correct, dtype=bool), target)
    assert got == pytest.approx(expected)


class FakeScorer:
    """Logits that make the model right exactly on texts starting with 'sure' and confident by length."""

    labels = ["a", "b"]

    def logits(self, texts, batch_size=64, by_length=False):  # InferenceModel.logits's signature
        out = []
        for t in texts:
            strength = len(t) / 10  # longer text -> more confident
            right = t.startswith("sure")
            label = t.split(":")[1][0]
            predicted = label if right else ("b" if label == "a" else "a")
            out.append([strength, 0.0] if predicted == "a" else [0.0, strength])
        return np.array(out)


def _data_dir(tmp_path, rows):
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}), d / "validation.parquet")
    (d / "manifest.json").write_text("{}")
    return d


def test_calibrate_handoff_on_a_validation_split_and_store_it(tmp_path):
    rows = [("sure:a" + "x" * 30, "a"), ("sure:b" + "x" * 20, "b"), ("nope:a" + "x" * 10, "a"), ("sure:b", "b")]
    cal = calibrate_handoff(FakeScorer(), _data_dir(tmp_path, rows), target_precision=0.9)
    # the two longest are right, the third is wrong: the threshold is the second's confidence
    assert cal["coverage"] == 0.5 and cal["precision"] == 1.0 and cal["n"] == 4 and cal["accuracy"] == 0.75
    second = 1 / (1 + np.exp(-len("sure:b" + "x" * 20) / 10))
    assert cal["threshold"] == pytest.approx(second)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert read_calibration(model_dir) is None
    write_calibration(model_dir, cal)
    stored = read_calibration(model_dir)
    assert stored["threshold"] == cal["threshold"] and "created_at" in stored


def test_calibration_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no 'validation' split"):
        calibrate_handoff(FakeScorer(), tmp_path)
    with pytest.raises(InputError, match="labels the model does not know.*'zebra'"):
        calibrate_handoff(FakeScorer(), _data_dir(tmp_path, [("sure:a", "zebra")]))
    (tmp_path / "calibration.json").write_text(json.dumps({"threshold": 3}))
    with pytest.raises(InputError, match="got 3"):
        read_calibration(tmp_path)


# --- playbook and the assistant's decision ------------------------------------------------------------------

def test_sample_playbook_covers_every_sample_intent():
    import pyarrow.csv as pacsv

    playbook = load_playbook(SAMPLE / "playbook.yaml")
    table = pacsv.read_csv(SAMPLE / "train.csv")
    labels = set(table.column(next(c for c in table.column_names if c != "text")).to_pylist())
    assert set(playbook.intents) == labels
    assert playbook.intents["card_lost_or_stolen"].handoff is True


def test_render_fills_known_slots_and_never_fails_on_unknown_ones():
    assert render("Hi {customer_name}, {intent} ({confidence:.0%})", {"customer_name": "Sam", "intent": "x",
                                                                      "confidence": 0.87}) == "Hi Sam, x (87%)"
    assert render("Hi {customer_name}!", {}) == "Hi !"
    assert render("{intent.__class__.__mro__} {0}", {"intent": "x"}) == " "  # no attribute/index lookups
    assert render("{customer_name:.2f}", {"customer_name": "Sam"}) == "Sam"  # spec that does not fit: str()
    assert render("{customer_name}", {"customer_name": "{intent}"}) == "{intent}"  # values are not templates


def test_decide_low_confidence_policy_and_generated_replies():
    playbook = Playbook.model_validate({"default": "A colleague will help, {customer_name}.", "intents": {
        "lost": {"reply": "Card frozen ({intent}).", "handoff": True}, "fee": {"reply": "Free, {customer_name}."}}})
    low = decide(playbook, "fee", 0.3, threshold=0.5, slots={"customer_name": "Sam"})
    assert (low.handoff, low.handoff_reason, low.reply) == (True, "low_confidence", "A colleague will help, Sam.")
    fee = decide(playbook, "fee", 0.9, threshold=0.5, slots={"customer_name": "Sam"})
    assert (fee.handoff, fee.handoff_reason, fee.reply) == (False, None, "Free, Sam.")
    lost = decide(playbook, "lost", 0.9, threshold=0.5)
    assert (lost.handoff, lost.handoff_reason, lost.reply) == (True, "intent_policy", "Card frozen (lost).")
    other = decide(playbook, "Refund_not_showing_up", 0.9, threshold=0.5)
    assert other.reply == GENERATED_REPLY.format(topic="refund not showing up") and not other.handoff
    assert topic_of("card_not_arrived") == "card not arrived"


def test_decide_fills_slots_from_entities_then_request_then_says_the_fallback():
    playbook = Playbook.model_validate({"intents": {"hours": {
        "reply": "Our {location} branch opens at 9, {customer_name}.", "slots": {"location": "location"},
        "fallback": "Which branch do you mean, {customer_name}?"}}})
    found = [{"type": "location", "text": "York", "score": 0.6}, {"type": "person", "text": "Ann", "score": 0.9},
             {"type": "location", "text": "Leeds", "score": 0.8}]
    slots = {"customer_name": "Sam"}
    assert decide(playbook, "hours", 0.9, 0.5, slots, entities=found).reply == "Our Leeds branch opens at 9, Sam."
    assert decide(playbook, "hours", 0.9, 0.5, slots, entities=[]).reply == "Which branch do you mean, Sam?"
    assert decide(playbook, "hours", 0.9, 0.5, {**slots, "location": "Oslo"}).reply.startswith("Our Oslo branch")
    no_fallback = Playbook.model_validate({"intents": {"hours": {"reply": "At {location}.", "slots": {"location": "location"}}}})
    assert decide(no_fallback, "hours", 0.9, 0.5, entities=[]).reply == "At ."
    assert decide(playbook, "hours", 0.1, 0.5, slots, entities=found).handoff  # low confidence: a human, as before


def test_playbook_errors_name_the_entry(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"intents": {"x": {"reply": "unclosed {brace"}}}))
    with pytest.raises(InputError, match="intent 'x'.*bad template"):
        load_playbook(bad)
    bad.write_text(yaml.safe_dump({"default": "{0} {}"}))
    with pytest.raises(InputError, match="default.*bad template"):
        load_playbook(bad)
    bad.write_text(yaml.safe_dump({"intents": {"x": {"reply": "ok", "handof": True}}}))
    with pytest.raises(InputError, match="intents.x.handof"):
        load_playbook(bad)
    bad.write_text(yaml.safe_dump({"intents": {"x": {"reply": "ok", "fallback": "unclosed {brace"}}}))
    with pytest.raises(InputError, match="intent 'x' fallback.*bad template"):
        load_playbook(bad)


def test_find_playbook_follows_lineage(tmp_path):
    source, data, model = tmp_path / "src", tmp_path / "data", tmp_path / "model"
    for d in (source, data, model):
        d.mkdir()
    assert find_playbook(model) is None
    (data / "manifest.json").write_text(json.dumps({"source": str(source)}))
    (model / "manifest.json").write_text(json.dumps({"data": str(data)}))
    assert find_playbook(model) is None
    (source / "playbook.yaml").write_text("intents: {}\n")
    assert find_playbook(model) == source / "playbook.yaml"
    (model / "playbook.yaml").write_text("intents: {}\n")
    assert find_playbook(model) == model / "playbook.yaml"


# --- the HTTP API in-process (no Ray) -----------------------------------------------------------------------

class FakeBackend:
    """Answers with a fixed ranking; records what it was asked."""

    def __init__(self):
        self.calls = []

    async def classify(self, texts):
        self.calls.append(texts)
        return Classification(version="v-test", threshold=0.5,
                              top=[[("fee", 0.9), ("lost", 0.06), ("other", 0.04)] for _ in texts], replica="r1",
                              timing={"hop_ms": 1.0, "queue_ms": 2.0, "forward_ms": 3.0, "batch": 2, "model_ms": 5})

    async def entities(self, texts):
        """Every capitalised word is a location."""
        self.calls.append(texts)
        return Tagging(version="ner-test", replica="r2", entities=[
            [{"start": m.start(), "end": m.end(), "type": "location", "text": m.group(), "score": 0.8}
             for m in __import__("re").finditer(r"[A-Z]\w+", t)] for t in texts])

    async def describe(self):
        return {"versions": [{"version": "v-test"}]}


def _client(token=None, limits=Limits(max_texts=4, max_chars=50, max_top_k=3), intents=True, entities=False):
    backend = FakeBackend()
    playbook = Playbook.model_validate({"intents": {"fee": {
        "reply": "Free, {customer_name}.", "slots": {"branch": "location"},
        "fallback": "Free at every branch, {customer_name}."}}})
    decisions = []
    api = make_api(backend, playbook, limits, token, lambda d, v: decisions.append((d, v)), intents=intents,
                   entities=entities)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test")
    return client, backend, decisions


def _run(coro):
    return asyncio.run(coro)


def test_api_classify_and_assist():
    async def go():
        client, backend, decisions = _client()
        async with client:
            r = await client.post("/v1/classify", json={"texts": ["a", "b"], "top_k": 2})
            assert r.status_code == 200 and r.headers["x-model-version"] == "v-test"
            timing = parse_server_timing(r.headers["server-timing"])  # where the time went, the ingress's own last
            assert timing.keys() == {"hop", "queue", "forward", "batch", "ingress"} and timing["batch"] == 2
            assert timing["ingress"] >= 0
            r_bad = await client.post("/v1/classify", json={"texts": []})
            assert r_bad.status_code == 422 and parse_server_timing(r_bad.headers["server-timing"]).keys() == {"ingress"}
            body = r.json()
            assert body["model_version"] == "v-test" and len(body["results"]) == 2
            assert body["results"][0]["label"] == "fee" and len(body["results"][0]["top_k"]) == 2
            r = await client.post("/v1/assist", json={"message": "fees?", "slots": {"customer_name": "Sam"}})
            assert r.status_code == 200
            assert r.json() | {"alternatives": None} == {
                "intent": "fee", "confidence": 0.9, "reply": "Free at every branch, Sam.", "handoff": False,
                "handoff_reason": None, "threshold": 0.5, "alternatives": None, "model_version": "v-test",
                "entities": None, "entity_model_version": None, "source": "playbook", "citations": [],
                "finish_reason": None}  # no entity model: the slot's fallback
            assert len(r.json()["alternatives"]) == 3
            assert [d.intent for d, _ in decisions] == ["fee"] and backend.calls == [["a", "b"], ["fees?"]]
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/v1/models")).json()["versions"][0]["version"] == "v-test"
            assert (await client.get("/openapi.json")).status_code == 200
            assert (await client.get("/docs")).status_code == 200
    _run(go())


def test_api_entities_and_assist_with_both_models():
    async def go():
        client, backend, _ = _client(entities=True)
        async with client:
            r = await client.post("/v1/entities", json={"texts": ["is Leeds open", "no names here"]})
            assert r.status_code == 200 and r.headers["x-model-version"] == "ner-test"
            assert r.json() == {"model_version": "ner-test", "results": [
                {"entities": [{"start": 3, "end": 8, "type": "location", "text": "Leeds", "score": 0.8}]},
                {"entities": []}]}
            r = await client.post("/v1/assist", json={"message": "fees in Leeds?", "slots": {"customer_name": "Sam"}})
            body = r.json()
            assert (body["reply"], body["entity_model_version"], body["model_version"]) == ("Free, Sam.", "ner-test", "v-test")
            assert body["entities"] == [{"start": 8, "end": 13, "type": "location", "text": "Leeds", "score": 0.8}]
            r = await client.post("/v1/assist", json={"message": "fees?", "slots": {"customer_name": "Sam"}})
            assert (r.json()["reply"], r.json()["entities"]) == ("Free at every branch, Sam.", [])
            assert sorted(map(tuple, backend.calls[1:])) == [("fees in Leeds?",), ("fees in Leeds?",)] + [("fees?",)] * 2
            r = await client.post("/v1/entities", json={"texts": ["x"] * 5})
            assert r.status_code == 422 and r.json()["details"][0]["field"] == "texts"
    _run(go())


@pytest.mark.parametrize("intents, entities", [(True, False), (False, True)])
def test_api_routes_exist_only_for_the_models_served(intents, entities):
    async def go():
        client, backend, _ = _client(intents=intents, entities=entities)
        async with client:
            for path, body, served in (("/v1/classify", {"texts": ["a"]}, intents),
                                       ("/v1/assist", {"message": "a"}, intents),
                                       ("/v1/entities", {"texts": ["a"]}, entities)):
                r = await client.post(path, json=body)
                assert r.status_code == (200 if served else 404), (path, r.text)
            r = await client.post("/v1/assist", json={"message": "fees?"})
            if intents:
                assert r.json()["entities"] is None and r.json()["reply"] == "Free at every branch, ."
    _run(go())


BAD_REQUESTS = [
    ("/v1/classify", {"texts": []}, "texts", "at least 1"),
    ("/v1/classify", {"texts": ["   \n\t"]}, "texts[0]", "empty or whitespace"),
    ("/v1/classify", {"texts": [""]}, "texts[0]", "at least 1 character"),
    ("/v1/classify", {"texts": ["x" * 51]}, "texts[0]", "at most 50 characters"),
    ("/v1/classify", {"texts": ["x"] * 5}, "texts", "at most 4 items"),
    ("/v1/classify", {"texts": "just one"}, "texts", "valid list"),
    ("/v1/classify", {"texts": [1, 2]}, "texts[0]", "valid string"),
    ("/v1/classify", {"texts": ["a"], "top_k": 9}, "top_k", "less than or equal to 3"),
    ("/v1/classify", {"texts": ["a"], "top_k": "2"}, "top_k", "valid integer"),
    ("/v1/classify", {"texts": ["a"], "extra": 1}, "extra", "not permitted"),
    ("/v1/classify", {}, "texts", "required"),
    ("/v1/assist", {"message": None}, "message", "valid string"),
    ("/v1/assist", {"message": "hi", "slots": {"bad key": "x"}}, "slots", "pattern"),
    ("/v1/assist", {"message": "hi", "slots": {"name": 3}}, "slots.name", "valid string"),
]


@pytest.mark.parametrize("path, body, field, message", BAD_REQUESTS,
                         ids=[f"{p}-{f}-{m}" for p, _, f, m in BAD_REQUESTS])
def test_api_rejects_bad_requests_with_a_json_4xx_that_says_what_is_wrong(path, body, field, message):
    async def go():
        client, backend, _ = _client()
        async with client:
            r = await client.post(path, json=body)
        assert r.status_code == 422, r.text
        detail = r.json()["details"]
        assert r.json()["error"] == "invalid request"
        assert any(d["field"].startswith(field) and message in d["message"] for d in detail), detail
        assert backend.calls == []
    _run(go())


@pytest.mark.parametrize("content, content_type, status, message", [
    (b'{"texts": ["a"', "application/json", 422, "malformed JSON"),
    (b'{"texts": ["\\ud800"]}', "application/json", 422, "valid string"),  # lone surrogate
    (b"texts=a", "application/x-www-form-urlencoded", 422, "valid dictionary"),
    (b"", "application/json", 422, ""),
    (b'{"texts": ["\xff"]}', "application/json", 400, "not UTF-8"),
])
def test_api_rejects_malformed_bodies(content, content_type, status, message):
    async def go():
        client, _, _ = _client()
        async with client:
            r = await client.post("/v1/classify", content=content, headers={"content-type": content_type})
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        assert message in json.dumps(r.json())
    _run(go())


def test_api_refuses_a_body_larger_than_any_valid_request_with_413_without_reading_it():
    from serve_app.api import body_limit

    limits = Limits(max_texts=4, max_chars=50, max_top_k=3)
    limit = body_limit(limits, "/v1/classify")
    largest = json.dumps({"texts": ["\u00e9" * 50] * 4, "top_k": 3}, ensure_ascii=True).encode()
    assert len(largest) < limit < 10_000_000

    async def go():
        client, backend, _ = _client(limits=limits)
        async with client:
            r = await client.post("/v1/classify", content=largest, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            big = b'{"texts": ["' + b"a" * (limit + 1) + b'"]}'
            r = await client.post("/v1/classify", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and f"over the limit of {limit}" in r.json()["error"]

            async def streamed():  # no Content-Length: counted as it arrives
                for _ in range(limit // 65536 + 2):
                    yield b" " * 65536
            r = await client.post("/v1/classify", content=streamed(), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text
        assert len(backend.calls) == 1
    _run(go())
    assert body_limit(limits, "/v1/observations") > body_limit(Limits(), "/v1/classify") > limit


def test_api_token_is_required_when_set():
    async def go():
        client, backend, _ = _client(token="s3cret")
        async with client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = await client.post("/v1/classify", json={"texts": ["a"]}, headers=headers)
                assert r.status_code == 401 and r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
            assert (await client.get("/v1/models")).status_code == 401
            assert (await client.get("/healthz")).status_code == 200
            r = await client.post("/v1/classify", json={"texts": ["a"]}, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and backend.calls == [["a"]]
    _run(go())


def fuzz_openapi(schema, max_examples: int) -> None:
    """Valid and invalid requests generated from the OpenAPI schema: no 5xx, and every response (errors
    included) has a declared status code, content type and body schema."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @given(case=strategy)
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       response_schema_conformance])

    fuzz()


def test_api_fuzzed_from_its_own_openapi_schema_never_answers_5xx():
    import schemathesis

    client, _, _ = _client(entities=True)
    fuzz_openapi(schemathesis.openapi.from_asgi("/openapi.json", client._transport.app), max_examples=150)


# --- configs -------------------------------------------------------------------------------------------------

def test_serve_config_yaml_validates_against_serve_schema_and_our_models():
    from ray.serve.schema import ServeDeploySchema

    text = SERVE_CONFIG.read_text()
    assert text.startswith("# RAY_AUTH_MODE=token serve deploy serve_app/serve_config.yaml"), "open with its command"
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert app.import_path == "serve_app.app:build_app"
    AppArgs.model_validate(app.args)  # typed app args: the k8s RayService is generated from these
    knobs = {INGRESS: RoutingKnobs, MODEL: BatchKnobs, CANARY: BatchKnobs, ENTITY: BatchKnobs}
    names = [d.name for d in app.deployments]
    assert set(names) <= set(knobs) and {INGRESS, MODEL} <= set(names)
    for d in app.deployments:
        if d.user_config is not None:
            knobs[d.name].model_validate(d.user_config)
    model = next(d for d in app.deployments if d.name == MODEL)
    batch = BatchKnobs.model_validate(model.user_config).max_batch_size
    assert model.max_ongoing_requests >= batch, "a replica must accept enough requests for a batch to fill"
    assert model.autoscaling_config["look_back_period_s"] > 10, "must exceed the 10 s metrics push interval"
    ingress = next(d for d in app.deployments if d.name == INGRESS)
    for d in (ingress, model):  # load beyond these is shed with 503, never queued without bound
        assert 0 < d.max_queued_requests, f"{d.name} needs max_queued_requests"
    assert ingress.backpressure_config.retry_after_s and ingress.backpressure_config.status_code == 503


class _Response:
    """What ``handle.method.remote()`` returns: awaitable, cancellable."""

    def __init__(self, outcome, delay_s=0.0):
        self.outcome, self.delay_s, self.cancelled = outcome, delay_s, False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Handle:
    """A deployment handle whose calls answer, in turn, with ``outcomes`` ((value or exception, delay_s))."""

    def __init__(self, *outcomes):
        self.outcomes, self.responses = list(outcomes), []

    @property
    def score(self):
        return self

    def remote(self, texts):
        self.responses.append(_Response(*self.outcomes.pop(0)))
        return self.responses[-1]


def test_a_model_call_retries_a_dead_replica_and_answers_503_when_slow_or_overloaded():
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError

    from serve_app.api import ModelUnavailable
    from serve_app.app import CallPolicy, _call_with_retries

    answer = (["row"], "replica-2", {"model_ms": 1.0})
    dead = ray.exceptions.ActorUnavailableError("replica died", None)
    handle = _Handle((dead, 0.0), (answer, 0.0))
    rows, replica, timing = _run(_call_with_retries(handle, "score", "v1", ["t"], CallPolicy(retries=1)))
    assert (rows, replica) == (["row"], "replica-2") and "hop_ms" in timing and len(handle.responses) == 2

    # A replica that does not answer in time: the call is cancelled, and the request gets 503 in bounded time.
    handle = _Handle((answer, 30.0))
    with pytest.raises(ModelUnavailable, match="no answer within 0.2 s"):
        _run(_call_with_retries(handle, "score", "v1", ["t"], CallPolicy(retries=3, timeout_s=0.2)))
    assert handle.responses[0].cancelled and len(handle.responses) == 1  # cancelled, and not retried

    # A full queue sheds the request at once (no retry: retrying would only add load).
    handle = _Handle((BackPressureError(num_queued_requests=9, max_queued_requests=8), 0.0), (answer, 0.0))
    with pytest.raises(ModelUnavailable, match="overloaded"):
        _run(_call_with_retries(handle, "score", "v1", ["t"], CallPolicy()))
    assert len(handle.responses) == 1

    # Replicas that stay dead: the retries are spent, then 503.
    handle = _Handle(*[(dead, 0.0)] * 3)
    with pytest.raises(ModelUnavailable, match="ActorUnavailableError"):
        _run(_call_with_retries(handle, "score", "v1", ["t"], CallPolicy(retries=2)))
    assert len(handle.responses) == 3


def test_serve_stage_flags_and_cli_registration(tmp_path):
    from jobs.config import parse_args
    from serve_app.run import ServeConfig, app_from_serve_config
    from slimray.cli import STAGES

    assert STAGES["serve"][0] == "serve_app.run"
    cfg = parse_args(ServeConfig, ["--model", "m", "--port", "8123", "--set", "routing.canary_fraction=0.2",
                                   "--set", "batching.max_batch_size=8"], "t")
    assert cfg.port == 8123 and cfg.routing.canary_fraction == 0.2 and cfg.batching.max_batch_size == 8
    entry, options = app_from_serve_config(SERVE_CONFIG)
    assert options[MODEL]["autoscaling_config"]["max_replicas"] >= 2
    assert entry["name"] == "slimray"


def test_deploy_hands_serve_the_yaml_untouched_when_nothing_is_overridden():
    from serve_app.run import app_from_serve_config, serve_schema

    entry, yaml_options = app_from_serve_config(SERVE_CONFIG)
    schema = serve_schema(AppArgs(model="/m/ft"), port=8123)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (entry["name"], entry["route_prefix"], entry["import_path"])
    assert app.args == {"model": "/m/ft"}  # the YAML's args name paths on a cluster: replaced, not merged
    assert {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments} == yaml_options
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8123)


def test_deploy_overrides_win_over_the_yaml_and_the_token_stays_out_of_it():
    from serve_app.run import app_from_serve_config, serve_schema

    _, yaml_options = app_from_serve_config(SERVE_CONFIG)
    args = AppArgs.model_validate({"model": "/m/ft", "canary_model": "/m/int8", "threads": 2, "api_token": "tok-123",
                                   "routing": {"canary_fraction": 0.2}})
    schema = serve_schema(args, host="0.0.0.0", port=8124,
                          deployments={MODEL: {"num_replicas": 2, "autoscaling_config": None},
                                       ENTITY: {"num_replicas": 1}})  # no entity model: the entry is dropped
    (app,) = schema.applications
    assert {d.name for d in app.deployments} == {INGRESS, MODEL, CANARY}
    assert app.args == {"model": "/m/ft", "canary_model": "/m/int8", "threads": 2, "routing": {"canary_fraction": 0.2}}
    assert "tok-123" not in schema.model_dump_json()  # Serve logs an app's args
    AppArgs.model_validate(app.args)  # what build_app gets on the cluster
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    # a knob set by a flag wins key by key; the YAML's other knobs stay
    assert options[INGRESS] == {**yaml_options[INGRESS], "user_config": {**yaml_options[INGRESS]["user_config"],
                                                                         "canary_fraction": 0.2}}
    assert options[MODEL] == {**{k: v for k, v in yaml_options[MODEL].items() if k != "autoscaling_config"},
                              "num_replicas": 2}
    assert options[CANARY] == yaml_options[MODEL]  # a canary without an entry of its own: the Model's options
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8124)


def test_an_entity_model_gets_the_model_options_and_an_entity_model_alone_no_model_entry():
    from serve_app.run import app_from_serve_config, serve_schema

    _, yaml_options = app_from_serve_config(SERVE_CONFIG)
    both = serve_schema(AppArgs(model="/m/ft", entity_model="/m/ner"))
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in both.applications[0].deployments}
    assert options[ENTITY] == yaml_options[MODEL] and options[MODEL] == yaml_options[MODEL]
    alone = serve_schema(AppArgs(entity_model="/m/ner", batching={"max_batch_size": 8}))
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in alone.applications[0].deployments}
    assert set(options) == {INGRESS, ENTITY} and options[ENTITY]["user_config"]["max_batch_size"] == 8
    assert alone.applications[0].args == {"entity_model": "/m/ner", "batching": {"max_batch_size": 8}}
    with pytest.raises(ValueError, match="give model .*, entity_model .*, sentiment_model .*, or several"):
        AppArgs()
    monitor = serve_schema(AppArgs(sentiment_model="/m/sent", alerting={"min_count": 5}))
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in monitor.applications[0].deployments}
    assert set(options) == {INGRESS, SENTIMENT, MONITOR}  # the sentiment model is batched like Model
    assert {k: v for k, v in options[SENTIMENT].items() if k != "user_config"} == {
        k: v for k, v in yaml_options[MODEL].items() if k != "user_config"}
    assert options[MONITOR] == {"user_config": {"min_count": 5}, "num_replicas": 1,
                                "ray_actor_options": {"num_cpus": 0.1}}  # not a whole CPU by default
    with pytest.raises(ValueError, match="canary_model is a second version of the intent model"):
        AppArgs(entity_model="/m/ner", canary_model="/m/int8")


def _fake_model(folder: Path, architecture: str = "BertForSequenceClassification",
                labels: tuple[str, ...] = ("a", "b")) -> Path:
    """A folder that passes the checks made before Serve starts (config.json, a vocabulary), without weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture],
                                                    "id2label": dict(enumerate(labels))}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return folder


def test_each_role_takes_its_kind_of_model_and_playbook_slots_must_be_tagged(tmp_path):
    from serve_app.app import resolve_paths, resolve_playbook

    intent = _fake_model(tmp_path / "intent", "BertForSequenceClassification", ["fee", "hours"])
    ner = _fake_model(tmp_path / "ner", "BertForTokenClassification", ["O", "B-person", "I-person", "B-location"])
    with pytest.raises(InputError, match="primary model .* is an entity tagger: serve it as entity_model"):
        resolve_paths(AppArgs(model=str(ner)))
    with pytest.raises(InputError, match="canary model .* is an entity tagger"):
        resolve_paths(AppArgs(model=str(intent), canary_model=str(ner)))
    with pytest.raises(InputError, match="entity model .*intent' is not an entity tagger"):
        resolve_paths(AppArgs(model=str(intent), entity_model=str(intent)))
    assert resolve_paths(AppArgs(entity_model=str(ner))).entity_model == str(ner)
    playbook = tmp_path / "p.yaml"
    playbook.write_text(yaml.safe_dump({"intents": {"hours": {"reply": "{where} {who}",
                                                              "slots": {"where": "location", "who": "person"}}}}))
    args = AppArgs(model=str(intent), entity_model=str(ner), playbook=str(playbook))
    assert set(resolve_playbook(args)[0].intents) == {"hours"}
    playbook.write_text(yaml.safe_dump({"intents": {"hours": {"reply": "{x}", "slots": {"x": "product"}}}}))
    with pytest.raises(InputError, match=r"entity types \['product'\] .*it tags \['location', 'person'\]"):
        resolve_playbook(args)
    assert resolve_playbook(AppArgs(entity_model=str(ner)))[1].startswith("none (no intent model")


def test_deployment_options_live_in_the_yaml_not_in_the_decorators():
    from ray.serve.deployment import deployment_to_schema

    from serve_app.app import EntityServer, Ingress, ModelServer

    for deployment in (Ingress, ModelServer, EntityServer):
        assert deployment_to_schema(deployment).model_dump(exclude_unset=True).keys() == {"name"}, deployment.name


def test_resolve_paths_names_missing_folders_and_clashing_versions(tmp_path, monkeypatch):
    from serve_app.app import resolve_paths

    monkeypatch.chdir(tmp_path)
    for folder in ("ft", "other/ft"):
        _fake_model(tmp_path / folder)
    with pytest.raises(InputError, match="primary model folder 'nope' does not exist"):
        resolve_paths(AppArgs(model="nope"))
    with pytest.raises(InputError, match="canary model folder 'nope' does not exist"):
        resolve_paths(AppArgs(model="ft", canary_model="nope"))
    with pytest.raises(InputError, match="both called 'ft'"):
        resolve_paths(AppArgs(model="ft", canary_model="other/ft"))
    args = resolve_paths(AppArgs(model="ft", canary_model="other/ft", canary_version="v2", data="data",
                                 playbook="p.yaml"))
    assert (args.model, args.canary_model) == (str(tmp_path / "ft"), str(tmp_path / "other" / "ft"))
    assert (args.data, args.playbook) == (str(tmp_path / "data"), str(tmp_path / "p.yaml"))
    assert resolve_paths(AppArgs(model="ft", data="s3://bucket/data")).data == "s3://bucket/data"


def test_an_api_token_argument_travels_only_in_the_environment_of_a_cluster_started_here(monkeypatch):
    from serve_app.run import TOKEN_ENV, _hand_token_to_cluster

    monkeypatch.setenv(TOKEN_ENV, "")
    monkeypatch.setenv("SLIMRAY_RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match=f"set {TOKEN_ENV} in its environment"):
        _hand_token_to_cluster(SecretStr("tok-123"))
    monkeypatch.delenv("SLIMRAY_RAY_ADDRESS")
    _hand_token_to_cluster(SecretStr("tok-123"))
    assert os.environ[TOKEN_ENV] == "tok-123"


def test_direct_ingress_is_set_only_for_a_cluster_this_process_starts_and_can_be_turned_off(monkeypatch):
    import serve_app.run as run

    keys = [*run.direct_ingress_env(1), *run.SERVE_ENV]
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(run, "_direct_port", None)
    monkeypatch.setenv("SLIMRAY_RAY_ADDRESS", "ray://head:10001")
    run.apply_serve_env(8123)  # a running cluster keeps its own settings: its proxies serve the port
    assert run.DIRECT_INGRESS not in os.environ and run._direct_port is None
    assert all(os.environ[k] == v for k, v in run.SERVE_ENV.items())
    monkeypatch.delenv("SLIMRAY_RAY_ADDRESS")
    run.apply_serve_env(8123)
    assert os.environ[run.DIRECT_INGRESS] == "1" and run._direct_port == 8123
    assert (os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]
            ) == ("8123", "8124")  # Serve's range excludes its maximum: exactly the port
    monkeypatch.setattr(run, "_direct_port", None)
    monkeypatch.setenv(run.DIRECT_INGRESS, "0")
    run.apply_serve_env(8123)
    assert os.environ[run.DIRECT_INGRESS] == "0" and run._direct_port is None


# --- the real Serve graph (integration) ---------------------------------------------------------------------

def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Waits (bounded) until the server process writes ``text`` to its log; fails at once if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not logged (server exit status {proc.poll()}):\n{log.read_text()[-3000:]}")


@pytest.mark.integration
def test_slimray_serve_runs_the_yaml_app_until_ctrl_c(isolated_network, finetuned, sample_data, tmp_path):
    """`slimray serve` end to end, as a user runs it: its own embedded cluster, a bearer token given as a flag,
    the deployment options of the repo's YAML, direct ingress on the port; Ctrl-C (SIGINT) shuts it down
    quietly."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's cluster
    cmd = [str(Path(sys.executable).parent / "slimray"), "serve", "--model", str(finetuned), "--data",
           str(sample_data), "--port", str(port), "--api-token", "s3cret-token"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_line(log, f"at {url} (API docs", proc)  # logged once deploy() has the app running
        assert httpx.post(url + "/v1/assist", json={"message": "I lost my card"}, timeout=30).status_code == 401
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        r = httpx.post(url + "/v1/assist", json={"message": "I lost my card"}, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == Path(finetuned).name
        models = httpx.get(url + "/v1/models", headers=auth, timeout=30).json()
        (version,) = models["versions"]
        assert version["calibration"]["source"].startswith("computed")
        assert version["calibration"]["split"] == "validation"
        assert version["batching"] == {"max_batch_size": 64, "batch_wait_timeout_s": 0.0}  # the YAML's user_config
        # direct ingress: the ingress replica itself listens on the port, so no proxy hop
        assert f"Started HTTP server on port {port}" in log.read_text()
        assert parse_server_timing(r.headers["server-timing"]).keys() >= {"ingress", "hop", "forward", "batch"}
        # The ingress replica SIGKILLed while a client holds a keep-alive connection: the dead server's side of
        # it lingers on the port (FIN_WAIT), and the replacement must still bind it (serve_app.app.
        # rebindable_direct_ingress), or the endpoint is gone for good.
        import psutil

        with httpx.Client(headers=auth, timeout=30) as held:
            assert held.get(url + "/v1/models").status_code == 200
            (ingress,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                          if "ServeReplica:slimray:Ingress" in " ".join(p.cmdline())]
            ingress.kill()
            ingress.wait(30)
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(url + "/v1/models", headers=auth, timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the ingress did not come back:\n" + log.read_text()[-3000:]
                time.sleep(0.5)
        before_stop = len(log.read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "s3cret-token" not in log.read_text()
    stopping = log.read_text()[before_stop:]  # a quiet stop: Serve, then Ray, one line; no traceback
    assert "slimray serve: stopped" in stopping and "Traceback" not in stopping, stopping[-3000:]


# One replica per model on the session cluster's 2 CPUs: no graph test asserts autoscaling (the YAML test, test_cluster
# and `slimray serve` deploy the YAML's as they are), and a burst that scales both versions up asks for more CPUs
# than there are, leaving replicas pending and restarting while the next test redeploys.
PINNED = {name: {"num_replicas": 1, "autoscaling_config": None} for name in (MODEL, CANARY, ENTITY)}


@pytest.fixture(scope="module")
def graph_app(ray_session, finetuned, sample_data, tmp_path_factory):
    """The arguments of the graph with two versions: v1 (the fine-tuned model, calibrated at start-up on the
    sample's validation split) and v2 (a copy whose stored calibration never hands off for low confidence);
    Serve is shut down after the module."""
    from ray import serve

    canary = tmp_path_factory.mktemp("canary") / "model"
    shutil.copytree(finetuned, canary)
    write_calibration(canary, {"threshold": 0.0, "source_note": "test version: confident about everything"})
    args = {"model": str(finetuned), "version": "v1", "canary_model": str(canary), "canary_version": "v2",
            "data": str(sample_data), "max_texts": 8, "max_chars": 200, "routing": {"canary_fraction": 0.25}}
    yield AppArgs.model_validate(args), free_port()
    serve.shutdown()


@pytest.fixture
def graph(graph_app):
    """The graph, deployed by `serve_app.run.deploy` (the YAML's deployment options) before every test, so that
    no test depends on what an earlier one left: Serve leaves an unchanged config as it is."""
    from types import SimpleNamespace

    from serve_app.run import deploy

    args, port = graph_app
    return SimpleNamespace(url=deploy(args, port=port, deployments=PINNED), port=port)


def _sample_messages(n: int) -> list[str]:
    import pyarrow.csv as pacsv

    texts = pacsv.read_csv(SAMPLE / "test.csv").column("text").to_pylist()
    return [texts[i % len(texts)] for i in range(n)]


async def _post_all(url: str, path: str, bodies: list[dict], concurrency: int = 16, headers=None) -> list:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        async def one(body):
            async with sem:
                return await client.post(path, json=body)
        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.integration
def test_graph_with_a_local_primary_answers_single_texts_in_the_ingress_as_the_model_would(graph_app):
    """local_model: the ingress answers the primary's single texts from its own copy (no handle hop); several
    texts, and the canary's share, still go to the model deployments, with the same answers."""
    from serve_app.run import deploy

    args, port = graph_app
    url = deploy(args.model_copy(update={"local_model": True}), port=port, deployments=PINNED)
    texts = _sample_messages(24)
    singles = asyncio.run(_post_all(url, "/v1/classify", [{"texts": [t]} for t in texts]))
    assert all(r.status_code == 200 for r in singles)
    local = [r for r in singles if r.headers["x-model-replica"] == "ingress"]
    assert local and all(r.headers["x-model-version"] == "v1" for r in local)
    assert all(parse_server_timing(r.headers["server-timing"])["hop"] == 0 for r in local)
    assert any(r.headers["x-model-version"] == "v2" for r in singles)  # the canary's share: its deployment
    by_text = {t: r.json()["results"][0] for t, r in zip(texts, singles) if r.headers["x-model-replica"] == "ingress"}
    asked = list(by_text)[:2]
    pair = httpx.post(f"{url}/v1/classify", json={"texts": asked}, timeout=60)
    while pair.headers["x-model-version"] != "v1":  # a v1 answer from the Model deployment
        pair = httpx.post(f"{url}/v1/classify", json={"texts": asked}, timeout=60)
    assert pair.headers["x-model-replica"] != "ingress"
    for text, result in zip(asked, pair.json()["results"], strict=True):
        assert by_text[text]["label"] == result["label"]
        assert by_text[text]["score"] == pytest.approx(result["score"], abs=1e-4)


@pytest.mark.integration
def test_graph_classifies_and_describes_both_versions(graph):
    texts = _sample_messages(3)
    r = httpx.post(graph.url + "/v1/classify", json={"texts": texts, "top_k": 4}, timeout=30)
    assert r.status_code == 200, r.text
    labels = set(load_playbook(SAMPLE / "playbook.yaml").intents)
    results = r.json()["results"]
    assert len(results) == 3 and r.json()["model_version"] in ("v1", "v2")
    for res in results:
        scores = [t["score"] for t in res["top_k"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert res["label"] == res["top_k"][0]["label"] and {t["label"] for t in res["top_k"]} <= labels
    models = httpx.get(graph.url + "/v1/models", timeout=30).json()
    v1, v2 = models["versions"]
    assert (v1["version"], v1["role"], v1["traffic_fraction"]) == ("v1", "primary", 0.75)
    assert (v2["version"], v2["role"], v2["traffic_fraction"]) == ("v2", "canary", 0.25)
    assert v1["calibration"]["source"].startswith("computed") and 0 <= v1["calibration"]["threshold"] <= 1
    assert v1["calibration"]["target_precision"] == 0.9 and v1["calibration"]["n"] > 0
    assert v2["calibration"]["source"].startswith("stored") and v2["handoff_threshold"] == 0.0
    assert v1["backend"] == "torch" and v1["labels"] == len(labels)
    assert models["playbook"]["source"] == str(SAMPLE / "playbook.yaml")  # found through the model's lineage


@pytest.mark.integration
def test_graph_assist_honours_canary_fraction_playbook_and_handoff(graph):
    n = 240
    bodies = [{"message": m, "slots": {"customer_name": "Sam"}} for m in _sample_messages(n)]
    responses = asyncio.run(_post_all(graph.url, "/v1/assist", bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    answers = [r.json() for r in responses]
    assert all(r.headers["x-model-version"] == a["model_version"] for r, a in zip(responses, answers))
    canary = sum(a["model_version"] == "v2" for a in answers)
    # Binomial(240, 0.25): mean 60, sd 6.7; 4 sd either side. 0.5 or 0 would be far outside.
    assert 33 <= canary <= 87, canary
    playbook = load_playbook(SAMPLE / "playbook.yaml")
    v1_threshold = answers[[a["model_version"] for a in answers].index("v1")]["threshold"]
    for a in answers:
        entry = playbook.intents[a["intent"]]
        if a["model_version"] == "v2":  # threshold 0: the playbook answers, and hands off only by policy
            assert a["threshold"] == 0.0 and a["reply"] == entry.reply.replace("{intent}", a["intent"])
            assert (a["handoff"], a["handoff_reason"]) == (entry.handoff, "intent_policy" if entry.handoff else None)
        else:
            assert a["threshold"] == v1_threshold
            low = a["confidence"] < v1_threshold
            assert a["handoff"] == (low or entry.handoff)
            if low:
                assert a["handoff_reason"] == "low_confidence" and a["reply"] == playbook.default


def _serve_deploy(config: dict, path: Path) -> None:
    """`serve deploy` of a Serve config, as on a running cluster (same namespace, token auth)."""
    import os
    import subprocess
    import sys

    import ray

    path.write_text(yaml.safe_dump(config))
    dashboard = "http://" + ray._private.worker._global_node.webui_url
    serve_cli = Path(sys.executable).parent / "serve"
    done = subprocess.run([str(serve_cli), "deploy", str(path), "--address", dashboard], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _wait_for(url: str, predicate, timeout_s: float = 120):
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=10)
            if last.status_code == 200 and predicate(last.json()):
                return last.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}: {last.text[:500] if last is not None else 'no answer'}\n{_serve_status()}")


def _serve_status() -> str:
    """What Serve says of each app and deployment (a failed replica's constructor error is in its message)."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as e:  # the timeout is the error to report, not this
        return f"(serve.status() failed: {e!r})"
    lines = []
    for name, app in apps.items():
        lines.append(f"{name}: {app.status} {app.message}")
        lines += [f"  {d}: {s.status} {s.message}" for d, s in app.deployments.items()]
    return "\n".join(lines)


@pytest.mark.integration
@pytest.mark.parametrize("body, field", [
    ({"texts": []}, "texts"), ({"texts": ["  "]}, "texts[0]"), ({"texts": ["x" * 201]}, "texts[0]"),
    ({"texts": ["a"] * 9}, "texts"), ({"texts": [3]}, "texts[0]"), ({"message": "hi"}, "texts"),
])
def test_graph_rejects_bad_requests_with_a_json_4xx(graph, body, field):
    r = httpx.post(graph.url + "/v1/classify", json=body, timeout=30)
    assert r.status_code == 422 and any(d["field"] == field for d in r.json()["details"]), r.text
    r = httpx.post(graph.url + "/v1/assist", content=b'{"message": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["details"][0]["message"]


@pytest.mark.integration
def test_graph_fuzzed_from_openapi_never_answers_5xx(graph):
    import schemathesis

    fuzz_openapi(schemathesis.openapi.from_url(graph.url + "/openapi.json"), max_examples=120)


@pytest.mark.integration
def test_graph_exports_metrics_and_never_logs_request_texts(graph):
    import ray

    from serve_app.run import metrics_port

    secret = f"zq-{uuid.uuid4().hex}"  # a text that must appear in no log
    answers = [httpx.post(graph.url + "/v1/assist", json={"message": f"my card {secret} was stolen"}, timeout=30)
               for _ in range(3)]
    assert all(a.status_code == 200 for a in answers)
    expected = ["slimray_intents", "serve_num_http_requests", "serve_deployment_processing_latency_ms"]
    expected += ["slimray_handoffs"] if any(a.json()["handoff"] for a in answers) else []
    assert httpx.post(graph.url + "/v1/classify", json={"texts": [secret]}, timeout=30).status_code == 200
    url = f"http://127.0.0.1:{metrics_port()}/metrics"
    # The versions that answered: series of an app deployed earlier (other tests) may still be exported.
    labels = {f'model_version="{a.json()["model_version"]}"' for a in answers}
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # replicas push metrics to the node's agent every few seconds
        text = httpx.get(url, timeout=10).text
        if all(name in text for name in expected) and all(label in text for label in labels):
            break
        time.sleep(2)
    assert [name for name in expected if name not in text] == []
    assert 'model_version="v' in text and [label for label in labels if label not in text] == []
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    _wait_until_every_replica_logged_a_later_request(graph.url, logs)
    leaked = [p for p in logs.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []


def _wait_until_every_replica_logged_a_later_request(url: str, logs: Path, timeout_s: float = 120) -> None:
    """Sends marked requests until the proxy and every live replica of the app have logged one (Serve puts the
    x-request-id in each access-log line, replicas down the handle chain included): whatever each of them
    logged for the earlier requests is then in its file."""
    from ray.util.state import list_actors

    marker = f"marker-{uuid.uuid4().hex}"
    deadline, missing = time.monotonic() + timeout_s, None
    for i in range(1000):
        r = httpx.post(url + "/v1/classify", json={"texts": ["hello"]}, headers={"x-request-id": f"{marker}-{i}"},
                       timeout=30)
        assert r.status_code == 200
        alive = {a.name.rsplit("#", 1)[-1] for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                 if (a.name or "").startswith("SERVE_REPLICA::slimray#")}
        marked = [p.name for p in (logs / "serve").glob("*.log") if marker.encode() in p.read_bytes()]
        missing = [rid for rid in alive if not any(rid in name for name in marked)]
        missing += [] if any(name.startswith("proxy") for name in marked) else ["proxy"]
        if alive and not missing:
            return
        if time.monotonic() > deadline:
            break
    raise TimeoutError(f"no marked request in the logs of {missing}")


@pytest.mark.integration
def test_serve_deploy_of_the_repo_yaml_then_live_knobs_without_restart(graph, finetuned, sample_data, tmp_path):
    """The repo's Serve YAML (model paths swapped for the test model's) deploys with `serve deploy`; a second
    deploy that changes only user_config reconfigures the running replicas in place. It replaces the graph
    fixture's app, which the fixture deploys again for the next test."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": graph.port}  # Serve already runs here; keep it as is
    (app,) = config["applications"]
    app["args"].update(model=str(finetuned), data=str(sample_data), version="yaml-v1")
    _serve_deploy(config, tmp_path / "serve.yaml")
    models_url = graph.url + "/v1/models"
    before = _wait_for(models_url, lambda m: m["versions"][0]["version"] == "yaml-v1" and len(m["versions"]) == 1)
    deployments = {d["name"]: d for d in app["deployments"]}
    assert before["versions"][0]["batching"] == deployments[MODEL]["user_config"]
    deployments[INGRESS]["user_config"] = {"canary_fraction": 0.0, "handoff_threshold": 1.0}
    deployments[MODEL]["user_config"] = {"max_batch_size": 3, "batch_wait_timeout_s": 0.01}
    _serve_deploy(config, tmp_path / "serve.yaml")
    after = _wait_for(models_url, lambda m: m["routing"]["handoff_threshold"] == 1.0
                      and m["versions"][0]["batching"]["max_batch_size"] == 3)
    assert after["versions"][0]["replica"] == before["versions"][0]["replica"]  # reconfigured, not restarted
    answers = [r.json() for r in asyncio.run(_post_all(graph.url, "/v1/assist",
                                                      [{"message": m} for m in _sample_messages(10)]))]
    assert all(a["handoff_reason"] == "low_confidence" and a["threshold"] == 1.0 for a in answers)
    r = httpx.post(graph.url + "/v1/classify", json={"texts": _sample_messages(8)}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 8  # 8 texts through batches of 3


def _word_spans(text: str, entities: list[dict]) -> set[tuple[int, int, str]]:
    """(first word, end word, type) of served entities, mapped back onto ``split_words(text)``; each span must
    cover its words, less only quotes or brackets around them (``char_spans``)."""
    from jobs.tagging import _LEADING, _TRAILING, split_words

    words = split_words(text)
    out = set()
    for e in entities:
        assert text[e["start"]:e["end"]] == e["text"] and e["start"] < e["end"], e
        first = next(k for k, (_, s, t) in enumerate(words) if s <= e["start"] < t)
        last = next(k for k, (_, s, t) in enumerate(words) if s < e["end"] <= t)
        assert set(text[words[first][1]:e["start"]]) <= set(_LEADING), (text, e)
        assert set(text[e["end"]:words[last][2]]) <= set(_TRAILING), (text, e)
        out.add((first, last + 1, e["type"]))
    return out


@pytest.mark.integration
def test_graph_with_an_entity_model_tags_real_text_as_evaluate_does_and_fills_slots(graph_app, finetuned,
                                                                                   finetuned_tagger, tmp_path):
    """Both models deployed (`slimray serve --model --entity-model`): /v1/entities on WNUT-17's test sentences
    (emoji, URLs, @user, non-ASCII) sent as their tokens joined by spaces gives exact character offsets and
    the spans of `slimray evaluate`'s tags; /v1/assist carries the entities and fills the playbook slot."""
    from cluster.settings import get_settings
    from jobs.inference import load_inference_model
    from jobs.tagging import read_tagged, spans
    from serve_app.run import deploy

    labels = json.loads((Path(finetuned) / "config.json").read_text())["id2label"].values()
    playbook = tmp_path / "playbook.yaml"
    playbook.write_text(yaml.safe_dump({"intents": {label: {"reply": "At {place}.", "slots": {"place": "location"},
                                                            "fallback": "Which place?"} for label in labels}}))
    args = AppArgs(model=str(finetuned), entity_model=str(finetuned_tagger), entity_version="ner-v1",
                   playbook=str(playbook), default_threshold=0.0)
    url = deploy(args, port=graph_app[1], deployments=PINNED)  # replaces the graph fixture's app; it deploys again
    models = httpx.get(url + "/v1/models", timeout=30).json()
    assert (models["entity_model"]["version"], models["entity_model"]["role"]) == ("ner-v1", "entity")
    assert models["entity_model"]["backend"] == "torch" and len(models["versions"]) == 1

    r = httpx.post(url + "/v1/assist", json={"message": "is there a Monzo branch in Oslo?"}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["entity_model_version"] == "ner-v1", r.text
    places = [e for e in body["entities"] if e["type"] == "location"]
    assert places, body  # a training template: the tiny tagger knows it
    assert body["reply"] == f"At {max(places, key=lambda e: e['score'])['text']}."
    r = httpx.post(url + "/v1/assist", json={"message": "hello there"}, timeout=30)
    if not any(e["type"] == "location" for e in r.json()["entities"]):
        assert r.json()["reply"] == "Which place?"

    path = get_settings().data_root / "wnut17" / "test.conll"
    if not path.is_file():
        pytest.skip(f"WNUT-17 not found at {path}")
    sentences = [s.tokens for s in read_tagged(path) if s.tokens]
    texts = [" ".join(tokens) for tokens in sentences]
    assert any(ord(c) > 127 for t in texts for c in t) and any("http" in t for t in texts)
    served = []
    for i in range(0, len(texts), 64):
        r = httpx.post(url + "/v1/entities", json={"texts": texts[i:i + 64]}, timeout=120)
        assert r.status_code == 200, r.text[:500]
        served += [row["entities"] for row in r.json()["results"]]
    model = load_inference_model(finetuned_tagger)
    evaluated = [set(spans([model.labels[k] for k in w.argmax(-1)])) for w in model.tag(sentences)]
    got = [_word_spans(text, found) for text, found in zip(texts, served)]
    same = sum(g == e for g, e in zip(got, evaluated))
    assert sum(map(len, got)) > 0 and same >= 0.999 * len(texts), (same, len(texts))
