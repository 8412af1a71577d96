"""Two models of one `lorachat eval` report, sample by sample: how often A's reply scores above, equal to or below B's.

    .venv/bin/python scripts/head_to_head.py reports/x/report.json construction-faq-en-rpo construction-faq-en

`eval` counts each adapter's wins against the base; this compares any two of the report's models (a DPO adapter
against its SFT parent, say) on the same held-out prompts. A prompt that several datasets of the report share
(e.g. two adapters' identical eval splits) counts once.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="report.json written by lorachat eval")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--metric", default="rouge_l", help="a reply metric of the report (default rouge_l)")
    args = parser.parse_args(argv)
    samples = json.load(open(args.report))["samples"]
    seen, counts = set(), Counter()
    for sample in samples:
        scores, key = sample["scores"], (sample["prompt"], sample["reference"])
        if key in seen or args.a not in scores or args.b not in scores:
            continue
        seen.add(key)
        a, b = scores[args.a][args.metric], scores[args.b][args.metric]
        counts["wins" if a > b else "losses" if a < b else "ties"] += 1
    if not seen:
        parser.error(f"no sample of {args.report} scores both {args.a} and {args.b}")
    print(f"{args.a} against {args.b} on {args.metric}, {len(seen)} prompts: "
          f"{counts['wins']} wins, {counts['ties']} ties, {counts['losses']} losses")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
