"""lorachat: LoRA/QLoRA fine-tuning of chat models, one domain or language at a time."""

__version__ = "0.1.0"
