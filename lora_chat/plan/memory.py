"""Peak training memory of a LoRA/QLoRA run from the model's shape and the run's settings, without weights.

Every figure is bytes and follows what PyTorch keeps alive for the backward pass of a Llama-style decoder
(transformers' modeling code, PEFT's LoRA layer, bitsandbytes' 4/8-bit matmuls); docs/plan.md derives each
term and records the measured and published runs it was checked against. Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..errors import LorachatError, Where

GIB = 1024**3
ADAPTER_BYTES = 4  # PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype) whatever the base dtype
# bitsandbytes nf4: 4 bits a weight plus one absmax per 64-weight block; double quantization stores that absmax
# in 8 bits with one fp32 scale per 256 blocks (QLoRA paper, section 3): 0.5 + 1/64 + 4/(64*256) bytes a weight.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES = 1.0  # LLM.int8: int8 weights plus one fp32 scale per output row (added per module below)
# lorachat's loss (train/loss.py) projects trained positions onto the vocabulary a chunk of rows at a time, as many
# rows (a power of two) as keep one chunk's logits within this many values (2**23 fp32 = 32 MiB): 256 rows at a 32k
# vocabulary, 128 at 49k (SmolLM2), 64 at 128k (Llama 3). Each chunk is still a matmul of at least 64 x vocab x
# hidden (SmolLM2: 3.6 GFLOP), so smaller chunks cost no measurable speed (bench_loss's loss_step_ms).
LOSS_CHUNK_ELEMENTS = 2**23
LOSS_CHUNK_MAX_ROWS = 1024
CUDA_CONTEXT = 0.5 * GIB  # CUDA context + cuBLAS/cuDNN workspaces with lazy module loading (CUDA >= 11.7)
# glibc's heap on a CPU. It raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
# activation-sized blocks come from the heap and stay resident once freed, fragmented between live ones: what a
# step allocates and frees again (activations, the loss's buffers, a layer's backward) leaves about this many times
# itself resident beside the live tensors, more with checkpointing (each layer's forward runs twice, in blocks of
# other sizes). Fitted on bench_plan's small random Llama (3 runs), checked on SmolLM2-135M (3 runs): docs/plan.md.
CPU_HEAP_KEPT = {False: 0.8, True: 2.5}  # by gradient checkpointing off / on
# Caching allocator: reserved over allocated for what a training loop allocates and frees (block rounding,
# fragmentation). Weights are allocated once, at load, in blocks of their own size, so they add no slack.
ALLOCATOR_SLACK = 0.08
# TRL's activation offloading (trl.models.activation_offloading, which `gradient_checkpointing: offload` turns on)
# keeps up to this many offloaded tensors on the GPU while their copy to the host is in flight (max_fwd_stash_size).
OFFLOAD_STASH = 5

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loss_chunk_rows(vocab: int) -> int:
    """Rows of logits lorachat's loss projects at a time for a vocabulary of `vocab` (a power of two)."""
    rows = max(LOSS_CHUNK_ELEMENTS // max(vocab, 1), 1)
    return min(1 << (rows.bit_length() - 1), LOSS_CHUNK_MAX_ROWS)


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes, read from config.json alone."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 1  # MoE: experts per layer (weights) ...
    active_experts: int = 1  # ... and experts each token runs through (activations, FLOPs)

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Where) -> Shape:
        # Multimodal configs keep the language model's sizes under text_config.
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

        def get(*keys: str, default: Any = None) -> Any:
            for key in keys:
                for source in (config, text):
                    if source.get(key) is not None:
                        return source[key]
            if default is None:
                raise LorachatError(f"config.json has no {keys[0]}: cannot size this model", where)
            return default

        hidden, heads = int(get("hidden_size", "n_embd", "d_model")), int(get("num_attention_heads", "n_head"))
        experts = int(get("num_local_experts", "num_experts", "n_routed_experts", default=1))
        return cls(
            hidden=hidden, layers=int(get("num_hidden_layers", "n_layer")),
            intermediate=int(get("moe_intermediate_size", "intermediate_size", "n_inner")
                             if experts > 1 else get("intermediate_size", "n_inner", default=4 * hidden)),
            heads=heads, kv_heads=int(get("num_key_value_heads", default=heads)),
            head_dim=int(get("head_dim", default=hidden // heads)), vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", default=False)), experts=experts,
            active_experts=int(get("num_experts_per_tok", "moe_topk", default=1)) if experts > 1 else 1)

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Per layer: module -> (in features, out features, copies); MLP copies = experts."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1),
                "gate_proj": (h, i, self.experts), "up_proj": (h, i, self.experts),
                "down_proj": (i, h, self.experts)}

    def layer_linear_params(self) -> int:
        return sum(n_in * n_out * copies for n_in, n_out, copies in self.linears().values())

    def active_linear_params(self) -> int:
        """Weights one token multiplies with per layer (MoE: only its experts)."""
        return sum(n_in * n_out * min(copies, self.active_experts)
                   for n_in, n_out, copies in self.linears().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.layers * self.layer_linear_params() + self.embedding_params + norms


@dataclass(frozen=True)
class Setup:
    """What about a run decides its memory: from the recipe, the data and the device."""

    compute_bytes: int  # 2 for bf16/fp16, 4 for fp32
    quantization: str  # none | 4bit | 8bit
    rank: int
    targets: tuple[str, ...]  # which of LINEARS carry LoRA
    variant: str  # lora | dora | rslora
    dropout: float
    optimizer: str  # adamw | adamw_8bit | sgd | adafactor
    batch: int  # rows per micro-batch
    seq_len: int  # tokens in the longest row of a micro-batch
    trained_share: float  # share of positions with a target: lorachat projects only those onto the vocabulary
    checkpointing: bool
    packing: bool
    offload: bool = False  # checkpointing's saved layer inputs kept in (pinned) host memory, not on the device
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    kernels: str = "none"  # none | liger
    device: str = "cuda"  # cuda | cpu
    loss_chunk: int | None = 0  # rows of logits at a time; 0 = lorachat's (loss_chunk_rows); None = all at once
    attention_span: int = 0  # mean tokens a token attends over in a row (packed: its sample); 0 = seq_len
    # How other trainers differ, for checking the model against their published runs (docs/plan.md):
    adapter_bytes: int = ADAPTER_BYTES  # torchtune keeps LoRA weights in the model's dtype
    # lorachat runs LoRA's matmuls in the compute dtype (fp32 master weights cast per step, as Unsloth and autocast
    # do); PEFT casts each LoRA input to the adapter's fp32 and so keeps an fp32 copy of it for backward.
    lora_in_compute_dtype: bool = True
    kbit_upcast: bool = False  # peft's prepare_model_for_kbit_training upcasts unquantized weights to fp32
    logit_copies: int = 0  # extra fp32 copies of the logits (transformers < 4.45 made a shifted contiguous one)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def changed(self, **changes: Any) -> Setup:
        return replace(self, **changes)


def adapter_params(shape: Shape, setup: Setup) -> int:
    """LoRA A (r x in) and B (out x r) on every targeted linear; DoRA adds a magnitude per output feature."""
    total = 0
    for name in setup.targets:
        n_in, n_out, copies = shape.linears()[name]
        total += copies * (setup.rank * (n_in + n_out) + (n_out if setup.variant == "dora" else 0))
    return total * shape.layers


def weight_bytes(shape: Shape, setup: Setup) -> int:
    """Linear layers in nf4 / int8 / the compute dtype; embeddings, head and norms stay unquantized.

    peft's prepare_model_for_kbit_training (run before LoRA on a quantized base) casts every parameter that is
    not quantized to fp32, so a QLoRA run through it holds its embeddings and LM head in fp32; lorachat's own
    preparation (train/quantized.py) keeps them in the compute dtype (`kbit_upcast` False).
    """
    linear = shape.layers * shape.layer_linear_params()
    norms = shape.layers * 2 * shape.hidden + shape.hidden
    rest = (shape.embedding_params + norms) * (4 if setup.kbit_upcast else setup.compute_bytes)
    if setup.quantization == "4bit":
        return int(linear * NF4_BYTES + rest)
    if setup.quantization == "8bit":
        rows = shape.layers * sum(n_out * copies for _, n_out, copies in shape.linears().values())
        return int(linear * INT8_BYTES + rows * 4 + rest)
    return (linear + shape.embedding_params + norms) * setup.compute_bytes


def optimizer_bytes(shape: Shape, setup: Setup, params: int) -> int:
    if setup.optimizer == "adamw":
        return 8 * params  # exp_avg + exp_avg_sq in fp32
    if setup.optimizer == "adamw_8bit":
        return 2 * params + 2 * 4 * math.ceil(params / 2048)  # two int8 states, blockwise fp32 absmax (2048)
    if setup.optimizer == "adafactor":
        # factored second moment: one fp32 value per row and per column of each LoRA matrix
        per_layer = sum(copies * 4 * (setup.rank + n_in + n_out + setup.rank)  # A: r + in, B: out + r
                        for name, (n_in, n_out, copies) in shape.linears().items() if name in setup.targets)
        return shape.layers * per_layer
    return 0  # plain SGD, as transformers sets it up: no momentum


def lora_activation_bytes(setup: Setup) -> int:
    """Bytes an element of what LoRA's matmuls keep (their input, A's output) and of the gradients they pass on."""
    return setup.compute_bytes if setup.lora_in_compute_dtype else max(setup.adapter_bytes, setup.compute_bytes)


def layer_activation_bytes(shape: Shape, setup: Setup) -> float:
    """Bytes one decoder layer keeps for backward, per token (no gradient checkpointing)."""
    d, r = setup.compute_bytes, setup.rank
    a = lora_activation_bytes(setup)
    h, i, q = shape.hidden, shape.intermediate * shape.active_experts, shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    liger = setup.kernels == "liger"
    # RMSNorm upcasts its input to fp32 and keeps that copy (Liger's fused norm keeps the input as is).
    total = 2 * h * (d if liger else 4)
    # LoRA: x -> cast to fp32 -> dropout -> A -> B. A keeps its input (the dropout output, or with no dropout the
    # cast, which is the shared input tensor itself when base and adapter are both fp32), dropout its bool mask,
    # B the r-wide output of A. The frozen base matmul keeps nothing (LLM.int8 keeps its input and an int8 copy).
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
    width = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_mid": i}
    shared: set[str] = set()
    for name in setup.targets:
        n_out = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i,
                 "down_proj": h}[name]
        n_in = width[groups[name]]
        if setup.dropout > 0:
            total += (a + 1) * n_in
        elif d == a:
            shared.add(groups[name])
        else:
            total += a * n_in
        total += a * r + (a * n_out if setup.variant == "dora" else 0)  # DoRA keeps the base output for its magnitude
    total += sum(d * width[g] for g in shared)
    if setup.quantization == "8bit":
        total += sum((d + 1) * w for w in width.values())
    # Attention: q and k after RoPE, v, the output, and a log-sum-exp per head. SDPA with a packed-sample mask
    # cannot use grouped-query attention (transformers repeats k and v to every head first); flash-attention
    # and unmasked SDPA can. Eager attention also keeps the (heads x T) softmax per token.
    repeated = setup.attention == "sdpa" and setup.packing
    total += d * (2 * q + 2 * (q if repeated else kv)) + 4 * shape.heads
    if setup.attention == "eager":
        total += d * shape.heads * setup.seq_len
    total += d * q  # the attention output made contiguous for o_proj
    # SwiGLU keeps gate (for silu), silu(gate) and up (for the product); Liger's fused SwiGLU recomputes silu.
    total += (2 if liger else 3) * d * i
    return total


@dataclass(frozen=True)
class Breakdown:
    """Bytes by part. `logits` (the loss, at the end of forward) and `backward` (a layer's backward: with gradient
    checkpointing the recomputed layer, plus the gradients in flight) never coexist; the peak takes the larger."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    backward: int
    cuda_context: int
    allocator: int

    @property
    def total(self) -> int:
        parts = vars(self)
        return sum(v for k, v in parts.items() if k not in ("logits", "backward")) + max(self.logits, self.backward)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in vars(self).items()}


def activation_bytes(shape: Shape, setup: Setup) -> tuple[int, int]:
    """(saved for backward at the end of forward, what a layer's backward adds at its peak) for a micro-batch."""
    d, h, tokens = setup.compute_bytes, shape.hidden, setup.tokens
    per_layer = layer_activation_bytes(shape, setup)
    # With checkpointing only each layer's input is kept, and backward recomputes one layer at a time; offloaded,
    # those inputs live in host memory and only the copies in flight stay on the device.
    kept_inputs = min(OFFLOAD_STASH, shape.layers) if setup.offload else shape.layers
    saved = (kept_inputs * d * h if setup.checkpointing else shape.layers * per_layer) + 4 * h  # + final norm's fp32
    # Backward's working set: the incoming gradient and the one being produced at the widest point (the MLP), in
    # the dtype LoRA passes its gradients on in.
    g = lora_activation_bytes(setup)
    working = 2 * g * shape.intermediate * shape.active_experts + 2 * g * h
    mask = 0
    if setup.packing and setup.attention in ("sdpa", "eager"):
        mask = setup.batch * setup.seq_len**2 * (1 if setup.attention == "sdpa" else d)  # block-diagonal mask
    backward = tokens * (working + (per_layer if setup.checkpointing else 0))
    return int(tokens * saved + mask), int(backward)


def logits_bytes(shape: Shape, setup: Setup) -> int:
    """The vocabulary projection and its loss.

    Unchunked (TRL, torchtune): logits in the compute dtype, their fp32 upcast, log-softmax kept for backward and
    its gradient, over every position. lorachat (train/loss.py) projects only trained positions, `loss_chunk` rows
    at a time, turning one fp32 buffer into exp, softmax and gradient in place (beside one compute-dtype copy when
    that is not fp32: the logits before their upcast, then the gradient), and keeps the hidden states' gradient
    (rows x hidden) instead of the logits, as Liger's fused linear cross-entropy does (so `kernels: liger` changes
    nothing here).
    """
    d, v, h = setup.compute_bytes, shape.vocab, shape.hidden
    rows = math.ceil(setup.tokens * setup.trained_share)
    if setup.loss_chunk is None:
        return int(rows * v * (d + (4 if d != 4 else 0) + 4 + 4 + 4 * setup.logit_copies))
    chunk = setup.loss_chunk or loss_chunk_rows(v)
    return int(min(rows, chunk) * v * (4 + (d if d != 4 else 0)) + rows * h * d)


def host_offload_bytes(shape: Shape, setup: Setup) -> int:
    """Pinned host memory `gradient_checkpointing: offload` needs: every layer's saved input of a micro-batch."""
    if not (setup.offload and setup.checkpointing):
        return 0
    return int(setup.tokens * shape.layers * setup.compute_bytes * shape.hidden)


# `gradient_checkpointing: auto` turns it off when the run without it needs at most this share of the device's
# memory. On a GPU the estimate already counts the context and the allocator's slack; the rest is room for the
# estimate's error (within 25% of measured runs, docs/plan.md). On a CPU the RAM is shared with everything else the
# machine runs, and glibc's heap (counted, CPU_HEAP_KEPT) varies by 20% from run to run.
AUTO_CHECKPOINTING_SHARE = {"cuda": 0.8, "cpu": 0.25}
# Offloaded checkpoints are pinned (page-locked) host memory, which the OS cannot swap or reclaim: at most this share
# of the host's available memory (TRL's offloading warns past 60% of it in use).
HOST_OFFLOAD_SHARE = 0.5


def auto_checkpointing(shape: Shape, setup: Setup, memory_bytes: float, host_bytes: float = 0) -> Setup:
    """The fastest way the run fits `memory_bytes` with headroom: without checkpointing, with it, or with its saved
    inputs offloaded to the host (GPU only, when `host_bytes` of free host memory can hold them pinned). When none
    fits with headroom, the leanest of them: the run's best chance, and what `plan --max-length` counts on."""
    limit = AUTO_CHECKPOINTING_SHARE[setup.device] * memory_bytes
    candidates = [setup.changed(checkpointing=False, offload=False), setup.changed(checkpointing=True, offload=False)]
    offloaded = setup.changed(checkpointing=True, offload=True)
    if setup.device == "cuda" and host_offload_bytes(shape, offloaded) <= HOST_OFFLOAD_SHARE * host_bytes:
        candidates.append(offloaded)
    for candidate in candidates:
        if estimate(shape, candidate).total <= limit:
            return candidate
    return candidates[-1]


def estimate(shape: Shape, setup: Setup) -> Breakdown:
    """Peak memory of one training step (after the first, when optimizer states exist)."""
    params = adapter_params(shape, setup)
    weights = weight_bytes(shape, setup)
    adapter = setup.adapter_bytes * params
    saved, backward = activation_bytes(shape, setup)
    if setup.variant == "dora":
        # DoRA materialises B @ A (out x in, fp32) of one module at a time to take its column norms.
        n_in, n_out, _ = max((shape.linears()[t] for t in setup.targets), key=lambda s: s[0] * s[1])
        backward += 4 * n_in * n_out
    parts = Breakdown(weights=weights, adapter=adapter, gradients=setup.adapter_bytes * params,
                      optimizer=optimizer_bytes(shape, setup, params), activations=saved,
                      logits=logits_bytes(shape, setup), backward=backward, cuda_context=0, allocator=0)
    if setup.device != "cuda":
        transient = parts.activations + max(parts.logits, parts.backward)
        return replace(parts, allocator=int(CPU_HEAP_KEPT[setup.checkpointing] * transient))
    return replace(parts, cuda_context=int(CUDA_CONTEXT), allocator=int(ALLOCATOR_SLACK * (parts.total - weights)))
