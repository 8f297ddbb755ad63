"""Per-fact scoring against ground-truth answers."""

import numpy as np

from specalign.evaluate.quality import QualityReport, facts
from specalign.world.qa import all_answers
from specalign.world.scene import sample_scene


def test_facts_are_found_in_both_voices():
    t = ("The key elements in this scene include a two-lane road curving to the left, a red car parked on the "
         "right side of the road and an oncoming blue van in the left lane.")  # fmt: skip
    kinds = dict((phrase, kind) for kind, phrase in facts(t))
    assert kinds["red car"] == "colour" and kinds["blue van"] == "colour"
    assert kinds["curving to the left"] == "road_layout"
    assert kinds["parked on the right"] == "vehicle_state" and kinds["oncoming"] == "vehicle_state"
    d = "In the scene, there is a road that bends to the left, a red car that is parked on the right."
    assert ("colour", "red car") in facts(d) and ("road_layout", "bends to the left") in facts(d)


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


def test_every_ground_truth_answer_scores_perfectly_against_itself():
    r = QualityReport()
    for seed in range(20):
        for qa in all_answers(sample_scene(np.random.default_rng(seed))):
            r.add(qa["target"], qa["target"])
            r.add(qa["draft"], qa["draft"])
    s = r.summary()
    assert s["exact_match"] == 1.0 and s["fact_accuracy"] == 1.0
    assert s["facts"]["colour"] > 100 and s["facts"]["count"] > 50
