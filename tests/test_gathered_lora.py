"""The gathered LoRA path (runtime/gathered_lora.py) on the tiny base: in a batch of three adapters (two ranks, one
on the attention projections only) and the base, each row gets the bits it gets alone, and what PEFT's own
mixed-batch forward gives; loads and unloads restack."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from adapter_factory import DISTINCT, EN_ROWS, tiny_adapters, trained_once
from lora_chat.runtime import AdapterSet, gathered_lora
from lora_chat.runtime.adapter_set import PEFT_BASE
from lora_chat.runtime.invariant import ROW_LENGTHS, tiles

QUESTIONS = ["Hi", "How long does a building permit take in the municipality?", "Vad är bygglov?",
             "What is a building permit?", "Hej, hur mår du idag, vän?", "Hello! How can I help you today?"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    base, en, sv = tiny_adapters(tmp_path_factory)  # rank 8 on every linear layer
    third = trained_once(tmp_path_factory, "attn-en", base, EN_ROWS, key="gathered-attn-en", **DISTINCT)  # rank 4
    return en, sv, third


@pytest.fixture(scope="module")
def rt(paths) -> AdapterSet:
    return moved(AdapterSet.open(list(paths)))


def moved(rt: AdapterSet) -> AdapterSet:
    """Every adapter's B moved well away from zero (one short finetune barely moves it), each its own way."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in rt.model.modules():
            for b in getattr(layer, "lora_B", {}).values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * 0.5)
    gathered_lora.install(rt.model)  # stacks are built from the weights as they are at the next forward
    return rt


def stacked(rt: AdapterSet) -> set[str]:
    """The PEFT keys in the layers' current stacks."""
    built = [vars(m).get(gathered_lora._STACK) for m in rt.model.modules()]
    return {key for b in built if b and b[1] for key, _ in b[1].layout}


def logits(rt: AdapterSet, names: list[str], prompts: list[list[int]], *, prefill: bool) -> torch.Tensor:
    """The runtime's forward (left-padded rows, per-row attention, fixed tiles): (B, T, V) float32."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), rt.tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt)
        mask[b, width - len(prompt):] = 1
    with torch.inference_mode(), tiles(prefill):
        out = rt.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       adapter_names=rt.peft_names(names), **{ROW_LENGTHS: mask.sum(-1).tolist()})
    return out.logits.float()


@contextlib.contextmanager
def peft_path(rt: AdapterSet):
    """PEFT's own mixed-batch forward in every LoRA layer while inside."""
    layers = [m for m in rt.model.modules() if vars(m).get("forward") is not None
              and getattr(vars(m)["forward"], "func", None) is gathered_lora.gathered_forward]
    for layer in layers:
        del layer.forward
    try:
        yield
    finally:
        for layer in layers:
            layer.forward = functools.partial(gathered_lora.gathered_forward, layer)


def batch(rt: AdapterSet) -> tuple[list[str], list[list[int]]]:
    names = [n for _ in range(2) for n in rt.names]  # base, en, sv, attn: each twice, each time another question
    prompts = [rt.tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS + QUESTIONS[:2]]
    return names, prompts


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill tiles", "decode tiles"])
def test_each_row_of_a_mixed_batch_gets_its_bits_alone_and_what_peft_computes(rt, prefill):
    names, prompts = batch(rt)
    assert len(rt.names) == 4 and any(PEFT_BASE == n for n in rt.peft_names(names))
    together = logits(rt, names, prompts, prefill=prefill)
    assert stacked(rt) == {rt.get(n).peft_name for n in rt.names[1:]}, "the gathered path ran"
    width = together.shape[1]
    for b, (name, prompt) in enumerate(zip(names, prompts)):
        alone = logits(rt, [name], [prompt], prefill=prefill)[0]
        assert torch.equal(together[b, width - len(prompt):], alone), f"row {b} ({name}) depends on its batch"
    with peft_path(rt):
        theirs = logits(rt, names, prompts, prefill=prefill)
    for b, prompt in enumerate(prompts):
        real = slice(width - len(prompt), width)  # padded positions are nobody's result
        torch.testing.assert_close(together[b, real], theirs[b, real], rtol=1e-5, atol=1e-5)
    # ...and the adapters are really in play: each row's question gets other logits from the base.
    base = logits(rt, ["base"] * len(names), prompts, prefill=prefill)
    assert all(torch.equal(base[b, -1], together[b, -1]) == (name == "base") for b, name in enumerate(names))


def test_loading_and_unloading_restacks_the_layers(paths):
    en, sv, third = paths
    rt = moved(AdapterSet.open([en, sv]))
    names, prompts = ["faq-en", "base", "talk-sv"], [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    logits(rt, names, prompts, prefill=True)
    assert stacked(rt) == {rt.get("faq-en").peft_name, rt.get("talk-sv").peft_name}
    rt.unload("talk-sv")
    assert not stacked(rt), "the unloaded adapter's matrices are released at once"
    rt.load(third)
    moved(rt)
    names[2] = "attn-en"
    ours = logits(rt, names, prompts, prefill=True)
    with peft_path(rt):
        theirs = logits(rt, names, prompts, prefill=True)
    torch.testing.assert_close(ours[:, -1], theirs[:, -1], rtol=1e-5, atol=1e-5)
    assert stacked(rt) == {rt.get("faq-en").peft_name, rt.get("attn-en").peft_name}
