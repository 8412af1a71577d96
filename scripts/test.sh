#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test offline (unit tests on tiny
# in-process models, then the `real_model` tests on the bundled SmolLM2-135M-Instruct).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
# llama-cpp-python, for the test that loads an exported GGUF LoRA in llama.cpp (tests/test_export_real.py): a
# source package that pip builds once (~10 min on 2 cores) and caches as a wheel. GGML_NATIVE=OFF because the
# native build crashes on its first decode on some CPUs. Tried once per version; if the build fails the suite
# goes on and that test skips, saying why (delete .venv/.lorachat-llama to try again).
llama_stamp=.venv/.lorachat-llama
if [ "$(cat "$llama_stamp" 2>/dev/null)" != "0.3.36" ]; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF" pip_install "llama-cpp-python==0.3.36" \
    || echo "note: llama-cpp-python did not build; the llama.cpp export test will skip" >&2
  echo "0.3.36" > "$llama_stamp"
fi
# Chromium and its driver, for the page's tests in real headless Chromium (tests/test_webui.py): Debian's packages,
# installed once where apt-get can (as root, as CI runs); elsewhere those tests skip, saying why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "note: chromium did not install; the page's tests will skip" >&2
  fi
fi
# vLLM's CPU build in a venv of its own, for the `vllm` tests (tests/test_serve_vllm.py): made once per machine
# (2-4 min, 3.5 GB), then reused. If it cannot be made, the suite goes on and those tests fail with the reason.
vllm_log=.venv/.lorachat-vllm-env.log
if vllm_python=$(bash scripts/vllm-env.sh 2> >(tee "$vllm_log" >&2)); then
  export LORACHAT_VLLM_PYTHON=$vllm_python
else
  export LORACHAT_VLLM_ENV_FAILED=$PWD/$vllm_log
fi
exec python -m pytest -q "$@"
