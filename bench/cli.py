"""The command line every subprocess-worker benchmark shares: `--quick`, the hidden `--worker KIND` its parent
starts it with, and one printed line per result."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bench_main(doc: str, quick_help: str, kinds: tuple[str, ...], worker: Callable[[argparse.Namespace], None],
               results: Callable[[bool], list[dict]], hidden: dict[str, dict] | None = None) -> None:
    """Run as a worker when `--worker` is given (its options in `hidden`, besides `--steps`), else the benchmark."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    for flag, options in (hidden or {}).items():
        parser.add_argument(flag, help=argparse.SUPPRESS, **options)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for r in results(args.quick):
        ratio = "" if r.get("ratio") is None else f": {r['ratio']}x"
        print(f"{r['name']:58s} {r['value']:>9} {r['unit']} vs {r['baseline_value']} ({r['baseline']}){ratio} "
              f"(goal {r['goal']})")
