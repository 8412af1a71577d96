#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, check the quickstart recipe and its data, fine-tune
# SmolLM2-135M-Instruct on it (2-core CPU: ~12 minutes in all), then evaluate the adapter against the base model.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
lorachat validate recipes/quickstart.yaml
lorachat finetune recipes/quickstart.yaml --overwrite
lorachat eval adapters/construction-faq-en --out reports/construction-faq-en
echo "adapter: adapters/construction-faq-en   report: reports/construction-faq-en/report.html"
