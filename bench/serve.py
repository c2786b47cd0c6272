"""Serving benchmark, side by side in one run on the same CPU budget (--threads torch threads each, default 1:
with 2 threads on a 2-core machine that anything else uses, OpenMP's barriers made batch-1 latency 290 ms):

1. raw: the model's own batched forward (tokenization included) in this process: the limit;
2. plain: a single-process FastAPI/uvicorn server with the same loader and threads, no batching (what a user
   would write instead; a sync route that FastAPI runs in its thread pool, and an async route that runs the
   forward on the event loop: both are measured and the better one is compared against); and the same
   server with an in-process micro-batcher (one task drains whatever requests are queued into one
   length-grouped forward, off the event loop: the strongest simple alternative);
3. serve: the slimray Serve graph (ingress + batched model replicas): 1 replica x threads (and, with
   threads > 1, as many 1-thread replicas).

Closed-loop load to 127.0.0.1 (bench/loadgen.py) at concurrency 1, 8, 32 and 64, with 1-text and 32-text
requests; texts/s, req/s, p50 and p99 for each. Run it in a loopback-only namespace on this machine:

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/serve.py'
    .venv/bin/python bench/serve.py --model runs/b77/ft --duration-s 5      # any model artifact

Uses the fine-tuned BANKING77 model at <storage_root>/bench/b77-ft when it exists (bench/finetune.py).
Writes <storage_root>/bench/serve.json. Last line: ``serve_single_c32_vs_plain: <ratio>``.
"""

# No `from __future__ import annotations`: FastAPI must see the plain server's local Body class itself.
import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.loadgen import build_request, closed_loop  # noqa: E402
from cluster.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32, 64)
TEXTS_PER_REQUEST = (1, 32)


def bench_texts(n: int = 512) -> list[str]:
    """BANKING77 test queries when the reference data is there, else the built-in sample's."""
    import pyarrow.csv as pacsv

    path = get_settings().data_root / "banking77" / "test.csv"
    if not path.is_file():
        path = REPO / "jobs" / "samples" / "harbor_bank" / "test.csv"
    texts = pacsv.read_csv(path).column("text").to_pylist()
    return [texts[i % len(texts)] for i in range(n)]


