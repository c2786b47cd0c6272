"""Artifacts at a location every node can reach: a local (shared) path, or an ``s3://`` / ``gs://`` URI.

Everything goes through ``pyarrow.fs`` (the same layer Ray Train and Tune use for ``storage_path``), so any
URI pyarrow understands works, including an S3-compatible server named in the URI
(``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``) or by ``AWS_ENDPOINT_URL``.
Credentials come from each node's environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
an instance role; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS).

Object stores have no atomic rename, so a folder written to a URI is complete only when its
``_SUCCESS`` marker exists: ``upload_dir`` writes every file first and the marker last (deleting an old
marker before touching anything), and readers (``download_dir``) refuse a folder without one. The marker
lists the files and their sizes and carries a random id; a local copy is downloaded again only when the
remote marker changed.

    with staged_upload("s3://bucket/runs/b77/data") as staging:
        write_everything_into(staging)          # uploaded, marker last, only if this block succeeds
    local = download_dir("s3://bucket/runs/b77/data")   # cached under SLIMRAY_STORAGE_CACHE
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

MARKER = "_SUCCESS"
# Schemes pyarrow.fs resolves that slimray documents and tests (s3) or expects to work the same way.
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(ValueError):
    """A storage location that cannot be read or written; the message names it (credentials removed)
    and says why. The stages print it as one line and exit with status 2."""


def is_uri(location: Any) -> bool:
    """True for ``scheme://...`` text (``file://`` included); False for plain paths."""
    return isinstance(location, str) and bool(_URI.match(location))


def redact(uri: str) -> str:
    """The URI without credentials (``s3://key:secret@bucket`` → ``s3://***@bucket``), for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def check_uri(uri: str) -> str:
    """Checks a URI's form without any network access; returns it. Raises StorageError."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in SCHEMES + ("file",):
        raise StorageError(f"unsupported storage URI scheme {scheme!r} in {redact(uri)!r}: use a local path "
                           "(shared by every node) or an s3:// or gs:// URI")
    if scheme != "file" and not urlsplit(uri).netloc:
        raise StorageError(f"storage URI {redact(uri)!r} names no bucket (expected {scheme}://bucket/path)")
    return uri


def join(location: str | os.PathLike, *parts: str) -> str:
    """Appends path parts to a local path or a URI (keeping the URI's ``?query``)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base = urlsplit(str(location))
    path = "/".join([base.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(base._replace(path=path))


def canonical(location: str | os.PathLike) -> str:
    """A URI as given; a local path made absolute (for run names and lineage)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI. Raises StorageError."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    uri = check_uri(str(location))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise StorageError(f"storage URI {redact(uri)!r} is not usable: {_reason(e)}") from None
    return fs, path.rstrip("/")


def _fail_fast(fs: Any) -> Any:
    """The same S3 or GCS filesystem with one attempt (S3) or 10 s of retries (GCS) and short timeouts, so
    that a probe of an unreachable endpoint fails in seconds instead of retrying for minutes (GCS's default
    is 15); a local filesystem is returned as it is."""
    import datetime as dt

    import pyarrow.fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # the constructor arguments pyarrow pickles the filesystem with
        options.update(connect_timeout=3, request_timeout=10)
        return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    if isinstance(fs, pafs.GcsFileSystem):
        options = {k: v for k, v in fs.__reduce__()[1][0].items() if v not in ("", None)}
        options["retry_time_limit"] = dt.timedelta(seconds=10)
        return pafs.GcsFileSystem(**options)
    return fs


def _reason(err: BaseException) -> str:
    """A short, human reason from a pyarrow/AWS/GCS error message."""
    text = str(err)
    lowered = text.lower()
    bucket = re.search(r"bucket '([^']+)'", text)
    if "no_such_bucket" in lowered or "specified bucket does not exist" in lowered:
        return f"bucket {bucket.group(1)!r} does not exist" if bucket else "the bucket does not exist"
    if any(k in lowered for k in ("invalid_access_key_id", "signature_does_not_match", "access_denied",
                                  "accessdenied", "permission denied", "forbidden", "http status 403")):
        return ("access denied: check the credentials this node uses (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or GOOGLE_APPLICATION_CREDENTIALS) and their permissions on the bucket")
    if any(k in lowered for k in ("network_connection", "curlcode", "could not connect", "couldn't connect",
                                  "timed out", "could not resolve")):
        return "cannot reach the storage endpoint (check endpoint_override / AWS_ENDPOINT_URL and the network)"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def check_writable(location: str | os.PathLike) -> None:
    """Raises StorageError, naming the location and the reason, if nothing can be written there.

    A URI gets a small probe object written and deleted (one attempt, short timeouts: an unreachable
    endpoint fails in seconds); the reasons told apart are no such bucket, access denied and an unreachable
    endpoint. A local path is checked without writing: its nearest existing folder must be writable.
    """
    if not is_uri(location):  # a local path: no probe, so that checking leaves nothing behind
        path = Path(location).expanduser().resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise StorageError(f"cannot write to {str(path)!r}: {str(existing)!r} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write to {str(path)!r}: permission denied on {str(existing)!r}")
        return
    fs, path = filesystem(location)
    probe = f"{path}/.slimray-probe-{uuid.uuid4().hex[:12]}"
    try:
        fast = _fail_fast(fs)
        with fast.open_output_stream(probe) as f:
            f.write(b"slimray write probe\n")
        fast.delete_file(probe)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot write to {redact(str(location))!r}: {_reason(e)}") from None


