"""Benchmark: extraction throughput at 7B shape, 10 questions per sample, on one GPU.

Goal: >= 60 pairs/s of 50-token greedy answers from the Video-LLaVA-7B shape (HF batched generate: about 4;
the reference: about 1). The path is extraction's own (`decode.batch`): per batch of S samples, a CLIP ViT-L/14
encode of each sample's 8 frames, one prefill of each sample's ~2,060-token visual prefix (SharedPrefixEngine),
the 10 questions' suffixes prefilled together, then 50 decode steps of all S x 10 rows as one CUDA graph each,
every row attending to its sample's single prefix copy. Random weights (timing only), bf16.
Writes benchmarks/results/extract_7b.json.

    python benchmarks/extract_7b.py [--samples-per-batch 4,8,16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode_7b as shape  # noqa: E402

from specalign.decode.engine import SharedPrefixEngine, decode_one_token, prefill_shared  # noqa: E402
from specalign.fsutil import write_json  # noqa: E402


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if shape.DEVICE == "cuda" else None


def run_batch(engine: SharedPrefixEngine, tower, frames, prefix, suffix, pad, new_tokens: int) -> None:
    """One extraction batch: vision encode (timed work; its output is not spliced, the shapes are what count),
    shared-prefix prefill, suffix prefill, new_tokens greedy steps with tokens kept on the GPU."""
    with torch.inference_mode():
        tower(pixel_values=frames)
        logits = prefill_shared(engine, prefix, suffix, pad)
        out = torch.empty(suffix.shape[0], new_tokens, dtype=torch.long, device=shape.DEVICE)
        for i in range(new_tokens):
            out[:, i] = logits.argmax(-1)
            if i + 1 < new_tokens:
                logits = decode_one_token(engine, out[:, i])
        out.tolist()  # the answers reach the host, as extraction writes them


def models(tiny: bool = False):
    """(the 7B-shaped target, a CLIP ViT-L/14 tower, the hidden size) on `shape.DEVICE`; tiny: the smoke shapes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hidden, clip_size = (
        4096,
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    )
    if tiny:
        hidden = 64
        shape.LLAMA_7B.update(shape.SMOKE_SHAPE)
        clip_size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    target = shape.llama_7b(32064, "video-llava-7b-shape")
    with torch.device(shape.DEVICE):
        tower = CLIPVisionModel(CLIPVisionConfig(**clip_size, image_size=224, patch_size=14)).to(torch.bfloat16).eval()
    return target, tower, hidden


def batch_inputs(target, S: int, questions: int, prefix_len: int, suffix_len: int, new_tokens: int, hidden: int):
    """One batch of S samples x `questions`: (its SharedPrefixEngine, frames, prefix embeddings, suffix embeddings,
    left padding of the suffixes), random but fixed by seed."""
    B = S * questions
    engine = SharedPrefixEngine(target, prefix_len, S, questions, suffix_len + new_tokens)
    g = torch.Generator(device=shape.DEVICE).manual_seed(0)
    frames = torch.randn(S * 8, 3, 224, 224, device=shape.DEVICE, dtype=torch.bfloat16, generator=g)
    prefix = torch.randn(S, prefix_len, hidden, device=shape.DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    suffix = torch.randn(B, suffix_len, hidden, device=shape.DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    lengths = torch.randint(max(1, suffix_len - 8), suffix_len + 1, (B,), generator=torch.Generator().manual_seed(0))
    pad = torch.arange(suffix_len)[None, :] < (suffix_len - lengths)[:, None]  # left padding
    return engine, frames, prefix, suffix, pad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples-per-batch", default="4,8,16")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--prefix", type=int, default=2060, help="visual prefix tokens (8 x 257 + template)")
    p.add_argument("--suffix", type=int, default=20, help="question + 'ASSISTANT:' tokens, longest")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "extract_7b.json"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    args = p.parse_args()
    if args.smoke:
        shape.DEVICE = "cpu"
    target, tower, hidden = models(tiny=args.smoke)
    rows = []
    for S in [int(x) for x in args.samples_per_batch.split(",")]:
        B = S * args.questions
        engine, frames, prefix, suffix, pad = batch_inputs(target, S, args.questions, args.prefix, args.suffix,
                                                           args.new_tokens, hidden)  # fmt: skip
        run_batch(engine, tower, frames, prefix, suffix, pad, 4)  # warm-up: captures the decode graph
        shape.sync()
        times = []
        for _ in range(args.batches):
            shape.sync()
            t = time.perf_counter()
            run_batch(engine, tower, frames, prefix, suffix, pad, args.new_tokens)
            shape.sync()
            times.append(time.perf_counter() - t)
        best = sorted(times)[len(times) // 2]
        rows.append({"samples_per_batch": S, "rows": B, "seconds_per_batch": round(best, 3),
                     "pairs_per_s": round(B / best, 1),
                     "peak_gib": peak_gib()})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        del engine
        if shape.DEVICE == "cuda":
            torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["pairs_per_s"])
    write_json(args.result, {
        "benchmark": "extract_7b",
        "goal": ">= 60 pairs/s, 10 questions per sample, 50-token answers, Video-LLaVA-7B shape, one H200",
        "machine": {"gpu": torch.cuda.get_device_name() if shape.DEVICE == "cuda" else "cpu (smoke run)",
                    "torch": torch.__version__},
        "setup": {"weights": "random (timing only)", "dtype": "bf16", "questions": args.questions,
                  "prefix_tokens": args.prefix, "suffix_tokens_max": args.suffix, "new_tokens": args.new_tokens,
                  "includes": "CLIP ViT-L/14 encode of 8 frames per sample, prefix + suffix prefill, decode, "
                              "answers copied to the host"},
        "rows": rows, "best": best, "goal_met": best["pairs_per_s"] >= 60,
    })  # fmt: skip


if __name__ == "__main__":
    main()
