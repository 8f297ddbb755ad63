"""Answer quality on the world: exact match and per-fact accuracy against the scene graph's answers.

A *fact* is a phrase of the ground-truth answer (in the model's own voice) that states one thing about the
scene: "red car", "two pedestrians", "oncoming", "curving to the left", "dusk and the light is fading". An answer
gets a fact right when it contains that phrase. A model that cannot see colour and guesses gets a colour fact right
about once in seven (the palette), which is the chance level the draft should fall to.

The phrases are not spelled here: they are read off world/qa.py's tables and phrase functions (and world/scene.py's
colours, vehicle kinds and states), so rewording an answer there rewords the facts scored here. The rule for a
table of phrases, one per value of a scene attribute (LAYOUT_T: layout -> "a two-lane road curving to the left"):
the fact is the phrase without the words every entry shares at its ends ("curving to the left").
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from specalign.errors import SpecalignError
from specalign.world import qa
from specalign.world.scene import (
    COLOUR_NAMES,
    EGO_STATES,
    LAYOUTS,
    LIGHT_STATES,
    PEDESTRIAN_STATES,
    TIMES_OF_DAY,
    VEHICLE_KINDS,
    VEHICLE_STATES,
    Pedestrian,
    RoadsideRow,
    Scene,
    Vehicle,
)

SIDES = ("left", "right")


def _alternatives(words) -> str:
    """A regex matching any of `words` (longest first, so "persons" is not read as "person")."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w))) + ")"


def varying_part(phrases: list[str]) -> list[str]:
    """Each phrase without the words that every phrase contains, taken off its two ends."""
    shared = set.intersection(*(set(p.split()) for p in phrases))
    out = []
    for p in phrases:
        words = p.split()
        while len(words) > 1 and words[0] in shared:
            words.pop(0)
        while len(words) > 1 and words[-1] in shared:
            words.pop()
        out.append(" ".join(words))
    return out


def _scene(**parts) -> Scene:
    return Scene(layout="straight", ego="stopped", ego_speed=0.0, time_of_day="day", curvature=0.0, **parts)


def _vehicle_states() -> list[str]:
    """What each vehicle phrase of qa says about the vehicle besides its colour and kind: the words after the noun
    ("parked on the left side of the road"), or before it without the article ("oncoming")."""
    out = []
    noun = "vehiclecolour vehiclekind"
    for phrase in (qa.vehicle_t, qa.vehicle_d):
        for state in VEHICLE_STATES:
            for side in SIDES:
                before, after = phrase(Vehicle("vehiclekind", "vehiclecolour", state, side, 0, 0, 0)).split(noun)
                before = re.sub(r"^(?:a|an)\b", "", before.strip()).strip()
                out.append(before if before else after.strip())
    return out


def _pedestrian_states() -> list[str]:
    out = []
    for phrase in (qa.pedestrian_t, qa.pedestrian_d):
        for side in SIDES:
            out += varying_part([phrase(Pedestrian(state, side, 0, 0, "grey")) for state in PEDESTRIAN_STATES])
    return out


def _building_nouns() -> list[str]:
    """The word each voice puts after a building row's colour ("red buildings", "red houses")."""
    scene = _scene(roadside=[RoadsideRow("building", "left", 10.0, 0.0, colour="buildingcolour")])
    return [re.search(r"buildingcolour (\w+)", qa.answer(scene, "What objects are on the side of the road?", v))[1]
            for v in ("target", "draft")]  # fmt: skip


def _count_nouns() -> list[str]:
    """The words qa's answers to the counting questions put after a number ("two vehicles", "one person")."""
    words = []
    for n in (0, 1, 2):
        scene = _scene(vehicles=[Vehicle("car", "red", "parked", "left", 0, 0, 0)] * n,
                       pedestrians=[Pedestrian("walking", "left", 0, 0, "red")] * n)  # fmt: skip
        for question, category in qa.QUESTIONS:
            if category == "counts":
                for voice in ("target", "draft"):
                    words += re.findall(rf"\b{_alternatives(qa.NUMBERS)} (\w+)", qa.answer(scene, question, voice))
    return words


