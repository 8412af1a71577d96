"""The runtime: one base loaded once, many adapters resident by name, mixed-adapter batches streamed.

    from lora_chat.runtime import AdapterSet, Request, Sampling, generate, stream

    rt = AdapterSet.open(["adapters/faq-en", "adapters/faq-sv"])        # base from their manifests
    prompt = rt.render("faq-sv", [{"role": "user", "content": "Vad är bygglov?"}])
    [done] = generate(rt, [Request("faq-sv", prompt, Sampling(max_tokens=64))])
    for delta in stream(rt, [Request("base", prompt), Request("faq-en", prompt)]):
        print(delta.row, delta.text, delta.finish_reason)

Modules by job: `adapter_set` (the base and its adapters: compatibility, loading, templates, stop ids,
thread safety), `generate` (the decode loop: one forward per step for rows of different adapters,
streaming, sampling, stops), `gathered_lora` (a mixed-adapter batch's LoRA in two matmuls per layer),
`invariant` (attention that makes a row's result independent of the batch;
see docs/batch-invariance.md). Chat, serve and eval are built on these; none of them touches PEFT's
adapter switching directly.
"""

from .adapter_set import BASE, AdapterSet, OpenedAdapter, Resident, SetPlan
from .generate import Completion, Delta, Request, Sampling, generate, stream

__all__ = ["BASE", "AdapterSet", "Completion", "OpenedAdapter", "SetPlan", "Delta", "Request", "Resident", "Sampling", "generate", "stream"]
