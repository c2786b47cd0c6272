"""Serve stage: run the assistant's Serve graph on the embedded (or configured) Ray cluster.

    slimray serve --model runs/b77/ft                                  # HTTP on 127.0.0.1:8000
    slimray serve --model runs/b77/ft --canary-model runs/b77/int8 --set routing.canary_fraction=0.1
    python -m serve_app.run --config my_serve.yaml                     # a YAML instance of ServeConfig

The deployments get the options of ``--serve-config`` (default ``serve_app/serve_config.yaml``:
autoscaling, resources, live knobs), so this runs the same app that ``serve deploy`` puts on a cluster.
The app's arguments come from the flags only (the YAML's ``args`` name paths on a cluster and another
model's data). Stops on Ctrl-C, or after ``--run-for-s``.
"""

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.config import ConfigError, load_yaml, run_stage
from serve_app.app import AppArgs, compose_app

log = logging.getLogger("slimray.serve")

SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
IMPORT_PATH = "serve_app.app:build_app"
# Serve settings read when Ray starts (set them on a real cluster's nodes too). Measured on 2 CPUs with a
# no-op model: p50 at concurrency 1 from 14.7 to 10.8 ms, req/s at concurrency 32 from 117 to 149.
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",  # handle calls between replicas over gRPC, not actor calls
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # no thread hop per request; our code never blocks
}


def apply_serve_env() -> None:
    """Sets SERVE_ENV (values already in the environment win); call it before the cluster starts."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


class ServeConfig(AppArgs):
    """Serve a model artifact over HTTP: FastAPI ingress + assistant, batched autoscaling model replicas."""

    host: str = Field(default="127.0.0.1", description="HTTP host (0.0.0.0 exposes it beyond this machine)")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    serve_config: Path = Field(default=SERVE_CONFIG, description="Serve config YAML whose deployment options "
                               "(autoscaling, resources, user_config) are used; its args are not")
    run_for_s: float | None = Field(default=None, gt=0, description="Smoke knob: shut down after this many seconds")


def app_from_serve_config(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(application entry, per-deployment options) of the slimray app in a Serve config YAML."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(load_yaml(path))
    except ValidationError as e:
        raise ConfigError(f"{path} is not a valid Serve config: {e}") from None
    apps = [a for a in schema.applications if a.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"{path} must hold exactly one application with import_path {IMPORT_PATH!r}")
    app = apps[0]
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    return app.model_dump(exclude_unset=True), options


def main(cfg: ServeConfig) -> None:
    from ray import serve

    from cluster.ray_env import connect

    entry, options = app_from_serve_config(cfg.serve_config)
    args = AppArgs.model_validate(cfg.model_dump(include=AppArgs.model_fields.keys()))
    app = compose_app(args, options)  # resolves calibration and playbook, fails early on a bad folder
    apply_serve_env()
    connect()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=entry.get("name", "slimray"), route_prefix=entry.get("route_prefix", "/"), blocking=False)
    url = f"http://{cfg.host}:{cfg.port}"
    log.info("serving %s at %s (API docs: %s/docs); Prometheus metrics: Ray's metrics export port %s",
             args.model, url, url, metrics_port())
    try:
        deadline = time.monotonic() + cfg.run_for_s if cfg.run_for_s else float("inf")
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def metrics_port() -> int | None:
    """The port where this node's Ray metrics agent serves Prometheus text (Serve's metrics and ours)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((n.get("MetricsExportPort") for n in ray.nodes() if n["NodeID"] == node_id), None)


def cli(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_stage(ServeConfig, main, argv, prog="slimray serve")


if __name__ == "__main__":
    cli()
