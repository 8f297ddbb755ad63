"""Answer quality on the world: exact match and per-fact accuracy against the scene graph's answers.

A *fact* is a phrase of the ground-truth answer (in the model's own voice) that states one thing about the
scene: "red car", "two pedestrians", "oncoming", "curving to the left", "night". An answer gets a fact right
when it contains that phrase. A model that cannot see colour and guesses gets a colour fact right about once
in seven (the palette), which is the chance level the draft should fall to.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from specalign.errors import SpecalignError

COLOURS = r"(?:red|orange|yellow|green|blue|purple|grey)"
NUMBER = r"(?:no|one|two|three|four|five|six|seven|eight|nine|ten)"
FACT_PATTERNS = {
    "colour": [
        rf"\b{COLOURS} (?:car|van|truck|bus|buildings|houses)\b",
        rf"\bshowing {COLOURS}\b",
        rf"\bis {COLOURS}\b",
        rf"\bit is {COLOURS}\b",
        rf"\b{COLOURS} on the (?:left|right)\b",
    ],
    "count": [rf"\b{NUMBER} (?:vehicles?|pedestrians?|cars?|persons?|person)\b"],
    "vehicle_state": [
        r"\bparked on the (?:left|right)\b",
        r"\bdriving ahead in the same direction\b",
        r"\boncoming\b",
        r"\bcrossing the intersection from the (?:left|right)\b",
        r"\bmoving in front of us\b",
        r"\bcoming towards us\b",
        r"\bcrosses from the (?:left|right)\b",
    ],
    "road_layout": [r"\b(?:straight|curving to the (?:left|right)|bends to the (?:left|right)|intersection)\b"],
    "ego_motion": [r"\b(?:stopped and not moving|moving slowly|driving fast|standing still|driving slowly)\b"],
    "time_of_day": [r"\b(?:daytime|dusk|night)\b"],
    "pedestrian": [r"\b(?:walking|standing|crossing the road|walks|stands|crosses the road)\b"],
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
        for qa in truth["qa"]:
            text = vlm.prompt_text(qa["question"])
            jobs.append((Prompt(vlm.expand_prompt(text, vis), vis, text), qa[role], truth["scene"]["time_of_day"]))
    for b in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc=f"eval {role}", unit="batch"):
        chunk = jobs[b : b + batch_size]
        outs = vlm.generate([p for p, _, _ in chunk], max_new_tokens=72)
        for (_, truth, group), ids in zip(chunk, outs, strict=True):
            report.add(vlm.decode(ids), truth, group)
    return report.summary()
