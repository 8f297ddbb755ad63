"""Where a model's colour misses are: held-out colour facts by the object they name and how visible it is.

For every colour fact of the ground-truth answers (to the questions whose answers state colours), the clip's
middle instant is rendered as it is and with the named objects in another colour: how visible the fact is is the
number of pixels whose 8-bit value changes by 4 or more (noise aside), counted in the part of the frame the model
sees (the whole frame's count is kept too). Occlusion, the frame's edges and an object behind the camera all
count, so 0 px means the fact cannot be read off the model's input. It also splits the misses by kind and, for
vehicles, by the type the answer gave the colour (trucks and buses are easily swapped).

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
from specalign.evaluate.quality import COLOURS, VEHICLES, facts  # noqa: E402
from specalign.models import load_model  # noqa: E402
from specalign.models.base import Prompt  # noqa: E402
from specalign.world.camera import EXPOSURE_S  # noqa: E402
from specalign.world.render import LAMPS, render  # noqa: E402
from specalign.world.scene import COLOUR_HUES, VEHICLE_KINDS, Scene  # noqa: E402

MIN_DN = 4  # a pixel shows a colour change of at least this many 8-bit levels (read noise: 1.4 DN by day)
T0_US = 50_000_000_000  # the world builder's clock offset; drive i starts at T0_US + i * 1e9 us


def colour_pixels(scene: dict, t: float, objects: list[tuple[str, int]], size: tuple[int, int],
                  crop: bool) -> tuple[int, int]:  # fmt: skip
    """Pixels that show the colour of `objects` ([(scene field, index)]) at time t: those whose 8-bit value changes
    by MIN_DN or more when each object takes the palette colour furthest from its own (a traffic light: shows the lamp
    furthest from its own), as (in the whole frame, in the model's view). So occlusion, the frame's edges and an
    object behind the camera all count, and a traffic light counts its lamps only, not its pole and housing.
    The view is what the model's processor keeps: with crop the central square (a 4:3 frame loses its left and
    right eighths), else the whole frame squashed."""
    other = copy.deepcopy(scene)
    for name, i in objects:
        if name == "traffic_light":
            own = LAMPS[scene["traffic_light"]["state"]]
            other["traffic_light"]["state"] = max(LAMPS, key=lambda k: np.abs(np.subtract(LAMPS[k], own)).sum())
        else:
            own = COLOUR_HUES[scene[name][i]["colour"]]
            other[name][i]["colour"] = max(COLOUR_HUES, key=lambda k: np.abs(np.subtract(COLOUR_HUES[k], own)).sum())
    full = render(Scene.from_dict(scene), t, *size, 3)
    recoloured = render(Scene.from_dict(other), t, *size, 3)
    # compared as the camera records them (noise aside): 8-bit values after the exposure, which is 11x longer at
    # night than by day, so a radiance step that is 5 DN by day is 57 DN at night
    dn = 255.0 * EXPOSURE_S[scene["time_of_day"]] / EXPOSURE_S["day"]
    full, recoloured = (np.clip(img * dn, 0, 255) for img in (full, recoloured))  # the 8-bit range clips
    changed = np.abs(full - recoloured).max(-1) >= MIN_DN  # [H, W]
    h, w = changed.shape
    side = min(h, w)
    view = changed[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2] if crop else changed
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
    noun = re.search(VEHICLES, phrase)  # "red truck"; "is red" names no type
    return "vehicle", [("vehicles", i) for i, v in enumerate(scene["vehicles"])
                       if v["colour"] == colour and (noun is None or v["kind"] == noun.group(0))]  # fmt: skip


MISSES = ("other colour", "other vehicle type", "not mentioned")


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
    crop = bool(getattr(vlm.image_processor, "do_center_crop", False))
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
            px_frame, px = colour_pixels(scene, t, drop, size, crop) if drop else (0, 0)
            right = re.search(rf"\b{re.escape(phrase)}\b", answer) is not None
            miss, said = (None, None) if right else kind_of_miss(phrase, answer)
            noun = re.search(rf"{VEHICLES}\b", phrase) if what == "vehicle" else None
            rows.append({"object": what, "pixels": px, "pixels_frame": px_frame, "time_of_day": scene["time_of_day"],
                         "right": right, "miss": miss, "type": noun.group(0) if noun else None, "said": said,
                         "side_view": any(name == "vehicles" and scene["vehicles"][i]["state"] == "crossing"
                                          for name, i in drop)})  # crossing vehicles show their side  # fmt: skip
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
    kinds = VEHICLE_KINDS
    print("| type | facts | right | " + " | ".join(f"said {k}" for k in kinds) + " |\n|---|---|---|" + "---|" * 4)
    for k in kinds:
        of = [r for r in rows if r["type"] == k and r["pixels"] > 0 and not r["side_view"]]
        said = [r["said"] for r in of if r["said"]]
        print(f"| {k} | {len(of)} | {np.mean([r['right'] for r in of]) if of else 0:.1%} | "
              + " | ".join(str(said.count(o)) for o in kinds) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
