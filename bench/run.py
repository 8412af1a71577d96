"""Every lorachat benchmark in one run, one output format.

    HF_HUB_OFFLINE=1 python bench/run.py --quick --out bench/results.json          # < 10 minutes on 2 cores
    HF_HUB_OFFLINE=1 python bench/run.py --only plan,validate --out /tmp/some.json

Each `bench/bench_<name>.py` exposes `results(quick: bool) -> list[dict]` with the keys
name, value, unit, baseline, baseline_value, ratio, goal; each measures its figure against its baseline in the same
run. Each module runs in its own process (memory figures are per process, and one benchmark's threads or caches
must not tint the next). The output is {"machine": {...}, "results": [...]}, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = ("name", "value", "unit", "baseline", "baseline_value", "ratio", "goal")


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def machine() -> dict:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    from lora_chat.models import cpu_has_native_bf16

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_native_bf16": cpu_has_native_bf16(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_bf16=torch.cuda.is_bf16_supported())
    for package in ("transformers", "peft", "trl"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def run_one(name: str, quick: bool) -> tuple[list[dict], str | None, float]:
    """One module's results in a fresh process; (results, error, seconds)."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import importlib; "
            "m = importlib.import_module('bench_' + sys.argv[3]); "
            "print('RESULTS ' + json.dumps(m.results(sys.argv[4] == '1')), flush=True)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(HERE), str(ROOT), name, "1" if quick else "0"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            rows = json.loads(line[8:])
            missing = [k for row in rows for k in KEYS if k not in row]
            return rows, (f"missing keys {sorted(set(missing))}" if missing else None), seconds
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [], f"exit {proc.returncode}: {tail}", seconds


def met(row: dict) -> str:
    """A goal written with a unit ("<= 5 ms overhead", ">= 95 %") is on the value; a bare number is on the ratio
    (or on the value, where a row has no ratio)."""
    goal = str(row.get("goal") or "").strip()
    for op in ("<=", ">=", "="):
        if goal.startswith(op):
            number, _, unit = goal[len(op):].strip().partition(" ")
            value = row["value"] if unit or row.get("ratio") is None else row["ratio"]
            if value is None:
                return "-"
            target = float(number)
            ok = {"<=": value <= target, ">=": value >= target, "=": value == target}[op]
            return "yes" if ok else "NO"
    return "-"


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.3g}" if isinstance(x, float) else str(x)


def table(results: list[dict]) -> str:
    lines = [f"{'name':32s} {'value':>10s} {'unit':14s} {'baseline':>10s} {'ratio':>7s} {'goal':>8s}  met",
             "-" * 92]
    for r in results:
        lines.append(f"{r['name']:32s} {_fmt(r['value']):>10s} {str(r['unit'])[:14]:14s} "
                     f"{_fmt(r['baseline_value']):>10s} {_fmt(r['ratio']):>7s} {str(r['goal']):>8s}  {met(r)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Shorter runs (under 10 minutes on 2 cores).")
    parser.add_argument("--only", help="Comma-separated benchmark names (bench_<name>.py), e.g. plan,train.")
    parser.add_argument("--out", required=True, help="Where to write the JSON.")
    args = parser.parse_args()
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = wanted
    sys.path.insert(0, str(ROOT))
    out = {"machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
           "results": [], "errors": {}, "seconds": {}}
    for name in names:
        print(f"running bench_{name}.py ...", flush=True)
        rows, error, seconds = run_one(name, args.quick)
        out["results"] += [{**{k: r.get(k) for k in KEYS}, "bench": name} for r in rows]
        out["seconds"][name] = round(seconds, 1)
        if error:
            out["errors"][name] = error
            print(f"  bench_{name}: {error}", flush=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(table(out["results"]))
    print(f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, torch {out['machine']['torch']}; "
          f"written to {args.out}")
    sys.exit(1 if out["errors"] else 0)


if __name__ == "__main__":
    main()
