"""How close the target's greedy choices are: the smallest top-2 logit margin of each answer, target alone.

A margin of exactly 0 is a tie: argmax takes the lower token id, and any kernel that rounds differently (a k-row
verify on a GPU against a one-row decode step) may take the other one, so greedy SD can leave the target-alone
answer there without any logic error. bf16 logits keep 8 bits of mantissa (steps of 0.06 at 10), so ties are
common; --fp32-head computes the LM head in fp32 from the same bf16 hidden states.

    python scripts/logit_margins.py --dataset WORLD/my_egpt_dsec_seq_1s [--samples 48] [--dtype bfloat16] [--fp32-head]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.data import open_dataset  # noqa: E402
from specalign.decode.engine import Engine, decode_one_token, prefill, prompt_embeds  # noqa: E402
from specalign.models import load_model  # noqa: E402


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-target")
    p.add_argument("--dataset", required=True)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--question", default="What are the key elements in this scene?")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp32-head", action="store_true", help="the LM head in fp32 (Engine(fp32_head=True))")
    args = p.parse_args()
    dataset = open_dataset(args.dataset)
    vlm = load_model(args.model, device=args.device, dtype=args.dtype)
    engine, rows = None, []
    for i in range(min(args.samples, len(dataset))):
        embeds, _ = prompt_embeds(vlm, vlm.collate([vlm.prepare(dataset[i], args.question)]))
        if engine is None or engine.max_len < embeds.shape[1] + args.max_new_tokens:
            engine = Engine(vlm, embeds.shape[1] + args.max_new_tokens + 8, fp32_head=args.fp32_head)
        logits = prefill(engine, embeds)[0]
        smallest = (float("inf"), -1)
        for step in range(args.max_new_tokens):
            top = logits.topk(2)
            smallest = min(smallest, (float(top.values[0] - top.values[1]), step))
            token = int(top.indices[0])
            if token == vlm.eos_token_id:
                break
            logits = decode_one_token(engine, torch.tensor([token], device=engine.device))[0]
        rows.append((*smallest, i))
    rows.sort()
    head = "fp32 head" if args.fp32_head else f"{args.dtype} head"
    print(f"{args.model} in {args.dtype} ({head}), {len(rows)} answers: {sum(m == 0.0 for m, _, _ in rows)} with an "
          f"exact top-2 tie; smallest margins (margin, step, sample): "
          + ", ".join(f"({m:.4f}, {s}, {i})" for m, s, i in rows[:6]))  # fmt: skip


if __name__ == "__main__":
    main()
