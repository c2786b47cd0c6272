"""Golden test of the command line, black-box through ``python -m slimray``: whatever parses the arguments,
every command's ``--help`` lists its options, and every bad invocation exits 2 without a traceback with one
line ``slimray COMMAND: error: ...`` that names the bad value or flag."""

import subprocess
import sys

import pytest


def slimray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimray", *args], capture_output=True, text=True, timeout=120)


# command -> options its --help must list
HELP = {
    ("prepare",): ["--source", "--out", "--task", "--text-column", "--label-column", "--limit", "--config", "--set"],
    ("finetune",): ["--data", "--out", "--model", "--workers", "--zero-stage", "--epochs", "--max-steps",
                    "--resume", "--no-resume", "--config", "--set", "deepspeed.overlap_comm"],
    ("evaluate",): ["--model", "--data", "--split", "--out", "--config", "--set"],
    ("predict",): ["--model", "--input", "--output", "--config", "--set"],
    ("compress",): ["--model", "--data", "--out", "--trials", "--max-accuracy-drop", "--config", "--set"],
    ("serve",): ["--model", "--data", "--port", "--config", "--set"],
    ("run",): ["--data", "--profile", "--out", "--serve", "--port", "--fresh"],
    ("submit",): ["--address", "--no-wait", "--resolve-paths", "--pip"],
    ("jobs", "list"): ["--address"],
    ("jobs", "status"): ["--address"],
    ("jobs", "logs"): ["--address", "--follow"],
    ("jobs", "stop"): ["--address"],
}


@pytest.mark.parametrize("command", sorted(HELP), ids=" ".join)
def test_help_lists_every_option(command):
    r = slimray(*command, "--help")
    assert r.returncode == 0, r.stderr
    missing = [opt for opt in HELP[command] if opt not in r.stdout]
    assert not missing, f"`slimray {' '.join(command)} --help` does not list {missing}"


def test_top_level_help_lists_every_command():
    r = slimray("--help")
    assert r.returncode == 0
    for name in ("prepare", "finetune", "evaluate", "predict", "compress", "serve", "run", "submit", "jobs"):
        assert name in r.stdout


# (arguments, text the error must show: the bad value, or the flag or name that is wrong)
BAD = [
    (["prepare", "--source", "x.csv", "--out", "o", "--bogus", "1"], "--bogus"),
    (["prepare", "--source", "x.csv", "--out", "o", "--validation-fraction", "lots"], "'lots'"),
    (["finetune", "--data", "d", "--out", "o", "--zero-stage", "7"], "(got 7)"),
    (["finetune", "--data", "d", "--out", "o", "--epochs", "abc"], "'abc'"),
    (["finetune", "--data", "d", "--out", "o", "--set", "deepspeed.nope=1"], "deepspeed.nope"),
    (["finetune", "--out", "o"], "data"),
    (["evaluate", "--model", "m", "--data", "d", "--out", "o", "--threads", "0"], "threads"),
    (["predict", "--model", "m", "--input", "i.csv", "--output", "o.csv", "--batch-size", "-3"], "-3"),
    (["compress", "--model", "m", "--data", "d", "--out", "o", "--trials", "zero"], "'zero'"),
    (["serve", "--model", "m", "--port", "notaport"], "'notaport'"),
    (["run", "--profile", "nosuch"], "'nosuch'"),
    (["run", "--bogus"], "--bogus"),
    (["run", "--port", "abc"], "'abc'"),
    (["submit", "nosuch"], "'nosuch'"),
    (["jobs", "list", "--bogus"], "--bogus"),
    (["jobs", "status"], "job_id"),
]


@pytest.mark.parametrize("args,shown", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_invocation_exits_2_naming_the_value(args, shown, tmp_path):
    r = subprocess.run([sys.executable, "-m", "slimray", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert shown in r.stderr, r.stderr
    # one problem, one line, saying which command refused it
    prog = "slimray " + " ".join(args[:2] if args[0] == "jobs" else args[:1])
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"{prog}: error: "), r.stderr
