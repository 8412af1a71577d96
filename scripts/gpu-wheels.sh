#!/usr/bin/env bash
# Wheels that scripts/gpu-check.sh needs on the lent GPU machine, downloaded here into .whl (git-ignored through
# .git/info/exclude; the device run carries it). That machine's Python 3.12 has torch 2.11 + CUDA 13.0, accelerate,
# safetensors, pyarrow and pytest, but no network, no trl, datasets, bitsandbytes, pydantic or liger-kernel, and an
# older transformers (5.17): so lorachat's own pins (pyproject.toml) of those go along, with what they need that the
# machine lacks. bitsandbytes ships one library per CUDA and ROCm release (43 MB zipped); only the CPU and CUDA 13.0
# ones are kept, so everything fits the 64 MiB the device run may carry. flash-attn has no wheel on PyPI (source
# only): the check skips it, saying so.
#   bash scripts/gpu-wheels.sh        # ~30 MB into .whl
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=(
  transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  click==8.5.1 regex==2026.11.19 phonenumbers==9.0.43 python-stdnum==2.2
  bitsandbytes==0.50.2 liger-kernel==0.8.5 zaragoza-construction-faq==1.2.1 chatterbot-corpus==1.3.3 py3langid==0.4.0
)
mkdir -p .git/info && grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
"$py" - <<'EOF'
import zipfile
from pathlib import Path

KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        dropped = {n for n in names if n.split("/")[-1].startswith("libbitsandbytes_") and n.split("/")[-1] not in KEEP}
        if not dropped:
            continue
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
            for name in names:
                if name in dropped:
                    continue
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):  # the dropped files' lines go too
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if line.split(b",")[0].decode() not in dropped)
                out.writestr(src.getinfo(name), data)
    slim.replace(wheel)
    print(f"{wheel.name}: kept {', '.join(KEEP)}, dropped {len(dropped)} other libraries")
EOF
du -sh .whl