def raw_forward(model_dir: str, threads: int, texts: list[str], seconds: float) -> dict[str, float]:
    """Batch-1 latency and batch-32 throughput of the model itself (tokenization + forward)."""
    from jobs.inference import load_inference_model

    model = load_inference_model(model_dir, threads=threads)
    model.logits(texts[:32], batch_size=32)
    lat = []
    t_end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end or len(lat) < 20:
        t0 = time.perf_counter()
        model.logits([texts[i % len(texts)]], batch_size=1)
        lat.append(time.perf_counter() - t0)
        i += 1
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done < 5 * 32:
        start = (done // 32 * 32) % (len(texts) - 32)
        model.logits(texts[start:start + 32], batch_size=32)
        done += 32
    texts_per_s = done / (time.perf_counter() - t0)
    del model
    gc.collect()
    return {"batch1_p50_ms": float(np.median(lat) * 1000), "batch32_texts_per_s": texts_per_s}


def plain_server_main(model_dir: str, port: int, threads: int, mode: str) -> None:
    """What a user writes without Serve: one uvicorn process, the same loader, no batching."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from jobs.inference import load_inference_model, softmax

    model = load_inference_model(model_dir, threads=threads)  # forward runs under torch.inference_mode
    labels = model.labels
    app = FastAPI()

    class Body(BaseModel):
        texts: list[str]

    def answer(body: Body) -> dict:
        probs = softmax(model.logits(body.texts, batch_size=len(body.texts)))
        return {"results": [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in probs]}

    if mode == "microbatch":  # the strongest simple alternative: one batcher drains whatever is queued
        queue: asyncio.Queue = asyncio.Queue()

        async def batcher() -> None:
            while True:
                items = [await queue.get()]
                while not queue.empty() and sum(len(t) for t, _ in items) < 64:
                    items.append(queue.get_nowait())
                texts = [t for chunk, _ in items for t in chunk]
                try:  # off the event loop, so that requests keep queueing meanwhile
                    probs = softmax(await asyncio.to_thread(model.logits, texts, len(texts), True))
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for _, future in items:
                        future.set_exception(e)
                    continue
                start = 0
                for chunk, future in items:
                    rows = probs[start:start + len(chunk)]
                    start += len(chunk)
                    future.set_result({"results": [{"label": labels[int(r.argmax())], "score": float(r.max())}
                                                   for r in rows]})

        @app.on_event("startup")
        async def start_batcher() -> None:
            app.state.batcher = asyncio.create_task(batcher())

        @app.post("/v1/classify")
        async def classify(body: Body) -> dict:
            future = asyncio.get_running_loop().create_future()
            await queue.put((body.texts, future))
            return await future
    elif mode == "sync":
        @app.post("/v1/classify")
        def classify(body: Body) -> dict:  # FastAPI runs it in its thread pool
            return answer(body)
    else:
        @app.post("/v1/classify")
        async def classify(body: Body) -> dict:  # one forward at a time, on the event loop
            return answer(body)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_http(port: int, timeout_s: float = 180, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"texts": ["warm up"]}, timeout=5)
            if r.status_code == 200:
                return
            raise RuntimeError(f"port {port} answers {r.status_code}: {r.text[:300]}")
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answers on port {port}")


def load_points(port: int, texts: list[str], duration_s: float, warmup_s: float) -> list[dict]:
    rows = []
    for per_request in TEXTS_PER_REQUEST:
        requests = [build_request("/v1/classify", json.dumps({"texts": texts[i:i + per_request]}).encode(), port)
                    for i in range(0, len(texts) - per_request, max(1, per_request // 4))][:256]
        for concurrency in CONCURRENCY:
            result = asyncio.run(closed_loop(port, requests, concurrency, duration_s, warmup_s=warmup_s))
            rows.append({"texts_per_request": per_request, "concurrency": concurrency,
                         **result.summary(per_request)})
            print(f"    {per_request:>2} texts x c={concurrency:<2}  {rows[-1]['req_per_s']:8.1f} req/s  "
                  f"{rows[-1]['texts_per_s']:8.1f} texts/s  p50 {rows[-1]['p50_ms']:7.1f} ms  "
                  f"p99 {rows[-1]['p99_ms']:7.1f} ms  failed {rows[-1]['failed']}", flush=True)
    return rows


def run_plain(model_dir: str, threads: int, mode: str, port: int, texts, duration_s, warmup_s) -> list[dict]:
    proc = subprocess.Popen([sys.executable, __file__, "--plain-server", mode, "--model", model_dir,
                             "--port", str(port), "--threads", str(threads)], cwd=REPO)
    try:
        wait_http(port, proc=proc)
        return load_points(port, texts, duration_s, warmup_s)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_serve(model_dir: str, configs: list[tuple[int, int]], port: int, texts, duration_s, warmup_s) -> dict:
    from ray import serve

    from cluster.ray_env import connect
    from serve_app.app import MODEL, AppArgs
    from serve_app.run import apply_serve_env, deploy

    apply_serve_env()
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray renices its workers by +15: not the plain server's
    connect()
    out = {}
    try:
        for replicas, threads in configs:  # the YAML's deployment options, with a fixed replica count
            deploy(AppArgs(model=model_dir, threads=threads), port=port,
                   deployments={MODEL: {"num_replicas": replicas, "autoscaling_config": None}})
            wait_http(port)
            name = f"serve {replicas}x{threads}"
            print(f"  {name}", flush=True)
            out[name] = load_points(port, texts, duration_s, warmup_s)
            serve.delete("slimray")
    finally:
        serve.shutdown()
    return out


def row(rows: list[dict], per_request: int, concurrency: int) -> dict:
    return next(r for r in rows if r["texts_per_request"] == per_request and r["concurrency"] == concurrency)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model artifact (default: <storage_root>/bench/b77-ft)")
    p.add_argument("--threads", type=int, default=1, help="CPU budget: torch threads of every contender")
    p.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per load point")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each load point")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--plain-server", choices=["sync", "async", "microbatch"], help=argparse.SUPPRESS)
    p.add_argument("--serve-only", action="store_true", help="measure the Serve graph alone (trying a setting; "
                   "the ratios need the full run)")
    args = p.parse_args()
    if args.plain_server:
        return plain_server_main(args.model, args.port, args.threads, args.plain_server)

    storage = Path(get_settings().storage_root)
    model_dir = args.model or str(storage / "bench" / "b77-ft")
    if not Path(model_dir).is_dir():
        raise SystemExit(f"model {model_dir!r} not found: run bench/finetune.py first or pass --model")
    model_dir = str(Path(model_dir).resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = bench_texts()
    print(f"model {model_dir}; {args.threads} threads per contender; {os.cpu_count()} CPUs; "
          f"load average before: {os.getloadavg()}", flush=True)

    print("  raw forward", flush=True)
    raw = raw_forward(model_dir, args.threads, texts, seconds=args.duration_s)
    print(f"    batch-1 p50 {raw['batch1_p50_ms']:.2f} ms; batch-32 {raw['batch32_texts_per_s']:.1f} texts/s")
    plain = {}
    for mode in () if args.serve_only else ("sync", "async", "microbatch"):
        print(f"  plain uvicorn ({mode} route)", flush=True)
        plain[f"plain {mode}"] = run_plain(model_dir, args.threads, mode, args.port + 1, texts, args.duration_s,
                                           args.warmup_s)
    configs = list(dict.fromkeys([(1, args.threads), (args.threads, 1)]))  # (replicas, threads per replica)
    serve_rows = run_serve(model_dir, configs, args.port, texts, args.duration_s, args.warmup_s)

    systems = {**plain, **serve_rows}
    print(f"\n{'system':<14} {'texts/req':>9} {'conc':>4} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'failed':>6}")
    for name, rows in systems.items():
        for r in rows:
            print(f"{name:<14} {r['texts_per_request']:>9} {r['concurrency']:>4} {r['req_per_s']:>8.1f} "
                  f"{r['texts_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['failed']:>6}")
    print(f"{'raw forward':<14} {'32':>9} {'-':>4} {'':>8} {raw['batch32_texts_per_s']:>8.1f} "
          f"(batch-1 latency {raw['batch1_p50_ms']:.2f} ms)")

    if args.serve_only:
        return
    plain_single = max(row(plain[f"plain {m}"], 1, 32)["req_per_s"] for m in ("sync", "async"))
    micro_single = row(plain["plain microbatch"], 1, 32)["req_per_s"]
    goals = {}
    for name, rows in serve_rows.items():
        batched = max(row(rows, 32, c)["texts_per_s"] for c in CONCURRENCY)
        goals[name] = {
            "req_per_s_single_c32_vs_plain": row(rows, 1, 32)["req_per_s"] / plain_single,
            "req_per_s_single_c32_vs_microbatch": row(rows, 1, 32)["req_per_s"] / micro_single,
            "p50_c1_minus_model_batch1_ms": row(rows, 1, 1)["p50_ms"] - raw["batch1_p50_ms"],
            "texts_per_s_32_text_requests_vs_raw": batched / raw["batch32_texts_per_s"],
        }
    ceiling = 2 * 1000 / raw["batch1_p50_ms"] if args.threads == 1 else float("nan")
    print(f"\nceiling (2 x the 1-thread in-process batch-1 rate): {ceiling:.1f} req/s; plain (better route) "
          f"{plain_single:.1f}, micro-batching {micro_single:.1f} single-text req/s at c=32")
    print("goals: single-text req/s at c=32 >= 1.2 x plain and >= 0.7 x micro-batching; p50 at c=1 <= the "
          "model's batch-1 latency + 5 ms; texts/s with 32-text requests >= 0.9 x raw")
    for name, g in goals.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in g.items()))
    out = storage / "bench" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_dir, "threads": args.threads, "raw": raw, "systems": systems,
                               "goals": goals, "ceiling_req_per_s": ceiling}, indent=2))
    best = max(goals.values(), key=lambda g: g["req_per_s_single_c32_vs_plain"])
    print(f"load average after: {os.getloadavg()}")
    print(f"serve_single_c32_vs_plain: {best['req_per_s_single_c32_vs_plain']:.3f}")

if __name__ == "__main__":
    main()
