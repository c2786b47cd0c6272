"""Autoscaling and replica failure of the Serve graph, measured with the deployment options of
serve_app/serve_config.yaml (the Model's autoscaling: delays, look-back, target) on the embedded cluster.

1. A step of load (closed loop, single-text requests) takes the Model deployment from 1 replica to >= 2:
   seconds from the step to the scale decision, to the new replica RUNNING, and to its first answer; then
   the load stops: seconds to the scale-down decision and to 1 replica.
2. A model replica is killed with SIGKILL under load, once with 2 replicas and once when it is the only
   one: failed requests (the goal is 0) and seconds until a replacement answers.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/serve_autoscale.py'

Writes <storage_root>/bench/serve_autoscale.json. Last line: ``failed_requests: <count over every phase>``.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadResult, build_request, closed_loop  # noqa: E402
from bench.serve import bench_texts  # noqa: E402
from cluster.settings import get_settings  # noqa: E402

APP = "slimray"
FIXED = {"autoscaling_config": None}  # deployment options: a fixed replica count instead of the YAML's autoscaling


class ReplicaWatch(threading.Thread):
    """Polls serve.status() for the Model deployment: (time, status, RUNNING, all replicas)."""

    def __init__(self, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.period_s, self.log, self.stopped = period_s, [], threading.Event()

    def run(self) -> None:
        from ray import serve

        from serve_app.app import MODEL

        while not self.stopped.is_set():
            try:
                d = serve.status().applications[APP].deployments[MODEL]
                states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
                self.log.append((time.perf_counter(), str(d.status), states.get("RUNNING", 0), sum(states.values())))
            except (KeyError, AttributeError):
                pass
            time.sleep(self.period_s)

    def first(self, after: float, predicate) -> float | None:
        return next((t - after for t, *rest in self.log if t >= after and predicate(*rest)), None)

    def running(self) -> int:
        return self.log[-1][2] if self.log else 0


def first_new_replica(result: LoadResult, known: set[str], after: float) -> float | None:
    """Seconds from ``after`` until a response came from a replica not in ``known``."""
    done = [s.start + s.latency for s in result.samples if s.status == 200 and s.header and s.header not in known]
    done = [t for t in done if t >= after]
    return min(done) - after if done else None


def replicas_seen(result: LoadResult) -> set[str]:
    return {s.header for s in result.samples if s.status == 200 and s.header}


def run_load(port, requests, concurrency, seconds, holder: dict) -> threading.Thread:
    def go():
        holder["result"] = asyncio.run(closed_loop(port, requests, concurrency, seconds))
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def model_replica_pids() -> list[int]:
    from ray.util.state import list_actors

    from serve_app.app import MODEL

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:{MODEL}"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def kill_phase(watch, port, requests, concurrency, seconds, label) -> dict:
    holder = {}
    before = watch.running()
    thread = run_load(port, requests, concurrency, seconds, holder)
    time.sleep(5)  # load settles
    pid = model_replica_pids()[0]
    t_kill = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    thread.join()
    result = holder["result"]
    known = {s.header for s in result.samples if s.status == 200 and s.start + s.latency < t_kill}
    noticed = watch.first(t_kill, lambda st, run, total: run < before)  # the controller saw the death
    back = None if noticed is None else watch.first(t_kill + noticed, lambda st, run, total: run >= before)
    out = {"phase": label, "replicas_before": before, "concurrency": concurrency, "requests": len(result.samples),
           "failed": result.failed(), "s_to_death_noticed": noticed,
           "s_to_replacement_running": None if back is None else noticed + back,
           "s_to_replacement_answering": first_new_replica(result, known, t_kill),
           **{k: v for k, v in result.summary(1).items() if k in ("p50_ms", "p99_ms")}}
    print(f"  {label}: {out}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model artifact (default: <storage_root>/bench/b77-ft)")
    p.add_argument("--concurrency", type=int, default=48, help="clients during the load step")
    p.add_argument("--load-s", type=float, default=75, help="length of the load step")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()

    from ray import serve

    from serve_app.app import MODEL, AppArgs
    from serve_app.run import SERVE_CONFIG, app_from_serve_config, deploy

    storage = Path(get_settings().storage_root)
    model_dir = str(Path(args.model or storage / "bench" / "b77-ft").resolve())
    if not Path(model_dir).is_dir():
        raise SystemExit(f"model {model_dir!r} not found: run bench/finetune.py first or pass --model")
    _, options = app_from_serve_config(SERVE_CONFIG)
    autoscaling = options[MODEL]["autoscaling_config"]
    print(f"model {model_dir}; Model autoscaling from {SERVE_CONFIG.name}: {autoscaling}", flush=True)
    texts = bench_texts()
    requests = [build_request("/v1/classify", json.dumps({"texts": [t]}).encode(), args.port) for t in texts]

    results: dict = {"model": model_dir, "autoscaling_config": autoscaling}
    try:
        deploy(AppArgs(model=model_dir), port=args.port)  # returns once the app answers
        watch = ReplicaWatch()
        watch.start()
        assert wait_until(lambda: watch.running() == 1, 30), "expected 1 replica at rest"

        print(f"1. load step: {args.concurrency} clients for {args.load_s:.0f} s", flush=True)
        holder = {}
        t_step = time.perf_counter()
        run_load(args.port, requests, args.concurrency, args.load_s, holder).join()
        t_stop = time.perf_counter()
        step = holder["result"]
        first = {s.header for s in step.samples if s.status == 200 and s.start + s.latency < t_step + 1}
        up = {"requests": len(step.samples), "failed": step.failed(),
              "max_running": max(run for _, _, run, _ in watch.log),
              "s_to_scale_decision": watch.first(t_step, lambda st, run, total: total > 1 or "UPSCALING" in st),
              "s_to_second_replica_running": watch.first(t_step, lambda st, run, total: run >= 2),
              "s_to_new_replica_answering": first_new_replica(step, first, t_step),
              **{k: v for k, v in step.summary(1).items() if k in ("req_per_s", "p50_ms", "p99_ms")}}
        print(f"  {up}", flush=True)
        print("   load stopped; waiting for the scale-down", flush=True)
        wait_until(lambda: watch.running() == 1 and len(watch.log) and watch.log[-1][3] == 1, 300)
        down = {"s_to_scale_down_decision": watch.first(t_stop, lambda st, run, total: "DOWNSCALING" in st
                                                        or (run < up["max_running"] and total < up["max_running"])),
                "s_to_one_replica": watch.first(t_stop, lambda st, run, total: total == 1)}
        print(f"  {down}", flush=True)
        results["scale_up"], results["scale_down"] = up, down

        print("2. replica killed (SIGKILL) under load", flush=True)
        deploy(AppArgs(model=model_dir), port=args.port, deployments={MODEL: {**FIXED, "num_replicas": 2}})
        assert wait_until(lambda: watch.running() == 2, 120), "expected 2 replicas"
        kills = [kill_phase(watch, args.port, requests, 16, 25, "one of 2 replicas killed")]
        deploy(AppArgs(model=model_dir), port=args.port, deployments={MODEL: {**FIXED, "num_replicas": 1}})
        assert wait_until(lambda: watch.running() == 1 and watch.log[-1][3] == 1, 120), "expected 1 replica"
        kills.append(kill_phase(watch, args.port, requests, 8, 30, "the only replica killed"))
        results["kills"] = kills
        watch.stopped.set()
    finally:
        serve.shutdown()

    out = storage / "bench" / "serve_autoscale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    up, down = results["scale_up"], results["scale_down"]
    print("\nphase                         seconds")
    for name, value in [("step -> scale decision", up["s_to_scale_decision"]),
                        ("step -> 2nd replica RUNNING", up["s_to_second_replica_running"]),
                        ("step -> new replica answers", up["s_to_new_replica_answering"]),
                        ("load end -> scale-down decision", down["s_to_scale_down_decision"]),
                        ("load end -> 1 replica", down["s_to_one_replica"])] + [
            (f"kill ({k['phase']}) -> replacement answers", k["s_to_replacement_answering"]) for k in results["kills"]]:
        print(f"{name:<48} {value if value is None else round(value, 1)}")
    failed = up["failed"] + sum(k["failed"] for k in results["kills"])
    print(f"requests: step {up['requests']} ({up['failed']} failed), kills "
          + ", ".join(f"{k['requests']} ({k['failed']} failed)" for k in results["kills"]))
    print(f"failed_requests: {failed}")


if __name__ == "__main__":
    main()
