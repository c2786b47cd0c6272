"""`--dry-run` on every stage (parse, validate, open and check the inputs, start nothing), and every stage's
flags and config files fuzzed through it with hypothesis: exit 0 or exit 2 with `prog: error:` lines, never a
traceback. SLIMRAY_FUZZ_EXAMPLES sets the examples per stage (80 by default)."""

from __future__ import annotations

import importlib
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import make_parser
from slimray.cli import STAGES, stage_config_class

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "samples" / "harbor_bank"


def stage_cli(stage: str):
    return importlib.import_module(STAGES[stage][0]).cli


def run(stage: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``slimray <stage> argv`` run in this process."""
    try:
        stage_cli(stage)(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def no_ray(monkeypatch):
    """A dry run must not start Ray: connecting fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(ray, "init", refuse)


def test_every_stage_and_run_take_dry_run():
    from slimray.run import RunConfig

    for stage in STAGES:
        assert "--dry-run" in make_parser(stage_config_class(stage), stage, dry_run=True).format_help()
    assert "--dry-run" in make_parser(RunConfig, "run", dry_run=True).format_help()


def test_dry_runs_check_real_inputs_print_one_line_and_write_nothing(no_ray, sample_data, tiny_classifier, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    cases = {
        "prepare": ["--source", str(SAMPLE), "--out", str(out)],
        "finetune": ["--data", str(sample_data), "--out", str(out), "--model", str(tiny_classifier)],
        "evaluate": ["--model", str(tiny_classifier), "--data", str(sample_data), "--out", str(out)],
        "compress": ["--model", str(tiny_classifier), "--data", str(sample_data), "--out", str(out)],
        "index": ["--docs", str(SAMPLE / "knowledge"), "--out", str(out)],
        "serve": ["--model", str(tiny_classifier), "--data", str(sample_data)],
    }
    for stage, argv in cases.items():
        status, stdout, stderr = run(stage, [*argv, "--dry-run"], capsys)
        assert status == 0, (stage, stderr)
        (line,) = [x for x in stdout.splitlines() if "dry run" in x]
        assert line.startswith(f"slimray {stage}: dry run: config valid, inputs checked; would "), line
        assert not out.exists(), stage
    status, stdout, _ = run("predict", ["--model", str(tiny_classifier), "--input", str(sample_data / "test.parquet"),
                                        "--output", str(tmp_path / "p.csv"), "--dry-run"], capsys)
    assert status == 0 and "would label" in stdout and not (tmp_path / "p.csv").exists()

    from slimray.run import cli as run_cli

    run_cli(["--out", str(out), "--dry-run"])  # the built-in sample, the quick profile
    assert "would run prepare" in capsys.readouterr().out and not out.exists()


def test_a_dry_run_refuses_what_the_stage_would_refuse(sample_data, tiny_classifier, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    status, _, stderr = run("finetune", ["--data", str(sample_data), "--out", str(tmp_path / "exists"),
                                         "--model", str(tiny_classifier), "--dry-run"], capsys)
    assert status == 2 and stderr.strip().endswith("already exists; pass --overwrite to replace it"), stderr
    status, _, stderr = run("evaluate", ["--model", str(tmp_path / "exists"), "--data", str(sample_data),
                                         "--dry-run"], capsys)
    assert status == 2 and "config.json: missing" in stderr, stderr
    for argv in (["--epochs", "1e99"], ["--epochs", ""], ["--lr", "nan"], ["--workers", "-3"]):
        status, _, stderr = run("finetune", ["--data", str(sample_data), "--out", str(tmp_path / "o"),
                                             *argv, "--dry-run"], capsys)
        assert status == 2 and len(stderr.strip().splitlines()) == 1, (argv, stderr)


# ----------------------------------------------------------------------------------------------------------
# Fuzzing: real flag names of each stage, hostile values, config files of every kind.

# Storage URIs appear only in forms refused without network access: reaching (or failing to reach) a bucket
# is tests/test_storage.py's matter, and an unreachable endpoint takes seconds to fail.
HOSTILE_TEXT = st.sampled_from(["", " ", "0", "-1", "1e99", "-1e99", "nan", "inf", "999999999999999999999", "true",
                                "[1, 2]", "{a: 1}", "null", "~", "'", "\"", "a=b", "--out", "\x00", "é", "😀",
                                "../../etc/passwd", "s3://", "gs://", "file:///nope", "/nope",
                                "minilm", "0.5", "1", "2", "64"])
ANY_TEXT = st.text(alphabet=string.printable + "éß😀\u202e", max_size=40)


def file_kinds(tmp_path: Path) -> dict[str, Path]:
    kinds = {"binary": b"\x00\xff\xfe\x89PNG\r\n" * 50, "empty": b"", "yaml_list": b"- 1\n- 2\n",
             "yaml_bad": b"a: [1, 2\n", "huge_number": b"epochs: 1e999\nworkers: 10000000000000\n",
             "deep": b"a: " + b"[" * 500 + b"]" * 500 + b"\n", "unknown": b"no_such_key: 1\n",
             "latin1": "caf\xe9: 1\n".encode("latin-1"), "csv": b"text,label\nhello,a\n"}
    found = {}
    for name, content in kinds.items():
        found[name] = tmp_path / f"{name}.yaml"
        found[name].write_bytes(content)
    found["folder"] = tmp_path
    found["missing"] = tmp_path / "missing.yaml"
    return found


def valid_argv(stage: str, sample_data: Path, model: Path, out: Path) -> list[str]:
    """Arguments with which ``stage``'s dry run passes: the fuzzing starts from them, so that its values reach
    the checks behind the parser."""
    return {
        "prepare": ["--source", str(SAMPLE), "--out", str(out)],
        "finetune": ["--data", str(sample_data), "--out", str(out), "--model", str(model)],
        "evaluate": ["--model", str(model), "--data", str(sample_data)],
        "predict": ["--model", str(model), "--input", str(sample_data / "test.parquet"), "--output", str(out) + ".csv"],
        "compress": ["--model", str(model), "--data", str(sample_data), "--out", str(out)],
        "index": ["--docs", str(SAMPLE / "knowledge"), "--out", str(out)],
        "serve": ["--model", str(model), "--data", str(sample_data)],
    }[stage]


@st.composite
def argvs(draw, stage: str, files: dict[str, Path], base: list[str]) -> list[str]:
    fields = list(stage_config_class(stage).model_fields)
    argv: list[str] = list(base) if draw(st.integers(0, 4)) else []
    for _ in range(draw(st.integers(0, 4))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            argv += ["--config", str(files[draw(st.sampled_from(sorted(files)))])]
        elif choice == 1:
            argv += ["--set", f"{draw(st.sampled_from(fields + ['nope', 'a.b']))}={draw(HOSTILE_TEXT)}"]
        elif choice == 2:
            argv += ["--" + draw(ANY_TEXT.filter(lambda t: t and not t.startswith("-")))]
        elif choice in (3, 4):
            argv += ["--" + draw(st.sampled_from(fields)).replace("_", "-"),
                     str(files[draw(st.sampled_from(sorted(files)))])]
        else:
            flag = "--" + draw(st.sampled_from(fields)).replace("_", "-")
            argv += [flag, draw(st.one_of(HOSTILE_TEXT, ANY_TEXT))]
    return argv + ["--dry-run"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_fuzzed_flags_and_config_files_end_in_exit_0_or_one_error_per_line(stage, no_ray, sample_data, tiny_classifier,
                                                                            tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp(f"fuzz-{stage}")
    files = file_kinds(folder)
    base = valid_argv(stage, sample_data, tiny_classifier, folder / "out")
    prog = f"slimray {stage}"
    seen = {0: 0, 2: 0}

    @settings(max_examples=int(os.environ.get("SLIMRAY_FUZZ_EXAMPLES", 80)), deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=argvs(stage, files, base))
    def check(argv):
        status, stdout, stderr = run(stage, argv, capsys)
        assert status in (0, 2), (argv, status, stderr[-2000:])
        assert "Traceback" not in stderr, (argv, stderr[-2000:])
        if status == 2:
            lines = stderr.strip().splitlines()
            assert lines and all(line.startswith(f"{prog}: error: ") for line in lines), (argv, stderr[-2000:])
        else:
            assert "dry run" in stdout, (argv, stdout[-2000:])
        seen[status] += 1

    check()
    print(f"fuzzed slimray {stage}: {seen[0] + seen[2]} cases, exit 0: {seen[0]}, exit 2: {seen[2]}")  # bench/chaos.py
    assert seen[0] and seen[2], seen  # both outcomes reached: the values got past the parser
    assert not (folder / "out").exists()


def test_a_finetune_dry_run_says_which_checkpoint_the_same_command_resumes(sample_data, tiny_classifier, tmp_path,
                                                                          monkeypatch, capsys):
    import json

    from jobs.config import parse_args
    from jobs.finetune import FinetuneConfig, run_name

    monkeypatch.setenv("SLIMRAY_STORAGE_ROOT", str(tmp_path / "storage"))
    argv = ["--data", str(sample_data), "--out", str(tmp_path / "ft"), "--model", str(tiny_classifier)]
    status, stdout, _ = run("finetune", [*argv, "--dry-run"], capsys)
    assert status == 0 and "resume" not in stdout
    run_dir = tmp_path / "storage" / "ray_train" / run_name(parse_args(FinetuneConfig, argv, "x"))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"metrics": {"step": 40, "epoch": 1}}}))
    status, stdout, _ = run("finetune", [*argv, "--dry-run"], capsys)
    assert status == 0 and f"would resume run {run_dir.name} from its step-40 checkpoint" in stdout, stdout
    status, stdout, _ = run("finetune", [*argv, "--no-resume", "--dry-run"], capsys)
    assert status == 0 and "resume" not in stdout
