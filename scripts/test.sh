#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test offline (unit tests on tiny
# in-process models, then the `real_model` tests on the bundled SmolLM2-135M-Instruct).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
exec python -m pytest -q "$@"
