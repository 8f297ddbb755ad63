"""Benchmark: a decode step's and a verify block's attention at 7B shape, SDPA against the split-KV kernels.

For each context length (the cache sized as the engine sizes it: context + 228 slots), batch 1, 32 heads of 128,
bf16, each of the 32 layers its own K/V (so nothing is served from L2):
- sdpa_masked: SDPA over the whole cache with the engine's mask (what `Engine(attention="sdpa")` runs);
- sdpa_used: SDPA over only the used slots without a mask (its best case; a CUDA graph replayed at any length
  cannot slice this way);
- split: `triton_split_kv` at each (splits, block_n, num_warps) of the sweep, the module's defaults among them.
And for verify blocks of `--blocks` tokens in the last used slots (an even size a chain; an odd one a tree of one
node fewer and its root, each node's ancestors drawn at random, as the engine verifies 16/32/64-node trees): SDPA
over the whole cache with the block's mask, against `triton_split_kv_block` at each (splits, block_m, num_warps,
num_stages) of its sweep.
Each is the 32 layers' calls captured in one CUDA graph, median over replays: microseconds per layer, and the
K/V bytes read per second.
Writes benchmarks/results/split_kv.json.

    python benchmarks/split_kv.py [--contexts 512,2080,4096] [--blocks 2,17,33,65] [--result PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # Triton's interpreter runs the kernel on the CPU; it is read when Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_time import REPLAYS, per_call_us  # noqa: E402 (the one CUDA-graph timing of kernel-sized calls)

from specalign.decode import attention  # noqa: E402
from specalign.fsutil import write_json  # noqa: E402

LAYERS, HEADS, HEAD_DIM, EXTRA_SLOTS = 32, 32, 128, 228
SWEEP = {"splits": (8, 16, 32, 64), "block_n": (32, 64, 128), "num_warps": (2, 4, 8)}
BLOCK_SWEEP = {"splits": (4, 8, 16), "block_m": (16, 32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


def q_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter has no bf16 dot


def measure(context: int, layers: int, heads: int, dim: int, sweep: dict, device: str, blocks: list[int],
            block_sweep: dict) -> dict:  # fmt: skip
    slots = context + EXTRA_SLOTS
    dtype = q_dtype(device)
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k = [torch.randn(1, heads, slots, dim, device=device, dtype=dtype) for _ in range(layers)]
    v = [torch.randn_like(x) for x in k]
    valid = torch.zeros(1, slots, dtype=torch.bool, device=device)
    valid[:, :context] = True
    used = torch.tensor(context, device=device)
    mask = valid[:, None, None, :]
    read = 2 * context * heads * dim * k[0].element_size()  # K and V bytes of one layer

    def row(us: float) -> dict:
        return {"us": round(us, 2), "gb_per_s": round(read / us / 1e3, 1)}

    out = {"slots": slots, "used": context, "kv_mb_per_layer": round(read / 1e6, 2)}
    out["sdpa_masked"] = row(per_call_us(lambda i: F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask),
                                      layers, device))  # fmt: skip
    out["sdpa_used"] = row(
        per_call_us(
            lambda i: F.scaled_dot_product_attention(q, k[i][:, :, :context], v[i][:, :, :context]), layers, device
        )
    )
    want = F.scaled_dot_product_attention(q.float(), k[0].float(), v[0].float(), attn_mask=mask)
    out["split"] = []
    for splits, block_n, warps in itertools.product(*sweep.values()):
        got = attention.triton_split_kv(q, k[0], v[0], valid, used, splits, block_n, warps)
        err = (got.float() - want).abs().max().item()
        launch = (splits, block_n, warps)
        us = per_call_us(lambda i, s=launch: attention.triton_split_kv(q, k[i], v[i], valid, used, *s), layers, device)
        out["split"].append({"splits": splits, "block_n": block_n, "num_warps": warps, **row(us),
                             "max_abs_err": round(err, 5)})  # fmt: skip
        print(f"context {context}: split {splits}/{block_n}/{warps}: {us:.2f} us/layer", flush=True)
    out["split_best"] = min(out["split"], key=lambda r: r["us"])
    out["split_default"] = next(r for r in out["split"] if (r["splits"], r["block_n"], r["num_warps"])
                                == (attention.SPLITS, attention.BLOCK_N, attention.NUM_WARPS))  # fmt: skip
    print(f"context {context}: sdpa masked {out['sdpa_masked']['us']} us, used {out['sdpa_used']['us']} us, "
          f"split default {out['split_default']['us']} us, best {out['split_best']}", flush=True)  # fmt: skip
    out["blocks"] = {str(t): measure_block(context, t, k, v, block_sweep, row, device) for t in blocks}
    return out


def measure_block(context: int, rows: int, k: list, v: list, sweep: dict, row, device: str) -> dict:
    """A verify block of `rows` tokens in the last used slots (a chain, or for odd `rows` a random tree) over each
    layer's cache k/v."""
    _, heads, slots, dim = k[0].shape
    layers = len(k)
    g = torch.Generator(device=device).manual_seed(rows)
    q = torch.randn(1, heads, rows, dim, device=device, dtype=k[0].dtype, generator=g)
    valid = (torch.arange(slots, device=device) < context)[None]
    tree = None
    if rows % 2:  # each node under a random earlier one (the root: the block's first token)
        parents = [int(torch.randint(i, (1,), generator=g, device=device)) for i in range(1, rows)]
        tree = torch.eye(rows, dtype=torch.bool, device=device)
        for i, p in enumerate(parents, start=1):
            tree[i] |= tree[p]
        tree = tree[None]
    used = torch.tensor(context, device=device)
    mask = attention.block_mask(valid, context, rows, tree)[:, None]
    out = {"sdpa_masked": row(per_call_us(lambda i: F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask),
                                          layers, device))}  # fmt: skip
    want = F.scaled_dot_product_attention(q.float(), k[0].float(), v[0].float(), attn_mask=mask)
    out["split"] = []
    default = dict(zip(("block_m", "num_warps", "splits", "num_stages"), attention.block_launch(rows), strict=True))
    launches = [dict(zip(sweep, values, strict=True)) for values in itertools.product(*sweep.values())]
    for launch in launches + [default] * (default not in launches):  # the module's launch among them
        got = attention.triton_split_kv_block(q, k[0], v[0], valid, used, tree, **launch)
        err = (got.float() - want).abs().max().item()
        us = per_call_us(lambda i, s=launch: attention.triton_split_kv_block(q, k[i], v[i], valid, used, tree, **s),
                         layers, device)  # fmt: skip
        out["split"].append({**launch, **row(us), "max_abs_err": round(err, 5)})
    out["split_best"] = min(out["split"], key=lambda r: r["us"])
    out["split_default"] = next(r for r in out["split"] if all(r[k] == v for k, v in default.items()))
    print(f"context {context}, block of {rows}: sdpa masked {out['sdpa_masked']['us']} us, split default "
          f"{out['split_default']['us']} us, best {out['split_best']}", flush=True)  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="512,2080,4096")
    p.add_argument("--blocks", default="2,17,33,65", help="verify block sizes (tokens) to time; empty for none")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "split_kv.json"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's interpreter on the CPU")
    args = p.parse_args()
    blocks = [int(t) for t in args.blocks.split(",") if t]
    if attention.triton is None:
        sys.exit("benchmarks/split_kv.py: needs Triton")
    if args.smoke:
        device, layers, heads, dim, contexts = "cpu", 2, 2, 16, [80]  # room for a 65-token block
        sweep = {"splits": (2,), "block_n": (16,), "num_warps": (attention.NUM_WARPS,)}
        block_sweep = {"splits": (2,), "block_m": (16,), "num_warps": (4,), "num_stages": (2,)}
        attention.SPLITS, attention.BLOCK_N = 2, 16  # the defaults are then in the sweeps
    elif torch.cuda.is_available():
        device, layers, heads, dim = "cuda", LAYERS, HEADS, HEAD_DIM
        contexts, sweep, block_sweep = [int(c) for c in args.contexts.split(",")], SWEEP, BLOCK_SWEEP
    else:
        sys.exit("benchmarks/split_kv.py: needs a CUDA GPU (or --smoke)")
    if blocks and max(blocks) > min(contexts):  # a block's tokens are the last of the context
        p.error(f"--blocks: a block of {max(blocks)} tokens does not fit a context of {min(contexts)}")
    result = {
        "benchmark": "split_kv",
        "machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run, interpreter)",
                    "torch": torch.__version__},
        "setup": {"batch": 1, "heads": heads, "head_dim": dim, "layers": layers, "dtype": str(q_dtype(device)),
                  "cache_slots": f"context + {EXTRA_SLOTS}", "replays": REPLAYS, "sweep": sweep,
                  "block_sweep": block_sweep,
                  "defaults": {"splits": attention.SPLITS, "block_n": attention.BLOCK_N,
                               "num_warps": attention.NUM_WARPS,
                               "block_launch": attention.BLOCK_LAUNCH}},
        "contexts": {str(c): measure(c, layers, heads, dim, sweep, device, blocks, block_sweep) for c in contexts},
    }  # fmt: skip
    write_json(args.result, result)


if __name__ == "__main__":
    main()
