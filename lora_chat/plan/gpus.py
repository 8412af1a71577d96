"""The cards `lorachat plan --gpu` knows: memory as the driver reports it and dense bf16 tensor peak.

Memory is the total nvidia-smi shows (MiB / 1024); bf16 is the dense (no 2:4 sparsity) tensor-core peak with
fp32 accumulation from NVIDIA's datasheets and architecture whitepapers (GeForce cards accumulate bf16 in fp32 at
half the fp16-accumulate rate, which is the rate training uses).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import LorachatError, Where


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, fp32 accumulate
    source: str


GPUS: tuple[Gpu, ...] = (
    # The consumer cards people train on first: 8, 12 and 16 GB.
    Gpu("RTX 4060", 8.0, 30.2, "NVIDIA Ada Lovelace GeForce specifications (AD107)"),
    Gpu("RTX 3060", 12.0, 25.6, "NVIDIA Ampere GA10x specifications (GA106, half the fp16-accumulate rate)"),
    Gpu("RTX 4070", 12.0, 58.3, "NVIDIA Ada Lovelace GeForce specifications (AD104)"),
    Gpu("RTX 4060 Ti 16GB", 16.0, 44.1, "NVIDIA Ada Lovelace GeForce specifications (AD106)"),
    Gpu("RTX 4080", 16.0, 97.5, "NVIDIA Ada Lovelace whitepaper, table 2"),
    Gpu("RTX 3090", 24.0, 71.0, "NVIDIA Ampere GA102 whitepaper, table 9"),
    Gpu("RTX 4090", 24.0, 165.2, "NVIDIA Ada Lovelace whitepaper, table 2"),
    Gpu("RTX 5090", 31.8, 209.5, "NVIDIA Blackwell RTX whitepaper, table 1"),
    Gpu("A10G", 22.5, 70.0, "AWS G5; A10 vs A10G spec table (baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference)"),
    Gpu("L4", 22.5, 121.0, "NVIDIA L4 datasheet"),
    Gpu("L40S", 45.0, 362.0, "NVIDIA L40S datasheet"),
    Gpu("A100 40GB", 40.0, 312.0, "NVIDIA A100 datasheet"),
    Gpu("A100 80GB", 80.0, 312.0, "NVIDIA A100 datasheet"),
    Gpu("H100", 79.6, 989.0, "NVIDIA H100 SXM datasheet"),
    Gpu("H200", 140.4, 989.0, "NVIDIA H200 SXM datasheet"),
)


def _key(name: str) -> str:
    # "rtx-4090", "RTX4090", "4090" and "nvidia a100 80gb" all name a card the same way.
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", "").replace("rtx", ""))


def find_gpu(name: str, where: Where | None = None) -> Gpu:
    """The card called `name` (case, spaces, dashes and an 'RTX'/'NVIDIA' prefix do not matter)."""
    keys = {_key(g.name): g for g in GPUS}
    wanted = _key(name)
    if wanted in keys:
        return keys[wanted]
    if wanted == "a100":  # the bare name most people mean is the 80 GB card
        return keys["a10080gb"]
    close = difflib.get_close_matches(wanted, list(keys), n=1, cutoff=0.5)
    hint = f"; did you mean '{keys[close[0]].name}'?" if close else ""
    known = ", ".join(g.name for g in GPUS)
    raise LorachatError(f"unknown GPU {name!r}{hint} (known: {known})", where or Where(field="--gpu"))
