import subprocess
import sys

import pytest

from slimray.cli import STAGES


def slimray(*args):
    return subprocess.run([sys.executable, "-m", "slimray", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_stage():
    r = slimray("--help")
    assert r.returncode == 0
    for name in STAGES:
        assert name in r.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_reads_its_config_file_and_set_overrides(stage, tmp_path):
    """--config and --set reach the stage's schema: an unknown key in either is refused by name (and where it
    came from), before any work, with status 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\n")
    r = slimray(stage, "--config", str(bad))
    assert r.returncode == 2 and f"{bad}: no_such_key: Extra inputs are not permitted" in r.stderr, r.stderr
    r = slimray(stage, "--set", "other_key.sub=2")
    assert r.returncode == 2 and "other_key: Extra inputs are not permitted" in r.stderr, r.stderr


def test_stage_is_also_a_python_module():
    r = subprocess.run([sys.executable, "-m", "jobs.finetune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--zero-stage" in r.stdout and "deepspeed.stage3_param_persistence_threshold" in r.stdout


def test_bad_value_exits_2_with_one_clear_line(tmp_path):
    r = slimray("finetune", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--zero-stage", "4")
    assert r.returncode == 2
    assert "zero_stage: Input should be 0, 1, 2 or 3 (got 4)" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_path_is_named(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
    r = slimray("prepare", "--source", str(src), "--out", str(tmp_path / "data"), "--tokenizer", "/nope/model")
    assert r.returncode == 2 and "model path '/nope/model' does not exist" in r.stderr
    assert not (tmp_path / "data").exists()
