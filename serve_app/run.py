"""Serve stage: deploy the assistant's Serve graph from ``serve_config.yaml`` and serve until Ctrl-C.

    slimray serve --model runs/b77/ft                                  # HTTP on 127.0.0.1:8000
    slimray serve --model runs/b77/ft --canary-model runs/b77/int8 --set routing.canary_fraction=0.1
    slimray serve --model runs/b77/ft --entity-model runs/wnut17/ft       # intents and entities, in parallel
    slimray serve --sentiment-model runs/news/ft --monitor-store postgresql+psycopg://mon@db/mon   # the monitor
    python -m serve_app.run --config my_serve.yaml                     # a YAML instance of ServeConfig

``deploy`` is the one way the app is put on a cluster here: ``slimray serve``, the smoke test of
``slimray run`` and ``slimray run --serve`` all call it. It hands Serve the config of ``--serve-config``
(default ``serve_app/serve_config.yaml``) with the app's args, the HTTP address and any deployment options
replaced, so Serve applies the YAML's deployment options (autoscaling, resources, live knobs) exactly as
``serve deploy`` does on a cluster. The app's arguments come from the flags only (the YAML's ``args`` name
paths on a cluster and another model's data); knobs set by flags win over the YAML's ``user_config``.
When this process starts the cluster, the ingress replica serves the HTTP port itself (``direct_ingress_env``).
Ctrl-C or SIGTERM stops Serve, then Ray, in one line.
"""

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, SecretStr

from jobs.config import ConfigError, load_yaml, run_cli
from serve_app.app import CANARY, ENTITY, INGRESS, MODEL, MONITOR, SENTIMENT, AppArgs, resolve_paths
from serve_app.rag import GENERATOR, RETRIEVER

log = logging.getLogger("slimray.serve")

SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
IMPORT_PATH = "serve_app.app:build_app"
# Serve settings read when Ray starts (set them on a real cluster's nodes too). Measured on 2 CPUs with a
# no-op model: p50 at concurrency 1 from 14.7 to 10.8 ms, req/s at concurrency 32 from 117 to 149.
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",  # handle calls between replicas over gRPC, not actor calls
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # no thread hop per request; our code never blocks
}
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
TOKEN_ENV = "SLIMRAY_API_TOKEN"  # cluster.settings.Settings.api_token
_direct_port: int | None = None  # the HTTP port the ingress replica itself listens on (apply_serve_env)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress on ``port``: the ingress replica runs the HTTP server itself, so a request skips
    Serve's proxy and its handle hop into the ingress. Measured with the fp32 MiniLM model, 2 model replicas
    of 1 thread, 32 clients sending one text each, on 2 CPUs: 138.7 req/s direct against 73.7 through the
    proxy, which cost 5.0 ms of CPU per request itself and raised the ingress's from 2.3 to 6.8 ms.

    One port serves one ingress replica per node, and Serve's proxy runs on the head only (``deploy`` moves
    it to a free port). Draining before a replica stops is cut from Serve's 30 s (meant for an outside load
    balancer) to 1 s, and a dead ingress's port goes straight to its replacement."""
    return {DIRECT_INGRESS: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}  # Serve holds a freed port 150 s for HAProxy; a new ingress needs it


def apply_serve_env(port: int | None = None) -> None:
    """Sets SERVE_ENV (values already in the environment win); call it before the cluster starts.

    With ``port``, and when this process is about to start the embedded cluster (no Ray yet, no cluster
    address, ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` not set to 0), also ``direct_ingress_env(port)``. A running
    cluster keeps its own settings: there Serve's proxy serves the HTTP port (the KubeRay manifests do so)."""
    import ray

    from cluster.settings import get_settings

    global _direct_port
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    embedded = not (ray.is_initialized() or get_settings().ray_address or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)
    if port is not None and embedded and os.environ.get(DIRECT_INGRESS, "1") != "0":
        os.environ.update(direct_ingress_env(port))
        _direct_port = port


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


