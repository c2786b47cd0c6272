"""Artifact folders that describe themselves, written atomically.

Every stage writes into ``<out>.partial-<random>`` beside the target and renames it into place only when
complete, so a crash never leaves a folder that looks finished. An output at a storage URI is staged in a
local folder and uploaded when complete, with its ``_SUCCESS`` marker last (``cluster.storage``).
``manifest.json`` records lineage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

from cluster import storage
from jobs.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The git commit of the code (with '+dirty' for local changes), or the package version outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "slimray " + version("slimray")
        except PackageNotFoundError:
            return "unknown"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (source files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_can_write(out: Path | str, overwrite: bool) -> None:
    """Fails early (before any work) if ``out`` exists and may not be replaced, or, for a storage URI,
    if nothing can be written there (no such bucket, access denied, unreachable endpoint)."""
    if storage.is_uri(out):
        storage.check_writable(out)  # first: it fails fast where the endpoint cannot be reached
    if storage.exists(out) and not overwrite:
        shown = storage.redact(out) if storage.is_uri(out) else str(out)
        raise InputError(f"output {shown!r} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yields a staging folder; on success it replaces ``out`` (a path, or a URI: uploaded, marker last),
    on error it is removed."""
    if storage.is_uri(out):
        check_can_write(out, overwrite)
        with storage.staged_upload(str(out)) as staging:
            yield staging
        return
    out = Path(out).expanduser().resolve()
    check_can_write(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest(stage: str, config: dict[str, Any], **lineage: Any) -> dict[str, Any]:
    return {"stage": stage, "created_at": now_iso(), "code_version": code_version(), **lineage, "config": config}
