"""Per-fact scoring against ground-truth answers, and its link to the words of world/qa.py."""

import copy
import re

import numpy as np
import pytest

from specalign.evaluate import quality
from specalign.evaluate.quality import QualityReport, facts
from specalign.world import qa
from specalign.world.qa import all_answers, answer
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
    Vehicle,
    sample_scene,
)


@pytest.fixture(scope="module")
def answers():
    """Every answer of 100 sampled scenes in both voices: [(scene, voice, text)]."""
    out = []
    for seed in range(100):
        scene = sample_scene(np.random.default_rng(seed))
        out += [(scene, v, a[v]) for a in all_answers(scene) for v in ("target", "draft")]
    return out


def kinds(text: str) -> dict[str, str]:
    return {phrase: kind for kind, phrase in facts(text)}


def test_facts_are_found_in_both_voices():
    t = ("The key elements in this scene include a two-lane road curving to the left, a red car parked on the "
         "right side of the road and an oncoming blue van in the left lane.")  # fmt: skip
    found = kinds(t)
    assert found["red car"] == "colour" and found["blue van"] == "colour"
    assert found["curving to the left"] == "road_layout"
    assert found["parked on the right side of the road"] == "vehicle_state" and found["oncoming"] == "vehicle_state"
    d = "In the scene, there is a road that bends to the left, a red car that is parked on the right."
    assert ("colour", "red car") in facts(d) and ("road_layout", "that bends to the left") in facts(d)
    # "standing still" is the ego vehicle, not a pedestrian standing; "day" in the draft's words is the time
    assert kinds("In the scene, we are standing still; it is day with good light.") == {
        "standing still": "ego_motion",
        "day with good light": "time_of_day",
    }


def test_the_words_are_the_world_tables():
    """The scorer's vocabulary is the world's: colours, vehicle kinds and number words come from scene.py and
    qa.py, and each of qa's phrase tables gives one fact per value, different for different values."""
    assert set(quality.COLOUR_WORDS) == set(COLOUR_NAMES) >= set(LIGHT_STATES)
    assert set(VEHICLE_KINDS) <= set(quality.COLOUR_NOUNS)
    assert re.fullmatch(quality.NUMBER, " ".join(qa.NUMBERS)) is None  # one word at a time
    assert all(re.fullmatch(quality.NUMBER, n) for n in qa.NUMBERS)
    tables = {"road_layout": (LAYOUTS, qa.LAYOUT_T, qa.LAYOUT_D), "ego_motion": (EGO_STATES, qa.EGO_T, qa.EGO_D),
              "time_of_day": (TIMES_OF_DAY, qa.TIME_T, qa.TIME_D)}  # fmt: skip
    for kind, (values, *voices) in tables.items():
        for table in voices:
            said = [[p for k, p in facts(table[v]) if k == kind] for v in values]
            assert all(len(s) == 1 for s in said), (kind, said)
            assert len({s[0] for s in said}) == len(values), f"{kind}: two values read as one fact"
    for phrase in (qa.vehicle_t, qa.vehicle_d):
        for kind_ in VEHICLE_KINDS:
            for colour in COLOUR_NAMES:
                states = set()
                for state in VEHICLE_STATES:
                    found = facts(phrase(Vehicle(kind_, colour, state, "left", 0, 0, 0)))
                    assert ("colour", f"{colour} {kind_}") in found
                    states |= {p for k, p in found if k == "vehicle_state"}
                assert len(states) == len(VEHICLE_STATES)
    for phrase in (qa.pedestrian_t, qa.pedestrian_d):
        said = {p for s in PEDESTRIAN_STATES for k, p in facts(phrase(Pedestrian(s, "left", 0, 0, "red")))}
        assert len(said) == len(PEDESTRIAN_STATES)


def test_every_word_qa_says_is_scored_and_every_scored_word_is_said(answers):
    """On real answers: every colour and number word qa writes lies inside a fact, every table phrase qa writes
    gives its fact, and every phrase the scorer looks for occurs in some answer (no dead words)."""
    colour_word = re.compile(rf"\b{quality.COLOURS}\b")
    count = re.compile(rf"\b{quality.NUMBER} (?:other )?(?:vehicles?|pedestrians?|cars?|persons?|person)\b")
    seen = set()
    fact_of = {}  # a table phrase -> the fact it gives
    for table in (qa.LAYOUT_T, qa.LAYOUT_D, qa.EGO_T, qa.EGO_D, qa.TIME_T, qa.TIME_D):
        fact_of |= {phrase: [p for _, p in facts(phrase)] for phrase in table.values()}
    for scene, voice, text in answers:
        found = facts(text)
        seen |= {p for _, p in found}
        spans = [m.span() for k, ps in quality._COMPILED.items() for p in ps for m in p.finditer(text)]
        for m in colour_word.finditer(text):
            assert any(a <= m.start() and m.end() <= b for a, b in spans), (m.group(0), text)
        for m in count.finditer(text):
            assert "other" in m.group(0) or ("count", m.group(0)) in found, text
        t = voice == "target"
        for table, value in ((qa.LAYOUT_T if t else qa.LAYOUT_D, scene.layout),
                             (qa.EGO_T if t else qa.EGO_D, scene.ego),
                             (qa.TIME_T if t else qa.TIME_D, scene.time_of_day)):  # fmt: skip
            if table[value] in text:
                assert set(fact_of[table[value]]) <= {p for _, p in found}, text
    for kind, phrases in quality.PHRASES.items():
        assert set(phrases) <= seen, (kind, set(phrases) - seen)
    assert {f"{c} {n}" for c in COLOUR_NAMES for n in quality.COLOUR_NOUNS} & seen


def test_report_counts_right_and_wrong_facts():
    truth = "There are two vehicles in the scene: a red car parked on the left side of the road and a grey bus."
    r = QualityReport()
    r.add(truth, truth, "day")
    r.add(truth.replace("red car", "green car").replace("two", "three"), truth, "night")
    s = r.summary()
    assert s["answers"] == 2 and s["exact_match"] == 0.5
    assert s["per_fact"]["colour"] == 0.75  # red car wrong once; grey bus right twice
    assert s["per_fact"]["colour/day"] == 1.0 and s["per_fact"]["colour/night"] == 0.5
    assert s["per_fact"]["count"] == 0.5


def test_an_answer_about_another_scene_loses_exactly_the_facts_that_differ():
    """Real answers of qa: the same scene with one thing changed is scored wrong on that thing only."""
    scene = next(s for s in (sample_scene(np.random.default_rng(i)) for i in range(100))
                 if s.vehicles and s.vehicles[0].state == "parked")  # fmt: skip
    other = copy.deepcopy(scene)
    other.vehicles[0].colour = next(c for c in COLOUR_NAMES if c != scene.vehicles[0].colour)
    other.time_of_day = next(t for t in TIMES_OF_DAY if t != scene.time_of_day)
    for voice in ("target", "draft"):
        r = QualityReport()
        for q, _ in qa.QUESTIONS:
            r.add(answer(other, q, voice), answer(scene, q, voice))
        per = r.summary()["per_fact"]
        assert per["colour"] < 1 and per["time_of_day"] == 0
        assert per["vehicle_state"] == per["road_layout"] == per["ego_motion"] == per["count"] == 1.0


def test_every_ground_truth_answer_scores_perfectly_against_itself(answers):
    r = QualityReport()
    for _, _, text in answers:
        r.add(text, text)
    s = r.summary()
    assert s["exact_match"] == 1.0 and s["fact_accuracy"] == 1.0
    assert s["facts"]["colour"] > 100 and s["facts"]["count"] > 50