# the words: a colour fact is a colour named with its object, or in one of these sentence frames of qa's answers
COLOUR_WORDS = tuple(dict.fromkeys((*COLOUR_NAMES, *LIGHT_STATES)))  # traffic lights show colours of the palette
COLOURS = _alternatives(COLOUR_WORDS)
VEHICLES = _alternatives(VEHICLE_KINDS)
COLOUR_NOUNS = (*VEHICLE_KINDS, *_building_nouns())
COLOUR_FRAMES = ("showing {}", "is {}", "{} on the left", "{} on the right")
NUMBER = _alternatives(qa.NUMBERS)
COUNT_NOUNS = tuple(sorted(set(_count_nouns())))
PHRASES = {
    "vehicle_state": _vehicle_states(),
    "road_layout": [*varying_part([qa.LAYOUT_T[k] for k in LAYOUTS]), *varying_part([qa.LAYOUT_D[k] for k in LAYOUTS])],
    "ego_motion": [*varying_part([qa.EGO_T[k] for k in EGO_STATES]), *varying_part([qa.EGO_D[k] for k in EGO_STATES])],
    "time_of_day": [
        *varying_part([qa.TIME_T[k] for k in TIMES_OF_DAY]),
        *varying_part([qa.TIME_D[k] for k in TIMES_OF_DAY]),
    ],  # fmt: skip
    "pedestrian": _pedestrian_states(),
}
FACT_PATTERNS = {
    "colour": [rf"\b{COLOURS} {_alternatives(COLOUR_NOUNS)}\b"]
    + [r"\b" + re.escape(frame).replace(re.escape("{}"), COLOURS) + r"\b" for frame in COLOUR_FRAMES],
    "count": [rf"\b{NUMBER} {_alternatives(COUNT_NOUNS)}\b"],
    **{kind: [rf"\b{_alternatives(phrases)}\b"] for kind, phrases in PHRASES.items()},
}
_COMPILED = {k: [re.compile(p) for p in ps] for k, ps in FACT_PATTERNS.items()}


def facts(text: str) -> list[tuple[str, str]]:
    """(fact type, phrase) pairs stated by a ground-truth answer."""
    out = []
    for kind, patterns in _COMPILED.items():
        for pat in patterns:
            out += [(kind, m.group(0)) for m in pat.finditer(text)]
    return sorted(set(out))


@dataclass
class QualityReport:
    answers: int = 0
    exact: int = 0
    fact_total: dict = field(default_factory=lambda: defaultdict(int))
    fact_right: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, predicted: str, truth: str, group: str = "") -> None:
        """Score one answer. group (e.g. 'day') adds a second tally '<type>/<group>'."""
        self.answers += 1
        self.exact += int(predicted.strip() == truth.strip())
        for kind, phrase in facts(truth):
            right = int(re.search(rf"\b{re.escape(phrase)}\b", predicted) is not None)
            for key in (kind, f"{kind}/{group}") if group else (kind,):
                self.fact_total[key] += 1
                self.fact_right[key] += right

    def summary(self) -> dict:
        acc = {k: round(self.fact_right[k] / n, 4) for k, n in sorted(self.fact_total.items()) if n}
        total = sum(v for k, v in self.fact_total.items() if "/" not in k)
        right = sum(v for k, v in self.fact_right.items() if "/" not in k)
        return {
            "answers": self.answers,
            "exact_match": round(self.exact / max(self.answers, 1), 4),
            "fact_accuracy": round(right / max(total, 1), 4),
            "per_fact": acc,
            "facts": {k: n for k, n in sorted(self.fact_total.items())},
        }


@torch.inference_mode()
def evaluate_quality(vlm, dataset, role: str, max_clips: int, batch_size: int = 100, progress: bool = True) -> dict:
    """Greedy answers to all 50 questions on `max_clips` held-out clips, scored against the ground truth."""
    from specalign.models.base import Prompt

    report = QualityReport()
    # clips of one drive share a scene: spread the picks over the split so they cover many drives
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(max_clips, len(dataset))).round().astype(int))
    jobs = []  # (prompt, truth, group); one visual encode input per clip, shared by its 50 questions
    for i in picks.tolist():
        s = dataset[i]
        truth = s.ground_truth()
        if truth is None:
            raise SpecalignError(f"{dataset.root}: sample {i} has no ground truth (scoring needs a minidsec world)")
        vis = vlm.visual_inputs(s)
        for item in truth["qa"]:
            text = vlm.prompt_text(item["question"])
            jobs.append((Prompt(vlm.expand_prompt(text, vis), vis, text), item[role], truth["scene"]["time_of_day"]))
    for b in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc=f"eval {role}", unit="batch"):
        chunk = jobs[b : b + batch_size]
        outs = vlm.generate([p for p, _, _ in chunk], max_new_tokens=72)
        for (_, truth, group), ids in zip(chunk, outs, strict=True):
            report.add(vlm.decode(ids), truth, group)
    return report.summary()
