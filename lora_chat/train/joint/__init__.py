"""Several adapters trained in one run on one loaded base (docs/joint-training.md)."""

from .run import finetune_joint

__all__ = ["finetune_joint"]
