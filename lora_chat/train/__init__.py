"""Supervised fine-tuning with LoRA/QLoRA on TRL/PEFT: `finetune` is the entry point (run.py)."""

from .run import Options, Plan, finetune

__all__ = ["Options", "Plan", "finetune"]
