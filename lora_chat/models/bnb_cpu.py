"""bitsandbytes' CPU repacking of 4-bit weights, kept out.

On a CPU with AVX512-BF16, a Linear4bit repacks its weight in place into an inference layout the first time it runs
in eval mode without grad. Checked on bitsandbytes 0.50.2 (the pinned version), that goes wrong three ways:

- training: the steps after an eval pass read the repacked buffer as if it were the plain one. Upstream tracks the
  same one-way packing for `.to()` in bitsandbytes-foundation/bitsandbytes#2078.
- a layer whose input is not a multiple of the quantization block (64) cannot be repacked: the forward pass raises
  `shape '[32, 0]' is invalid ...`.
- the packed kernel computes in bf16 whatever the model's compute dtype, so a float32 4-bit model answers other
  than it trained, and a merge into the dequantized base fails its own logit check against it.

So every 4-bit layer stays in the layout it trained in. Re-check when the pin moves; the guard turns itself off on a
newer bitsandbytes.
"""

from __future__ import annotations

from typing import Any

CHECKED = "0.50.2"


def keep_4bit_weights_unpacked(model: Any) -> None:
    import bitsandbytes
    from packaging.version import Version

    if Version(bitsandbytes.__version__) > Version(CHECKED):
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
