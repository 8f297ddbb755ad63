"""Benchmark: build the default minidsec world (1 s clips, 5,208 train + 1,100 test) on this machine.

Goal: under 20 minutes on the 2-core development machine. Writes benchmarks/results/world_build.json.

    .venv/bin/python benchmarks/world_build.py [--out DIR] [--train N --test N] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="where to build (default: a temp dir, removed afterwards)")
    p.add_argument("--train", type=int, default=5208)
    p.add_argument("--test", type=int, default=1100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "world_build.json"))
    args = p.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="world_bench_"))
    cmd = [sys.executable, "-m", "specalign", "world", "build", "--out", str(out / "world"), "--train", str(args.train),
           "--test", str(args.test), "--workers", str(args.workers)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (out / "world").rglob("*") if f.is_file())
    clips = args.train + args.test
    result = {
        "benchmark": "world_build",
        "command": " ".join(cmd),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "clips": clips,
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 2),
        "clips_per_second": round(clips / seconds, 2),
        "disk_bytes": size,
        "goal_minutes": 20,
        "met": seconds < 20 * 60,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
