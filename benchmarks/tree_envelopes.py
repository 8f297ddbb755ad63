"""Benchmark: tau against the drafting envelope, for trained heads and the text-only n-gram draft.

For each depth d: the n-gram draft and each head as a chain of gamma = d, and each eagle head as a dynamic tree
(TOPK, d, NODES). Greedy `speculate` on the test split; the numbers are acceptance (alpha, tau), which do not
depend on the machine: timings here are not claims (run on the CPU, one timing each). Each run's results.json
keeps its acceptance traces for `benchmarks/heads_7b.py --traces` to replay at 7B shape. Writes
benchmarks/results/tree_envelopes.json and .png.

    python benchmarks/tree_envelopes.py --dataset SPLIT --ngram TABLE --head eagle=DIR [--head eagle+events=DIR]
        [--depths 6,8,10] [--trees 10,6,60 6,10,64] [--questions 1] [--samples 64] [--runs DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculate_mini import speculate_row  # noqa: E402

from specalign.decode.run import SpeculateConfig  # noqa: E402
from specalign.fsutil import save_png, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a test split")
    p.add_argument("--ngram", required=True, help="an n-gram table of the same train answers")
    p.add_argument("--head", action="append", default=[], metavar="KIND=DIR", help="a trained head (repeatable)")
    p.add_argument("--depths", default="6,8,10", help="chain lengths (gamma) of the chain rows")
    p.add_argument("--trees", nargs="*", default=["10,6,60", "10,8,64", "6,10,64"], help="TOPK,DEPTH,NODES")
    p.add_argument("--questions", type=int, default=1)
    p.add_argument("--samples", type=int, default=64, help="answers (samples x questions)")
    p.add_argument("--device", default=None)
    p.add_argument("--runs", default="/tmp/tree_envelopes")
    p.add_argument("--result", default=str(Path(__file__).parent / "results" / "tree_envelopes.json"))
    args = p.parse_args()
    heads = dict(h.split("=", 1) for h in args.head)
    sources = {}
    for d in (int(x) for x in args.depths.split(",")):
        sources[f"ngram, chain gamma {d}"] = {"ngram": args.ngram, "gamma": d}
        for kind, folder in heads.items():
            sources[f"{kind}, chain gamma {d}"] = {"draft_head": folder, "gamma": d}
    for tree in args.trees:
        for kind, folder in heads.items():
            if kind != "feature-adapter":
                sources[f"{kind}, tree {tree}"] = {"draft_head": folder, "tree": tree}
    rows = []
    for i, (label, opts) in enumerate(sources.items()):
        cfg = SpeculateConfig(dataset=args.dataset, out=str(Path(args.runs) / f"source{i}"), questions=args.questions,
                              max_samples=max(1, args.samples // args.questions), repeats=1, hf_baseline=False,
                              device=args.device, overwrite=True, **opts)  # fmt: skip
        row = speculate_row(label, cfg)
        rows.append({k: row[k] for k in ("source", "run", "token_identical", "gamma", "tree", "mean_tree_nodes",
                                         "answers", "tokens", "alpha", "tau")})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    setup = {"dataset": args.dataset, "questions": args.questions, "answers": rows[0]["answers"], "heads": heads,
             "ngram": args.ngram, "greedy": True, "max_new_tokens": 50,
             "note": "acceptance only (alpha, tau): machine-independent"}  # fmt: skip
    res = {"benchmark": "tree_envelopes", "setup": setup, "rows": rows}
    write_json(args.result, res)
    plot(res, Path(args.result).with_suffix(".png"))


def plot(res: dict, path: Path) -> None:
    """tau against depth: one line per chain source, markers for the trees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    chains: dict[str, list] = {}
    for r in res["rows"]:
        if r["tree"] is None:
            chains.setdefault(r["source"].split(",")[0], []).append((r["gamma"], r["tau"]))
    colours = {}
    for name, pts in chains.items():
        pts.sort()
        (line,) = ax.plot(*zip(*pts, strict=True), marker="o", ls="--" if name == "ngram" else "-",
                          color="tab:grey" if name == "ngram" else None, label=f"{name}, chain")  # fmt: skip
        colours[name] = line.get_color()
    kinds = [k for k in chains if k != "ngram"]
    for r in res["rows"]:
        if r["tree"] is not None:
            kind = r["source"].split(",")[0]
            side = kinds.index(kind) - (len(kinds) - 1) / 2 if kind in kinds else 0
            x = r["gamma"] + 0.15 * side
            ax.scatter([x], [r["tau"]], marker="*", s=160, zorder=3, color=colours.get(kind),
                       label=f"{r['source']} ({r['mean_tree_nodes']:.0f} nodes)")  # fmt: skip
            ax.annotate(f"{r['tau']:.2f}", (x, r["tau"]), textcoords="offset points", fontsize=7,
                        xytext=(-30 if side < 0 else 8, -3))  # fmt: skip
    depths = sorted({r["gamma"] for r in res["rows"]})
    ax.plot(depths, [d + 1 for d in depths], color="k", lw=0.8, ls=":", marker="_", markersize=25,
            label="the most a round can give (depth + 1)")  # fmt: skip
    ax.set_xlim(min(depths) - 1, max(depths) + 1)
    ax.set_xticks(depths)
    ax.set_xlabel("depth (chain gamma, or tree depth)")
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_title(f"tau by envelope, {res['setup']['answers']} test answers ({res['setup']['questions']}q), greedy")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
