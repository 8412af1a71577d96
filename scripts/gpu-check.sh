#!/usr/bin/env bash
# The GPU check (issues 19 and 20), one call of at most 9 minutes on a lent GPU machine: the machine, `pytest -m gpu`,
# then bench/gpu_check.py (bench_joint's four adapters jointly and one after another; QLoRA and LoRA runs of
# SmolLM2-135M's architecture, liger and flash-attention on and off, each run's peak memory beside `lorachat plan`'s
# estimate, those its budget reaches: on an H200 the runs need a second call, `bench/gpu_check.py --no-joint`).
# Figures land in $OUT: gpu-check.json, gpu-check.md (paste into bench/RESULTS.md), gpu-check.log (all of this
# output), pytest-gpu.log, finetune.log.
#
#   bash scripts/gpu-check.sh                        # on the GPU machine, from the repo root
#   GPU_CHECK_ON_CPU=1 bash scripts/gpu-check.sh     # here: the same steps on the CPU, small, to check the script
#
# Nothing is installed from a registry: lorachat runs from this checkout (PYTHONPATH), and the packages the machine
# lacks come as wheels in .whl (scripts/gpu-wheels.sh fetches them), installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
on_cpu=${GPU_CHECK_ON_CPU:-0}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

check() {
  local started=$SECONDS py pytest_rc check_rc
  echo "== machine ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  if [ "$on_cpu" = 1 ]; then
    py=${PYTHON:-python}
    echo "GPU_CHECK_ON_CPU=1: CUDA-only steps skip, saying why; memory is the peak RSS"
  else
    py=${PYTHON:-python3}
    nvidia-smi || echo "nvidia-smi: not found or failed"
  fi
  if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    if [ "$on_cpu" = 1 ]; then
      echo "wheels in .whl: not installed on the CPU (they are for the GPU machine's Python; .venv has lorachat's pins)"
    else
      echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: the carried wheels did not install"; return 1; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  else
    echo "no .whl folder: using the packages already installed"
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$py" - <<'EOF'
import importlib.metadata as md, platform, torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {cuda}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
for name in ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "flash-attn"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF

  echo "== pytest -m gpu ($((SECONDS - started)) s)"
  timeout 180 "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
  pytest_rc=${PIPESTATUS[0]}

  echo "== bench/gpu_check.py ($((SECONDS - started)) s)"
  # Runs not started by ~400 s in are skipped, saying so: with one run's 120 s limit the check ends inside 9 minutes.
  local budget=$((400 - (SECONDS - started)))
  "$py" bench/gpu_check.py --out "$OUT" --pytest-log "$OUT/pytest-gpu.log" --pytest-rc "$pytest_rc" \
    --budget-s $((budget > 60 ? budget : 60)) $([ "$on_cpu" = 1 ] && echo --cpu)
  check_rc=$?

  echo "== done in $((SECONDS - started)) s: pytest exit $pytest_rc, gpu_check exit $check_rc; files in $OUT"
  [ "$pytest_rc" = 0 ] && [ "$check_rc" = 0 ]
}

check 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
