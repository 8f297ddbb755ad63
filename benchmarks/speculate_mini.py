"""Benchmark: speculative decoding on the bundled mini models (real acceptance) for each draft source.

Runs `specalign speculate` (greedy, gamma 4) over the test split of a minidsec world with each source: the draft
VLM resynced on the accepted prefix (plain, with prefill hiding, with adaptive gamma); with --adapter the
TokenAdapter (over the draft's own answer, and over resynced proposals); with --ngram the text-only n-gram draft
(the baseline a draft that reads the scene must beat); with --head KIND=DIR the draft heads on the target's
features (eagle and eagle+events as chains and as --tree trees, the feature-adapter cascade).
Reports whether SD is token-identical to the target alone, alpha, tau, the speedup vs the target alone on the same
engine (median and spread over answers, and overall) and vs HF generate. Each run's results.json (with its
acceptance traces) is kept under --runs for benchmarks/decode_7b.py to replay at 7B shape.
Writes benchmarks/results/speculate_mini.json.

    python benchmarks/speculate_mini.py [--adapter TASK/best_model] [--ngram TABLE.json] [--head eagle=DIR ...]
        [--tree 10,6,60] [--sources 5,6,7] [--world DIR] [--samples 64] [--questions 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.decode.run import SpeculateConfig, run_speculate  # noqa: E402
from specalign.fsutil import write_json  # noqa: E402
from specalign.world.build import WorldConfig, build_world  # noqa: E402

SOURCES = {
    "draft-vlm": {},
    "draft-vlm, prefill hidden": {"hide_prefill": True},
    "draft-vlm, adaptive gamma (p >= 0.3)": {"min_confidence": 0.3},
    "adapter over the draft's answer": {"adapter": True},
    "adapter over resynced proposals": {"adapter": True, "adapter_resync": True},
    "ngram (text only: prompt lookup + n-gram table)": {"ngram": True},
    "eagle head, chain": {"head": "eagle"},
    "eagle head, tree": {"head": "eagle", "tree": True},
    "eagle+events head, chain": {"head": "eagle+events"},
    "eagle+events head, tree": {"head": "eagle+events", "tree": True},
    "feature-adapter cascade (draft VLM -> adapter -> target LM head)": {"head": "feature-adapter"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="/tmp/speculate_world", help="built here (test split only) when missing")
    p.add_argument("--adapter", default=None, help="a TokenAdapter best_model/ for the adapter sources")
    p.add_argument("--ngram", default=None, help="an n-gram table (`specalign ngram build`): runs the ngram row")
    p.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="KIND=DIR",
        help="a trained head per kind (eagle, eagle+events, feature-adapter): runs its rows",
    )
    p.add_argument("--tree", default="10,6,60", help="TOPK,DEPTH,NODES of the tree rows")
    p.add_argument("--questions", type=int, default=1, help="the first N questions of the world's list")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timings per answer and side (the median is kept)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument(
        "--fp32-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the target's logits from an fp32 LM head (default on, as in speculate)",
    )
    p.add_argument("--draft-device", default=None, help="e.g. cuda:1: the draft (and adapter) on a second GPU")
    p.add_argument("--sources", default=None, help="comma-separated row numbers of SOURCES to run (default all)")
    p.add_argument("--runs", default="/tmp/speculate_runs", help="each source's speculate output folder")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "speculate_mini.json"))
    args = p.parse_args()
    world = Path(args.world)
    if not (world / "my_egpt_dsec_seq_1s").is_dir():
        build_world(WorldConfig(out=str(world), train=0, test=args.samples, clips_per_sequence=2, mp4=False,
                                workers=8), progress=False)  # fmt: skip
    heads = dict(h.split("=", 1) for h in args.head)
    rows = []
    picked = None if args.sources is None else {int(i) for i in args.sources.split(",")}
    if picked is not None and not picked <= set(range(len(SOURCES))):
        p.error(f"--sources: rows are 0..{len(SOURCES) - 1}")
    for i, (name, opts) in enumerate(SOURCES.items()):
        missing = ((opts.get("ngram") and not args.ngram) or (opts.get("adapter") and not args.adapter)
                   or (opts.get("head") and opts["head"] not in heads))  # fmt: skip
        if (picked is not None and i not in picked) or missing:
            continue
        opts = dict(opts)
        kind = opts.pop("head", None)
        if kind:
            opts["draft_head"] = heads[kind]
        if opts.pop("tree", False):
            opts["tree"] = args.tree
        out = Path(args.runs) / f"source{i}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = SpeculateConfig(dataset=str(world / "my_egpt_dsec_seq_1s"), out=str(out), max_samples=args.samples,
                              questions=args.questions,
                              gamma=args.gamma, dtype=args.dtype, fp32_head=args.fp32_head, repeats=args.repeats,
                              draft_device=args.draft_device, overwrite=True,
                              token_adapter=args.adapter if opts.pop("adapter", False) else None,
                              ngram=args.ngram if opts.pop("ngram", False) else None, **opts)  # fmt: skip
        rows.append(speculate_row(name, cfg))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stage_seconds"}), flush=True)
    write_json(args.result, {
        "benchmark": "speculate_mini",
        "machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"cpu {platform.machine()}, {os.cpu_count()} cores",
                    "torch": torch.__version__},
        "setup": {"target": "mini-target", "draft": "mini-draft", "adapter": args.adapter, "ngram": args.ngram,
                  "heads": heads, "tree": args.tree,
                  "gamma": args.gamma,
                  "dtype": args.dtype or "default", "fp32_head": args.fp32_head,
                  "draft_device": args.draft_device or "same as the target",
                  "greedy": True, "max_new_tokens": 50, "repeats": args.repeats, "questions": args.questions,
                  "samples": args.samples,
                  "world": "minidsec test split, 2 clips per drive, seed 0"},
        "rows": rows,
    })  # fmt: skip


def speculate_row(name: str, cfg: SpeculateConfig) -> dict:
    """Run one source and keep the numbers a table needs."""
    res = run_speculate(cfg, progress=False)
    t = res["totals"]
    return {"source": name, "run": cfg.out, "token_identical": res["verdict"]["token_identical"],
            "gamma": res["config"]["gamma"], "tree": res["config"]["tree"],
            "mean_tree_nodes": _mean([n for r in res["samples"] for n in r["nodes_per_round"]]),
            "divergences": res["divergences"], **{k: t[k] for k in (
                "answers", "tokens", "alpha", "tau", "first_token_acceptance", "mean_accepted_per_round",
                "free_tokens_from_prefill_hiding", "sd_tokens_per_s", "target_tokens_per_s",
                "speedup_vs_target_alone", "speedup_vs_hf_generate", "stage_seconds")}}  # fmt: skip


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    main()
