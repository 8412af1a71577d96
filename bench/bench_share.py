"""How fast an adapter is verified, packed and unpacked, against `sha256sum` and `tar` on the same files.

    python bench/bench_share.py [--mb 100] [--repeat 3]

The adapter is a real adapter folder: `adapter_model.safetensors` of random float32 LoRA-shaped tensors (random,
so gzip cannot shrink it, as with trained weights), PEFT's config and a manifest. Both sides run in this process,
on the same files, warm in the page cache, best of `--repeat`:

- verify: `lorachat adapters verify` (sha256 of every file vs the manifest) vs `sha256sum` of the same files;
- pack: `lorachat adapters pack` (deterministic tar.gz, hashing as it archives) vs `tar -czf` (gzip -6, same level);
- pack_verify: verify then pack, vs sha256sum then tar: the issue's figure, `pack_verify_mb_per_s`;
- unpack: `lorachat adapters unpack` (stdlib data filter, byte count, manifest check, atomic rename) vs `tar -xzf`.

MB/s is the adapter's size over the time taken. Goal: ratio >= 0.7 (Python's hashlib and zlib are the same C
code the tools use; what lorachat adds is its checks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

GOAL = 0.7


def make_adapter(folder: Path, megabytes: int) -> Path:
    """A LoRA-adapter-shaped folder of about `megabytes` MB with a valid manifest."""
    import numpy as np
    from safetensors.numpy import save_file

    from lora_chat.adapters.store import write_manifest

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    hidden, r = 4096, 64
    tensors, size, layer = {}, 0, 0
    while size < megabytes * 1_000_000:
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
            size += 2 * r * hidden * 4
        layer += 1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": "bench/base"}), encoding="utf-8")
    write_manifest(folder, {"format": 1, "name": folder.name, "base": {"model_id": "bench/base"}})
    return folder


def best(repeat: int, work: Callable[[], object], before: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def results(quick: bool, megabytes: int | None = None, repeat: int | None = None) -> list[dict]:
    from lora_chat.adapters.archive import pack, unpack
    from lora_chat.adapters.store import verify

    megabytes = megabytes or (20 if quick else 100)
    repeat = repeat or (1 if quick else 3)
    root = Path(tempfile.mkdtemp(prefix="bench-share-"))
    try:
        adapter = make_adapter(root / "bench-adapter", megabytes)
        files = sorted(p.name for p in adapter.iterdir())
        mb = sum(p.stat().st_size for p in adapter.iterdir()) / 1e6
        ours_tar, their_tar = root / "ours.tar.gz", root / "theirs.tar.gz"

        def sha256sum() -> None:
            subprocess.run(["sha256sum", *files], cwd=adapter, check=True, stdout=subprocess.DEVNULL)

        def tar_czf() -> None:
            subprocess.run(["tar", "-czf", str(their_tar), adapter.name], cwd=root, check=True)

        def clear(folder: Path) -> Callable[[], None]:
            return lambda: (shutil.rmtree(folder, ignore_errors=True), folder.mkdir())

        timings = {
            "verify": (best(repeat, lambda: verify(adapter)), best(repeat, sha256sum), "sha256sum"),
            "pack": (best(repeat, lambda: pack(adapter, ours_tar)), best(repeat, tar_czf), "tar -czf"),
            "pack_verify": (best(repeat, lambda: (verify(adapter), pack(adapter, ours_tar))),
                            best(repeat, lambda: (sha256sum(), tar_czf())), "sha256sum + tar -czf"),
            "unpack": (best(repeat, lambda: unpack(ours_tar, root / "in-ours"), clear(root / "in-ours")),
                       best(repeat, lambda: subprocess.run(["tar", "-xzf", str(their_tar), "-C",
                                                             str(root / "in-theirs")], check=True),
                            clear(root / "in-theirs")), "tar -xzf"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, (ours, theirs, baseline) in timings.items():
        value, baseline_value = mb / ours, mb / theirs
        rows.append({"name": f"{name}_mb_per_s", "value": round(value, 1), "unit": f"MB/s ({mb:.0f} MB adapter)",
                     "baseline": baseline, "baseline_value": round(baseline_value, 1),
                     "ratio": round(value / baseline_value, 2), "goal": f">= {GOAL}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="Adapter size in MB.")
    parser.add_argument("--repeat", type=int, default=3, help="Best of N runs each side.")
    args = parser.parse_args()
    rows = results(quick=False, megabytes=args.mb, repeat=args.repeat)
    print(f"{'name':<22} {'lorachat':>10} {'baseline':>10} {'ratio':>6}  goal   baseline")
    for row in rows:
        print(f"{row['name']:<22} {row['value']:>10} {row['baseline_value']:>10} {row['ratio']:>6}  "
              f"{row['goal']}  {row['baseline']} ({row['unit']})")


if __name__ == "__main__":
    main()
