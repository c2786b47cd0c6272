"""Artifacts at storage URIs, against a local S3-compatible server (moto's server mode on 127.0.0.1).

The unit tests need no Ray. The integration test fine-tunes with data, output and Ray Train's checkpoints
all in the bucket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.request
import uuid

import pytest

from cluster import storage
from cluster.storage import StorageError
from jobs.errors import InputError

BUCKET = "slimray-test"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free 127.0.0.1 port, with dummy credentials in the environment; yields the
    endpoint ``127.0.0.1:PORT``."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture()
def s3(s3_server, tmp_path, monkeypatch):
    """Makes ``s3(path)`` URIs in a fresh prefix of the test bucket; local copies go to a temp cache."""
    monkeypatch.setenv("SLIMRAY_STORAGE_CACHE", str(tmp_path / "cache"))
    prefix = f"t-{uuid.uuid4().hex[:8]}"

    def uri(path: str = "", bucket: str = BUCKET, endpoint: str = s3_server) -> str:
        return f"s3://{bucket}/{prefix}/{path}?endpoint_override={endpoint}&scheme=http"
    return uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _dropping_server():
    """A 127.0.0.1 listener that accepts and at once closes every connection; yields (endpoint, accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        server.close()
        thread.join(timeout=5)


def _folder(tmp_path, files: dict[str, str]):
    root = tmp_path / "src"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _untrained_classifier(encoder, labels: list[str], out):
    """A loadable classifier with an untrained head: enough to check the plumbing, and made in seconds."""
    from transformers import AutoTokenizer

    from jobs.artifacts import write_json
    from jobs.modeling import load_pretrained_for_training

    load_pretrained_for_training(str(encoder), labels, "AutoModelForSequenceClassification").save_pretrained(out)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(out)
    write_json(out / "manifest.json", {"stage": "test fixture", "max_length": 64})
    return out


# ----------------------------------------------------------------------------------------------------------
# Locations (no server).


def test_join_keeps_the_query_and_redact_hides_credentials():
    uri = "s3://bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "b77", "data") == "s3://bkt/runs/b77/data?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("runs", "b77") == "runs/b77"
    assert storage.redact("s3://AK:SECRET@bkt/x?scheme=http") == "s3://***@bkt/x?scheme=http"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("runs/x") and not storage.is_uri(None)


def test_location_fields_keep_uris_and_resolve_paths(tmp_path):
    from pathlib import Path

    from jobs.config import ConfigError, build_config
    from jobs.prepare import PrepareConfig

    cfg = build_config(PrepareConfig, flags={"source": "x", "out": "s3://bkt/runs/data?scheme=http"})
    assert cfg.out == "s3://bkt/runs/data?scheme=http"
    assert cfg.model_dump(mode="json")["out"] == "s3://bkt/runs/data?scheme=http"
    assert build_config(PrepareConfig, flags={"source": "x", "out": "runs/data"}).out == Path("runs/data")
    assert build_config(PrepareConfig, flags={"source": "x", "out": f"file://{tmp_path}"}).out == tmp_path
    with pytest.raises(ConfigError, match=r"out: .*unsupported storage URI scheme 'ftp'.*\(got 'ftp://host/x'\)"):
        build_config(PrepareConfig, flags={"source": "x", "out": "ftp://host/x"})
    with pytest.raises(ConfigError, match="names no bucket"):
        build_config(PrepareConfig, flags={"source": "x", "out": "s3:///x"})


def test_local_check_writable_names_the_obstacle(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.check_writable(tmp_path / "file" / "runs")
    storage.check_writable(tmp_path / "new" / "runs")
    assert not (tmp_path / "new").exists(), "checking leaves nothing behind"


# ----------------------------------------------------------------------------------------------------------
# Against the S3 server.


def test_upload_download_round_trip_and_cache(s3, tmp_path):
    src = _folder(tmp_path, {"a.txt": "A", "sub/b.json": '{"b": 1}'})
    marker = storage.upload_dir(src, s3("art"))
    assert marker["files"] == {"a.txt": 1, "sub/b.json": 8}
    assert storage.read_marker(s3("art")) == marker and storage.exists(s3("art"))

    local = storage.download_dir(s3("art"))
    assert (local / "a.txt").read_text() == "A" and (local / "sub" / "b.json").read_text() == '{"b": 1}'
    assert not (local / storage.MARKER).exists()
    # Unchanged remote: the cached copy is reused, not downloaded again.
    stamp = (local / "a.txt").stat().st_mtime_ns
    assert storage.local_copy(s3("art")) == local and (local / "a.txt").stat().st_mtime_ns == stamp
    # A new upload (new marker) is downloaded again, and files it no longer has are gone.
    (src / "a.txt").write_text("A2")
    (src / "sub" / "b.json").unlink()
    storage.upload_dir(src, s3("art"))
    local = storage.download_dir(s3("art"))
    assert (local / "a.txt").read_text() == "A2" and not (local / "sub" / "b.json").exists()
    storage.evict(s3("art"))
    assert not local.exists() and (storage.local_copy(s3("art")) / "a.txt").read_text() == "A2"


def test_marker_written_last_and_incomplete_folders_refused(s3, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    # A failing stage uploads nothing.
    with pytest.raises(RuntimeError):
        with storage.staged_upload(s3("failed")) as staging:
            (staging / "weights.bin").write_bytes(b"x" * 10)
            raise RuntimeError("stage failed")
    assert not storage.exists(s3("failed"))
    with pytest.raises(StorageError, match="has no _SUCCESS marker"):
        storage.download_dir(s3("failed"))

    # Replacing a complete folder removes its marker first: an upload that dies half-way leaves a folder
    # that no reader takes for complete (object stores have no atomic rename).
    src = _folder(tmp_path, {"1.txt": "one", "2.txt": "two"})
    storage.upload_dir(src, s3("art"))
    real_copy, copied = pafs.copy_files, []

    def dies_on_second_file(source, destination, **kw):
        if copied:
            raise OSError("connection reset")
        copied.append(destination)
        real_copy(source, destination, **kw)

    monkeypatch.setattr(pafs, "copy_files", dies_on_second_file)
    with pytest.raises(StorageError, match="cannot upload"):
        storage.upload_dir(src, s3("art"))
    monkeypatch.undo()
    assert storage.read_marker(s3("art")) is None
    with pytest.raises(StorageError, match="upload did not finish"):
        storage.local_copy(s3("art"))


def test_check_writable_errors_name_the_uri_and_the_reason(s3, s3_server):
    import pyarrow.fs as pafs

    storage.check_writable(s3("ok"))
    fs, path = storage.filesystem(s3("ok"))
    assert fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)) == [], "the probe is deleted"

    with pytest.raises(StorageError, match=r"cannot write to 's3://no-such-bucket/.*': bucket 'no-such-bucket' "
                                           r"does not exist"):
        storage.check_writable(s3("x", bucket="no-such-bucket"))

    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        storage.check_writable(s3("x", endpoint=f"127.0.0.1:{_closed_port()}"))
    # Fails fast: one attempt, no retries. An endpoint that drops every connection sees exactly one.
    with _dropping_server() as (endpoint, connections):
        with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
            storage.check_writable(s3("x", endpoint=endpoint))
    assert len(connections) == 1, f"{len(connections)} connection attempts: the probe retried"

    with pytest.raises(StorageError, match="Unexpected query parameter"):
        storage.check_writable(s3("x") + "&bogus=1")


def test_check_writable_bad_credentials(s3, s3_server):
    # moto checks credentials once told to (its /moto-api/reset-auth); the dummy keys are then unknown.
    def enforce(count: bytes) -> None:
        urllib.request.urlopen(urllib.request.Request(
            f"http://{s3_server}/moto-api/reset-auth", data=count, method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10).read()

    enforce(b"0")
    try:
        with pytest.raises(StorageError, match="cannot write to .*: access denied: check the credentials"):
            storage.check_writable(s3("x"))
    finally:
        enforce(b"inf")
    storage.check_writable(s3("x"))


def test_stage_errors_before_any_work_for_unwritable_uris(s3, capsys, monkeypatch, sample_data, tmp_path):
    from jobs.finetune import FinetuneConfig
    from jobs.finetune import main as finetune_main
    from jobs.prepare import cli as prepare_cli

    loaded = []
    monkeypatch.setattr("jobs.prepare.load_source", lambda *a: loaded.append(a))
    with pytest.raises(SystemExit) as exit_info:
        prepare_cli(["--source", "jobs/samples/harbor_bank", "--out", s3("data", bucket="missing-bucket")])
    assert exit_info.value.code == 2 and not loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slimray prepare: error: cannot write to {s3('data', bucket='missing-bucket')!r}: "
                   "bucket 'missing-bucket' does not exist"]

    # The Ray Train storage root is checked before Ray starts.
    import ray

    monkeypatch.setenv("SLIMRAY_STORAGE_ROOT", s3("runs", bucket="missing-bucket"))
    connected = ray.is_initialized()  # an integration run may share one cluster across tests
    with pytest.raises(StorageError, match=r"cannot write to 's3://missing-bucket/.*/runs/ray_train\?.*does not exist"):
        finetune_main(FinetuneConfig(data=sample_data, out=tmp_path / "ft"))
    assert ray.is_initialized() == connected


def test_output_uri_that_exists_needs_overwrite(s3, tmp_path):
    from jobs.artifacts import atomic_dir, check_can_write

    with atomic_dir(s3("out")) as staging:
        (staging / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match=r"output 's3://.*/out\?.*' already exists; pass --overwrite"):
        check_can_write(s3("out"), overwrite=False)
    check_can_write(s3("out"), overwrite=True)


def test_prepare_and_evaluate_through_s3(s3, tiny_encoder, tmp_path):
    """prepare writes to the bucket; evaluate reads model and data from it and writes its metrics there."""
    from jobs.evaluate import cli as evaluate_cli
    from jobs.prepare import cli as prepare_cli

    prepare_cli(["--source", "jobs/samples/harbor_bank", "--out", s3("data")])
    marker = storage.read_marker(s3("data"))
    splits = {"train.parquet", "validation.parquet", "test.parquet", "labels.json", "manifest.json"}
    assert splits <= set(marker["files"])
    labels = json.loads((storage.local_copy(s3("data")) / "labels.json").read_text())
    storage.upload_dir(_untrained_classifier(tiny_encoder, labels, tmp_path / "model"), s3("model"))

    evaluate_cli(["--model", s3("model"), "--data", s3("data"), "--split", "validation", "--out", s3("eval")])
    metrics = json.loads((storage.download_dir(s3("eval")) / "metrics.json").read_text())
    assert metrics["split"] == "validation" and 0 <= metrics["accuracy"] <= 1
    manifest = json.loads((storage.local_copy(s3("eval")) / "manifest.json").read_text())
    assert manifest["model"] == s3("model") and manifest["data"] == s3("data")


@pytest.fixture(scope="session")
def ray_workers_cache():
    """The download cache of Ray's workers: the setting as it was when the session started (Ray's workers
    keep the environment Ray started with; the per-test temp cache of ``s3`` comes later)."""
    from cluster.settings import get_settings

    return get_settings().storage_cache


@pytest.fixture()
def s3_with_keys(s3):
    """URIs that carry the dummy credentials (``s3://KEY:SECRET@bucket``, which pyarrow reads): the Ray
    workers may have started before this module set them in the environment. On a real cluster they come
    from each node's environment."""
    return lambda path: s3(path).replace("s3://", "s3://testing:testing@", 1)


@pytest.mark.integration
def test_finetune_then_compress_with_data_checkpoints_and_models_in_s3(s3_with_keys, ray_session, ray_workers_cache,
                                                                       sample_data, tiny_encoder, monkeypatch):
    """Data, output and Ray Train's checkpoints all in the bucket, nothing on the driver's disk but caches; then
    the search on that model: Tune keeps its state in the bucket, trials upload their candidates there, chosen/
    gets its marker."""
    import pyarrow.fs as pafs

    from jobs.finetune import FinetuneConfig, run_name
    from jobs.finetune import main as finetune
    from tuning.compress import CompressConfig
    from tuning.compress import main as compress

    storage.upload_dir(sample_data, s3_with_keys("data"))
    monkeypatch.setenv("SLIMRAY_STORAGE_ROOT", s3_with_keys("runs"))
    cfg = FinetuneConfig(data=s3_with_keys("data"), out=s3_with_keys("ft"), model=str(tiny_encoder), workers=2,
                         zero_stage=2, max_steps=2, batch_size=16, log_every=1)  # the last step checkpoints
    assert finetune(cfg) == s3_with_keys("ft")

    local = storage.download_dir(s3_with_keys("ft"))
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["accuracy"] <= 1
    assert (local / "model.safetensors").stat().st_size > 1_000_000
    assert json.loads((local / "manifest.json").read_text())["data"] == s3_with_keys("data")
    fs, root = storage.filesystem(storage.join(s3_with_keys("runs"), "ray_train", run_name(cfg)))
    saved = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert any("/checkpoint_" in p for p in saved), saved[:20]

    point = {"distill_layers": 0, "distill_epochs": 1, "temperature": 2.0, "alpha": 0.5, "lr": 3e-4,
             "prune_heads": 0.0, "prune_ffn": 0.0, "importance": "taylor", "recovery_steps": 0,
             "trim_vocab": False, "quantize": "torch-int8"}
    search = CompressConfig(model=s3_with_keys("ft"), data=s3_with_keys("data"), out=s3_with_keys("compress"),
                            trials=1, train_limit=100, max_accuracy_drop=100, latency_rounds=3, initial_points=[point],
                            search={"distill_epochs": [1]})
    try:
        assert compress(search) == storage.join(s3_with_keys("compress"), "chosen")
    finally:
        for uri in (search.model, search.data, storage.join(search.out, "inputs")):  # the trials' copies
            storage.evict(uri, ray_workers_cache)

    chosen = storage.download_dir(storage.join(s3_with_keys("compress"), "chosen"))
    metrics = json.loads((chosen / "metrics.json").read_text())
    assert metrics["trials"] == {"finished": 1, "total": 1} and metrics["backend"] == "torch-int8"
    assert json.loads((chosen / "manifest.json").read_text())["parent"] == s3_with_keys("ft")
    fs, root = storage.filesystem(s3_with_keys("compress"))
    saved = {i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
    assert {"report.md", "pareto.png", "compress_config.json", "inputs/_SUCCESS"} <= saved, sorted(saved)
    assert any(p.startswith("tune/experiment_state") for p in saved), sorted(saved)
    assert any(p.startswith("search/") and p.endswith("/_SUCCESS") for p in saved), sorted(saved)
