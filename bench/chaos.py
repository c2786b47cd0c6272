"""The fault and abuse suite: real faults from outside the process, on the embedded cluster or a 2-node
`ray start` cluster, each scenario's outcome counted and written as it ends.

    unshare -n sh -c 'ip link set lo up; SLIMRAY_STORAGE_ROOT=runs .venv/bin/python bench/chaos.py'
    ... bench/chaos.py --only train-workers,search-trial     # some scenarios
    ... bench/chaos.py --quick                               # the built-in sample and a 2-layer model: minutes

Scenarios (``--only`` names):
- train-workers: BANKING77, 1 epoch, a checkpoint every 25 steps, --max-failures 5; a Ray Train worker process
  SIGKILLed at 5 random checkpointed steps of one run; then the driver SIGKILLed (with the embedded cluster it
  started) and the same command started again. Its test accuracy is set against two undisturbed runs of the
  same seed (their spread is reported too).
- train-node: a 2-node cluster, ZeRO-3 with one worker per node (STRICT_SPREAD); the second node killed once a
  checkpoint is registered: how the run ends, and whether the same command resumes from that checkpoint once
  the node is back.
- search-trial / search-driver: a compression search whose trial process is SIGKILLed; one whose driver is
  SIGKILLed and started again: the search completes, no trial is counted twice, no candidate folder is
  half-written, and a trial finished before the kill is not rebuilt.
- serve-*: `slimray serve` of the fine-tuned model on its own embedded cluster, under closed-loop load of
  single-message requests (bench/loadgen.py, a 10 s client timeout): the Model replica SIGKILLed, the ingress
  replica SIGKILLed (with direct ingress it holds the port), Serve's proxy SIGKILLed, the Model replica
  stopped (SIGSTOP) for longer than the ingress waits for a model, and a burst of more clients than the
  ingress admits (load shed by max_queued_requests): clients that wait the Retry-After of a 503, then clients
  that retry at once (a flood). Every request is counted: 200, 503 with Retry-After,
  another status, a refused or reset connection, and lost (no answer within 10 s).
- input-cli-in-process: tests/test_dry_run.py's fuzzing of every stage's flags and config files through
  --dry-run, at ``--cli-cases`` cases (2,100) in all.
- input-http: schemathesis against the live `slimray serve` (``--http-cases``, 5,000 valid and invalid
  requests from its OpenAPI schema), then a 10 MB body, 5,000 texts, JSON nested 100,000 deep, invalid
  UTF-8, wrong types, a 200 kB message, and 20 slow clients dribbling their bodies while others are served:
  no status >= 500.
- input-cli: at least 200 real `slimray <stage>` subprocesses with hypothesis-fuzzed flags and config files
  (the strategies of tests/test_dry_run.py): exit 0 or 2, one `error:` line per problem, never a traceback.

Each scenario appends its row to <storage_root>/bench/chaos/results.jsonl when it ends; a scenario already
there is skipped (``--again`` runs it again), so a run cut short keeps what it measured. The README table is
printed from that file. Last line: ``chaos_failures: <scenarios whose outcome missed the goal>``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # loadgen.py
sys.path.insert(0, str(REPO / "tests"))  # tests/raycluster.py (the 2-node cluster) and the fuzz strategies

from cluster.settings import get_settings  # noqa: E402

SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")
RUN_NAME = re.compile(r"Ray Train run (\S+) \(storage (.+)\)")
TRIAL_DONE = re.compile(r"Trial trial_(\w+) completed after")
WAITING = re.compile(r"worker group startup timed out after [\d.]+ seconds waiting for \d+ workers")


# ----------------------------------------------------------------------------------------------------------
# Processes: started in a session of their own, output kept with arrival times, killed from outside.

class Logged:
    """A command in its own session; every output line is appended to ``log`` and kept with its arrival time."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args, self.log = args, log
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.log.open("a") as f:
            for line in self.proc.stdout:
                f.write(line)
                f.flush()
                with self.cond:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def tail(self, n: int = 30) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def wait_for(self, pattern: re.Pattern, timeout_s: float, after: int = 0) -> tuple[float, re.Match]:
        """(arrival time, match) of the first line from index ``after`` on that matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for t, line in self.lines[after:]:
                    if m := pattern.search(line):
                        return t, m
                after = len(self.lines)
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise RuntimeError(f"exited ({self.proc.returncode}) before /{pattern.pattern}/:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no /{pattern.pattern}/ in {timeout_s:.0f} s:\n{self.tail()}")
                self.cond.wait(timeout=1.0)

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=30)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL the command, its session (an embedded cluster's GCS and raylet) and every descendant."""
        import psutil

        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=30)
        self.wait(60)


def descendants_named(pid: int, needle: str) -> list[int]:
    """Pids of ``pid``'s descendants whose command line (a Ray worker's process title) contains ``needle``."""
    import psutil

    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for p in children:
        try:
            if needle in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered for the run in ``run_dir`` (0 before one)."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic()


# ----------------------------------------------------------------------------------------------------------
# Results.

