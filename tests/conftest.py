"""Shared fixtures. Integration tests (real Ray) run only with --integration, inside a loopback-only
network namespace (tests/run.sh arranges it), so that Ray's listeners stay on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.settings import get_settings

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true", help="also run tests marked integration (real Ray)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="integration test: run with --integration (bash tests/run.sh)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def network_is_loopback_only() -> bool:
    return sorted(os.listdir("/sys/class/net")) == ["lo"]


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
