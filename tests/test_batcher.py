"""serve_app.batcher.Batcher: batches form from what queued during the previous forward, a lone request starts
at once, sizes and errors are kept per batch; and the Server-Timing values the graph answers with."""

import asyncio
import threading

import pytest

from serve_app.api import parse_server_timing, server_timing
from serve_app.batcher import Batcher


class GatedRun:
    """A forward pass that records its batches and, while ``gate`` is closed, blocks (as a long forward would)."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, texts):
        self.batches.append(list(texts))
        self.started.set()
        self.gate.wait(timeout=30)
        if "boom" in texts:
            raise ValueError("bad text in batch")
        return [t.upper() for t in texts]


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


def test_a_lone_request_starts_at_once_in_a_batch_of_its_own():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=8)
        return await batcher.submit(["hello"])

    result = asyncio.run(main())
    assert result.rows == ["HELLO"] and result.batch == 1
    assert run.batches == [["hello"]]


def test_requests_that_queue_during_a_forward_share_the_next_one_in_order():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=8)
        run.gate.clear()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await _until(run.started)  # the first forward runs (and blocks) with "a" alone
        rest = [asyncio.ensure_future(batcher.submit([f"t{i}", f"u{i}"])) for i in range(3)]
        await asyncio.sleep(0.01)  # they queue behind the running forward
        run.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert run.batches == [["a"], ["t0", "u0", "t1", "u1", "t2", "u2"]]
    assert first.batch == 1 and [r.batch for r in rest] == [6, 6, 6]
    assert [r.rows for r in rest] == [["T0", "U0"], ["T1", "U1"], ["T2", "U2"]]
    assert len({r.started for r in rest}) == 1 and rest[0].started >= first.started + first.forward_s


def test_a_batch_never_exceeds_max_batch_size_and_never_splits_a_request():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=4)
        run.gate.clear()
        head = asyncio.ensure_future(batcher.submit(["x"]))
        await _until(run.started)
        queued = [asyncio.ensure_future(batcher.submit(texts)) for texts in (["a", "b", "c"], ["d", "e"], ["f"])]
        await asyncio.sleep(0.01)
        run.gate.set()
        await head
        return await asyncio.gather(*queued)

    results = asyncio.run(main())
    assert run.batches[1:] == [["a", "b", "c"], ["d", "e", "f"]]
    assert [r.batch for r in results] == [3, 3, 3]
    with pytest.raises(ValueError, match="max_batch_size=4 texts, got 5"):
        asyncio.run(Batcher(run, max_batch_size=4).submit(list("abcde")))


def test_a_failing_forward_fails_its_own_batch_only():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=8)
        run.gate.clear()
        head = asyncio.ensure_future(batcher.submit(["boom"]))
        await _until(run.started)
        partner = asyncio.ensure_future(batcher.submit(["fine"]))
        await asyncio.sleep(0.01)
        run.gate.set()
        with pytest.raises(ValueError, match="bad text"):
            await head
        return await partner, await batcher.submit(["later"])

    partner, later = asyncio.run(main())
    assert partner.rows == ["FINE"] and later.rows == ["LATER"]


def test_a_cancelled_request_leaves_the_queue_without_a_forward():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=8)
        run.gate.clear()
        head = asyncio.ensure_future(batcher.submit(["head"]))
        await _until(run.started)
        gone = asyncio.ensure_future(batcher.submit(["gone"]))
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        run.gate.set()
        await head
        return await kept

    assert asyncio.run(main()).rows == ["KEPT"]
    assert run.batches == [["head"], ["kept"]]


def test_batch_wait_lets_a_small_batch_gather_company():
    run = GatedRun()

    async def main():
        batcher = Batcher(run, max_batch_size=8, batch_wait_s=0.2)
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0)  # the batch has started waiting for company
        second = asyncio.ensure_future(batcher.submit(["b"]))
        return await first, await second

    first, second = asyncio.run(main())
    assert run.batches == [["a", "b"]] and first.batch == second.batch == 2
    with pytest.raises(ValueError, match="batch_wait_s must be >= 0"):
        Batcher(run, batch_wait_s=-1)


def test_server_timing_round_trips_and_ignores_what_it_does_not_know():
    value = server_timing({"hop_ms": 1.234, "queue_ms": 0.5, "forward_ms": 12.0, "batch": 7, "model_ms": 13})
    assert value == 'hop;dur=1.23, queue;dur=0.50, forward;dur=12.00, batch;desc="7"'
    assert parse_server_timing(value + ", ingress;dur=20.5, cache;desc=hit-or-miss") == {
        "hop": 1.23, "queue": 0.5, "forward": 12.0, "batch": 7.0, "ingress": 20.5}


def test_calls_to_another_process_run_concurrently_and_carry_what_queued_while_every_slot_was_busy():
    """The ingress's dispatcher: an async ``run`` (a model deployment's method), ``concurrency`` calls at once."""
    calls: list[list[str]] = []
    release: list[asyncio.Event] = []
    most = 0

    async def run(texts):
        nonlocal most
        calls.append(list(texts))
        gate = asyncio.Event()
        release.append(gate)
        most = max(most, batcher.in_flight)
        await gate.wait()
        if "boom" in texts:
            raise ValueError("the replica failed")
        return [t.upper() for t in texts]

    async def until(n):
        while len(calls) < n:
            await asyncio.sleep(0)

    async def main():
        lone = []
        for n, text in enumerate(("a", "b"), 1):  # two lone requests: two calls at once, neither waits
            lone.append(asyncio.ensure_future(batcher.submit([text])))
            await until(n)
        queued = [asyncio.ensure_future(batcher.submit([t])) for t in ("c", "d", "e")]
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(calls) == 2  # every slot busy: they queue
        release[0].set()  # one call ends: the next carries everything queued
        await until(3)
        release[1].set()
        await lone[1]
        failing = asyncio.ensure_future(batcher.submit(["boom"]))
        await until(4)  # a slot is free again: it starts alone
        for gate in release:
            gate.set()
        results = await asyncio.gather(*lone, *queued)
        with pytest.raises(ValueError, match="the replica failed"):
            await failing
        return results

    batcher = Batcher(run, max_batch_size=8, concurrency=2)
    results = asyncio.run(main())
    assert calls == [["a"], ["b"], ["c", "d", "e"], ["boom"]] and most == 2
    assert [r.rows for r in results] == [["A"], ["B"], ["C"], ["D"], ["E"]]
    assert [r.batch for r in results] == [1, 1, 3, 3, 3]
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        Batcher(run, concurrency=0)


def test_a_call_runs_in_its_first_requests_context():
    """Serve keeps the request id in a context variable: a coalesced call must carry its first request's id
    to the model replica (and its logs), not the id of whichever request started the batcher."""
    import contextvars

    request_id = contextvars.ContextVar("request_id", default=None)
    seen: list[tuple[str, list[str]]] = []

    async def run(texts):
        seen.append((request_id.get(), list(texts)))
        return texts

    async def send(rid, text):
        request_id.set(rid)
        return await batcher.submit([text])

    async def main():
        for i in range(3):  # one after another: each call alone, each in its own request's context
            await send(f"r{i}", f"t{i}")

    batcher = Batcher(run, max_batch_size=8, concurrency=2)
    asyncio.run(main())
    assert seen == [("r0", ["t0"]), ("r1", ["t1"]), ("r2", ["t2"])]
