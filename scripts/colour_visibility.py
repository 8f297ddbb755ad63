"""Where a model's colour misses are: held-out colour facts by the object they name and how visible it is.

For every colour fact of the ground-truth answers (to the questions whose answers state colours), the named
objects are removed from the scene and the clip's middle instant is rendered with and without them: the object's
visible size is the number of pixels whose RGB radiance changes (> 0.02), counted in the part of the frame the
model sees (the central square its processor crops; the whole frame's count is kept too). Occlusion, the frame's
edges and an object behind the camera all count, so 0 px means the fact cannot be read off the model's input.

    python scripts/colour_visibility.py --model mini-target --dataset WORLD/my_egpt_dsec_seq_1s [--clips 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specalign.data import open_dataset  # noqa: E402
from specalign.evaluate.quality import COLOURS, facts  # noqa: E402
from specalign.models import load_model  # noqa: E402
from specalign.models.base import Prompt  # noqa: E402
from specalign.world.render import render  # noqa: E402
from specalign.world.scene import Scene  # noqa: E402

T0_US = 50_000_000_000  # the world builder's clock offset; drive i starts at T0_US + i * 1e9 us


def visible_pixels(scene: dict, t: float, drop: list[tuple[str, int]], size: tuple[int, int]) -> tuple[int, int]:
    """Pixels whose radiance changes when the objects `drop` ([(scene field, index)]) are taken out at time t:
    (in the whole frame, in the model's view). The view is the frame's central square: Video-LLaVA's processor
    resizes the shortest side and centre-crops a square, so a 4:3 frame loses its left and right eighths."""
    less = copy.deepcopy(scene)
    for name, i in sorted(drop, reverse=True):
        if name == "traffic_light":
            less["traffic_light"] = None
        else:
            del less[name][i]
    full = render(Scene.from_dict(scene), t, *size, 3)
    without = render(Scene.from_dict(less), t, *size, 3)
    changed = np.abs(full - without).max(-1) > 0.02  # [H, W]
    h, w = changed.shape
    side = min(h, w)
    view = changed[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
    return int(changed.sum()), int(view.sum())


def named_objects(phrase: str, scene: dict) -> tuple[str, list[tuple[str, int]]]:
    """(object kind, the scene objects a colour fact's phrase can be about)."""
    colour = re.search(COLOURS, phrase).group(0)
    if phrase.startswith("showing"):
        return "traffic light", [("traffic_light", 0)]
    if re.search(r"buildings|houses| on the (left|right)", phrase):
        side = re.search(r"on the (left|right)", phrase)
        return "building", [("roadside", i) for i, r in enumerate(scene["roadside"]) if r["kind"] == "building"
                            and r["colour"] == colour and (side is None or r["side"] == side.group(1))]  # fmt: skip
    return "vehicle", [("vehicles", i) for i, v in enumerate(scene["vehicles"]) if v["colour"] == colour]


MISSES = ("other colour", "other vehicle type", "not mentioned")
VEHICLES = r"(?:car|van|truck|bus)"


def kind_of_miss(phrase: str, answer: str) -> tuple[str, str | None]:
    """Why a colour fact was missed: the answer names the object with another colour ("blue car" for "red car"),
    the colour with another vehicle type ("red van"), or neither (the object is left out). Also the vehicle type
    the answer gave that colour, for the second kind."""
    colour = re.search(COLOURS, phrase).group(0)
    other = re.escape(phrase).replace(colour, COLOURS)
    if re.search(rf"\b{other}\b", answer):
        return MISSES[0], None
    noun = re.search(rf"{VEHICLES}\b", phrase)
    said = re.search(rf"\b{colour} ({VEHICLES})\b", answer)
    if noun and said:
        return MISSES[1], said.group(1)
    return MISSES[2], None


BINS = ("all", "0 (not visible)", "1-29 px", "30-99 px", "100+ px")


def size_bin(px: int) -> str:
    return BINS[1] if px <= 0 else BINS[2] if px < 30 else BINS[3] if px < 100 else BINS[4]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini-target")
    p.add_argument("--dataset", required=True, help="a built world's test split")
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--out", default=None, help="also write every fact as JSON here")
    args = p.parse_args()
    dataset = open_dataset(args.dataset)
    vlm = load_model(args.model, dtype="fp32")
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(args.clips, len(dataset))).round().astype(int))
    jobs = []  # (prompt, truth, scene, t, size)
    for i in picks.tolist():
        sample = dataset[i]
        truth = sample.ground_truth()
        t = ((truth["window_us"][0] + truth["window_us"][1]) / 2 - T0_US) % 1_000_000_000 * 1e-6
        size = sample.frames(1).shape[2:0:-1]  # (W, H)
        vis = vlm.visual_inputs(sample)
        for qa in truth["qa"]:
            if any(kind == "colour" for kind, _ in facts(qa["target"])):
                text = vlm.prompt_text(qa["question"])
                jobs.append((Prompt(vlm.expand_prompt(text, vis), vis, text), qa["target"], truth["scene"], t, size))
    answers = []
    with torch.inference_mode():
        for b in range(0, len(jobs), 100):
            answers += [vlm.decode(ids) for ids in vlm.generate([j[0] for j in jobs[b : b + 100]], max_new_tokens=72)]
    rows = []
    for (_, truth, scene, t, size), answer in zip(jobs, answers, strict=True):
        for kind, phrase in facts(truth):
            if kind != "colour":
                continue
            what, drop = named_objects(phrase, scene)
            px_frame, px = visible_pixels(scene, t, drop, size) if drop else (0, 0)
            right = re.search(rf"\b{re.escape(phrase)}\b", answer) is not None
            miss, said = (None, None) if right else kind_of_miss(phrase, answer)
            noun = re.search(rf"{VEHICLES}\b", phrase) if what == "vehicle" else None
            rows.append({"object": what, "pixels": px, "pixels_frame": px_frame, "time_of_day": scene["time_of_day"],
                         "right": right, "miss": miss, "type": noun.group(0) if noun else None, "said": said,
                         "side_view": noun is not None and any(  # crossing vehicles show their side
                             v["state"] == "crossing" for v in scene["vehicles"]
                             if v["kind"] == noun.group(0) and phrase.startswith(v["colour"]))})  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows))
    print(f"{args.model}: {len(rows)} colour facts on {len(picks)} clips, "
          f"{np.mean([r['right'] for r in rows]):.1%} right")  # fmt: skip
    table = defaultdict(list)
    for r in rows:
        table[(r["object"], "all")].append(r["right"])
        table[(r["object"], size_bin(r["pixels"]))].append(r["right"])
        table[("any", size_bin(r["pixels"]))].append(r["right"])
    print("| object | visible size | facts | right |\n|---|---|---|---|")
    for (what, size), hits in sorted(table.items(), key=lambda kv: (kv[0][0], BINS.index(kv[0][1]))):
        print(f"| {what} | {size} | {len(hits)} | {np.mean(hits):.1%} |")
    print("\nmisses of visible objects (>= 1 px) by kind:\n| object | misses | " + " | ".join(MISSES) + " |")
    print("|---|---|" + "---|" * len(MISSES))
    for what in sorted({r["object"] for r in rows}):
        miss = [r["miss"] for r in rows if r["object"] == what and not r["right"] and r["pixels"] > 0]
        print(f"| {what} | {len(miss)} | " + " | ".join(f"{miss.count(m) / max(len(miss), 1):.0%}" for m in MISSES)
              + " |")  # fmt: skip
    print("\nvisible vehicles seen from behind or ahead (crossing ones show their side): the type an answer gave the "
          "fact's colour, when it was another type (rows: the truth)")  # fmt: skip
    kinds = ("car", "van", "truck", "bus")
    print("| type | facts | right | " + " | ".join(f"said {k}" for k in kinds) + " |\n|---|---|---|" + "---|" * 4)
    for k in kinds:
        of = [r for r in rows if r["type"] == k and r["pixels"] > 0 and not r["side_view"]]
        said = [r["said"] for r in of if r["said"]]
        print(f"| {k} | {len(of)} | {np.mean([r['right'] for r in of]) if of else 0:.1%} | "
              + " | ".join(str(said.count(o)) for o in kinds) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