class ServeConfig(AppArgs):
    """Serve a model artifact over HTTP: FastAPI ingress + assistant, batched autoscaling model replicas."""

    host: str = Field(default="127.0.0.1", description="HTTP host (0.0.0.0 exposes it beyond this machine)")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    serve_config: Path = Field(default=SERVE_CONFIG, description="Serve config YAML whose deployment options "
                               "(autoscaling, resources, user_config) are used; its args are not")
    run_for_s: float | None = Field(default=None, gt=0, description="Smoke knob: shut down after this many seconds")


def read_serve_config(path: Path):
    """The Serve config YAML at ``path``, validated by Serve's schema; it must hold the slimray app once.

    Returns:
        ``ray.serve.schema.ServeDeploySchema``.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(load_yaml(path))
    except ValidationError as e:
        raise ConfigError(f"{path} is not a valid Serve config: {e}") from None
    if [a.import_path for a in schema.applications].count(IMPORT_PATH) != 1:
        raise ConfigError(f"{path} must hold exactly one application with import_path {IMPORT_PATH!r}")
    return schema


def app_from_serve_config(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(application entry, per-deployment options by name) of the slimray app in a Serve config YAML."""
    app = next(a for a in read_serve_config(path).applications if a.import_path == IMPORT_PATH)
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    return app.model_dump(exclude_unset=True), options


