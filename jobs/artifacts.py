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


# The files a loader reads from a model folder: weights, the model's config and its tokenizer. Their sizes and
# sha256 go into the artifact's record (``files``), and every load checks them (``verify_files``).
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".pt", ".bin", ".gguf")
# Files that hold a tokenizer's vocabulary (a tokenizer_config.json alone does not), then its other files.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.json")
TOKENIZER_FILES = VOCABULARY_FILES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the weights, config and tokenizer files at the top of ``folder``."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(Path(folder).iterdir())
            if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in TOKENIZER_FILES or f.name == "config.json")}


def verify_files(folder: Path, records: dict[str, dict[str, Any]], source: str) -> None:
    """Refuses, naming the file, a recorded file that is missing, of another size (truncated) or whose bytes
    changed since ``source`` recorded them."""
    for name, rec in records.items():
        path = Path(folder) / name
        if not path.is_file():
            raise InputError(f"{path}: missing (listed in {source}); the model folder is incomplete")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise InputError(f"{path}: {size} bytes, but {source} records {rec['bytes']} (truncated or replaced "
                             "after it was written)")
        if file_sha256(path) != rec["sha256"]:
            raise InputError(f"{path}: sha256 does not match the one {source} records (changed or damaged after "
                             "it was written)")


def read_artifact_json(path: Path) -> Any:
    """A JSON file of an artifact, or an InputError that names it (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a valid JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None


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
