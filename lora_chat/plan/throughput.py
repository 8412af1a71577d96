"""Training FLOPs per token and the tokens/s a card sustains at a stated share of its peak.

Per trained token a frozen base costs 2 FLOPs per weight forward and 2 backward (gradients for the activations
only; frozen weights need none), gradient checkpointing adds one more forward, LoRA's own matrices cost 6 per
adapter weight (forward, input and weight gradients), causal attention 2·T·(heads·head_dim) per layer forward
and twice that backward, and the LM head 4·vocab·hidden at the positions that carry a loss.
"""

from __future__ import annotations

from .memory import Setup, Shape, adapter_params

# Model FLOPs utilisation of a single-GPU LoRA run, as a share of the dense bf16 peak. torchtune's published
# Llama-2-7B runs on an RTX 4090 reach ~44% (LoRA, 2582 tok/s) and ~54% (QLoRA with torch.compile, 3155 tok/s)
# by this FLOP count (docs/plan.md); bitsandbytes' LLM.int8 matmul runs at about half the 16-bit speed.
UTILISATION = {"none": 0.40, "4bit": 0.35, "8bit": 0.20}
LIGER_SPEEDUP = 1.2  # Liger-Kernel README: ~20% higher training throughput with its fused kernels


def flops_per_token(shape: Shape, setup: Setup) -> float:
    linear = shape.layers * shape.active_linear_params()
    passes = 4 + (2 if setup.checkpointing else 0)
    span = setup.attention_span or setup.seq_len  # causal: a token sees half its sample on average, hence 2·T not 4·T
    attention = shape.layers * 2 * span * shape.heads * shape.head_dim * (3 + (1 if setup.checkpointing else 0))
    head = 4 * shape.vocab * shape.hidden * setup.trained_share
    lora = 6 * adapter_params(shape, setup) + (2 * adapter_params(shape, setup) if setup.checkpointing else 0)
    return passes * linear + attention + head + lora


def tokens_per_second(shape: Shape, setup: Setup, peak_tflops: float, utilisation: float) -> float:
    return peak_tflops * 1e12 * utilisation / flops_per_token(shape, setup)


def default_utilisation(setup: Setup) -> float:
    return min(UTILISATION[setup.quantization] * (LIGER_SPEEDUP if setup.kernels == "liger" else 1.0), 0.75)
