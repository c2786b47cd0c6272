"""Serving benchmark, side by side in one run on the same CPU budget (--threads torch threads per model process,
default 1: with 2 threads on a 2-core machine that anything else uses, OpenMP's barriers made batch-1 latency
290 ms):

1. raw: the model's own forward (tokenization included) in this process: batch-1 latency and batch-32 rate;
2. plain: a single-process FastAPI/uvicorn server with the same loader and threads, no batching (what a user
   would write instead; a sync route that FastAPI runs in its thread pool, so two forwards use both cores,
   and an async route that runs the forward on the event loop: the better one is compared against); and the
   same server with an in-process micro-batcher (one task drains whatever requests are queued into one
   length-grouped forward, off the event loop: the strongest simple alternative);
3. serve: the slimray Serve graph as ``slimray serve`` runs it (direct ingress on the port, ingress + batched
   model replicas): 1 model replica, and 2 replicas of 1 thread (model threads x replicas <= 2 = the cores).

Every contender and the load generator share the machine's cores. For each: closed-loop load (bench/loadgen.py)
at concurrency 1, 8, 32 and 64 with 1-text requests and 1 and 8 with 32-text requests (req/s, texts/s, p50/p95/p99, failures);
CPU milliseconds per request of each process at 32 clients (the plain server's one process; Serve's proxy,
ingress, model replicas, controller and Ray's own); for Serve, where each request's time went, from the
``Server-Timing`` header every answer carries (ingress, handle hop, batch queue, forward, formed batch size;
"outside" is the client's latency minus the ingress's: sockets, HTTP parsing before the app, the client);
then open-loop load at fixed arrival rates, stepped up until p99 exceeds 200 ms: the highest rate each holds.
With --compressed DIR, the single-text c=32 point again for every contender on that model.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/serve.py'
    .venv/bin/python bench/serve.py --model runs/b77/ft --compressed runs/b77/compress/chosen

Uses the fine-tuned BANKING77 model at <storage_root>/bench/b77-ft when it exists (bench/finetune.py). Writes
<storage_root>/bench/serve.json after every contender (a run cut short keeps what it measured) and
serve.png (latency against throughput, closed and open loop). Last line: ``serve_single_c32_vs_plain: <ratio>``.
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
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.loadgen import build_request, closed_loop, open_loop, open_loop_summary  # noqa: E402
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


def raw_forward(model_dir: str, threads: int, texts: list[str], seconds: float,
                script: bool = True) -> dict[str, float]:
    """Batch-1 latency and batch-32 throughput of the model itself (tokenization + forward); ``script=False``:
    the eager PyTorch model instead of the TorchScript trace every contender loads."""
    from jobs.inference import load_inference_model

    model = load_inference_model(model_dir, threads=threads, script=script)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RAY_ROLES = {"ray::ProxyActor": "proxy", "ray::ServeReplica:slimray:Ingress": "ingress",
             "ray::ServeReplica:slimray:Model": "model replicas", "ray::ServeController": "controller",
             "raylet": "ray core", "gcs_server": "ray core", "dashboard": "ray core"}


def ray_processes() -> dict[int, str]:
    """pid -> role of this machine's Ray processes (RAY_ROLES)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = next((r for key, r in RAY_ROLES.items() if key in cmd), None)
        if role is not None:
            out[int(entry.name)] = role
    return out


def load_point(port: int, requests: list[bytes], concurrency: int, duration_s: float, warmup_s: float,
               pids: dict[int, str]) -> dict:
    """One closed-loop point: the summary, CPU ms per answered request by process role, and the Server-Timing
    breakdown (means over answered requests) when the server sends one."""
    from serve_app.api import parse_server_timing

    before = {pid: cpu_seconds(pid) for pid in pids}
    load_cpu = time.process_time()
    result = asyncio.run(closed_loop(port, requests, concurrency, duration_s, warmup_s=warmup_s,
                                     record_header="server-timing"))
    n = max(1, sum(s.status == 200 for s in result.samples))  # the CPU was spent on all, warm-up included
    cpu: dict[str, float] = {"load generator": (time.process_time() - load_cpu) * 1000 / n}
    for pid, role in pids.items():
        try:
            cpu[role] = cpu.get(role, 0.0) + (cpu_seconds(pid) - before[pid]) * 1000 / n
        except OSError:  # gone meanwhile (a Ray worker that exited)
            pass
    timings = [{**parse_server_timing(s.header), "client": s.latency * 1000} for s in result.ok() if s.header]
    breakdown = {}
    if timings:
        for key in ("client", "ingress", "hop", "queue", "forward", "batch"):
            values = [t[key] for t in timings if key in t]
            breakdown[key] = float(np.mean(values)) if values else float("nan")
        breakdown["outside"] = breakdown["client"] - breakdown["ingress"]
    return {"concurrency": concurrency, "cpu_ms_per_request": cpu, "breakdown_ms": breakdown}, result


