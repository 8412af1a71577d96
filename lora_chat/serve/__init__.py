"""`lorachat serve`: the OpenAI API over the runtime (protocol, serving, api_router, batcher, app) or vLLM (vllm)."""
