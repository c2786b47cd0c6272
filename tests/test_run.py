"""`slimray run`: the skip/resume bookkeeping (unit) and the whole pipeline on a tiny slice (integration)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError
from jobs.inference import load_inference_model
from raycluster import free_port  # tests/raycluster.py
from slimray.report import SUMMARY_COLUMNS
from slimray.run import RunState, load_profile, run_or_skip, stage_configs

REPO = Path(__file__).resolve().parent.parent


def test_profiles_build_valid_stage_configs(tmp_path):
    for name in ("quick", "full"):
        profile, path = load_profile(name)
        cfgs = stage_configs(profile, "some/source", tmp_path, path)
        assert cfgs["finetune"].workers == 2 and cfgs["compress"].out == tmp_path / "compress"


def test_bad_profiles_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'quik'.*quick"):
        load_profile("quik")
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"data": "x"}}))
    with pytest.raises(ConfigError, match=r"finetune: \['data'\] are set by `slimray run`"):
        load_profile(str(bad))
    bad.write_text(yaml.safe_dump({"finetune": {"zero_stage": 5}}))
    profile, path = load_profile(str(bad))
    with pytest.raises(ConfigError, match="(?s)section 'finetune'.*zero_stage.*got 5"):
        stage_configs(profile, "src", tmp_path, path)


def test_a_stage_runs_once_per_inputs_and_resumes_after_an_interruption(tmp_path, capsys):
    marker = tmp_path / "stage" / "manifest.json"
    calls = []

    def work(resume):
        calls.append(resume)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps({"n": len(calls)}))

    state = RunState(tmp_path)
    run_or_skip(state, 1, "prepare", "t", "fp-1", marker, work)
    run_or_skip(RunState(tmp_path), 1, "prepare", "t", "fp-1", marker, work)  # same inputs: skipped
    assert calls == [False] and "skipped" in capsys.readouterr().out
    run_or_skip(RunState(tmp_path), 1, "prepare", "t", "fp-2", marker, work)  # new inputs: runs afresh
    assert calls == [False, False]
    marker.write_text("changed by hand")  # output no longer what was recorded: runs again
    run_or_skip(RunState(tmp_path), 1, "prepare", "t", "fp-2", marker, work)
    assert len(calls) == 3

    def interrupted(resume):
        calls.append(resume)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_or_skip(RunState(tmp_path), 1, "prepare", "t", "fp-3", marker, interrupted)
    run_or_skip(RunState(tmp_path), 1, "prepare", "t", "fp-3", marker, work)  # same inputs: resumes
    assert calls[-2:] == [False, True]
    assert RunState(tmp_path).stages["prepare"]["status"] == "done"


def parse_summary(stdout: str) -> dict[str, list[str]]:
    """The rows of the printed base-vs-chosen table: name -> cells (columns split on 2+ spaces)."""
    lines = stdout[stdout.index("Base vs chosen"):].splitlines()[1:5]
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.integration
def test_the_pipeline_on_a_tiny_slice(isolated_network, tiny_encoder, tiny_causal_lm, tmp_path):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump({
        "prepare": {"limit": 64},
        "finetune": {"model": str(tiny_encoder), "workers": 2, "zero_stage": 3, "max_steps": 3, "batch_size": 8,
                     "checkpoint_every": 3, "log_every": 1, "eval_batch_size": 64},
        "compress": {"trials": 2, "train_limit": 64, "max_accuracy_drop": 100, "asha": False, "trial_cpus": 1,
                     "latency_rounds": 3,
                     "search": {"distill_layers": [0, 1], "distill_epochs": [1], "prune_heads": [0.0],
                                "prune_ffn": [0.0], "recovery_steps": [0], "trim_vocab": [True],
                                "quantize": ["onnx-int8"]}},
        "smoke": {"requests": 3, "batch_requests": 1},
        "knowledge": {"generator": str(tiny_causal_lm), "questions": 2, "max_new_tokens": 8},
    }))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded cluster
    env["SLIMRAY_STORAGE_ROOT"] = str(tmp_path / "storage")
    args = [sys.executable, "-m", "slimray", "run", "--profile", str(profile), "--out", str(out),
            "--port", str(free_port())]
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]

    for rel in ("data/manifest.json", "data/train.parquet", "ft/model.safetensors", "ft/history.jsonl",
                "compress/trials.json", "compress/chosen/metrics.json", "compress/pareto.png", "smoke.json",
                "run_state.json", "configs/prepare.yaml", "configs/finetune.yaml", "configs/compress.yaml",
                "report.md"):
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) == 3
    for fig in figures:
        assert (out / fig).stat().st_size > 1000 and (out / fig).read_bytes()[:4] == b"\x89PNG", fig
    assert "## Against the goals" in report and "slimray serve --model" in report

    metrics = json.loads((out / "compress/chosen/metrics.json").read_text())
    rows = parse_summary(first.stdout)
    for (_, key, decimals), base_cell, chosen_cell in zip(SUMMARY_COLUMNS, rows["base (fine-tuned)"], rows["chosen"]):
        assert float(base_cell) == pytest.approx(metrics["base"][key], abs=10 ** -decimals), key
        assert float(chosen_cell) == pytest.approx(metrics[key], abs=10 ** -decimals), key
    assert rows["ratio"][2] == f"{metrics['speedup_b1']:.2f}x faster"
    assert rows["ratio"][4] == f"{metrics['size_reduction']:.2f}x smaller"
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["assist_requests"] == 3 and smoke["assist_p50_ms"] > 0 and smoke["raw_texts_per_s"] > 0
    # The sample's knowledge base was indexed and served: its questions went through the streamed assist path.
    knowledge = smoke["knowledge"]
    assert knowledge["questions"] == 2 and len(knowledge["answers"]) == 2
    assert json.loads((out / "kb" / "index.json").read_text())["calibration"]["answerable"] > 0
    assert "### Answers from the knowledge base" in report

    # No customer text reaches the logs at INFO (the driver's output carries the Ray workers' and replicas' too):
    # training, the search and serving log counts and figures, never a text of the data.
    import pyarrow.parquet as pq

    logged = first.stdout + first.stderr
    texts = {t for split in ("train", "validation", "test")
             for t in pq.read_table(out / "data" / f"{split}.parquet").column("text").to_pylist() if len(t) >= 12}
    leaked = sorted(t for t in texts if t in logged)
    assert not leaked, f"{len(leaked)} data texts in the run's output, e.g. {leaked[:3]}"

    # The same command again: every stage is complete for unchanged inputs, so only the report is rewritten.
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped — complete, inputs unchanged") == 4, again.stdout
    assert parse_summary(again.stdout) == rows


def test_a_tagging_run_needs_data(tmp_path):
    from slimray.run import RunConfig, start

    with pytest.raises(ConfigError, match="task: 'ner' needs --data"):
        start(RunConfig(task="ner", out=tmp_path / "run"))


@pytest.mark.integration
def test_the_pipeline_for_an_entity_tagger(isolated_network, tiny_encoder, tmp_path):
    """`slimray run --task ner`: the same stages and report for a tagger, with the per-type table, the search
    on entity F1 and the smoke test on /v1/entities, whose answers equal the model's in-process ones."""
    from conftest import write_tagged_sample

    source = write_tagged_sample(tmp_path / "tagged.conll")
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump({
        "finetune": {"model": str(tiny_encoder), "workers": 2, "zero_stage": 2, "epochs": 3, "batch_size": 8,
                     "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 16, "log_every": 5, "eval_batch_size": 64},
        "compress": {"trials": 2, "max_accuracy_drop": 100, "asha": False, "latency_texts": 32, "latency_rounds": 3,
                     "search": {"distill_layers": [0, 1], "distill_epochs": [1], "prune_heads": [0.0],
                                "prune_ffn": [0.0], "recovery_steps": [0], "trim_vocab": [True],
                                "quantize": ["onnx-int8"]}},
        "smoke": {"requests": 3, "batch_requests": 1},
    }))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["SLIMRAY_STORAGE_ROOT"] = str(tmp_path / "storage")
    args = [sys.executable, "-m", "slimray", "run", "--task", "ner", "--data", str(source), "--profile",
            str(profile), "--out", str(out), "--port", str(free_port())]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    # The search ran on entity F1 (the tagger's metric wherever a classifier's is accuracy).
    metrics = json.loads((out / "compress/chosen/metrics.json").read_text())
    assert metrics["metric"] == "entity_f1" and "accuracy" not in metrics
    for key in ("entity_f1", "macro_f1", "entity_f1_drop_pts", "speedup_b1", "size_reduction"):
        assert isinstance(metrics[key], float), key
    assert metrics["trials"] == {"finished": 2, "total": 2}
    labels = json.loads((out / "data/labels.json").read_text())
    chosen = load_inference_model(out / "compress/chosen")
    assert chosen.kind == "tagging" and chosen.labels == labels
    assert json.loads((out / "data/manifest.json").read_text())["task"] == "ner"
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["entities_requests"] == 3 and smoke["texts_checked"] == 3 + smoke["entities_batch_size"]
    assert smoke["served_agreement"] == 1.0 and smoke["entities_found"] > 0
    report = (out / "report.md").read_text()
    for needle in ("| entity type |", "| type | precision | recall | F1 | strict F1 | support |", "| location |",
                   "*micro avg*", "val entity F1", "validation entity F1 within", "`/v1/entities`",
                   "slimray serve --entity-model"):
        assert needle in report, needle
    assert "entity F1" in done.stdout[done.stdout.index("Base vs chosen"):]
