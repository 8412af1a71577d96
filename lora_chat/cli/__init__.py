"""The `lorachat` command line: `main` is the click group; each module beside this one adds one command group."""

from . import eval, finetune, inspect, plan  # noqa: F401 - importing registers the commands
from .main import main

__all__ = ["main"]