# Options of the deployments that the Serve YAML does not list (its commented entries): without them Serve
# would give each replica a whole CPU.
UNLISTED_DEFAULTS: dict[str, dict[str, Any]] = {
    RETRIEVER: {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.2}},
    GENERATOR: {"max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.5}},
    MONITOR: {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
}


def serve_schema(args: AppArgs, serve_config: Path = SERVE_CONFIG, host: str = "127.0.0.1", port: int = 8000,
                 deployments: dict[str, dict[str, Any]] | None = None):
    """The Serve config that ``deploy`` hands to Serve: ``serve_config`` with the slimray app alone, ``args`` as
    its args (without the API token: Serve logs args), HTTP on ``host:port``, and deployment options changed.

    Args:
        args: the app's arguments; routing and batching knobs that were set explicitly win over the
            ``user_config`` of the YAML, key by key.
        serve_config: Serve config YAML (deployment options, HTTP options, app name and route).
        host: HTTP host.
        port: HTTP port.
        deployments: per deployment name, options that replace the YAML's (a ``None`` value removes the
            option, e.g. ``{"Model": {"num_replicas": 2, "autoscaling_config": None}}``). A canary or an
            entity model without an entry of its own gets the ``Model`` entry's options; entries of
            deployments that ``args`` does not serve are dropped (Serve rejects them).

    Returns:
        ``ray.serve.schema.ServeDeploySchema``.
    """
    from ray.serve.schema import ServeDeploySchema

    config = read_serve_config(serve_config).model_dump(exclude_unset=True)
    (app,) = [a for a in config["applications"] if a["import_path"] == IMPORT_PATH]
    app["args"] = args.model_dump(mode="json", include=set(AppArgs.model_fields) - {"api_token"},
                                  exclude_defaults=True)
    entries = {d["name"]: d for d in app.get("deployments", [])}
    served = {INGRESS: True, MODEL: bool(args.model), CANARY: bool(args.canary_model), ENTITY: bool(args.entity_model),
              SENTIMENT: bool(args.sentiment_model), MONITOR: bool(args.sentiment_model), RETRIEVER: bool(args.index),
              GENERATOR: bool(args.generator)}
    for name in (CANARY, ENTITY, SENTIMENT):  # batched replicas of the same kind: the same options unless listed
        if served[name] and MODEL in entries:
            entries.setdefault(name, {**entries[MODEL], "name": name})
    for name, options in UNLISTED_DEFAULTS.items():  # not listed in the YAML (Serve rejects unused entries)
        if served[name]:
            entries.setdefault(name, {"name": name, **options})
    knobs = {INGRESS: args.routing, **{name: args.batching for name in (MODEL, CANARY, ENTITY, SENTIMENT)
                                       if served[name]}}
    if served[MONITOR]:
        knobs[MONITOR] = args.alerting
    for name, given in knobs.items():
        set_knobs = given.model_dump(exclude_unset=True) if given is not None else {}
        if set_knobs:
            entry = entries.setdefault(name, {"name": name})
            entry["user_config"] = {**(entry.get("user_config") or {}), **set_knobs}
    for name, options in (deployments or {}).items():
        entries[name] = {k: v for k, v in {**entries.get(name, {}), **options, "name": name}.items()
                         if v is not None}
    app["deployments"] = [entry for name, entry in entries.items() if served.get(name, True)]
    config["applications"] = [app]
    config["http_options"] = {**config.get("http_options", {}), "host": host, "port": port}
    return ServeDeploySchema.model_validate(config)


def _hand_token_to_cluster(token: SecretStr | None) -> None:
    """Serve logs an app's args and Ray logs runtime environments, so a token given as an argument reaches
    the app as the cluster's SLIMRAY_API_TOKEN setting: Ray's processes inherit this process's environment
    when it starts the cluster. A cluster that runs already needs the setting in its own environment."""
    import ray

    from cluster.settings import get_settings

    if token is None:
        return
    if ray.is_initialized() or get_settings().ray_address or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        raise ConfigError(f"api_token reaches the app only on a cluster that this command starts; on a running "
                          f"cluster set {TOKEN_ENV} in its environment instead")
    os.environ[TOKEN_ENV] = token.get_secret_value()


def deploy(args: AppArgs, serve_config: Path = SERVE_CONFIG, host: str = "127.0.0.1", port: int = 8000,
           deployments: dict[str, dict[str, Any]] | None = None, timeout_s: float = 600) -> str:
    """Deploys the slimray app of ``serve_config`` with ``args`` (see ``serve_schema``) and returns its URL once
    it answers. Connects to Ray first (an embedded cluster unless one is configured).

    Serve builds the app (``build_app``, on the cluster) and applies the config's deployment options, as
    for ``serve deploy``; deploying again with only ``user_config`` changed reconfigures replicas in place.

    Raises:
        InputError: a model folder is missing or both versions have the same name (checked here first).
        RuntimeError: Serve could not deploy the app (its message says why).
        TimeoutError: the app was not running after ``timeout_s`` seconds.
    """
    from ray import serve
    from ray.serve._private.api import serve_start

    from cluster.ray_env import connect

    args = resolve_paths(args)  # a missing folder fails here, in one line, not in Serve's build task
    schema = serve_schema(args, serve_config, host, port, deployments)
    _hand_token_to_cluster(args.api_token)
    apply_serve_env(port)
    connect()
    http_options = schema.http_options.model_dump()
    if _direct_port == port:  # the ingress replica takes the port; Serve's proxy (head only) another one
        http_options["port"] = _free_port(host)
    # What Ray's own `serve run CONFIG` does: start Serve with the config's HTTP options, then let the
    # controller apply the config (build the app, apply each deployment's options).
    client = serve_start(http_options=http_options, proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    (app,) = schema.applications
    _warn_if_it_cannot_fit(app)
    deadline = time.monotonic() + timeout_s
    while (status := serve.status().applications.get(app.name)) is None or status.status != "RUNNING":
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve could not deploy {app.name!r} ({status.status}): {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app.name!r} not running after {timeout_s:.0f} s: {status and status.message}")
        time.sleep(0.5)  # the controller reconciles every 0.1 s; a build takes seconds
    client.wait_for_proxies_serving(wait_for_applications_running=True)
    url = f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"
    _wait_answering(f"{url}/healthz", deadline)  # direct ingress: the replica's server starts on its own
    return f"http://{host}:{port}"


def _warn_if_it_cannot_fit(app: Any) -> None:
    """Warns when the app's replicas at their minimum ask for more CPUs than the cluster has: they would wait
    for resources (on an embedded cluster, forever) while deploy waits for them."""
    import ray

    def value(options: Any, key: str, default: Any) -> Any:
        found = options.get(key) if isinstance(options, dict) else getattr(options, key, None)
        return default if found is None or type(found).__name__ == "DEFAULT" else found

    wanted = {}
    for d in app.deployments:
        scaling = d.autoscaling_config if type(d.autoscaling_config).__name__ != "DEFAULT" else None
        replicas = value(scaling, "min_replicas", 1) if scaling else value(d, "num_replicas", 1)
        wanted[d.name] = (replicas if isinstance(replicas, int) else 1) * float(
            value(d.ray_actor_options, "num_cpus", 1))
    have = ray.cluster_resources().get("CPU", 0)
    if sum(wanted.values()) > have:
        log.warning("the app's replicas ask for %.1f CPUs (%s) and the cluster has %.1f: some will wait for "
                    "resources. Lower their ray_actor_options.num_cpus in the Serve config, or add nodes",
                    sum(wanted.values()), ", ".join(f"{k} {v:g}" for k, v in wanted.items()), have)


def _wait_answering(url: str, deadline: float) -> None:
    import httpx

    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} does not answer")
        time.sleep(0.2)


def _stop_on_sigterm() -> None:
    """SIGTERM stops the server as Ctrl-C does (Ray's own handler would dump stacks and abort)."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def serving_until_interrupted(run_for_s: float | None = None) -> Iterator[None]:
    """Runs the block (a ``deploy``), then serves until Ctrl-C or SIGTERM (or for ``run_for_s`` seconds), then
    stops in order, Serve then Ray, and says so in one line. Ctrl-C while the block still runs ends it as
    quietly."""
    import ray
    from ray import serve

    _stop_on_sigterm()
    try:
        yield
        _stop_on_sigterm()  # again: starting Ray installed its own handler
        deadline = time.monotonic() + run_for_s if run_for_s else float("inf")
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():  # else shutdown() would start Ray (deploy failed before connecting)
            serve.shutdown()
            ray.shutdown()
        print("slimray serve: stopped (Serve shut down, then Ray)", flush=True)


def main(cfg: ServeConfig) -> None:
    with serving_until_interrupted(cfg.run_for_s):
        url = deploy(cfg, cfg.serve_config, cfg.host, cfg.port)
        served = " and ".join(f"{what} {folder}" for what, folder in (
            ("intent model", cfg.model), ("entity model", cfg.entity_model),
            ("sentiment monitor", cfg.sentiment_model)) if folder)
        log.info("serving %s at %s (API docs: %s/docs; a page to try it: %s/); Prometheus metrics: Ray's metrics "
                 "export port %s", served, url, url, url, metrics_port())


def metrics_port() -> int | None:
    """The port where this node's Ray metrics agent serves Prometheus text (Serve's metrics and ours)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((n.get("MetricsExportPort") for n in ray.nodes() if n["NodeID"] == node_id), None)


def dry_run(cfg: ServeConfig) -> str:
    """``--dry-run``: the model folders, index and generator (``resolve_paths``), the Serve YAML and the
    deployments it would start (``serve_schema``)."""
    args = resolve_paths(cfg)
    (app,) = serve_schema(args, cfg.serve_config, cfg.host, cfg.port).applications
    return (f"would serve {', '.join(d.name for d in app.deployments)} from {cfg.serve_config} at "
            f"http://{cfg.host}:{cfg.port}")


def cli(argv: list[str] | None = None) -> None:
    run_cli(ServeConfig, main, argv, prog="slimray serve", check=dry_run)


if __name__ == "__main__":
    cli()
