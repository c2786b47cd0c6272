"""Environment settings: *where* things run (what runs comes from the stage configs).

Every field can be set with an environment variable prefixed ``SLIMRAY_``, e.g.
``SLIMRAY_RAY_ADDRESS=ray://head:10001`` or ``SLIMRAY_STORAGE_ROOT=/mnt/shared/runs``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where slimray finds Ray, data and storage."""

    model_config = SettingsConfigDict(env_prefix="SLIMRAY_", extra="forbid")

    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to connect to ('auto', 'ray://host:10001', or host:port). "
        "Empty: start an embedded single-machine cluster (ray.init(address='local')).",
    )
    ray_num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="CPUs the embedded cluster advertises (default: all cores). Ignored for a remote cluster.",
    )
    storage_root: str = Field(
        default="./runs",
        description="Root for run outputs and Ray Train/Tune storage: a local path (shared by every node "
        "on a real cluster) or a storage URI (s3://bucket/runs, gs://bucket/runs; see cluster/storage.py).",
    )
    storage_cache: Path = Field(
        default=Path.home() / ".cache" / "slimray" / "storage",
        description="Local copies of inputs read from storage URIs (downloaded again only when they change) "
        "and the working files of outputs written to URIs; local to each node.",
    )
    data_root: Path = Field(
        default=Path("../shared/data"),
        description="Folder with the reference datasets (banking77, wnut17, vader-news) used by tests and benchmarks.",
    )
    torch_extensions_dir: Path = Field(
        default=Path.home() / ".cache" / "slimray" / "torch_extensions",
        description="Cache for DeepSpeed's compiled ops, shared by every worker so each op compiles once.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the serving API requires on /v1 routes (read by the ingress replica); "
        "empty: no auth.",
    )


def get_settings() -> Settings:
    """Reads the settings from the environment now (not at import, so tests can change it)."""
    return Settings()

