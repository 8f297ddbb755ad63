"""Benchmark: feature-level drafting on minidsec, end to end: features -> heads -> speculative decoding.

For each question set (1q, 10q): extract the target's own greedy answers on the train split with the features a
head reads (`extract --hidden-states`), and on the test split for evaluation; build the text-only n-gram table
from the same train answers; train each head kind with one budget (`train-head`: eagle, eagle+events,
feature-adapter); then run `speculate` on the test split, greedy, with the same envelope for every source: the
n-gram draft and each head as a chain of gamma = the tree's depth, and the eagle heads as a dynamic tree. Reports
per source: token identity, alpha, tau, the speedup vs the target alone on the same engine, and per head its
training time and teacher-forced top-1/top-5 and offline chain tau on the test features. The eagle vs
eagle+events rows answer the study's question: do event features help a head that reads the target's own
features?  Writes benchmarks/results/heads_mini.json and heads_mini.png.

    python benchmarks/heads_mini.py [--world DIR] [--runs DIR] [--questions 1,10] [--train 1024] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculate_mini import speculate_row  # noqa: E402

from specalign.align.extract import ExtractConfig, extract  # noqa: E402
from specalign.align.train_head import HeadTrainConfig, train_head  # noqa: E402
from specalign.decode.ngram import NgramBuildConfig, build_ngram  # noqa: E402
from specalign.decode.run import SpeculateConfig  # noqa: E402
from specalign.fsutil import save_png, write_json  # noqa: E402
from specalign.world.build import WorldConfig, build_world  # noqa: E402

KINDS = ("eagle", "eagle+events", "feature-adapter")
RESULTS = Path(__file__).parent / "results"


def log(*a) -> None:
    print(*a, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="/tmp/heads_world", help="built here when missing")
    p.add_argument("--runs", default="/tmp/heads_runs", help="extractions, heads and speculate runs")
    p.add_argument("--train", type=int, default=1024, help="train clips of a world built here")
    p.add_argument("--questions", default="1,10", help="question sets to run (comma-separated counts)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument(
        "--feature-loss",
        type=float,
        default=0.0,
        help="smooth-L1 weight on the next feature (the committed runs: 0, EAGLE-3's choice)",
    )
    p.add_argument("--tree", default="10,6,60", help="TOPK,DEPTH,NODES of the tree rows; chains use gamma = DEPTH")
    p.add_argument("--samples", type=int, default=64, help="test samples decoded per question set")
    p.add_argument("--repeats", type=int, default=1, help="timings per answer and side (the median is kept)")
    p.add_argument("--device", default=None)
    p.add_argument("--result", default=str(RESULTS / "heads_mini.json"))
    args = p.parse_args()
    world, runs = Path(args.world), Path(args.runs)
    kinds = args.kinds.split(",")
    depth = int(args.tree.split(",")[1])
    if not (world / "my_egpt_dsec_train_1s").is_dir():
        t0 = time.time()
        build_world(WorldConfig(out=str(world), train=args.train, test=64, workers=os.cpu_count() or 2, mp4=False),
                    progress=False)  # fmt: skip
        log(f"world built in {time.time() - t0:.0f} s")
    train_split, test_split = world / "my_egpt_dsec_train_1s", world / "my_egpt_dsec_seq_1s"
    sets = {}
    for q in (int(x) for x in args.questions.split(",")):
        name = f"{q}q"
        seconds = {}
        feats = {}
        for split, folder in (("train", train_split), ("test", test_split)):
            t0 = time.time()
            extract(ExtractConfig(dataset=str(folder), out=str(runs / name / f"features_{split}"), questions=q,
                                  hidden_states=True, device=args.device, batch_size=64), progress=False)  # fmt: skip
            seconds[f"extract_{split}"] = round(time.time() - t0, 1)
            feats[split] = runs / name / f"features_{split}"
        table = runs / name / "ngram.json"
        build_ngram(NgramBuildConfig(pairs=str(feats["train"]), out=str(table)))
        log(f"{name}: features in {seconds}")
        heads, training = {}, {}
        for kind in kinds:
            t0 = time.time()
            res = train_head(HeadTrainConfig(features=str(feats["train"]), eval_features=str(feats["test"]), kind=kind,
                                             out=str(runs / name / "heads"), epochs=args.epochs,
                                             batch_size=args.batch_size, lr=args.lr, ttt_steps=args.ttt_steps,
                                             feature_loss=args.feature_loss,
                                             device=args.device), progress=False)  # fmt: skip
            heads[kind] = str(Path(res["task_dir"]) / "best_model")
            training[kind] = {"seconds": round(time.time() - t0, 1), "train_seconds": res["seconds"],
                              "parameters": res["parameters"], "best_epoch": res["best_epoch"],
                              "eval": res["best"]}  # fmt: skip
            log(f"{name} {kind}: {json.dumps(training[kind])[:300]}")
        rows = []
        sources = {f"ngram, chain gamma {depth}": {"ngram": str(table)}}
        for kind in kinds:
            sources[f"{kind}, chain gamma {depth}"] = {"draft_head": heads[kind]}
            if kind != "feature-adapter":
                sources[f"{kind}, tree {args.tree}"] = {"draft_head": heads[kind], "tree": args.tree}
        for i, (label, opts) in enumerate(sources.items()):
            cfg = SpeculateConfig(dataset=str(test_split), out=str(runs / name / f"speculate{i}"), questions=q,
                                  max_samples=max(1, args.samples // q), gamma=depth, repeats=args.repeats,
                                  device=args.device, hf_baseline=False, overwrite=True, **opts)  # fmt: skip
            rows.append(speculate_row(label, cfg))
            r = rows[-1]
            log(f"{name} {label}: identical {r['token_identical']} alpha {r['alpha']:.3f} tau {r['tau']:.2f} "
                f"speedup {r['speedup_vs_target_alone']['median']:.2f}x")  # fmt: skip
        sets[name] = {"seconds": seconds, "training": training, "rows": rows}
    result = {
        "benchmark": "heads_mini",
        "machine": {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"cpu {platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__},
        "setup": {"target": "mini-target", "draft": "mini-draft", "world": f"minidsec, {args.train} train clips, "
                  "64 test clips, seed 0", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "ttt_steps": args.ttt_steps, "feature_loss": args.feature_loss, "tree": args.tree,
                  "chain_gamma": depth, "greedy": True,
                  "max_new_tokens": 50, "repeats": args.repeats, "test_answers_per_set": args.samples},
        "sets": sets,
    }  # fmt: skip
    write_json(args.result, result)
    plot(result, Path(args.result).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """tau per source and question set, the n-gram baseline's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(8 * len(sets), 4.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], sets.items(), strict=True):
        labels = [r["source"] for r in s["rows"]]
        taus = [r["tau"] for r in s["rows"]]
        colours = ["tab:grey" if lab.startswith("ngram") else "tab:green" if "events" in lab else
                   "tab:red" if "adapter" in lab else "tab:blue" for lab in labels]  # fmt: skip
        ax.barh(labels, taus, color=colours)
        ax.axvline(taus[0], color="k", ls="--", lw=1, label=f"ngram {taus[0]:.2f}")
        for y, t in enumerate(taus):
            ax.text(t, y, f" {t:.2f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tau: tokens per target forward (greedy, bonus included)")
        ax.set_title(f"{name}: {s['rows'][0]['answers']} test answers")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, max(taus) * 1.15)
    fig.suptitle("Feature-level drafting on minidsec:\nheads on the target's features vs a text-only n-gram draft")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
