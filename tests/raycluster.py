"""A real Ray cluster started with `ray start` for integration tests: a head and optional worker nodes on this
machine, with token auth, stopped by pid (never `ray stop`: it kills every Ray on the machine).

Run it inside a loopback-only network namespace (the `isolated_network` fixture insists on one): every node
then listens on 127.0.0.1 only, and clusters of different test runs cannot meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from serve_app.run import SERVE_ENV

BIN = Path(sys.executable).parent  # ray, serve and the jobs' `python` come from this venv


_GIVEN: set[int] = set()  # ports handed out in this process: one cluster asks for several before it binds any


def free_port() -> int:
    """A port nothing listens on now, never one this process was given before (the kernel may offer a
    just-released port again: a head's dashboard and its agent once got the same one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def slimray(*args, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimray", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def stop_by_pid(marker: str) -> None:
    """Terminates the processes whose command line names ``marker`` (a cluster's temp dir) and their
    children, then kills what is left after 5 s."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in mine and any(marker in a for a in p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@dataclass
class RayCluster:
    """A running cluster: its dashboard URL, GCS address and the environment its clients need."""

    temp_dir: str
    env: dict[str, str]
    gcs_address: str = ""
    dashboard: str = ""
    sessions: list[int] = field(default_factory=list)  # process groups of the `ray start` calls

    def start_node(self, *args: str) -> None:
        """`ray start` in a session of its own, so that its daemons can be found by process group too."""
        proc = subprocess.Popen([str(BIN / "ray"), "start", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                                 f"--dashboard-agent-listen-port={free_port()}", *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")

    def nodes(self) -> list[dict]:
        """The cluster's nodes as Ray's state API lists them (node_id, state, is_head_node, resources_total)."""
        r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json", "--address", self.dashboard],
                           env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"ray list nodes failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout[r.stdout.index("["):])

    def wait_for_nodes(self, n: int, timeout_s: float = 120) -> list[dict]:
        deadline, alive = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, ValueError):
                alive = [node for node in self.nodes() if node["state"] == "ALIVE"]
                if len(alive) >= n:
                    return alive
            time.sleep(2)
        raise TimeoutError(f"{len(alive)} of {n} nodes alive after {timeout_s:.0f} s: {alive}")

    def stop(self) -> None:
        stop_by_pid(self.temp_dir)
        for pgid in self.sessions:  # anything the sweep missed (a daemon whose parent already exited)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(nodes: int = 1, num_cpus: int = 2, memory: int = 4_000_000_000,
                object_store_memory: int = 300_000_000, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A head plus ``nodes - 1`` worker nodes, each advertising ``num_cpus`` CPUs and the given memory and object
    store (bytes; a node counts the whole machine otherwise); waits until all are alive; stops them by pid.

    ``env`` adds to the environment of the nodes and of the clients (``cluster.env``), e.g. SLIMRAY_* settings
    that ``slimray submit`` forwards to its jobs.
    """
    cluster = RayCluster(
        temp_dir=f"/tmp/sr-{secrets.token_hex(3)}",  # short: Ray's socket paths live under it
        env={**os.environ, **SERVE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
             # a job's `python` is looked up on the PATH its node was started with
             "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": os.environ.get("HOME", "/root"),
             **(env or {})})
    cluster.env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    cluster.gcs_address, cluster.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    resources = [f"--num-cpus={num_cpus}", f"--memory={memory}", f"--object-store-memory={object_store_memory}"]
    try:
        cluster.start_node("--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                           "--dashboard-host=127.0.0.1", *resources)
        for _ in range(nodes - 1):
            cluster.start_node(f"--address={cluster.gcs_address}", *resources)
        cluster.wait_for_nodes(nodes)
        yield cluster
    finally:
        cluster.stop()