def exists(location: str | os.PathLike) -> bool:
    """A local path that exists, or a URI folder whose upload completed (its marker exists)."""
    if not is_uri(location):
        return Path(location).expanduser().exists()
    return read_marker(str(location)) is not None


def read_marker(uri: str) -> dict[str, Any] | None:
    """The completion marker of a folder at ``uri``, or None if there is none (yet)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    fs = _fail_fast(fs)  # a probe: an unreachable endpoint fails in seconds
    try:
        if fs.get_file_info(f"{path}/{MARKER}").type != pafs.FileType.File:
            return None
        with fs.open_input_stream(f"{path}/{MARKER}") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise StorageError(f"cannot read {redact(uri)!r}: {_reason(e)}") from None


def delete(location: str | os.PathLike) -> None:
    """Removes a folder (marker first, so no reader takes a half-deleted folder for a complete one)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        if fs.get_file_info(f"{path}/{MARKER}").type == pafs.FileType.File:
            fs.delete_file(f"{path}/{MARKER}")
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir_contents(path, missing_dir_ok=True)
            if not is_uri(location):
                fs.delete_dir(path)
    except OSError as e:
        raise StorageError(f"cannot delete {redact(str(location))!r}: {_reason(e)}") from None


def upload_file(local: str | os.PathLike, uri: str) -> None:
    """Copies one local file to ``uri`` (a file URI, not a folder)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    except OSError as e:
        raise StorageError(f"cannot upload {str(local)!r} to {redact(uri)!r}: {_reason(e)}") from None


def upload_dir(local: str | os.PathLike, uri: str) -> dict[str, Any]:
    """Replaces the folder at ``uri`` with the local folder: old marker deleted first, old files removed,
    every file copied, then the marker written last. Returns the marker."""
    import pyarrow.fs as pafs

    local = Path(local).resolve()
    files = {p.relative_to(local).as_posix(): p.stat().st_size for p in sorted(local.rglob("*"))
             if p.is_file() and p.name != MARKER}
    marker = {"format": "slimray-upload/1", "id": uuid.uuid4().hex,
              "uploaded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "files": files}
    delete(uri)
    fs, path = filesystem(uri)
    try:
        for rel in files:  # one copy per file: copy_files on a folder would also copy a stray marker
            if isinstance(fs, pafs.LocalFileSystem):  # (a file:// URI) object stores need no folders
                fs.create_dir(f"{path}/{rel}".rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local / rel), f"{path}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
        with fs.open_output_stream(f"{path}/{MARKER}") as f:
            f.write(json.dumps(marker, indent=2).encode("utf-8"))
    except OSError as e:
        raise StorageError(f"cannot upload to {redact(uri)!r}: {_reason(e)}") from None
    return marker


def cache_root() -> Path:
    from cluster.settings import get_settings

    return get_settings().storage_cache.expanduser()


def download_dir(uri: str, cache: str | os.PathLike | None = None) -> Path:
    """A local copy of the completed folder at ``uri``, kept in a cache keyed by the URI and downloaded
    again only when the remote marker changed. Raises StorageError if the folder is incomplete."""
    import pyarrow.fs as pafs

    marker = read_marker(uri)
    if marker is None:
        raise StorageError(f"{redact(uri)!r} has no {MARKER} marker: nothing is there, or its upload did not "
                           "finish (the stage that writes it failed or is still running)")
    root = Path(cache) if cache is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(redact(uri).encode()).hexdigest()[:16]
    target, copy_of_marker = root / key, root / f"{key}.json"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # trials on one node may ask for the same folder at once
        if target.is_dir() and copy_of_marker.is_file() and json.loads(copy_of_marker.read_text()) == marker:
            return target
        fs, path = filesystem(uri)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root))
        try:
            for rel, size in marker["files"].items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{path}/{rel}", str(staging / rel), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                if (staging / rel).stat().st_size != size:
                    raise StorageError(f"{redact(uri)!r} changed while it was downloaded ({rel}); try again")
            copy_of_marker.unlink(missing_ok=True)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            copy_of_marker.write_text(json.dumps(marker))
        except OSError as e:
            raise StorageError(f"cannot download {redact(uri)!r}: {_reason(e)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def evict(uri: str, cache: str | os.PathLike | None = None) -> None:
    """Removes the cached local copy of ``uri`` (it is downloaded again when next needed)."""
    root = Path(cache) if cache is not None else cache_root()
    key = hashlib.sha256(redact(uri).encode()).hexdigest()[:16]
    (root / f"{key}.json").unlink(missing_ok=True)
    shutil.rmtree(root / key, ignore_errors=True)
    (root / f"{key}.lock").unlink(missing_ok=True)


def local_copy(location: str | os.PathLike) -> Path:
    """A local folder for an input: the path itself, or the cached download of a URI."""
    return download_dir(str(location)) if is_uri(location) else Path(location).expanduser()


def work_dir(uri: str) -> Path:
    """A persistent local folder for the working files of an output at ``uri`` (keyed by the URI)."""
    path = cache_root() / "work" / hashlib.sha256(redact(uri).encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def staged_upload(uri: str) -> Iterator[Path]:
    """Yields a local staging folder; if the block succeeds it is uploaded to ``uri`` (marker last).
    Either way the staging folder is removed."""
    staging = Path(tempfile.mkdtemp(prefix="slimray-upload-"))
    try:
        yield staging
        upload_dir(staging, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
