"""The base model: where it is (resolve), the bundled offline copy (bundled), loading it (load), and
what it is from its json files alone (facts: shapes, stop tokens). Importing this package imports
neither torch nor transformers."""

from .bundled import BUNDLED_DIRNAME, BUNDLED_MODEL_ID, BUNDLED_PACKAGE, EXPORT_MARKER
from .facts import model_facts, refuse_encoder_only, stop_ids
from .load import cpu_has_native_bf16, load_model, load_tokenizer, pick_dtype
from .resolve import ResolvedBase, hub_offline, one_line, resolve_base

__all__ = ["BUNDLED_DIRNAME", "BUNDLED_MODEL_ID", "BUNDLED_PACKAGE", "EXPORT_MARKER", "ResolvedBase",
           "cpu_has_native_bf16", "hub_offline", "load_model", "load_tokenizer", "model_facts", "one_line",
           "pick_dtype", "refuse_encoder_only", "resolve_base", "stop_ids"]
