"""Adapters on disk: the directory and its manifest (store), and whether one fits a base (compat)."""

from .compat import COMPAT_KEYS, check_compatible
from .store import (CARD, FORMAT, MANIFEST, METRICS, RECIPE, TEMPLATE, TRAIN_LOG, AdapterInfo, finish, looks_whole,
                    previous_of, read_adapter, render_card, source_license, staging_dir, update_metrics, verify,
                    versions)

__all__ = ["CARD", "COMPAT_KEYS", "FORMAT", "MANIFEST", "METRICS", "RECIPE", "TEMPLATE", "TRAIN_LOG", "AdapterInfo",
           "check_compatible", "finish", "looks_whole", "previous_of", "read_adapter", "render_card",
           "source_license", "staging_dir", "update_metrics", "verify", "versions"]