class Results:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def done(self, scenario: str) -> bool:
        return any(r["scenario"] == scenario or (scenario == "serve" and r["scenario"].startswith("serve-"))
                   for r in self.rows())

    def add(self, row: dict[str, Any]) -> None:
        row = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": os.getloadavg()[0], **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{row['scenario']}] {row['outcome']} ({'goal met' if row['ok'] else 'GOAL MISSED'})", flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.1f} s" if isinstance(v, float) else str(v)

    out = ["| scenario | tries | outcome | requests sent | failed | lost | time to recover |",
           "|---|---|---|---|---|---|---|"]
    latest = {r["scenario"]: r for r in rows}  # the last run of each scenario
    for r in latest.values():
        out.append(f"| {r['title']} | {r['tries']} | {r['outcome']} | {cell(r.get('requests'))} | "
                   f"{cell(r.get('failed'))} | {cell(r.get('lost'))} | {cell(r.get('recover_s'))} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# Training.

def finetune_argv(args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "slimray", "finetune", "--data", str(args.data), "--out", str(out),
            "--model", args.model, "--epochs", "1", "--batch-size", "16", "--checkpoint-every",
            str(args.checkpoint_every), "--log-every", str(args.checkpoint_every), "--max-failures", "5",
            "--seed", "0", *extra]
    return argv + (["--max-steps", str(args.quick_steps)] if args.quick else [])


def steps_per_run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    rows = pq.read_metadata(args.data / "train.parquet").num_rows
    steps = math.ceil(rows / 32)  # 2 workers x batch 16
    return min(steps, args.quick_steps) if args.quick else steps


def accuracy(out: Path) -> float:
    return float(json.loads((out / "metrics.json").read_text())["accuracy"])


def reference_run(args: argparse.Namespace, name: str) -> float:
    """An undisturbed run of the same command (its own output folder, so its own Ray Train run)."""
    out = args.root / name
    if not (out / "metrics.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        run = Logged(finetune_argv(args, out), args.root / f"{name}.log", env=args.env)
        if run.wait(args.timeout_s) != 0:
            raise RuntimeError(f"the undisturbed run {name} failed:\n{run.tail()}")
    return accuracy(out)


def train_workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """5 worker kills at random checkpointed steps, then the driver killed and the same command started again."""
    rng = random.Random(args.seed)
    total = steps_per_run(args)
    every = args.checkpoint_every
    targets = sorted(rng.sample(range(every, int(0.85 * total) + 1, every), 5))
    out = args.root / f"train-disturbed-{int(time.time())}"  # a new run each time: the command resumes only its own
    log = args.root / f"{out.name}.log"
    run = Logged(finetune_argv(args, out), log, env=args.env)
    _, m = run.wait_for(RUN_NAME, 600)
    run_dir = Path(m[2]) / m[1]
    kills = []
    for target in targets:
        wait_until(lambda: registered_step(run_dir) >= target or run.proc.poll() is not None, args.timeout_s,
                   f"checkpoint {target}")
        workers = descendants_named(run.proc.pid, "RayTrainWorker")
        if run.proc.poll() is not None or not workers:
            raise RuntimeError(f"no Ray Train worker to kill at step {target}:\n{run.tail()}")
        victim, mark = rng.choice(workers), run.mark()
        registered, t_kill = registered_step(run_dir), time.monotonic()
        os.kill(victim, signal.SIGKILL)
        t_back, back = run.wait_for(RESUMED, args.timeout_s, after=mark)
        kills.append({"target": target, "registered": registered, "resumed_from": int(back[1]),
                      "recover_s": round(t_back - t_kill, 1)})
        print(f"  worker {victim} killed at checkpoint {registered}: resumed from {back[1]} in "
              f"{t_back - t_kill:.1f} s", flush=True)
    # The driver: once a checkpoint after the last resume is registered, SIGKILL it with its embedded cluster.
    after = kills[-1]["resumed_from"] + every
    wait_until(lambda: registered_step(run_dir) >= after or run.proc.poll() is not None, args.timeout_s,
               f"checkpoint {after}")
    if run.proc.poll() is not None:
        raise RuntimeError(f"the run ended before its driver could be killed:\n{run.tail()}")
    driver_step, t_kill = registered_step(run_dir), time.monotonic()
    run.kill_tree()
    again = Logged(finetune_argv(args, out), log, env=args.env)
    t_back, back = again.wait_for(RESUMED, args.timeout_s)
    rc = again.wait(args.timeout_s)
    if rc != 0:
        raise RuntimeError(f"the same command, started again, failed ({rc}):\n{again.tail()}")
    disturbed = accuracy(out)
    refs = [reference_run(args, "train-reference-a"), reference_run(args, "train-reference-b")]
    delta = max(abs(disturbed - r) for r in refs) * 100
    spread = abs(refs[0] - refs[1]) * 100
    resumed = sum(k["resumed_from"] >= k["registered"] for k in kills)
    recover = [k["recover_s"] for k in kills]
    return [
        {"scenario": "train-workers", "title": "training: a Ray Train worker SIGKILLed at a random step, 5 times in "
         "one run", "tries": 5, "outcome": f"resumed {resumed}/5 (from its latest checkpoint each time)",
         "recover_s": statistics.median(recover), "recover_max_s": max(recover), "kills": kills,
         "ok": resumed == 5},
        {"scenario": "train-driver", "title": "training: the driver SIGKILLed (with its embedded cluster), the same "
         "command started again", "tries": 1, "outcome": f"resumed from step {back[1]} (checkpoint {driver_step})",
         "recover_s": round(t_back - t_kill, 1), "ok": int(back[1]) == driver_step},
        {"scenario": "train-accuracy", "title": "training: test accuracy after those 6 faults vs 2 undisturbed "
         "runs", "tries": 1, "outcome": f"{disturbed:.4f} vs {refs[0]:.4f} and {refs[1]:.4f}: within "
         f"{delta:.2f} pt (undisturbed spread {spread:.2f} pt)", "accuracy": disturbed, "references": refs,
         "ok": delta <= 0.5},
    ]


def train_node(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The second node of a 2-node cluster killed during a ZeRO-3 run with one worker per node."""
    from raycluster import ray_cluster

    store = args.root / "node-storage"
    out = args.root / f"train-node-{int(time.time())}"
    resources = ["--num-cpus=2", "--memory=4000000000", "--object-store-memory=300000000"]
    with ray_cluster(nodes=2, num_cpus=2, env={"SLIMRAY_STORAGE_ROOT": str(store)}) as cluster:
        argv = [sys.executable, "-m", "slimray", "submit", "--address", cluster.dashboard, "finetune",
                "--data", str(args.data), "--out", str(out), "--model", args.model, "--zero-stage", "3",
                "--placement-strategy", "STRICT_SPREAD", "--cpus-per-worker", "1", "--batch-size", "16",
                "--max-steps", str(4 * args.node_checkpoint_every), "--checkpoint-every",
                str(args.node_checkpoint_every), "--log-every", "5", "--max-failures", "1"]
        log = args.root / f"{out.name}.log"
        job = Logged(argv, log, env=cluster.env)
        _, m = job.wait_for(RUN_NAME, 600)
        run_dir = Path(m[2]) / m[1]
        wait_until(lambda: registered_step(run_dir) > 0 or job.proc.poll() is not None, args.timeout_s,
                   "a first checkpoint")
        step, t_kill, mark = registered_step(run_dir), time.monotonic(), job.mark()
        os.killpg(cluster.sessions[1], signal.SIGKILL)  # the second `ray start`: its raylet and agents
        # Ray Train either stops the run, or (its default) keeps retrying to start the worker group, saying so.
        try:
            _, waiting = job.wait_for(WAITING, 600, after=mark)
            rc, ended = None, f"waited for its second node, saying \"{waiting[0][:120]}\""
        except RuntimeError:  # exited instead
            rc = job.wait(60)
            ended = f"stopped (exit {rc}) after {time.monotonic() - t_kill:.0f} s: {last_error(job)}"
        kept = registered_step(run_dir)
        # The node comes back: the waiting run resumes by itself, a stopped one by the same command.
        cluster.start_node(f"--address={cluster.gcs_address}", *resources)
        cluster.wait_for_nodes(2)
        again = job if rc is None else Logged(argv, log, env=cluster.env)
        try:
            t_back, back = again.wait_for(RESUMED, args.timeout_s, after=mark if rc is None else 0)
            resumed_from = int(back[1])
            rc2 = again.wait(args.timeout_s)
        except (TimeoutError, RuntimeError) as e:
            resumed_from, rc2, t_back = None, None, None
            print(f"  the resumed run failed: {e}", flush=True)
    how = "the same run resumed" if rc is None else "the same command, started again, resumed"
    outcome = (f"{ended}; checkpoint {kept} intact; once the node was back {how} from step {resumed_from} and "
               f"{'finished' if rc2 == 0 else f'ended with {rc2}'}")
    return [{"scenario": "train-node", "title": "training: the second node of a 2-node cluster killed during ZeRO-3 "
             "(one worker per node)", "tries": 1, "outcome": outcome, "first_exit": rc, "checkpoint": step,
             "recover_s": round(t_back - t_kill, 1) if t_back else None,
             "ok": kept >= step and resumed_from == kept and rc2 == 0}]


def last_error(proc: Logged) -> str:
    lines = [line for _, line in proc.lines if "error" in line.lower()]
    return lines[-1][-300:] if lines else "(no error line)"


# ----------------------------------------------------------------------------------------------------------
# Search.

def compress_argv(args: argparse.Namespace, out: Path) -> list[str]:
    space = {"distill_layers": [2], "distill_epochs": [1], "prune_heads": [0.0], "prune_ffn": [0.0],
             "recovery_steps": [0], "trim_vocab": [True, False], "quantize": ["onnx-int8", "torch-int8"]}
    return [sys.executable, "-m", "slimray", "compress", "--model", str(args.teacher), "--data", str(args.data),
            "--out", str(out), "--trials", "4", "--train-limit", str(args.search_rows), "--max-accuracy-drop", "100",
            "--no-asha", "--trial-cpus", "1", "--set", f"search={json.dumps(space)}"]


def check_search(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The search's rows and what is wrong with its output: a trial counted twice, a half-written candidate."""
    rows = json.loads((out / "trials.json").read_text())["trials"]
    problems = []
    ids = [r["trial_id"] for r in rows]
    if len(ids) != len(set(ids)):
        problems.append(f"trials counted twice: {sorted(i for i in ids if ids.count(i) > 1)}")
    for folder in (out / "search").iterdir() if (out / "search").is_dir() else []:
        if folder.is_dir() and not (folder / "slimray_model.json").is_file():
            problems.append(f"half-written candidate {folder.name}: {sorted(p.name for p in folder.iterdir())}")
    if not (out / "chosen" / "metrics.json").is_file():
        problems.append("no chosen/metrics.json")
    return rows, problems


def search_trial(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = args.root / f"search-trial-{int(time.time())}"
    run = Logged(compress_argv(args, out), args.root / f"{out.name}.log", env=args.env)
    wait_until(lambda: descendants_named(run.proc.pid, "ImplicitFunc") or run.proc.poll() is not None,
               args.timeout_s, "a running trial", poll_s=0.5)
    time.sleep(5)  # let the trial get into its work: the kill lands mid-trial, not at its start
    victims = descendants_named(run.proc.pid, "ImplicitFunc")
    if not victims:
        raise RuntimeError(f"no trial process to kill:\n{run.tail()}")
    t_kill = time.monotonic()
    os.kill(victims[0], signal.SIGKILL)
    rc = run.wait(args.timeout_s)
    rows, problems = check_search(out) if rc == 0 else ([], [f"exit {rc}: {run.tail(5)}"])
    errored = [r for r in rows if r["status"] == "error"]
    return [{"scenario": "search-trial", "title": "search: a trial's process SIGKILLed", "tries": 1,
             "outcome": (f"completed: {len(rows)} trials, {len(errored)} failed "
                         f"({errored[0]['error'][:80] if errored else '-'})"
                         if rc == 0 else "search failed") + (f"; {'; '.join(problems)}" if problems else ""),
             "recover_s": round(time.monotonic() - t_kill, 1), "ok": rc == 0 and not problems and len(rows) == 4}]


def search_driver(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = args.root / f"search-driver-{int(time.time())}"
    log = args.root / f"{out.name}.log"
    env = {**args.env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    run = Logged(compress_argv(args, out), log, env=env)

    def a_trial_finished() -> bool:
        states = list(out.glob("tune/experiment_state*.json"))
        return run.proc.poll() is not None or bool(states and "TERMINATED" in states[0].read_text())

    wait_until(a_trial_finished, args.timeout_s, "a finished trial", poll_s=0.5)
    if run.proc.poll() is not None:
        raise RuntimeError(f"the search ended before its driver could be killed:\n{run.tail()}")
    t_kill = time.monotonic()
    run.kill_tree()
    # Trials Tune had recorded as completed when the driver died: their candidates must not be built again. (A
    # trial that had saved its candidate but not yet reported is run again: Tune never counted it.)
    done = {m[1] for _, line in run.lines if (m := TRIAL_DONE.search(line))}
    finished = {p: p.stat().st_mtime for p in out.glob("search/*/slimray_model.json") if p.parent.name in done}
    again = Logged(compress_argv(args, out), log, env=env)
    rc = again.wait(args.timeout_s)
    rows, problems = check_search(out) if rc == 0 else ([], [f"exit {rc}: {again.tail(5)}"])
    rebuilt = [p.parent.name for p, t in finished.items() if not p.is_file() or p.stat().st_mtime != t]
    if rebuilt:
        problems.append(f"rebuilt after the restart: {rebuilt}")
    return [{"scenario": "search-driver", "title": "search: the driver SIGKILLed (with its embedded cluster), the "
             "same command started again", "tries": 1,
             "outcome": (f"resumed and completed: {len(rows)} trials, {len(finished)} completed before the kill kept"
                         if rc == 0 else "search failed") + (f"; {'; '.join(problems)}" if problems else ""),
             "recover_s": round(time.monotonic() - t_kill, 1),
             "ok": rc == 0 and not problems and len(rows) == 4 and bool(finished)}]


# ----------------------------------------------------------------------------------------------------------
# Serving under load.

LOST_S = 10.0  # a request with no answer after this long is lost (the bound)


def serving_requests(args: argparse.Namespace, port: int) -> list[bytes]:
    from loadgen import build_request  # bench/loadgen.py

    from jobs.prepare import read_split

    texts = read_split(args.data, "test", ("text",))["text"][:500]
    return [build_request("/v1/classify", json.dumps({"texts": [t]}).encode(), port) for t in texts]


def count_outcomes(result: Any, t_fault: float) -> dict[str, Any]:
    """Every request of a load phase by outcome; ``recover_s``: from the fault to the first 200 after the last
    failed request (0 when none failed)."""
    samples = result.samples
    lost = [s for s in samples if s.status == 0 and s.latency >= LOST_S - 0.1]
    counts = {"requests": len(samples), "served": sum(s.status == 200 for s in samples),
              "503_retry_after": sum(s.status == 503 and s.header != "" for s in samples),
              "503_without_retry_after": sum(s.status == 503 and s.header == "" for s in samples),
              "other_status": sum(s.status not in (0, 200, 503) for s in samples),
              "refused_or_reset": sum(s.status == 0 for s in samples) - len(lost), "lost": len(lost),
              "max_answer_s": round(max((s.latency for s in samples if s.status), default=0.0), 2)}
    counts["failed"] = counts["requests"] - counts["served"]
    failures = [s.start + s.latency for s in samples if s.status != 200 and s.start + s.latency >= t_fault]
    if not failures:
        counts["recover_s"] = 0.0
    else:
        after = [s.start + s.latency for s in samples if s.status == 200 and s.start + s.latency > max(failures)]
        counts["recover_s"] = round(min(after) - t_fault, 1) if after else None
    return counts


def under_load(port: int, requests: list[bytes], concurrency: int, seconds: float, fault_at_s: float,
               fault: Callable[[], Any], honor_retry_after: bool = True) -> tuple[dict[str, Any], Any]:
    """Closed-loop load for ``seconds``; ``fault()`` runs ``fault_at_s`` into it. Returns the outcome counts
    and what the fault returned."""
    import asyncio

    from loadgen import closed_loop

    holder: dict[str, Any] = {}

    def load() -> None:
        holder["result"] = asyncio.run(closed_loop(port, requests, concurrency, seconds, record_header="retry-after",
                                                   timeout_s=LOST_S, honor_retry_after=honor_retry_after))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(fault_at_s)  # the load's schedule: the fault lands while it runs
    t_fault = time.perf_counter()
    returned = fault()
    thread.join()
    return count_outcomes(holder["result"], t_fault), returned


def wait_serving(port: int, timeout_s: float) -> float:
    """Seconds until 3 classify requests in a row answer 200 (the endpoint has recovered)."""
    import httpx

    t0, good = time.monotonic(), 0
    body = {"texts": ["I want to check my balance"]}
    while good < 3:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"the endpoint did not recover within {timeout_s:.0f} s")
        try:
            good = good + 1 if httpx.post(f"http://127.0.0.1:{port}/v1/classify", json=body,
                                          timeout=LOST_S).status_code == 200 else 0
        except httpx.HTTPError:
            good = 0
        if good < 3:
            time.sleep(0.2)
    return time.monotonic() - t0


def start_server(args: argparse.Namespace, name: str, serve_args: list[str] | None = None) -> tuple[Logged, int]:
    """`slimray serve` on a free port, with its own embedded cluster: of the fine-tuned model, or of what
    ``serve_args`` name; returns once it answers."""
    from raycluster import free_port

    port = free_port()
    serve_args = ["--model", str(args.teacher)] if serve_args is None else serve_args
    server = Logged([str(Path(sys.executable).parent / "slimray"), "serve", *serve_args, "--port", str(port)],
                    args.root / f"{name}-{int(time.time())}.log", env=args.env)
    try:
        server.wait_for(re.compile(rf"at http://127\.0\.0\.1:{port} \(API docs"), 600)
    except BaseException:
        server.kill_tree()
        raise
    return server, port


def stop_server(server: Logged) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)  # stops it as Ctrl-C does; a background job ignores SIGINT
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill_tree()


def serving(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The serving faults, one after another on one `slimray serve`, each under its own load phase."""
    from serve_app.app import INGRESS, MODEL

    server, port = start_server(args, "serve")
    rows = []
    try:
        requests = serving_requests(args, port)
        wait_serving(port, 120)

        def replica(name: str) -> list[int]:
            return descendants_named(server.proc.pid, f"ServeReplica:slimray:{name}")

        def kill(needle: str) -> Callable[[], int]:
            def go() -> int:
                pids = descendants_named(server.proc.pid, needle)
                if not pids:
                    raise RuntimeError(f"no process titled {needle!r} to kill")
                os.kill(pids[0], signal.SIGKILL)
                return pids[0]
            return go

        def stall() -> int:
            (pid, *_) = replica(MODEL)
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(args.stall_s, os.kill, (pid, signal.SIGCONT)).start()
            return pid

        phases = [
            ("serve-model-kill", f"serving: the Model replica SIGKILLed under load ({args.clients} clients)",
             args.clients, kill(f"ServeReplica:slimray:{MODEL}")),
            ("serve-ingress-kill", f"serving: the ingress replica (it holds the port) SIGKILLed under load "
             f"({args.clients} clients)", args.clients, kill(f"ServeReplica:slimray:{INGRESS}")),
            ("serve-proxy-kill", f"serving: Serve's proxy SIGKILLed under load ({args.clients} clients)",
             args.clients, kill("ProxyActor")),
            ("serve-slow-model", f"serving: the Model replica stopped (SIGSTOP) for {args.stall_s:g} s under load "
             f"({args.clients} clients)", args.clients, stall),
            ("serve-overload", f"serving: {args.burst} clients at once, more than the ingress admits (each waits "
             "the Retry-After of a 503)", args.burst, lambda: None),
            ("serve-flood", f"serving: {args.burst} clients at once that ignore Retry-After (a 503 is retried at "
             "once)", args.burst, lambda: None),
        ]
        for scenario, title, clients, fault in phases:
            if args.only_serve and scenario not in args.only_serve:
                continue
            print(f"[{scenario}] {clients} clients for {args.phase_s:g} s", flush=True)
            counts, pid = under_load(port, requests, clients, args.phase_s, args.phase_s / 3, fault,
                                     honor_retry_after=scenario != "serve-flood")
            back_s = wait_serving(port, 300)
            burst = scenario in ("serve-overload", "serve-flood")
            if burst:  # and once the burst is over, the endpoint serves everyone again
                after, _ = under_load(port, requests, args.clients, 10, 0, lambda: None)
                counts["after_burst"] = {k: after[k] for k in ("requests", "served", "failed")}
            clear = (counts["lost"] == 0 and counts["other_status"] == 0 and counts["503_without_retry_after"] == 0
                     and counts["max_answer_s"] < LOST_S)
            served = "served" if counts["failed"] == 0 else (
                f"served {counts['served']}, 503 + Retry-After {counts['503_retry_after']}, refused or reset "
                f"{counts['refused_or_reset']}")
            rows.append({"scenario": scenario, "title": title, "tries": 1, "outcome": served, **counts,
                         "recovered_after_load_s": round(back_s, 1), "pid": pid,
                         "ok": clear and (not burst or counts["after_burst"]["failed"] == 0)})
            print(f"  {rows[-1]}", flush=True)
    finally:
        stop_server(server)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Bad input: real subprocesses.

def input_cli(args: argparse.Namespace) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    from hypothesis import HealthCheck, given, settings

    from slimray.cli import STAGES
    from test_dry_run import argvs, file_kinds, valid_argv  # tests/test_dry_run.py: the in-process fuzzing

    folder = args.root / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = file_kinds(folder)
    cases: list[tuple[str, list[str]]] = []
    per_stage = math.ceil(args.subprocesses / len(STAGES))
    def collector(stage: str) -> Callable[[], None]:
        @settings(max_examples=per_stage, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(argv=argvs(stage, files, valid_argv(stage, args.data, args.teacher, folder / "out")))
        def collect(argv: list[str]) -> None:
            cases.append((stage, argv))
        return collect

    for stage in sorted(STAGES):
        collector(stage)()

    def one(case: tuple[str, list[str]]) -> tuple[str, list[str], int, str]:
        stage, argv = case
        r = subprocess.run([sys.executable, "-m", "slimray", stage, *argv], cwd=REPO, env=args.env,
                           capture_output=True, text=True, errors="replace", timeout=300)
        return stage, argv, r.returncode, r.stderr

    bad = []
    with ThreadPoolExecutor(2) as pool:
        for stage, argv, rc, stderr in pool.map(one, cases):
            lines = stderr.strip().splitlines()
            if rc not in (0, 2) or "Traceback" in stderr or (
                    rc == 2 and not all(line.startswith(f"slimray {stage}: error: ") for line in lines)):
                bad.append({"stage": stage, "argv": argv, "rc": rc, "stderr": stderr[-1500:]})
    exits = len(cases) - len(bad)
    return [{"scenario": "input-cli", "title": "bad input: fuzzed flags and config files, real `slimray <stage>` "
             "subprocesses", "tries": len(cases), "outcome": f"refused or checked: {exits}/{len(cases)} exit 0 or 2 "
             f"with one line per problem; {len(bad)} tracebacks or other exits", "bad": bad[:10],
             "ok": not bad and len(cases) >= args.subprocesses}]


def sentiment_model(args: argparse.Namespace) -> Path:
    """A news-sentiment classifier for the monitor: ``--sentiment-model``, else one prepared and fine-tuned
    here once (the built-in news editorial data, a short run: the scenario needs a working model, not a
    good one)."""
    if args.sentiment_model is not None:
        return args.sentiment_model
    data, model = args.root / "news-data", args.root / "news-ft"
    for stage, argv in (("prepare", ["--config", "jobs/configs/prepare_vader_news.yaml", "--out", str(data)]),
                        ("finetune", ["--data", str(data), "--model", args.model, "--max-steps", "120",
                                      "--out", str(model)])):
        if not (Path(argv[-1]) / "manifest.json").is_file():
            r = subprocess.run([sys.executable, "-m", "slimray", stage, *argv], cwd=REPO, env=args.env,
                               capture_output=True, text=True, timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"slimray {stage} failed:\n{r.stderr[-2000:]}")
    return model


def monitor_faults(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The news monitor under load (one observation per request, each with its own id), its SentimentModel
    replica and then its Monitor replica SIGKILLed; afterwards every acknowledged observation is looked up in
    the store: a 2xx whose observation is not there is lost."""
    import asyncio

    import httpx

    from jobs.monitor import MonitorStore
    from jobs.prepare import read_split

    store = f"sqlite:///{args.root / f'monitor-{int(time.time())}.db'}"
    server, port = start_server(args, "monitor", ["--sentiment-model", str(sentiment_model(args)),
                                                  "--monitor-store", store])
    texts = read_split(args.data, "test", ("text",))["text"]
    outcomes: list[tuple[str, int, float, float]] = []  # id, status (0: no answer), start, seconds
    try:
        counter = iter(range(10**9))

        async def client(http: httpx.AsyncClient, t_end: float) -> None:
            while time.perf_counter() < t_end:
                n = next(counter)
                item = {"id": f"chaos-{n}", "topic": f"topic-{n % 5}", "text": texts[n % len(texts)]}
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/observations", json={"items": [item]}, timeout=LOST_S)
                    status = r.status_code
                    # "duplicate": a retried call whose first try had stored it (the monitor stores an id once)
                    ok = status == 200 and r.json()["results"][0]["status"] in ("stored", "duplicate")
                    if status == 503:
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                except httpx.HTTPError:
                    status, ok = 0, False
                outcomes.append((item["id"], status if status != 200 or ok else -1, t0, time.perf_counter() - t0))

        async def load(seconds: float) -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                t_end = time.perf_counter() + seconds
                await asyncio.gather(*(client(http, t_end) for _ in range(args.clients)))

        thread = threading.Thread(target=lambda: asyncio.run(load(args.phase_s * 1.5)), daemon=True)
        thread.start()
        kills = []
        for name in ("SentimentModel", "Monitor"):
            time.sleep(args.phase_s / 2)  # the load's schedule: one kill in each half
            (pid, *_) = descendants_named(server.proc.pid, f"ServeReplica:slimray:{name}")
            kills.append((name, time.perf_counter()))
            os.kill(pid, signal.SIGKILL)
        thread.join()
    finally:
        stop_server(server)
    acked = [i for i, status, _, _ in outcomes if status == 200]
    kept = MonitorStore.open(store).texts(acked)
    missing = [i for i in acked if i not in kept]
    unanswered = sum(1 for _, status, _, dt in outcomes if status == 0 and dt >= LOST_S - 0.1)
    statuses = dict(sorted(Counter(str(status) for _, status, _, _ in outcomes).items()))
    first_kill = kills[0][1]
    failed_at = [t + dt for _, status, t, dt in outcomes if status != 200 and t + dt >= first_kill]
    later_ok = [t + dt for _, status, t, dt in outcomes if status == 200 and failed_at and t + dt > max(failed_at)]
    return [{"scenario": "serve-monitor", "title": f"serving: the news monitor's SentimentModel replica, then its "
             f"Monitor replica SIGKILLed under load ({args.clients} clients, one observation per request)",
             "tries": 2, "outcome": f"statuses {statuses}; {len(acked)} acknowledged as stored, {len(missing)} of "
             f"them missing from the store", "requests": len(outcomes),
             "failed": len(outcomes) - len(acked), "lost": len(missing) + unanswered, "missing": missing[:20],
             "recover_s": round(min(later_ok) - first_kill, 1) if later_ok else (0.0 if not failed_at else None),
             "ok": not missing and not unanswered and bool(acked)}]


def input_cli_in_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    """tests/test_dry_run.py's fuzzing (every stage's flags and config files, through --dry-run, in-process) at
    ``--cli-cases`` cases in all; each stage prints how many it ran."""
    from slimray.cli import STAGES

    per_stage = math.ceil(args.cli_cases / len(STAGES))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_dry_run.py",
                        "-k", "fuzzed"], cwd=REPO, env={**args.env, "SLIMRAY_FUZZ_EXAMPLES": str(per_stage)},
                       capture_output=True, text=True, errors="replace", timeout=3600)
    counts = [int(m[1]) for m in re.finditer(r"fuzzed slimray \w+: (\d+) cases", r.stdout)]
    failed = re.search(r"(\d+) failed", r.stdout)
    cases = sum(counts)
    return [{"scenario": "input-cli-in-process", "title": "bad input: fuzzed flags and config files of every stage, "
             "in-process through --dry-run", "tries": cases,
             "outcome": f"{cases} cases in {len(counts)} stages: exit 0 or 2 with one line per problem"
             + (f"; {failed[1]} stages FAILED" if failed else "") if r.returncode == 0 or failed else
             f"pytest exit {r.returncode}: {r.stdout[-300:]}",
             "ok": r.returncode == 0 and cases >= args.cli_cases}]


def fuzz_http(url: str, cases: int) -> Any:
    """``cases`` valid and invalid requests generated from the live OpenAPI schema; their statuses counted."""
    from collections import Counter

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    statuses: Counter = Counter()

    @given(case=strategy)
    @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        try:
            statuses[case.call(timeout=LOST_S).status_code] += 1
        except Exception as e:  # noqa: BLE001 - a dropped connection or a timeout is an outcome to count
            statuses[type(e).__name__] += 1

    fuzz()
    return statuses


def hostile_probes(port: int) -> dict[str, Any]:
    """Oversized and malformed bodies, and slow clients holding connections while others are served."""
    import socket
    from collections import Counter

    import httpx

    url = f"http://127.0.0.1:{port}/v1/classify"
    json_headers = {"content-type": "application/json"}
    probes = {
        "10 MB body": b'{"texts": ["' + b"a" * 10_000_000 + b'"]}',
        "5,000 texts": json.dumps({"texts": ["hello"] * 5000}).encode(),
        "JSON nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
        "invalid UTF-8": b'{"texts": ["\xff\xfe"]}',
        "wrong types": b'{"texts": [1, null, {"a": []}]}',
        "a 200 kB message": json.dumps({"texts": ["word " * 40_000]}).encode(),
    }
    out = {name: httpx.post(url, content=body, headers=json_headers, timeout=LOST_S).status_code
           for name, body in probes.items()}
    # 20 slow clients: each sends its headers and then one byte of its body every 0.5 s
    slow = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 40\r\n\r\n")
        slow.append(s)
    served = []
    for i in range(10):
        for s in slow:
            try:
                s.sendall(b" ")
            except OSError:
                pass
        served.append(httpx.post(url, json={"texts": ["where is my card?"]}, timeout=LOST_S).status_code)
        time.sleep(0.5)  # the slow clients' pace
    for s in slow:
        s.close()
    out["while 20 slow clients hold connections"] = dict(Counter(served))
    return out


def input_http(args: argparse.Namespace) -> list[dict[str, Any]]:
    """schemathesis against the live `slimray serve` (``--http-cases`` cases), then the hostile probes."""
    from collections import Counter

    server, port = start_server(args, "fuzz")
    try:
        statuses = fuzz_http(f"http://127.0.0.1:{port}", args.http_cases)
        probes = hostile_probes(port)
    finally:
        stop_server(server)
    cases = sum(statuses.values())
    bad = {k: v for k, v in statuses.items() if not (isinstance(k, int) and k < 500)}
    probe_5xx = {k: v for k, v in probes.items() if isinstance(v, int) and v >= 500}
    slow_ok = probes["while 20 slow clients hold connections"] == {200: 10}
    return [{"scenario": "input-http", "title": "bad input: the HTTP API fuzzed from its OpenAPI schema "
             "(schemathesis, live server), oversized / deep / invalid bodies, slow clients", "tries": cases,
             "requests": cases + len(probes) + 9, "failed": sum(bad.values()) + len(probe_5xx),
             "outcome": f"statuses {dict(sorted(Counter({str(k): v for k, v in statuses.items()}).items()))}; "
             f"probes {probes}", "statuses": {str(k): v for k, v in statuses.items()}, "probes": probes,
             "ok": not bad and not probe_5xx and slow_ok and cases >= args.http_cases}]


SCENARIOS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "train-workers": train_workers, "train-node": train_node, "search-trial": search_trial,
    "search-driver": search_driver, "serve": serving, "input-cli": input_cli,
    "input-cli-in-process": input_cli_in_process, "input-http": input_http, "serve-monitor": monitor_faults,
}


def parse_args() -> argparse.Namespace:
    root = Path(get_settings().storage_root).resolve() / "bench"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=root / "b77-data", help="prepared data (bench/finetune.py's)")
    p.add_argument("--teacher", type=Path, default=root / "b77-ft", help="a fine-tuned model, for the search")
    p.add_argument("--model", default="minilm", help="the pretrained model the training scenarios fine-tune")
    p.add_argument("--root", type=Path, default=root / "chaos", help="where runs, logs and results.jsonl go")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    p.add_argument("--again", action="store_true", help="run scenarios that results.jsonl already has")
    p.add_argument("--quick", action="store_true", help="few steps: to try the suite, not to measure it")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--node-checkpoint-every", type=int, default=10)
    p.add_argument("--quick-steps", type=int, default=200)
    p.add_argument("--search-rows", type=int, default=600, help="train rows the search's students learn from")
    p.add_argument("--subprocesses", type=int, default=210)
    p.add_argument("--sentiment-model", type=Path, default=None, help="the monitor's sentiment model (default: "
                   "one fine-tuned here once on the built-in news editorial data)")
    p.add_argument("--cli-cases", type=int, default=2100, help="in-process fuzzed CLI cases, all stages together")
    p.add_argument("--http-cases", type=int, default=5000, help="schemathesis cases against the live API")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients of the serving faults")
    p.add_argument("--burst", type=int, default=700, help="clients of the overload phase")
    p.add_argument("--phase-s", type=float, default=30, help="length of each serving load phase")
    p.add_argument("--stall-s", type=float, default=12, help="how long the Model replica is stopped")
    p.add_argument("--only-serve", default="", help="comma-separated serving phases (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=3600)
    args = p.parse_args()
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"--only: unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.only_serve = [x for x in args.only_serve.split(",") if x]
    args.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each command its own cluster
    return args


def main() -> None:
    args = parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = Results(args.root / "results.jsonl")
    for name in args.only.split(","):
        if results.done(name) and not args.again:
            print(f"[{name}] already in {results.path}: skipped (--again runs it again)", flush=True)
            continue
        started = time.monotonic()
        print(f"[{name}] starting", flush=True)
        try:
            rows = SCENARIOS[name](args)
        except Exception as e:  # the scenario could not be carried out: recorded, and the suite goes on
            rows = [{"scenario": name, "title": name, "tries": 0, "outcome": f"not carried out: {e!r}"[:500],
                     "ok": False}]
        for row in rows:
            results.add({**row, "scenario_wall_s": round(time.monotonic() - started, 1)})
    rows = results.rows()
    print("\n" + table(rows))
    print(f"load average after: {os.getloadavg()}")
    latest = {r["scenario"]: r for r in rows}
    print(f"chaos_failures: {sum(not r['ok'] for r in latest.values())}")


if __name__ == "__main__":
    main()
