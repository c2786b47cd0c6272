"""A smoke test of the served assistant: deploy the Serve graph, send real requests over HTTP, time them.

``slimray run`` calls it after choosing a model (``smoke_test`` for an intent model, ``smoke_test_entities``
for an entity tagger); it also works on its own against any model folder:

    from serve_app.smoke import serve_model, smoke_test
    with serve_model("runs/x/compress/chosen", "runs/x/data", port=8000) as url:
        print(smoke_test(url, texts, labels))

Latencies are client-side wall times of complete HTTP requests (JSON, ingress, model replica, response),
sent one at a time, so they show what one user waits for, not throughput under load (bench/serve.py).
``raw_baseline`` times the same texts through the same model in-process (tokenization + forward, one
thread like a replica), right after, so the cost of serving is a difference measured side by side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from typing import Any, Iterator, Sequence

log = logging.getLogger("slimray.serve")


@contextlib.contextmanager
def serve_model(model: str, data: str | None, port: int, host: str = "127.0.0.1", entity: bool = False,
                index: str | None = None, generator: str | None = None, max_new_tokens: int = 96) -> Iterator[str]:
    """Deploys the app of ``serve_app/serve_config.yaml`` for ``model`` (``serve_app.run.deploy``; as the entity
    model with ``entity``; with a knowledge index and a generator when given); yields its URL, and shuts Serve
    down on exit."""
    from ray import serve

    from serve_app.app import AppArgs
    from serve_app.run import deploy

    args = (AppArgs(entity_model=str(model)) if entity else
            AppArgs(model=str(model), data=str(data) if data else None, index=index, generator=generator,
                    max_new_tokens=max_new_tokens))
    url = deploy(args, host=host, port=port)
    try:
        yield url
    finally:
        serve.shutdown()


def raw_baseline(model_dir: str, texts: Sequence[str], requests: int, batch_requests: int,
                 batch_size: int = 32, threads: int = 1) -> dict[str, float]:
    """The smoke test's texts, in the same order, through the model in this process: p50 ms per single
    text and texts/s for the same 32-text chunks (tokenization included, as in a replica; a tagger's words
    split and its spans built, as its replica does)."""
    from jobs.inference import load_inference_model

    model = load_inference_model(model_dir, threads=threads)
    run = model.entities if model.kind == "tagging" else model.logits
    run([texts[0]])  # warm-up
    single = []
    for i in range(requests):
        t0 = time.perf_counter()
        run([texts[i % len(texts)]], batch_size=1)
        single.append(1000 * (time.perf_counter() - t0))
    spent, sent = 0.0, 0
    for chunk in _chunks(texts, batch_requests, batch_size):
        t0 = time.perf_counter()
        run(list(chunk), batch_size=batch_size)
        spent += time.perf_counter() - t0
        sent += len(chunk)
    return {"raw_single_p50_ms": statistics.median(single), "raw_texts_per_s": sent / spent}


def _chunks(texts: Sequence[str], count: int, size: int) -> list[Sequence[str]]:
    """``count`` windows of ``size`` texts, walking through the texts (wrapping around)."""
    return [texts[start:start + size] for start in
            ((i * size) % max(1, len(texts) - size + 1) for i in range(count))]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def smoke_test(url: str, texts: Sequence[str], labels: Sequence[str], requests: int = 30,
               batch_requests: int = 5, batch_size: int = 32, timeout_s: float = 60.0) -> dict[str, Any]:
    """Sends ``requests`` single messages to /v1/assist and ``batch_requests`` batches to /v1/classify.

    Every response must be 200 with a known label; anything else raises with the status and body.

    Returns:
        Latency percentiles (ms), the served accuracy on the texts sent, the hand-off rate, counts.
    """
    import requests as http

    session = http.Session()

    def post(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        response = session.post(url + path, json=body, timeout=timeout_s)
        elapsed = 1000 * (time.perf_counter() - t0)
        if response.status_code != 200:
            raise RuntimeError(f"smoke test: POST {path} answered {response.status_code}: {response.text[:300]}")
        return response.json(), elapsed

    if len(texts) < batch_size:
        raise ValueError(f"the smoke test needs at least {batch_size} texts, got {len(texts)}")
    post("/v1/assist", {"message": texts[0]})  # first request: connections, lazy imports; not timed
    single, correct, handoffs = [], 0, 0
    for i in range(requests):
        j = i % len(texts)
        body, ms = post("/v1/assist", {"message": texts[j]})
        single.append(ms)
        correct += body["intent"] == labels[j]
        handoffs += bool(body["handoff"])
    batched, batch_correct, sent = [], 0, 0
    label_chunks = _chunks(labels, batch_requests, batch_size)
    for chunk, chunk_labels in zip(_chunks(texts, batch_requests, batch_size), label_chunks):
        body, ms = post("/v1/classify", {"texts": list(chunk)})
        batched.append(ms)
        batch_correct += sum(r["label"] == want for r, want in zip(body["results"], chunk_labels))
        sent += len(chunk)
    result = {
        "url": url,
        "assist_requests": requests,
        "assist_p50_ms": statistics.median(single),
        "assist_p95_ms": _percentile(single, 95),
        "assist_accuracy": correct / requests,
        "handoff_rate": handoffs / requests,
        "classify_requests": batch_requests,
        "classify_batch_size": batch_size,
        "classify_p50_ms": statistics.median(batched),
        "classify_texts_per_s": sent / (sum(batched) / 1000),
        "classify_accuracy": batch_correct / sent,
    }
    log.info("smoke test: /v1/assist p50 %.1f ms, p95 %.1f ms; /v1/classify (%d texts) p50 %.1f ms; "
             "served accuracy %.3f", result["assist_p50_ms"], result["assist_p95_ms"], batch_size,
             result["classify_p50_ms"], result["classify_accuracy"])
    return result


def smoke_test_entities(url: str, model_dir: str, texts: Sequence[str], requests: int = 30, batch_requests: int = 5,
                        batch_size: int = 32, timeout_s: float = 60.0) -> dict[str, Any]:
    """Sends ``requests`` single texts and ``batch_requests`` batches to /v1/entities, and checks every answer
    against the same model in this process (``InferenceModel.entities``): spans, types and texts must agree.

    Returns:
        Latency percentiles (ms), texts/s of the batches, entities found and the share of texts whose served
        entities equal the in-process ones (``served_agreement``).
    """
    import requests as http

    from jobs.inference import load_inference_model

    if len(texts) < batch_size:
        raise ValueError(f"the smoke test needs at least {batch_size} texts, got {len(texts)}")
    session = http.Session()
    model = load_inference_model(model_dir, threads=1)

    def post(chunk: Sequence[str]) -> tuple[list[list[dict[str, Any]]], float]:
        t0 = time.perf_counter()
        response = session.post(url + "/v1/entities", json={"texts": list(chunk)}, timeout=timeout_s)
        elapsed = 1000 * (time.perf_counter() - t0)
        if response.status_code != 200:
            raise RuntimeError(f"smoke test: POST /v1/entities answered {response.status_code}: {response.text[:300]}")
        return [row["entities"] for row in response.json()["results"]], elapsed

    def key(found: list[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
        return [(e["start"], e["end"], e["type"], e["text"]) for e in found]

    post(texts[:1])  # first request: connections, lazy imports; not timed
    single, batched, served, sent_texts = [], [], [], []
    for i in range(requests):
        chunk = [texts[i % len(texts)]]
        found, ms = post(chunk)
        single.append(ms)
        served += found
        sent_texts += chunk
    sent = 0
    for chunk in _chunks(texts, batch_requests, batch_size):
        found, ms = post(chunk)
        batched.append(ms)
        served += found
        sent_texts += list(chunk)
        sent += len(chunk)
    expected = model.entities(sent_texts)
    agree = sum(key(a) == key(b) for a, b in zip(served, expected))
    result = {
        "url": url,
        "entities_requests": requests,
        "entities_p50_ms": statistics.median(single),
        "entities_p95_ms": _percentile(single, 95),
        "entities_batch_requests": batch_requests,
        "entities_batch_size": batch_size,
        "entities_batch_p50_ms": statistics.median(batched),
        "entities_texts_per_s": sent / (sum(batched) / 1000),
        "entities_found": sum(len(f) for f in served),
        "texts_checked": len(sent_texts),
        "served_agreement": agree / len(sent_texts),
    }
    log.info("smoke test: /v1/entities p50 %.1f ms (1 text), %.0f texts/s (%d texts); %d entities, served = "
             "in-process on %.3f of texts", result["entities_p50_ms"], result["entities_texts_per_s"], batch_size,
             result["entities_found"], result["served_agreement"])
    return result


def smoke_test_knowledge(url: str, questions: Sequence[str], timeout_s: float = 300.0) -> dict[str, Any]:
    """Sends each question to ``/v1/assist?stream=true`` and reads the server-sent events: where each answer
    came from (playbook, generated, hand-off), its citations, the time to its first ``token`` event and to
    ``done``. Every response must be 200 and end with a ``done`` event."""
    import requests as http

    rows = []
    for question in questions:
        t0, first, done = time.perf_counter(), None, None
        with http.post(f"{url}/v1/assist", params={"stream": "true"}, json={"message": question}, stream=True,
                       timeout=timeout_s) as response:
            if response.status_code != 200:
                raise RuntimeError(f"smoke test: POST /v1/assist?stream=true answered {response.status_code}: "
                                   f"{response.text[:300]}")
            event = None
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "token":
                    first = first or time.perf_counter()
                elif line.startswith("data: ") and event == "done":
                    done = json.loads(line.removeprefix("data: "))
        if done is None:
            raise RuntimeError(f"smoke test: the stream for {question!r} ended without a done event")
        rows.append({"question": question, "source": done["source"], "reply": done["reply"],
                     "citations": [c["id"] for c in done["citations"]], "intent": done["intent"],
                     "first_token_ms": 1000 * ((first or time.perf_counter()) - t0),
                     "done_ms": 1000 * (time.perf_counter() - t0)})
    sources = [r["source"] for r in rows]
    generated = [r for r in rows if r["source"] == "generated"]
    result = {"questions": len(rows), **{f"{s}_answers": sources.count(s) for s in ("playbook", "generated", "handoff")},
              "generated_first_token_p50_ms": statistics.median(r["first_token_ms"] for r in generated)
              if generated else None, "answers": rows}
    log.info("smoke test of the knowledge path: %d questions: %d generated, %d playbook, %d hand-off",
             len(rows), result["generated_answers"], result["playbook_answers"], result["handoff_answers"])
    return result
