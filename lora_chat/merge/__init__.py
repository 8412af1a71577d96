"""Adapters out of lorachat: merged into the base (into_base), combined into one (combine), exported for
llama.cpp and Ollama (gguf)."""

from .combine import METHODS, CombineOptions, combine
from .gguf import ExportOptions, export_gguf, modelfile_lines
from .into_base import DTYPES, MergeOptions, merge_into_base

__all__ = ["DTYPES", "METHODS", "CombineOptions", "ExportOptions", "MergeOptions", "combine", "export_gguf",
           "merge_into_base", "modelfile_lines"]
