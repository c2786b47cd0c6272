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
                "p50_ms": float(np.percentile(lat, 50)) if n else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if n else float("nan")}


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
                      warmup_s: float = 0.0, timeout_s: float = 60.0) -> LoadResult:
    """Runs ``concurrency`` clients for ``warmup_s`` then ``duration_s`` (the measured window); cycles
    ``requests``. Clients send nothing after the window; what is in flight then still completes."""
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
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.window = (t_record, min(t_end, time.perf_counter()))
    return result
