"""Questions and answers from a scene graph, in two voices.

The question list imitates the top-50 questions of the DSEC instruction data (a `{question, count}` list,
most frequent first, "What are the key elements in this scene?" on top). Each answer is generated from the
scene graph twice: in the target's voice ("The key elements in this scene include ...", as Video-LLaVA
tends to answer) and in the draft's voice ("In the scene, there is ...", as EventGPT tends to answer). Both
voices state the same facts, so the two models differ in what they can see, not in what they were taught.
"""

from __future__ import annotations

from specalign.world.scene import Scene, Vehicle

NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# (question, category), most frequent first.
QUESTIONS: list[tuple[str, str]] = [
    ("What are the key elements in this scene?", "key_elements"),
    ("Describe the scene.", "describe"),
    ("What vehicles are in the scene?", "vehicles"),
    ("What is the layout of the road?", "road_layout"),
    ("What is happening in this scene?", "activity"),
    ("Are there any pedestrians?", "pedestrians"),
    ("What time of day is it?", "environment"),
    ("What objects are on the side of the road?", "roadside"),
    ("How many vehicles are there?", "counts"),
    ("Are there any buildings?", "structures"),
    ("Can you describe what you see in this scene?", "describe"),
    ("Where are the vehicles located?", "vehicles"),
    ("What color are the vehicles?", "colours"),
    ("Is the road straight or curved?", "road_layout"),
    ("What is the ego vehicle doing?", "activity"),
    ("What are the pedestrians doing?", "pedestrians"),
    ("What are the lighting conditions?", "environment"),
    ("Is there a traffic light?", "structures"),
    ("How many pedestrians are there?", "counts"),
    ("What is on the left side of the road?", "roadside"),
    ("What is on the right side of the road?", "roadside"),
    ("Describe the environment.", "describe"),
    ("Are there any vehicles on the road?", "vehicles"),
    ("Is there an intersection ahead?", "road_layout"),
    ("Is the car moving or stopped?", "activity"),
    ("Is anyone crossing the road?", "pedestrians"),
    ("Is it day or night?", "environment"),
    ("Are there any trees?", "roadside"),
    ("What color is the traffic light?", "colours"),
    ("What structures are visible?", "structures"),
    ("What are the other vehicles doing?", "vehicles"),
    ("What type of road is this?", "road_layout"),
    ("How fast is the vehicle moving?", "activity"),
    ("Where are the pedestrians?", "pedestrians"),
    ("What are the visibility conditions?", "environment"),
    ("Are there any street lamps?", "roadside"),
    ("How many cars are visible?", "counts"),
    ("What color are the buildings?", "colours"),
    ("Is there a vehicle ahead of us?", "vehicles"),
    ("Describe this driving scene in detail.", "describe"),
    ("Are there any parked cars?", "vehicles"),
    ("What should the driver pay attention to?", "activity"),
    ("Describe the road.", "road_layout"),
    ("Is the road busy?", "counts"),
    ("What color is the car in the scene?", "colours"),
    ("Are there any oncoming vehicles?", "vehicles"),
    ("What is the overall scene?", "describe"),
    ("What action should the driver take?", "activity"),
    ("How many objects are in the scene?", "counts"),
    ("What is the driver doing?", "activity"),
]
CATEGORIES = sorted({c for _, c in QUESTIONS})


def question_counts(top: int = 4810) -> list[dict]:
    """The `{question, count}` list, Zipf-like counts, most frequent first."""
    return [{"question": q, "count": int(round(top / (i + 1) ** 0.85))} for i, (q, _) in enumerate(QUESTIONS)]


