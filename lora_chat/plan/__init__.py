"""Before a run: will it fit this GPU, and how long will it take? From the recipe, config.json and the data.

gpus.py is the table of cards, memory.py the memory model, throughput.py FLOPs and tokens/s, estimate.py the
command's work (lengths, steps, suggestions, the printed table). docs/plan.md has the formulas and sources.
"""

from .estimate import Plan, make_plan, print_plan
from .gpus import GPUS, Gpu, find_gpu
from .memory import Breakdown, Setup, Shape, estimate

__all__ = ["GPUS", "Breakdown", "Gpu", "Plan", "Setup", "Shape", "estimate", "find_gpu", "make_plan", "print_plan"]
