"""The `lorachat` command line: `main` is the click group; each module beside this one adds one command group."""

from . import adapters, chat, eval, feedback, finetune, inspect, merge, plan, serve  # noqa: F401 - importing registers the commands
from .main import main

__all__ = ["main"]