def number(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def _join(items: list[str]) -> str:
    items = list(dict.fromkeys(items))  # "a person on the left and a person on the left" says nothing new
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"one {word}"
    return f"{number(n)} {word}es" if word.endswith("s") else f"{number(n)} {word}s"


LAYOUT_T = {
    "straight": "a straight two-lane road",
    "curve_left": "a two-lane road curving to the left",
    "curve_right": "a two-lane road curving to the right",
    "intersection": "a two-lane road leading to an intersection",
}
LAYOUT_D = {
    "straight": "a straight road",
    "curve_left": "a road that bends to the left",
    "curve_right": "a road that bends to the right",
    "intersection": "a road with an intersection ahead",
}
EGO_T = {
    "stopped": "the ego vehicle is stopped and not moving",
    "slow": "the ego vehicle is moving slowly along the road",
    "fast": "the ego vehicle is driving fast along the road",
}
EGO_D = {"stopped": "we are standing still", "slow": "we are driving slowly", "fast": "we are driving fast"}
TIME_T = {
    "day": "It is daytime and the scene is brightly lit",
    "dusk": "It is dusk and the light is fading",
    "night": "It is night and the scene is dark",
}
TIME_D = {"day": "it is day with good light", "dusk": "it is dusk with low light", "night": "it is night and dark"}


def vehicle_t(v: Vehicle) -> str:
    noun = f"{v.colour} {v.kind}"
    return {
        "parked": f"{_a(noun)} parked on the {v.side} side of the road",
        "same_direction": f"{_a(noun)} driving ahead in the same direction",
        "oncoming": f"an oncoming {noun} in the left lane",
        "crossing": f"{_a(noun)} crossing the intersection from the {v.side}",
    }[v.state]


def vehicle_d(v: Vehicle) -> str:
    noun = f"{v.colour} {v.kind}"
    return {
        "parked": f"{_a(noun)} that is parked on the {v.side}",
        "same_direction": f"{_a(noun)} moving in front of us",
        "oncoming": f"{_a(noun)} coming towards us",
        "crossing": f"{_a(noun)} that crosses from the {v.side}",
    }[v.state]


def pedestrian_t(p) -> str:
    return {
        "walking": f"a pedestrian walking on the {p.side} sidewalk",
        "standing": f"a pedestrian standing on the {p.side} sidewalk",
        "crossing": "a pedestrian crossing the road",
    }[p.state]


def pedestrian_d(p) -> str:
    return {
        "walking": f"a person who walks on the {p.side}",
        "standing": f"a person who stands on the {p.side}",
        "crossing": "a person who crosses the road",
    }[p.state]


def _roadside(scene: Scene, side: str | None, voice: str) -> list[str]:
    out = []
    for r in scene.roadside:
        if side is not None and r.side != side:
            continue
        where = f" on the {r.side}" if side is None else ""
        if r.kind == "tree":
            out.append(f"trees{where}" if voice == "target" else f"some trees{where}")
        elif r.kind == "pole":
            out.append(f"street lamps{where}" if voice == "target" else f"lamp posts{where}")
        else:
            out.append(f"{r.colour} buildings{where}" if voice == "target" else f"{r.colour} houses{where}")
    return out


def _elements(scene: Scene, voice: str, limit: int = 5) -> list[str]:
    """The scene's main items in the voice's words, most important first, at most `limit`."""
    veh = vehicle_t if voice == "target" else vehicle_d
    ped = pedestrian_t if voice == "target" else pedestrian_d
    items = [veh(v) for v in scene.vehicles[:2]] + [ped(p) for p in scene.pedestrians[:1]]
    if scene.traffic_light:
        items.append(f"a traffic light showing {scene.traffic_light.state}")
    items += _roadside(scene, None, voice)[:2]
    return items[:limit]


def _vehicles(scene: Scene, voice: str) -> str:
    n = len(scene.vehicles)
    if voice == "target":
        if n == 0:
            return "There are no other vehicles on the road; the road ahead is clear of traffic."
        return (
            f"There {'is' if n == 1 else 'are'} {_plural(n, 'vehicle')} in the scene: "
            + _join([vehicle_t(v) for v in scene.vehicles[:3]])
            + "."
        )
    if n == 0:
        return "In the scene, there is no other car, and the road is empty."
    return "In the scene, there is " + _join([vehicle_d(v) for v in scene.vehicles[:3]]) + "."


def _pedestrians(scene: Scene, voice: str) -> str:
    n = len(scene.pedestrians)
    if voice == "target":
        if n == 0:
            return "There are no pedestrians visible in the scene; the sidewalks are empty."
        return (
            f"There {'is' if n == 1 else 'are'} {_plural(n, 'pedestrian')}: "
            + _join([pedestrian_t(p) for p in scene.pedestrians])
            + "."
        )
    if n == 0:
        return "In the scene, there is no person on the road or on the sidewalks."
    return "In the scene, there is " + _join([pedestrian_d(p) for p in scene.pedestrians]) + "."


def _counts(scene: Scene, voice: str, what: str) -> str:
    nv, np_ = len(scene.vehicles), len(scene.pedestrians)
    if what == "cars":
        nc = sum(v.kind == "car" for v in scene.vehicles)
        if voice == "target":
            return f"There {'is' if nc == 1 else 'are'} {_plural(nc, 'car')} visible, among {_plural(nv, 'vehicle')}."
        return f"In the scene, there is {_plural(nc, 'car')} out of {_plural(nv, 'vehicle')}."
    if what == "pedestrians":
        if voice == "target":
            return f"There {'is' if np_ == 1 else 'are'} {_plural(np_, 'pedestrian')} in the scene."
        return f"In the scene, there is {_plural(np_, 'person')} near the road."
    if what == "busy":
        busy = "busy" if nv + np_ >= 3 else "quiet"
        if voice == "target":
            return f"The road is {busy}, with {_plural(nv, 'vehicle')} and {_plural(np_, 'pedestrian')}."
        return f"In the scene, the road is {busy}: there is {_plural(nv, 'vehicle')} and {_plural(np_, 'person')}."
    if voice == "target":
        return f"There {'is' if nv == 1 else 'are'} {_plural(nv, 'vehicle')} and {_plural(np_, 'pedestrian')}."
    return f"In the scene, there is {_plural(nv, 'vehicle')} and {_plural(np_, 'person')}."


MIN_WORDS = 20


def answer(scene: Scene, question: str, voice: str) -> str:
    """The answer to one of QUESTIONS in the 'target' or 'draft' voice (about 20-60 tokens)."""
    text = _answer(scene, question, voice)
    if len(text.split()) < MIN_WORDS:  # short answers get the driving context, as a VLM tends to add
        if voice == "target":
            text += f" Overall, {EGO_T[scene.ego]} on {LAYOUT_T[scene.layout]}."
        else:
            text += f" Also, {EGO_D[scene.ego]} on {LAYOUT_D[scene.layout]}."
    return text


def _answer(scene: Scene, question: str, voice: str) -> str:
    t = voice == "target"
    q = question
    layout = (LAYOUT_T if t else LAYOUT_D)[scene.layout]
    ego = (EGO_T if t else EGO_D)[scene.ego]
    time = (TIME_T if t else TIME_D)[scene.time_of_day]
    elements = _join(_elements(scene, voice))

    if q == "What are the key elements in this scene?":
        if t:
            return f"The key elements in this scene include {layout}" + (f", {elements}." if elements else ".")
        return f"In the scene, there is {layout}" + (f", {elements}." if elements else ".")
    if q in (
        "Describe the scene.",
        "Can you describe what you see in this scene?",
        "What is the overall scene?",
        "Describe this driving scene in detail.",
        "Describe the environment.",
    ):
        if t:
            return f"The scene shows {layout} where {ego}. {time}. " + (
                f"Visible are {_join(_elements(scene, voice, 3))}." if elements else "No other road users are visible."
            )
        return f"In the scene, there is {layout} and {ego}; {time}. " + (
            f"There is {_join(_elements(scene, voice, 3))}." if elements else "There is nothing else."
        )
    if q in (
        "What vehicles are in the scene?",
        "Where are the vehicles located?",
        "Are there any vehicles on the road?",
        "What are the other vehicles doing?",
    ):
        return _vehicles(scene, voice)
    if q == "Is there a vehicle ahead of us?":
        ahead = [v for v in scene.vehicles if v.state == "same_direction"]
        if t:
            return (
                f"Yes, there is {vehicle_t(ahead[0])}."
                if ahead
                else "No, there is no vehicle directly ahead of us in our lane; the lane is clear."
            )
        return (
            f"In the scene, there is {vehicle_d(ahead[0])}."
            if ahead
            else "In the scene, there is no car in front of us in our lane."
        )
    if q == "Are there any parked cars?":
        parked = [v for v in scene.vehicles if v.state == "parked"]
        if t:
            return (
                (
                    "Yes, there "
                    + ("is " if len(parked) == 1 else "are ")
                    + _join([vehicle_t(v) for v in parked[:3]])
                    + "."
                )
                if parked
                else "No, there are no parked vehicles along the road in this scene."
            )
        return (
            ("In the scene, there is " + _join([vehicle_d(v) for v in parked[:3]]) + ".")
            if parked
            else ("In the scene, there is no parked car on either side.")
        )
    if q == "Are there any oncoming vehicles?":
        onc = [v for v in scene.vehicles if v.state == "oncoming"]
        if t:
            return (
                ("Yes, there " + ("is " if len(onc) == 1 else "are ") + _join([vehicle_t(v) for v in onc[:3]]) + ".")
                if onc
                else "No, there are no oncoming vehicles in the left lane at the moment."
            )
        return (
            ("In the scene, there is " + _join([vehicle_d(v) for v in onc[:3]]) + ".")
            if onc
            else ("In the scene, there is no car coming towards us.")
        )
    if q in (
        "What is the layout of the road?",
        "Is the road straight or curved?",
        "What type of road is this?",
        "Describe the road.",
        "Is there an intersection ahead?",
    ):
        inter = scene.layout == "intersection"
        if t:
            extra = "The intersection lies ahead of the ego vehicle." if inter else "There is no intersection in view."
            return f"The scene shows {layout} with a sidewalk on each side. {extra}"
        extra = "We are close to the crossing." if inter else "There is no crossing in view."
        return f"In the scene, there is {layout} with sidewalks. {extra}"
    if q in (
        "What is happening in this scene?",
        "What is the ego vehicle doing?",
        "Is the car moving or stopped?",
        "How fast is the vehicle moving?",
        "What is the driver doing?",
    ):
        moving = [v for v in scene.vehicles if v.state != "parked"]
        if t:
            others = (
                f"Nearby, there is {_join([vehicle_t(v) for v in moving[:2]])}."
                if moving
                else "No other vehicles are moving nearby."
            )
            return f"In this scene, {ego}. {others}"
        others = f"There is {_join([vehicle_d(v) for v in moving[:2]])}." if moving else "Nothing else moves."
        return f"In the scene, {ego}. {others}"
    if q in ("What should the driver pay attention to?", "What action should the driver take?"):
        hazards = [pedestrian_t(p) if t else pedestrian_d(p) for p in scene.pedestrians if p.state == "crossing"]
        hazards += [
            vehicle_t(v) if t else vehicle_d(v) for v in scene.vehicles if v.state in ("same_direction", "crossing")
        ]
        if scene.traffic_light:
            hazards.append(f"the traffic light showing {scene.traffic_light.state}")
        if t:
            return (
                "The driver should pay attention to " + _join(hazards[:3]) + " and keep a safe distance."
                if hazards
                else "The driver should keep to the lane and watch the road, which is clear ahead."
            )
        return (
            "In the scene, we should watch " + _join(hazards[:3]) + "."
            if hazards
            else "In the scene, there is nothing to watch out for; the road is clear."
        )
    if q in (
        "Are there any pedestrians?",
        "What are the pedestrians doing?",
        "Where are the pedestrians?",
        "Is anyone crossing the road?",
    ):
        if q == "Is anyone crossing the road?":
            crossing = [p for p in scene.pedestrians if p.state == "crossing"]
            if t:
                return (
                    "Yes, there is a pedestrian crossing the road ahead of the ego vehicle."
                    if crossing
                    else "No, nobody is crossing the road; "
                    + _pedestrians(scene, voice)[0].lower()
                    + _pedestrians(scene, voice)[1:]
                )
            return (
                "In the scene, there is a person who crosses the road in front of us."
                if crossing
                else "In the scene, nobody crosses the road."
            )
        return _pedestrians(scene, voice)
    if q in (
        "What time of day is it?",
        "What are the lighting conditions?",
        "Is it day or night?",
        "What are the visibility conditions?",
    ):
        if t:
            vis = {"day": "visibility is good", "dusk": "visibility is reduced", "night": "visibility is poor"}
            return f"{time}, and {vis[scene.time_of_day]}. The sky is clear above {layout}."
        return f"In the scene, {time}, and the sky is clear."
    if q in (
        "What objects are on the side of the road?",
        "Are there any trees?",
        "Are there any street lamps?",
        "What is on the left side of the road?",
        "What is on the right side of the road?",
    ):
        side = "left" if "left side" in q else "right" if "right side" in q else None
        items = _roadside(scene, side, voice)
        where = f"on the {side} side of the road" if side else "along the road"
        if t:
            if not items:
                return f"There are no trees, street lamps or buildings {where}; only the sidewalk is visible."
            return f"The objects {where} include {_join(items)}."
        if not items:
            return f"In the scene, there is nothing {where} except the sidewalk."
        return f"In the scene, there is {_join(items)} {where}."
    if q in ("Are there any buildings?", "What structures are visible?", "Is there a traffic light?"):
        items = [s for s in _roadside(scene, None, voice) if "buildings" in s or "houses" in s or "lamp" in s]
        if scene.traffic_light:
            items.insert(0, f"a traffic light showing {scene.traffic_light.state} on the right")
        if t:
            return (
                f"The structures in this scene include {_join(items)}."
                if items
                else "There are no buildings or traffic lights in this scene, only the road and its sidewalks."
            )
        return (
            f"In the scene, there is {_join(items)}."
            if items
            else "In the scene, there is no building and no traffic light."
        )
    if q in ("How many vehicles are there?", "How many objects are in the scene?"):
        return _counts(scene, voice, "vehicles")
    if q == "How many pedestrians are there?":
        return _counts(scene, voice, "pedestrians")
    if q == "How many cars are visible?":
        return _counts(scene, voice, "cars")
    if q == "Is the road busy?":
        return _counts(scene, voice, "busy")
    if q in ("What color are the vehicles?", "What color is the car in the scene?"):
        if not scene.vehicles:
            return (
                "There are no vehicles in the scene, so no vehicle colors can be named."
                if t
                else "In the scene, there is no car, so there is no color to tell."
            )
        parts = [
            f"the {v.kind} {'parked' if v.state == 'parked' else 'on the road'} is {v.colour}"
            for v in scene.vehicles[:3]
        ]
        return ("In this scene, " if t else "In the scene, ") + _join(parts) + "."
    if q == "What color is the traffic light?":
        if not scene.traffic_light:
            return (
                "There is no traffic light visible in this scene, so its color cannot be named."
                if t
                else "In the scene, there is no traffic light."
            )
        s = scene.traffic_light.state
        return (
            f"The traffic light on the right side of the road is showing {s}."
            if t
            else f"In the scene, there is a traffic light and it is {s}."
        )
    if q == "What color are the buildings?":
        b = [r for r in scene.roadside if r.kind == "building"]
        if not b:
            return (
                "There are no buildings in this scene, so no building colors can be named."
                if t
                else "In the scene, there is no house."
            )
        parts = [f"{r.colour} on the {r.side}" for r in b]
        return ("The buildings are " if t else "In the scene, the houses are ") + _join(parts) + "."
    raise KeyError(f"no answer template for question {question!r}")


def all_answers(scene: Scene) -> list[dict]:
    """Every question's answer in both voices: [{category, question, target, draft}]."""
    return [
        {"category": c, "question": q, "target": answer(scene, q, "target"), "draft": answer(scene, q, "draft")}
        for q, c in QUESTIONS
    ]