def load_points(port: int, texts: list[str], duration_s: float, warmup_s: float, pids: dict[int, str],
                points: tuple[tuple[int, tuple[int, ...]], ...]) -> list[dict]:
    rows = []
    for per_request, concurrencies in points:
        requests = [build_request("/v1/classify", json.dumps({"texts": texts[i:i + per_request]}).encode(), port)
                    for i in range(0, len(texts) - per_request, max(1, per_request // 4))][:256]
        for concurrency in concurrencies:
            extra, result = load_point(port, requests, concurrency, duration_s, warmup_s, pids)
            rows.append({"texts_per_request": per_request, **extra, **result.summary(per_request)})
            r = rows[-1]
            line = (f"    {per_request:>2} texts x c={concurrency:<2}  {r['req_per_s']:8.1f} req/s  "
                    f"{r['texts_per_s']:8.1f} texts/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                    f"failed {r['failed']}")
            if r["breakdown_ms"]:
                b = r["breakdown_ms"]
                line += (f"  | outside {b['outside']:.1f} ingress {b['ingress']:.1f} (hop {b['hop']:.1f} queue "
                         f"{b['queue']:.1f} forward {b['forward']:.1f}) batch {b['batch']:.1f}")
            print(line, flush=True)
    return rows


def open_loop_points(port: int, texts: list[str], start_rate: float, step_s: float, max_steps: int = 12
                     ) -> dict:
    """Open-loop single-text load at rates from ``start_rate`` up by 1.25x a step until p99 > 200 ms (or any
    failure): every step's figures and the highest rate held."""
    requests = [build_request("/v1/classify", json.dumps({"texts": [t]}).encode(), port) for t in texts[:256]]
    steps, held, rate = [], 0.0, max(1.0, start_rate)
    for _ in range(max_steps):
        result = asyncio.run(open_loop(port, requests, rate, step_s, warmup_s=1.0, record_header="server-timing"))
        r = open_loop_summary(result, 1, rate)
        steps.append(r)
        ok = r["p99_ms"] <= 200 and r["failed"] == 0
        print(f"    open loop {rate:7.1f} req/s target: achieved {r['achieved_req_per_s']:7.1f}, p50 "
              f"{r['p50_ms']:7.1f} p95 {r['p95_ms']:7.1f} p99 {r['p99_ms']:7.1f} ms, failed {r['failed']}", flush=True)
        if not ok:
            break
        held = r["achieved_req_per_s"]
        rate *= 1.25
    return {"steps": steps, "held_req_per_s_p99_200ms": held}


# 32-text requests at c=1 and 8 only: more clients of 32-text requests measure only a longer queue
FULL_POINTS = ((1, CONCURRENCY), (32, (1, 8)))
C32_POINT = ((1, (32,)),)


def run_plain(model_dir: str, threads: int, mode: str, port: int, texts, duration_s, warmup_s,
              points=FULL_POINTS, open_loop_s: float = 0) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--plain-server", mode, "--model", model_dir,
                             "--port", str(port), "--threads", str(threads)], cwd=REPO)
    try:
        wait_http(port, proc=proc)
        out = {"closed": load_points(port, texts, duration_s, warmup_s, {proc.pid: "server"}, points)}
        if open_loop_s:
            out["open"] = open_loop_points(port, texts, 0.3 * row(out["closed"], 1, 32)["req_per_s"], open_loop_s)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_serve(model_dir: str, configs: list[tuple[int, int, bool]], port: int, texts, duration_s, warmup_s,
              points=FULL_POINTS, open_loop_s: float = 0, on_result: Callable[[str, dict], None] | None = None
              ) -> dict:
    """The graph as ``slimray serve`` deploys it, once per (model replicas, threads, local_model) config."""
    from ray import serve

    from serve_app.app import MODEL, AppArgs
    from serve_app.run import deploy

    out = {}
    for replicas, threads, local in configs:  # the YAML's deployment options, with a fixed replica count
        deploy(AppArgs(model=model_dir, threads=threads, local_model=local), port=port,
               deployments={MODEL: {"num_replicas": replicas, "autoscaling_config": None}})
        wait_http(port)
        name = f"serve {replicas}x{threads}" + (" +local" if local else "")
        print(f"  {name}", flush=True)
        result = {"closed": load_points(port, texts, duration_s, warmup_s, ray_processes(), points)}
        if open_loop_s:
            result["open"] = open_loop_points(port, texts, 0.3 * row(result["closed"], 1, 32)["req_per_s"],
                                              open_loop_s)
        out[name] = result
        if on_result is not None:
            on_result(name, result)
        serve.delete("slimray")
    return out


def row(rows: list[dict], per_request: int, concurrency: int) -> dict:
    return next(r for r in rows if r["texts_per_request"] == per_request and r["concurrency"] == concurrency)


def plot(systems: dict[str, dict], path: Path) -> None:
    """Latency against throughput: closed loop (p50, single texts, c = 1..64) and open loop (p99)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (closed, opened) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, result in systems.items():
        rows = [r for r in result["closed"] if r["texts_per_request"] == 1]
        closed.plot([r["req_per_s"] for r in rows], [r["p50_ms"] for r in rows], marker="o", label=name)
        for r in rows:
            closed.annotate(f"c={r['concurrency']}", (r["req_per_s"], r["p50_ms"]), fontsize=6)
        if "open" in result:
            steps = result["open"]["steps"]
            opened.plot([s["achieved_req_per_s"] for s in steps], [s["p99_ms"] for s in steps], marker="o", label=name)
    closed.set(title="closed loop, 1 text per request", xlabel="answered req/s", ylabel="p50 latency (ms)",
               yscale="log")
    opened.axhline(200, color="grey", linestyle="--", linewidth=0.8)
    opened.set(title="open loop, 1 text per request", xlabel="achieved req/s", ylabel="p99 latency (ms)",
               yscale="log")
    for ax in (closed, opened):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_cpu(systems: dict[str, dict]) -> None:
    print("\nCPU ms per answered request at 32 clients, single texts (where the 2 cores went):")
    for name, result in systems.items():
        cpu = row(result["closed"], 1, 32)["cpu_ms_per_request"]
        print(f"  {name:<16} total {sum(cpu.values()):6.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model artifact (default: <storage_root>/bench/b77-ft)")
    p.add_argument("--compressed", default=None, help="a compressed artifact of the same model: the single-text "
                   "c=32 point again for every contender")
    p.add_argument("--threads", type=int, default=1, help="CPU budget: torch threads of every contender")
    p.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per load point")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each load point")
    p.add_argument("--open-loop-s", type=float, default=6.0, help="measured seconds per open-loop rate (0: none)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--plain-server", choices=["sync", "async", "microbatch"], help=argparse.SUPPRESS)
    p.add_argument("--serve-only", action="store_true", help="measure the Serve graph alone (trying a setting; "
                   "the ratios need the full run)")
    args = p.parse_args()
    if args.plain_server:
        return plain_server_main(args.model, args.port, args.threads, args.plain_server)

    from cluster.ray_env import connect
    from serve_app.run import apply_serve_env

    storage = Path(get_settings().storage_root)
    model_dir = args.model or str(storage / "bench" / "b77-ft")
    for folder in (model_dir, args.compressed):
        if folder is not None and not Path(folder).is_dir():
            raise SystemExit(f"model {folder!r} not found: run bench/finetune.py first or pass --model")
    model_dir = str(Path(model_dir).resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = bench_texts()
    print(f"model {model_dir}; {args.threads} threads per model process; {os.cpu_count()} CPUs; "
          f"load average before: {os.getloadavg()}", flush=True)
    out_dir = storage / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": model_dir, "threads": args.threads, "load_before": os.getloadavg(),
                              "systems": {}, "compressed": {}}

    def save(section: str, name: str, result: dict) -> None:
        report[section][name] = result
        (out_dir / "serve.json").write_text(json.dumps(report, indent=2))

    print("  raw forward", flush=True)
    report["raw"] = raw = raw_forward(model_dir, args.threads, texts, seconds=args.duration_s)
    print(f"    batch-1 p50 {raw['batch1_p50_ms']:.2f} ms; batch-32 {raw['batch32_texts_per_s']:.1f} texts/s")
    report["raw_eager"] = eager = raw_forward(model_dir, args.threads, texts, seconds=args.duration_s, script=False)
    print(f"    (eager PyTorch, not traced: batch-1 p50 {eager['batch1_p50_ms']:.2f} ms; batch-32 "
          f"{eager['batch32_texts_per_s']:.1f} texts/s)", flush=True)
    modes = () if args.serve_only else ("sync", "async", "microbatch")
    for mode in modes:
        print(f"  plain uvicorn ({mode} route)", flush=True)
        save("systems", f"plain {mode}", run_plain(model_dir, args.threads, mode, args.port + 1, texts,
                                                   args.duration_s, args.warmup_s, open_loop_s=args.open_loop_s))
    # (model replicas, threads each, the ingress's own copy of the primary): model threads in all <= 2
    configs = [(1, args.threads, False), (max(1, 2 // args.threads), 1, False), (1, 1, True)]
    apply_serve_env(args.port)  # as `slimray serve` starts its cluster: direct ingress on the port
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray renices its workers by +15: not the plain server's
    connect()
    from ray import serve

    try:
        run_serve(model_dir, list(dict.fromkeys(configs)), args.port, texts, args.duration_s, args.warmup_s,
                  open_loop_s=args.open_loop_s, on_result=lambda name, result: save("systems", name, result))
        if args.compressed:
            compressed = str(Path(args.compressed).resolve())
            print(f"compressed model {compressed}: single texts at c=32", flush=True)
            raw_c = raw_forward(compressed, args.threads, texts, seconds=args.duration_s)
            report["raw_compressed"] = raw_c
            print(f"    batch-1 p50 {raw_c['batch1_p50_ms']:.2f} ms; batch-32 {raw_c['batch32_texts_per_s']:.1f}")
            for mode in modes:
                print(f"  plain uvicorn ({mode} route)", flush=True)
                save("compressed", f"plain {mode}", run_plain(compressed, args.threads, mode, args.port + 1,
                                                             texts, args.duration_s, args.warmup_s, C32_POINT))
            run_serve(compressed, list(dict.fromkeys(configs)), args.port, texts, args.duration_s, args.warmup_s,
                      C32_POINT, on_result=lambda name, result: save("compressed", name, result))
    finally:
        serve.shutdown()
    summarize(report, args, out_dir)


def summarize(report: dict, args: argparse.Namespace, out_dir: Path) -> None:
    systems, raw = report["systems"], report["raw"]
    print(f"\n{'system':<16} {'texts/req':>9} {'conc':>4} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'failed':>6}")
    for name, result in systems.items():
        for r in result["closed"]:
            print(f"{name:<16} {r['texts_per_request']:>9} {r['concurrency']:>4} {r['req_per_s']:>8.1f} "
                  f"{r['texts_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r.get('p95_ms', float('nan')):>8.1f} "
                  f"{r['p99_ms']:>8.1f} {r['failed']:>6}")
    print(f"{'raw forward':<16} {'32':>9} {'-':>4} {'':>8} {raw['batch32_texts_per_s']:>8.1f} "
          f"(batch-1 latency {raw['batch1_p50_ms']:.2f} ms)")
    print_cpu(systems)
    print("\nhighest open-loop rate with p99 <= 200 ms (single texts):")
    for name, result in systems.items():
        if "open" in result:
            print(f"  {name:<16} {result['open']['held_req_per_s_p99_200ms']:7.1f} req/s")
    plot(systems, out_dir / "serve.png")
    print(f"plot: {out_dir / 'serve.png'}")
    if args.serve_only:
        return
    serve_rows = {name: r["closed"] for name, r in systems.items() if name.startswith("serve")}
    plain_single = max(row(systems[f"plain {m}"]["closed"], 1, 32)["req_per_s"] for m in ("sync", "async"))
    micro_single = row(systems["plain microbatch"]["closed"], 1, 32)["req_per_s"]
    goals = {}
    for name, rows in serve_rows.items():
        batched = max(r["texts_per_s"] for r in rows if r["texts_per_request"] == 32)
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
    if report["compressed"]:
        comp = report["compressed"]
        c_plain = max(row(comp[f"plain {m}"]["closed"], 1, 32)["req_per_s"] for m in ("sync", "async"))
        c_micro = row(comp["plain microbatch"]["closed"], 1, 32)["req_per_s"]
        print(f"compressed model, single texts at c=32: plain {c_plain:.1f}, micro-batching {c_micro:.1f} req/s "
              f"(goal: Serve >= 0.6 x plain)")
        for name, result in comp.items():
            if name.startswith("serve"):
                r = row(result["closed"], 1, 32)
                goals[name + " compressed"] = {"req_per_s_single_c32_vs_plain": r["req_per_s"] / c_plain,
                                               "req_per_s_single_c32_vs_microbatch": r["req_per_s"] / c_micro}
                print(f"  {name}: {r['req_per_s']:.1f} req/s = {r['req_per_s'] / c_plain:.2f} x plain, "
                      f"{r['req_per_s'] / c_micro:.2f} x micro-batching, failed {r['failed']}")
        print_cpu(comp)
    report.update(goals=goals, ceiling_req_per_s=ceiling, load_after=os.getloadavg())
    (out_dir / "serve.json").write_text(json.dumps(report, indent=2))
    best = max((g for n, g in goals.items() if not n.endswith("compressed")),
               key=lambda g: g["req_per_s_single_c32_vs_plain"])
    print(f"load average after: {os.getloadavg()}")
    print(f"serve_single_c32_vs_plain: {best['req_per_s_single_c32_vs_plain']:.3f}")


if __name__ == "__main__":
    main()
