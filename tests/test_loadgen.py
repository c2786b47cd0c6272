"""The serving benchmarks' load generator against a tiny in-process HTTP server (no Ray)."""

import asyncio
import json

from bench.loadgen import build_request, closed_loop, open_loop, open_loop_summary


async def serve_once(handler_delay: float, answered: list):
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                await asyncio.sleep(handler_delay)
                answered.append(1)
                body = json.dumps({"ok": True}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nx-model-replica: r1\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_open_loop_sends_on_schedule_whatever_the_server_does():
    async def run():
        answered: list = []
        server = await serve_once(0.05, answered)  # slower than the arrival gap: requests overlap
        port = server.sockets[0].getsockname()[1]
        body = build_request("/v1/classify", b'{"texts": ["hi"]}', port)
        result = await open_loop(port, [body], rate=40, duration_s=1.0, warmup_s=0.25)
        server.close()
        return result, answered

    result, answered = asyncio.run(run())
    assert len(result.samples) == 50 == len(answered)  # 40/s for 1.25 s, every request answered
    assert all(s.status == 200 and s.header == "r1" for s in result.samples)
    summary = open_loop_summary(result, 1, 40)
    assert summary["requests"] == 40 and summary["failed"] == 0 and summary["target_req_per_s"] == 40
    assert summary["p50_ms"] >= 50  # each answer waits the handler's 50 ms at least


def test_closed_loop_keeps_concurrency_clients_busy():
    async def run():
        answered: list = []
        server = await serve_once(0.0, answered)
        port = server.sockets[0].getsockname()[1]
        body = build_request("/v1/classify", b'{"texts": ["hi"]}', port)
        result = await closed_loop(port, [body], concurrency=4, duration_s=600, max_requests=200)  # bounded by count
        server.close()
        return result

    result = asyncio.run(run())
    assert len(result.samples) == 200 and result.failed() == 0
