"""The `lorachat` command line: `main` is the click group; each module beside this one adds one command group."""

from . import chat, eval, finetune, inspect, serve  # noqa: F401 - importing registers the commands
from .main import main

__all__ = ["main"]
