"""`lorachat eval`: base vs adapters on held-out conversations, with intervals, a judge and reports.

Modules by job: `metrics` (text metrics, pure), `stats` (bootstrap), `loss` (masked loss, the head only
at trained positions), `generate` (replies on the runtime, rows of every model batched together), `judge`
(pairwise LLM judge over HTTP), `report` (JSON/MD/HTML), `run` (the orchestration, top to bottom). Import `run_eval` from `.run`: this package's
`__init__` stays light so `metrics` and `stats` load without torch.
"""
