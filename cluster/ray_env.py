"""The one place that decides between an embedded Ray cluster and a remote one."""

from __future__ import annotations

import logging
import os

import ray

from cluster.settings import Settings, get_settings

log = logging.getLogger(__name__)


def runtime_env_vars(settings: Settings) -> dict[str, str]:
    """Environment every Ray worker of a slimray job gets."""
    env = {
        # One compile of DeepSpeed's ops, reused by every worker and every run.
        "TORCH_EXTENSIONS_DIR": str(settings.torch_extensions_dir),
        # The tokenizers' own thread pool fights torch for the same cores.
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
    if settings.ray_address:
        env["RAY_ADDRESS"] = settings.ray_address
    return env


def connect(settings: Settings | None = None) -> None:
    """Connects to the configured cluster, or starts an embedded one; reuses a connection that exists.

    An embedded cluster uses ``address="local"`` so it never attaches to another cluster on the machine.
    """
    if ray.is_initialized():
        return
    settings = settings or get_settings()
    settings.torch_extensions_dir.mkdir(parents=True, exist_ok=True)
    env_vars = runtime_env_vars(settings)
    # The driver of a job submitted with `ray job submit` runs on the cluster (the job supervisor sets this
    # variable): join that cluster, whose address it also sets, rather than start an embedded one.
    address = settings.ray_address or ("auto" if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else None)
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=settings.ray_num_cpus,
            runtime_env={"env_vars": env_vars},
            include_dashboard=True,  # Train V2 logs an error every second without it.
            log_to_driver=True,
        )
    # Train V2's controller looks the cluster up through RAY_ADDRESS; with several clusters on one
    # machine it otherwise refuses ("multiple active Ray instances").
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
