"""Projection: one answer's latency at 7B shape, stacked by stage, for every draft source and schedule.

Nothing runs on a GPU here: each answer's rounds, as measured on minidsec (`target_voice.py`: the draft VLM
before and after distillation, the n-gram table, the head, the hybrid; `study_table.py`: the draft VLM with the
reference TokenAdapter), are priced with the 7B-shaped component times measured on one H200 (`decode_7b.json`:
both vision encodes, the draft's prefill and decode step, the target's chain verify of k tokens; `heads_7b.json`:
the target's prefill and decode step, the head's prefill and its tree round, draft and verify). An answer costs

    vision + prefill + sum over rounds (draft + verify)

with the target alone as the first row: its vision, its prefill, then one decode step per token after the first.
The draft VLM pays its own vision encode and prefill (serially, on the target's GPU) and one decode step per
drafted token; with prefill hiding on a second GPU its first round costs only what does not fit under the
target's vision + prefill. The hybrid is priced both ways (a second GPU, and the same GPU with nothing
overlapped), which bound a same-GPU side stream. The study's 1.03x is the ratio it reported, drawn against our
target alone. These are projections: 7B timings x acceptance measured on the mini models.

    python benchmarks/latency_7b.py [--voice benchmarks/results/target_voice.json] [--study ...study_table.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.fsutil import read_json, save_png, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STAGES = ("vision", "prefill", "draft", "verify")
STUDY_SPEEDUP = 1.03  # the reference study's best end to end (feature-level adapter with prefill hiding)
LABEL = "projection: 7B timings x acceptance measured on the mini models"


def components(decode: dict, heads: dict, tree: str) -> dict:
    """The 7B-shaped times (ms) an answer is priced with."""
    row = next(r for r in heads["projection"] if r["kind"] == "eagle" and r["tree"] == tree)
    return {
        "target_vision": decode["vision_encode_ms"]["video_llava_8_frames_224"],
        "draft_vision": decode["vision_encode_ms"]["eventgpt_1_image_336"],
        "target_prefill": heads["target"]["prefill_ms"],
        "target_step": heads["target"]["decode_step_ms"],
        "draft_prefill": decode["draft_prefill_ms"],
        "draft_step": decode["draft_decode_ms_per_token"],
        # a chain verify of k drafted tokens is a block of k + 1: its cost in decode steps, measured up to 16
        "verify_vs_step": {int(k): v for k, v in decode["verify_cost_vs_decode"].items()},
        "ngram_draft": 0.04,  # host time per round, measured by speculate (no GPU work)
        "head_prefill": heads["head"]["prefill_ms"],
        "tree_round_draft": row["ms_per_round"]["draft"],
        "tree_round_verify": row["ms_per_round"]["verify"],
    }  # fmt: skip


def verify_ms(c: dict, k: int) -> float:
    table = c["verify_vs_step"]
    return table[min(k + 1, max(table))] * c["target_step"]


def answer_ms(trace: dict, c: dict, kind: str, pre: int = 0, overlap: bool = True) -> dict:
    """One answer's stage times (ms). kind: target, draft-vlm, ngram, head, hybrid. pre: tokens the draft VLM
    drafts during the target's vision + prefill (its first-token guess included; 0: none); overlap: on a second
    GPU (only what outlasts the target's vision + prefill is waited for) or not (the same GPU, serially)."""
    t = {"vision": c["target_vision"], "prefill": c["target_prefill"], "draft": 0.0, "verify": 0.0}
    if kind == "target":
        t["verify"] = (trace["tokens"] - 1) * c["target_step"]  # the decode steps
        return t
    if kind in ("draft-vlm", "hybrid"):  # the draft VLM's own vision and prefill, and its drafting in the shadow
        own = {"vision": c["draft_vision"], "prefill": c["draft_prefill"], "draft": max(0, pre - 1) * c["draft_step"]}
        if overlap:
            t["draft"] += max(0.0, sum(own.values()) - c["target_vision"] - c["target_prefill"])
        else:
            for stage, ms in own.items():
                t[stage] += ms
    # the guess was right: round 1 is what was drafted in the shadow (traces before `prefill_hit` existed: free > 0)
    hit = pre > 0 and trace.get("prefill_hit", trace["free"] > 0)
    for r, (_, k) in enumerate(zip(trace["accepted"], trace["drafted"], strict=True)):
        vlm_round = kind == "draft-vlm" or (kind == "hybrid" and r == 0 and (hit or "prefill_hit" not in trace))
        if vlm_round:  # a chain from the draft VLM: drafted in the shadow, or (a miss) now, a step per token
            t["draft"] += 0.0 if (r == 0 and hit) else k * c["draft_step"]
            t["verify"] += verify_ms(c, k)
            if kind == "hybrid":
                t["draft"] += c["head_prefill"]  # the head catches up on the prompt and this round
        elif kind == "ngram":
            t["draft"] += c["ngram_draft"]
            t["verify"] += verify_ms(c, k)
        else:  # a head's tree round (the first one also runs the head's prefill)
            t["draft"] += c["tree_round_draft"] + (c["head_prefill"] if r == 0 else 0.0)
            t["verify"] += c["tree_round_verify"]
    return t


def price(label: str, traces: list[dict], c: dict, kind: str, pre: int = 0, overlap: bool = True,
          tau: float | None = None) -> dict:  # fmt: skip
    per = [answer_ms(tr, c, kind, pre, overlap) for tr in traces if kind == "target" or tr["accepted"]]
    alone = [answer_ms(tr, c, "target") for tr in traces if kind == "target" or tr["accepted"]]
    total = [sum(p.values()) for p in per]
    ratio = [sum(a.values()) / s for a, s in zip(alone, total, strict=True)]
    return {"source": label, "answers": len(per), "tau_minidsec": tau,
            "ms": {s: round(statistics.mean(p[s] for p in per), 2) for s in STAGES},
            "total_ms": round(statistics.mean(total), 2),
            "speedup_vs_target_alone": round(sum(sum(a.values()) for a in alone) / sum(total), 3),
            "speedup_median_over_answers": round(statistics.median(ratio), 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voice", default=str(RESULTS / "target_voice.json"))
    p.add_argument("--study", default=str(RESULTS / "study_table.json"))
    p.add_argument("--decode", default=str(RESULTS / "decode_7b.json"))
    p.add_argument("--heads", default=str(RESULTS / "heads_7b.json"))
    p.add_argument("--result", default=str(RESULTS / "latency_7b.json"))
    args = p.parse_args()
    voice = read_json(args.voice)
    c = components(read_json(args.decode), read_json(args.heads), voice["setup"]["tree"])
    rows_by = {r["source"]: r for r in voice["rows"]}

    def find(prefix: str) -> dict:
        return next(r for name, r in rows_by.items() if name.startswith(prefix))

    head = find("head alone")
    n = statistics.mean(t["tokens"] for t in head["traces"])
    rows = [price(f"target alone ({n:.0f} tokens an answer)", head["traces"], c, "target")]
    rows.append({"source": f"the study's best ({STUDY_SPEEDUP}x, as reported)", "answers": None,
                 "total_ms": round(rows[0]["total_ms"] / STUDY_SPEEDUP, 2), "ms": None,
                 "speedup_vs_target_alone": STUDY_SPEEDUP, "tau_minidsec": None})  # fmt: skip
    study = read_json(args.study) if Path(args.study).is_file() else {}
    adapter = next((r for r in study.get("rows", {}).get("1q", {}).get("speculate", [])
                    if "adapter" in r["source"]), None)  # fmt: skip
    if adapter is not None:  # measured on other answers (question 1 only): its own target-alone row beside it
        n = statistics.mean(t["tokens"] for t in adapter["traces"])
        rows.append(price(f"target alone, on the 1q answers ({n:.0f} tokens)", adapter["traces"], c, "target"))
        rows.append(price("draft VLM + TokenAdapter, gamma 4, on the 1q answers", adapter["traces"], c, "draft-vlm",
                          overlap=False, tau=adapter["tau"]))  # fmt: skip
    depth = int(voice["setup"]["tree"].split(",")[1])
    gamma = voice["setup"]["gamma"]
    for prefix, label in (("bundled draft", "draft VLM (its own voice)"),
                          ("distilled draft", "draft VLM (the target's voice)")):  # fmt: skip
        r = find(prefix)
        rows.append(price(f"{label}, gamma {gamma}, prefill hiding, 2nd GPU", r["traces"], c, "draft-vlm", gamma + 1,
                          tau=r["tau"]))  # fmt: skip
    r = find("ngram")
    rows.append(price(r["source"].replace("ngram", "n-gram table"), r["traces"], c, "ngram", tau=r["tau"]))
    rows.append(price(f"head, tree {voice['setup']['tree']}", head["traces"], c, "head", tau=head["tau"]))
    for r in voice["rows"]:
        if not r["source"].startswith("hybrid"):
            continue
        pre = r.get("prefill_draft") or depth + 1
        voice_of = ("its own voice" if "bundled" in r["source"] else
                    "the target's voice (LoRA)" if "LoRA" in r["source"] else "the target's voice")  # fmt: skip
        for overlap in (True, False):
            where = "2nd GPU" if overlap else "same GPU, serial"
            rows.append(price(f"hybrid: draft in {voice_of}, {pre} tokens in the shadow, {where}", r["traces"], c,
                              "hybrid", pre, overlap, r["tau"]))  # fmt: skip
    result = {"benchmark": "latency_7b", "label": LABEL, "components_ms": c,
              "sources": {"acceptance": [args.voice, args.study], "timings": [args.decode, args.heads]},
              "rows": rows}  # fmt: skip
    write_json(args.result, result)
    plot(rows, Path(args.result).with_suffix(".png"))
    for r in rows:
        print(f"{r['source']:70s} {r['total_ms']:8.1f} ms  {r['speedup_vs_target_alone']:.2f}x")


def plot(rows: list[dict], path: Path) -> None:
    """Horizontal bars, one per source, stacked by stage; the speedup vs the target alone at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vision": "#8da0cb", "prefill": "#66c2a5", "draft": "#fc8d62", "verify": "#e78ac3"}
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.6))
    for y, r in enumerate(rows):
        if r["ms"] is None:  # reported, not priced: one hatched bar
            ax.barh(y, r["total_ms"], color="white", edgecolor="grey", hatch="//")
        else:
            left = 0.0
            for s in STAGES:
                name = "verify (the target alone: its decode steps)" if s == "verify" else s
                ax.barh(y, r["ms"][s], left=left, color=colours[s], label=name if y == 0 else None)
                left += r["ms"][s]
        ax.text(r["total_ms"] + 3, y, f"{r['total_ms']:.0f} ms  ({r['speedup_vs_target_alone']:.2f}x)",
                va="center", fontsize=9)  # fmt: skip
    ax.set_yticks(range(len(rows)), [r["source"] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["total_ms"] for r in rows) * 1.3)
    ax.set_xlabel("ms per answer (mean over the test answers)")
    ax.set_title("One answer at 7B shape, by stage\nprojection: 7B-shape component times (one H200) x minidsec "
                 "acceptance", fontsize=10)  # fmt: skip
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
