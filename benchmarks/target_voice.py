"""Benchmark: a draft in the target's voice, and the hybrid schedule it makes possible, on minidsec.

The bundled draft answers in its own voice ("In the scene, ...") where the target starts "The key elements ...",
so prefill hiding wins nothing. Here the draft learns the target's own greedy answers to the same train clips
(`models train-mini --role draft --init mini-draft --teacher-pairs RUN`: sequence-level distillation), and
`speculate` runs on the test split, greedy, before and after:
- the draft VLM alone with prefill hiding (gamma 4): first-token acceptance, alpha, tau, free tokens;
- the bundled head alone (`mini-head`, a tree);
- the hybrid (`--hide-prefill --draft-head`): the draft VLM drafts the first round during the target's prefill,
  the head every round after; with the bundled draft and with the distilled one.
The per-answer traces (tokens accepted and drafted per round) are kept for `benchmarks/latency_7b.py`, which
projects each schedule at 7B shape. Writes benchmarks/results/target_voice.json.

    python benchmarks/target_voice.py --world DIR --teacher RUN [--questions 10] [--answers 100] [--budget 180]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculate_mini import speculate_row  # noqa: E402

from specalign.align.distill import DistillConfig  # noqa: E402
from specalign.align.distill import distill as run_distill  # noqa: E402
from specalign.data import open_dataset  # noqa: E402
from specalign.decode.ngram import NgramBuildConfig, build_ngram  # noqa: E402
from specalign.decode.run import SpeculateConfig  # noqa: E402
from specalign.fsutil import read_json, write_json  # noqa: E402
from specalign.models.train_mini import TrainConfig, train_mini  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def log(*a) -> None:
    print(*a, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="a minidsec world built with the bundled models' tokenizer")
    p.add_argument("--teacher", required=True, help="an extraction of the world's train split by mini-target")
    p.add_argument("--runs", default="/tmp/voice_runs", help="the distilled draft and the speculate runs")
    p.add_argument("--questions", type=int, default=10, help="questions per test clip decoded")
    p.add_argument("--answers", type=int, default=100, help="test answers decoded per row")
    p.add_argument("--budget", type=float, default=180.0, help="seconds of draft training")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--gamma", type=int, default=4, help="the draft VLM's rows without a head")
    p.add_argument("--tree", default="6,10,64", help="TOPK,DEPTH,NODES of the head and hybrid rows")
    p.add_argument("--prefill-draft", type=int, default=6, help="the last hybrid row's draft-VLM tokens during the "
                   "prefill (its first-token guess included): what fits under the target's prefill at 7B")  # fmt: skip
    p.add_argument("--lora-steps", type=int, default=0, help="also distil with LoRA (`specalign distill`, the 7B "
                   "draft's path) for this many steps, and decode with that draft too (0: no)")  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument("--result", default=str(RESULTS / "target_voice.json"))
    args = p.parse_args()
    world, runs = Path(args.world), Path(args.runs)
    depth = int(args.tree.split(",")[1])
    t0 = time.time()
    manifest = train_mini(TrainConfig(role="draft", world=str(world), out=str(runs / "mini-draft-voice"),
                                      init="mini-draft", teacher_pairs=args.teacher, steps=100000,
                                      time_budget=args.budget, clips_per_batch=64, questions_per_clip=4, lr=args.lr,
                                      warmup=50, eval_clips=100, device=args.device), progress=False)  # fmt: skip
    distill = {"command": f"specalign models train-mini --role draft --world {world} --init mini-draft "
                          f"--teacher-pairs {args.teacher} --time-budget {args.budget} --clips-per-batch 64 "
                          f"--lr {args.lr} --warmup 50", "wall_seconds": round(time.time() - t0, 1),
               **{k: manifest[k] for k in ("parameters", "train_seconds", "final_loss", "held_out")}}  # fmt: skip
    distill["held_out"] = {k: v for k, v in distill["held_out"].items() if "/" not in k and k != "per_fact"}
    log(f"distilled draft: {distill}")
    voice = str(runs / "mini-draft-voice")
    table = runs / "ngram.json"  # the text-only baseline, from the same teacher answers
    build_ngram(NgramBuildConfig(pairs=args.teacher, out=str(table)))
    test = world / "my_egpt_dsec_seq_1s"
    lora = {}
    if args.lora_steps:
        t0 = time.time()
        train = str(world / "my_egpt_dsec_train_1s")
        m = run_distill(DistillConfig(draft="mini-draft", pairs=args.teacher, dataset=train,
                                      out=str(runs / "mini-draft-lora"), steps=args.lora_steps, batch_size=16, lr=1e-3,
                                      device=args.device, overwrite=True), progress=False)  # fmt: skip
        lora = {"command": f"specalign distill --draft mini-draft --pairs {args.teacher} --dataset {train} "
                           f"--steps {args.lora_steps} --batch-size 16 --lr 1e-3",
                "wall_seconds": round(time.time() - t0, 1),
                **{k: m[k] for k in ("parameters", "train_seconds", "final_loss", "held_out")}}  # fmt: skip
        log(f"LoRA-distilled draft: {lora}")
    sources = {
        "bundled draft (its own voice), gamma 4, prefill hiding": {"draft": "mini-draft", "hide_prefill": True},
        "distilled draft (the target's voice), gamma 4, prefill hiding": {"draft": voice, "hide_prefill": True},
        f"ngram, gamma {depth}": {"ngram": str(table), "gamma": depth},
        f"head alone (mini-head), tree {args.tree}": {"draft_head": "mini-head", "tree": args.tree},
        f"hybrid: bundled draft, then the head's tree {args.tree}": {"draft": "mini-draft", "draft_head": "mini-head",
                                                                     "tree": args.tree, "hide_prefill": True},
        f"hybrid: distilled draft, then the head's tree {args.tree}": {"draft": voice, "draft_head": "mini-head",
                                                                       "tree": args.tree, "hide_prefill": True},
        f"hybrid: distilled draft ({args.prefill_draft} in the prefill's shadow), then the head's tree {args.tree}": {
            "draft": voice, "draft_head": "mini-head", "tree": args.tree, "hide_prefill": True,
            "prefill_draft": args.prefill_draft},
    }  # fmt: skip
    if lora:
        sources.update({
            "LoRA-distilled draft, gamma 4, prefill hiding": {"draft": str(runs / "mini-draft-lora"),
                                                              "hide_prefill": True},
            f"hybrid: LoRA-distilled draft, then the head's tree {args.tree}": {
                "draft": str(runs / "mini-draft-lora"), "draft_head": "mini-head", "tree": args.tree,
                "hide_prefill": True},
        })  # fmt: skip
    rows = []
    result = {
        "benchmark": "target_voice",
        "machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"cpu {platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__},
        "setup": {"target": "mini-target", "head": "mini-head", "world": str(world), "teacher": args.teacher,
                  "world_clips": {split: len(open_dataset(world / f"my_egpt_dsec_{name}_1s"))
                                  for split, name in (("train", "train"), ("test", "seq"))},
                  "questions": args.questions, "answers": args.answers, "gamma": args.gamma, "tree": args.tree,
                  "greedy": True, "max_new_tokens": 50},
        "distilled_draft": distill,
        "lora_distilled_draft": lora or None,
        "rows": rows,
    }  # fmt: skip
    for i, (label, opts) in enumerate(sources.items()):
        opts = {"gamma": args.gamma, **opts}
        cfg = SpeculateConfig(dataset=str(test), out=str(runs / f"speculate{i}"), questions=args.questions,
                              max_samples=max(1, args.answers // args.questions), repeats=1, hf_baseline=False,
                              overwrite=True, device=args.device, **opts)  # fmt: skip
        row = {k: v for k, v in speculate_row(label, cfg).items() if k != "stage_seconds"}
        row["prefill_draft"] = cfg.prefill_draft or (cfg.gamma + 1 if cfg.hide_prefill else 0)
        samples = read_json(Path(cfg.out) / "results.json")["samples"]
        with_rounds = [s for s in samples if s["accepted_per_round"]]
        # the study's bar: the answer's first drafted token is the target's (round 1, its first proposal)
        first = sum(s["accepted_per_round"][0] > 0 for s in with_rounds)
        row["answer_first_token_accepted"] = first / max(len(with_rounds), 1)
        row["answers_with_free_tokens"] = sum(s["free_tokens"] > 0 for s in samples)
        row["traces"] = [{"tokens": len(s["target_tokens"]), "accepted": s["accepted_per_round"],
                          "drafted": s.get("nodes_per_round") or s["drafted_per_round"],
                          "free": s["free_tokens"], "prefill_hit": s["prefill_hit"]} for s in samples]  # fmt: skip
        rows.append(row)
        write_json(args.result, result, flat_numbers=True)  # a killed run keeps its finished rows
        log(
            f"{label}: identical {row['token_identical']} alpha {row['alpha']:.3f} tau {row['tau']:.2f} "
            f"first token {first}/{len(with_rounds)} free {row['free_tokens_from_prefill_hiding']}"
        )


if __name__ == "__main__":
    main()
