"""Shared fixtures. Integration tests (real Ray) run only with --integration, inside a loopback-only
network namespace (tests/run.sh arranges it), so that Ray's listeners stay on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.settings import get_settings

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true", help="also run tests marked integration (real Ray)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--integration"):
        # Unit tests first: they must not share the process with a running Ray driver (the shared cluster of
        # `ray_session`), e.g. the token tests reset Ray's process-wide token loader.
        items.sort(key=lambda item: "integration" in item.keywords)
        return
    skip = pytest.mark.skip(reason="integration test: run with --integration (bash tests/run.sh)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def network_is_loopback_only() -> bool:
    # /proc/net/dev lists this network namespace's interfaces (/sys/class/net may show the host's).
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


@pytest.fixture(scope="session")
def isolated_network():
    """Integration tests start Ray, whose services listen on every interface: insist on a private netns."""
    if not network_is_loopback_only():
        pytest.fail("integration tests must run in a loopback-only network namespace: "
                    "use `bash tests/run.sh` (or unshare -n sh -c 'ip link set lo up; pytest --integration')")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = get_settings().data_root
    if not (root / "banking77").is_dir():
        pytest.skip(f"reference data not found at {root} (set SLIMRAY_DATA_ROOT)")
    return root.resolve()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A real 2-layer encoder: MiniLM-L6's embeddings and first two layers (pretrained weights, not random)."""
    from transformers import AutoModel, AutoTokenizer

    from jobs.modeling import resolve_model

    src = resolve_model("minilm")
    model = AutoModel.from_pretrained(src)
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("minilm-2l")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The built-in Harbor Lane Bank sample, prepared (16 intents; always available, no ../shared needed)."""
    from jobs.prepare import PrepareConfig, main

    out = tmp_path_factory.mktemp("sample") / "data"
    main(PrepareConfig(source=str(SAMPLE), out=out, seed=0))
    return out


@pytest.fixture(scope="session")
def ray_session(isolated_network, tmp_path_factory):
    """One embedded Ray cluster for every integration test; storage in a temp folder."""
    import ray

    from cluster.ray_env import connect

    os.environ["SLIMRAY_STORAGE_ROOT"] = str(tmp_path_factory.mktemp("storage"))
    connect()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def finetuned(ray_session, sample_data, tiny_encoder, tmp_path_factory) -> Path:
    """The one short ZeRO-3 run the integration tests share: 2 workers, every parameter partitioned, and a
    worker killed after the step-4 checkpoint on the first attempt (the run must resume and finish)."""
    from jobs.finetune import FinetuneConfig, main

    out = tmp_path_factory.mktemp("ft") / "model"
    cfg = FinetuneConfig(
        data=sample_data, out=out, model=str(tiny_encoder), workers=2, cpus_per_worker=1, zero_stage=3,
        max_steps=8, batch_size=16, lr=3e-4, warmup_ratio=0.0, checkpoint_every=2, log_every=2,
        fail_after_step=4, max_failures=2,
        deepspeed={"stage3_param_persistence_threshold": 0},
    )
    main(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tiny_encoder, sample_data, tmp_path_factory) -> Path:
    """The 2-layer MiniLM cut, trained in-process (no Ray, ~20 s) on the built-in sample: a real classifier
    whose predictions mean something, for the compression tests."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from jobs.artifacts import write_json
    from jobs.modeling import load_pretrained_for_training
    from tuning.methods import Context, kd_train

    labels = json.loads((sample_data / "labels.json").read_text())
    train = pq.read_table(sample_data / "train.parquet")
    val = pq.read_table(sample_data / "validation.parquet")
    model = load_pretrained_for_training(str(tiny_encoder), labels, "AutoModelForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    y = np.asarray(train.column("label_id").to_pylist())
    ctx = Context(train_texts=train.column("text").to_pylist(), train_labels=y,
                  teacher_logits=np.zeros((len(y), len(labels)), dtype=np.float32),
                  val_texts=val.column("text").to_pylist(), val_labels=np.asarray(val.column("label_id").to_pylist()),
                  max_length=64, threads=2)
    kd_train(model, tokenizer, ctx, epochs=5, lr=8e-4, temperature=1.0, alpha=0.0)  # alpha 0: plain cross-entropy
    out = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "manifest.json", {"stage": "test fixture", "max_length": 64})
    return out
