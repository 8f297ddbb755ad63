"""Benchmark: one 7B layer's weight matmuls at k rows (a decode step is 1, a verify chain or tree 2..64), cuBLAS
against inductor's autotuned kernels: is a verify block's time in its matmuls?

A Llama-7B layer reads 405 MB of bf16 weights (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008), so at
batch 1 every row count should cost about one weight read (~94 us at 4.3 TB/s). For each k:
- cublas: `F.linear` eagerly (what the engine's blocks run: their compile leaves matmuls to cuBLAS);
- autotuned: the same seven matmuls compiled with `Engine(tune="autotune")`'s options (torch.compile's mode
  "max-autotune-no-cudagraphs"), which benchmarks Triton templates against cuBLAS and keeps the faster per shape;
- tuned_reduction (k = 1 only): inductor's coordinate-descent tuning, which turns a one-row matmul into a Triton
  reduction (what the engine's compiled decode step runs).
Each is the 32 layers (each its own weights, so nothing is served from L2) captured in one CUDA graph, median over
replays: microseconds per layer and weight bytes read per second.
Writes benchmarks/results/block_matmul.json after each row count.

    python benchmarks/block_matmul.py [--rows 1,2,4,8,16,32,64] [--result PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_time import REPLAYS, per_call_us  # noqa: E402 (the one CUDA-graph timing of kernel-sized calls)

from specalign.decode.engine import TUNINGS  # noqa: E402
from specalign.fsutil import write_json  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE = 32, 4096, 11008


def layer_weights(hidden: int, inter: int, device: str, dtype) -> list[torch.Tensor]:
    """q, k, v, o, gate, up, down as nn.Linear stores them ([out, in])."""
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in shapes]


def matmuls(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    """x [k, hidden] through the layer's seven matmuls (no attention, no norms) -> [k, hidden]."""
    q, k, v = F.linear(x, w[0]), F.linear(x, w[1]), F.linear(x, w[2])
    o = F.linear(q + k + v, w[3])
    gate, up = F.linear(o, w[4]), F.linear(o, w[5])
    return F.linear(gate * up, w[6])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "block_matmul.json"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, eager only: checks the script")
    args = p.parse_args()
    if args.smoke:
        device, dtype, layers, hidden, inter = "cpu", torch.float32, 2, 64, 128
    elif torch.cuda.is_available():
        device, dtype, layers, hidden, inter = "cuda", torch.bfloat16, LAYERS, HIDDEN, INTERMEDIATE
    else:
        sys.exit("benchmarks/block_matmul.py: needs a CUDA GPU (or --smoke)")
    rows = [int(k) for k in args.rows.split(",")]
    weights = [layer_weights(hidden, inter, device, dtype) for _ in range(layers)]
    read = sum(w.numel() * w.element_size() for w in weights[0])  # weight bytes of one layer
    backends = {"cublas": matmuls}
    if not args.smoke:
        # the engine's own inductor options (`Engine(tune=...)`), so these rows are what its decode step can get
        backends["autotuned"] = torch.compile(matmuls, dynamic=False, options=TUNINGS["autotune"])
        # its own code object: dynamo keeps one cache per function, and these two compiles must not share it
        reduction = torch.compile(lambda x, w: matmuls(x, w), dynamic=False, options=TUNINGS["coordinate"])
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.rows.split(",")))
    result = {
        "benchmark": "block_matmul",
        "machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
                    "torch": torch.__version__},
        "setup": {"layers": layers, "hidden": hidden, "intermediate": inter, "dtype": str(dtype),
                  "weight_mb_per_layer": round(read / 1e6, 1), "replays": REPLAYS},
        "rows": {},
    }  # fmt: skip
    for k in rows:
        x = torch.randn(k, hidden, device=device, dtype=dtype) * 0.02
        row = {}
        todo = dict(backends, **({"tuned_reduction": reduction} if k == 1 and not args.smoke else {}))
        for name, fn in todo.items():
            t = time.perf_counter()
            us = per_call_us(lambda i, fn=fn, x=x: fn(x, weights[i]), len(weights), device)
            row[name] = {"us": round(us, 2), "gb_per_s": round(read / us / 1e3, 1),
                         "setup_s": round(time.perf_counter() - t, 1)}  # fmt: skip
            print(f"k={k} {name}: {us:.1f} us/layer, {read / us / 1e3:.0f} GB/s", flush=True)
        result["rows"][str(k)] = row
        write_json(args.result, result)  # each row count as it lands: autotuning is slow
    print(f"wrote {args.result}", flush=True)


if __name__ == "__main__":
    main()
