"""Closed-loop HTTP load for the serving benchmarks: N clients, each sending its next request as soon as the
previous answer arrives, over keep-alive HTTP/1.1 to 127.0.0.1. Bounded by time and by request count.

A bare asyncio client (no HTTP library) so that the load generator costs the 2-core machine little; a
response header can be recorded per request (the serving benchmarks record ``x-model-replica``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    start: float  # perf_counter seconds
    latency: float  # seconds
    status: int  # HTTP status, 0 for a connection error
    header: str = ""  # value of the recorded header


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)  # every request, warm-up and tail included
    window: tuple[float, float] = (0.0, 0.0)  # measured (perf_counter start, end)

    @property
    def wall_s(self) -> float:
        return self.window[1] - self.window[0]

    def measured(self) -> list[Sample]:
        """Requests that completed inside the window (whenever they started): a closed loop's throughput."""
        return [s for s in self.samples if self.window[0] <= s.start + s.latency <= self.window[1]]

    def ok(self) -> list[Sample]:
        return [s for s in self.measured() if s.status == 200]

    def failed(self) -> int:
        """Failed requests over the whole run, warm-up and tail included."""
        return sum(s.status != 200 for s in self.samples)

    def summary(self, texts_per_request: int) -> dict[str, float]:
        lat = np.array([s.latency for s in self.ok()]) * 1000
        n = len(lat)
        return {"requests": len(self.samples), "failed": self.failed(),
                "req_per_s": n / self.wall_s if self.wall_s else 0.0,
                "texts_per_s": n * texts_per_request / self.wall_s if self.wall_s else 0.0,
                **{f"p{q}_ms": float(np.percentile(lat, q)) if n else float("nan") for q in (50, 95, 99)}}


def open_loop_summary(result: LoadResult, texts_per_request: int, rate: float) -> dict[str, float]:
    """An open loop's figures: the target rate, the rate answered inside the window (achieved), and the
    latency percentiles of every request scheduled in the window, late answers included (a failed or
    unanswered one counts in ``failed``)."""
    lo, hi = result.window
    scheduled = [s for s in result.samples if lo <= s.start < hi]
    ok = [s for s in scheduled if s.status == 200]
    lat = np.array([s.latency for s in ok]) * 1000
    done_in_window = sum(1 for s in ok if s.start + s.latency <= hi)
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 95, 99)}
    return {"target_req_per_s": rate, "achieved_req_per_s": done_in_window / (hi - lo) if hi > lo else 0.0,
            "texts_per_s": done_in_window * texts_per_request / (hi - lo) if hi > lo else 0.0,
            "requests": len(scheduled), "failed": len(scheduled) - len(ok), **pct}


def build_request(path: str, body: bytes, port: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader, header: str) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, fields.get(header, "")


async def closed_loop(port: int, requests: list[bytes], concurrency: int, duration_s: float,
                      max_requests: int = 1_000_000, record_header: str = "x-model-replica",
                      warmup_s: float = 0.0, timeout_s: float = 60.0, honor_retry_after: bool = False) -> LoadResult:
    """Runs ``concurrency`` clients for ``warmup_s`` then ``duration_s`` (the measured window); cycles
    ``requests``. Clients send nothing after the window; what is in flight then still completes. With
    ``honor_retry_after`` (and ``record_header="retry-after"``), a client answered 503 waits the seconds the
    server asked for before its next request, as a well-behaved HTTP client does."""
    result = LoadResult()
    pool = itertools.cycle(requests)
    t_start = time.perf_counter()
    t_record = t_start + warmup_s
    t_end = t_record + duration_s
    sent = 0

    async def client() -> None:
        nonlocal sent
        reader = writer = None
        while time.perf_counter() < t_end and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(next(pool))
                status, value = await asyncio.wait_for(_read_response(reader, record_header), timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                status, value = 0, ""
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)  # a refused connection would otherwise spin
            result.samples.append(Sample(t0, time.perf_counter() - t0, status, value))
            if honor_retry_after and status == 503 and value.isdigit():
                await asyncio.sleep(min(float(value), max(0.0, t_end - time.perf_counter())))
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.window = (t_record, min(t_end, time.perf_counter()))
    return result


async def open_loop(port: int, requests: list[bytes], rate: float, duration_s: float, warmup_s: float = 0.0,
                    record_header: str = "x-model-replica", timeout_s: float = 60.0,
                    max_connections: int = 512) -> LoadResult:
    """Sends requests at a fixed arrival rate (``rate`` per second, evenly spaced) whatever the answers do,
    over a pool of keep-alive connections (one request in flight per connection, a new connection when all
    are busy, up to ``max_connections``). Each latency counts from the request's scheduled time, so a
    server that falls behind is charged for the queue it builds (no coordinated omission).

    The measured window is ``[warmup_s, warmup_s + duration_s]`` after the start; requests scheduled in it
    are measured (``LoadResult.measured`` takes those that also completed in it: the achieved rate)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    result = LoadResult()
    pool = itertools.cycle(requests)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    open_count = 0
    t_start = time.perf_counter()
    t_record, t_end = t_start + warmup_s, t_start + warmup_s + duration_s
    tasks = []

    async def one(scheduled: float, body: bytes) -> None:
        nonlocal open_count
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                if open_count >= max_connections:
                    raise OSError("connection limit reached")
                open_count += 1
                conn = await asyncio.open_connection("127.0.0.1", port)
            conn[1].write(body)
            status, value = await asyncio.wait_for(_read_response(conn[0], record_header), timeout_s)
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            status, value = 0, ""
            if conn is not None:
                conn[1].close()
                open_count -= 1
        result.samples.append(Sample(scheduled, time.perf_counter() - scheduled, status, value))

    i = 0
    while True:
        scheduled = t_start + i / rate
        if scheduled >= t_end:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, next(pool))))
        i += 1
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    result.window = (t_record, t_end)
    return result
