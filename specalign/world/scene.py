"""Scene graphs of minidsec drives and where every object is at time t.

A sequence is one drive through one scene: a road layout, the ego vehicle's motion, other road users,
roadside objects, a traffic light and the time of day. Roadside objects repeat along the road and road
users wrap around their depth range, so everything a scene graph says stays true for the whole drive.

World frame: X lateral (m, right positive, 0 = centre of the ego lane), Y up (m), Z depth ahead (m).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

LAYOUTS = ("straight", "curve_left", "curve_right", "intersection")
EGO_STATES = ("stopped", "slow", "fast")
TIMES_OF_DAY = ("day", "dusk", "night")
VEHICLE_KINDS = ("car", "van", "truck", "bus")
VEHICLE_STATES = ("parked", "same_direction", "oncoming", "crossing")
PEDESTRIAN_STATES = ("walking", "standing", "crossing")
ROADSIDE_KINDS = ("tree", "pole", "building")
LIGHT_STATES = ("red", "yellow", "green")

# Colours a person names. All have the same luminance (0.299 R + 0.587 G + 0.114 B), so an event camera,
# which only sees log luminance, cannot tell them apart: the colour gap holds by construction.
COLOUR_HUES = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.2, 1.0),
    "purple": (0.6, 0.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
}
LUMA = np.array([0.299, 0.587, 0.114])
OBJECT_LUMINANCE = 0.42


def isoluminant(hue, luminance: float = OBJECT_LUMINANCE) -> np.ndarray:
    """The most saturated colour of this hue whose luminance is exactly `luminance`."""
    hue = np.asarray(hue, dtype=np.float64)
    chroma = hue - LUMA @ hue  # zero-luminance direction
    scale = 1.0
    for c in chroma:  # largest scale that keeps every channel in [0, 1]
        if c > 0:
            scale = min(scale, (1 - luminance) / c)
        elif c < 0:
            scale = min(scale, luminance / -c)
    return luminance + scale * chroma


COLOURS = {name: isoluminant(h) for name, h in COLOUR_HUES.items()}
COLOUR_NAMES = tuple(COLOURS)

LANE_WIDTH = 3.5
ROAD_LEFT, ROAD_RIGHT = -1.5 * LANE_WIDTH, 0.5 * LANE_WIDTH  # two lanes: ego lane and oncoming lane
Z_NEAR, Z_FAR = 3.0, 60.0
EGO_SPEED = {"stopped": (0.0, 0.0), "slow": (3.0, 5.0), "fast": (11.0, 15.0)}

# (width, height) in metres
VEHICLE_SIZE = {"car": (1.8, 1.5), "van": (2.0, 2.1), "truck": (2.4, 3.2), "bus": (2.5, 3.0)}


@dataclass
class Vehicle:
    kind: str
    colour: str
    state: str  # parked | same_direction | oncoming | crossing
    side: str  # left | right | ahead
    x: float  # lateral position (m)
    z0: float  # depth at t = 0 (m)
    speed: float  # own speed along its direction (m/s)


@dataclass
class Pedestrian:
    state: str  # walking | standing | crossing
    side: str  # left | right
    x: float
    z0: float
    colour: str  # clothing


@dataclass
class RoadsideRow:
    kind: str  # tree | pole | building
    side: str  # left | right
    spacing: float  # metres between repeats
    phase: float  # position of the first one (m)
    colour: str | None = None  # buildings only
    height: float = 0.0


@dataclass
class TrafficLight:
    state: str  # red | yellow | green
    side: str
    z0: float


@dataclass
class Scene:
    layout: str
    ego: str
    ego_speed: float
    time_of_day: str
    curvature: float  # 1/m; lateral road offset is curvature * z^2 / 2
    vehicles: list[Vehicle] = field(default_factory=list)
    pedestrians: list[Pedestrian] = field(default_factory=list)
    roadside: list[RoadsideRow] = field(default_factory=list)
    traffic_light: TrafficLight | None = None
    intersection_z: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Scene:
        d = dict(d)
        d["vehicles"] = [Vehicle(**v) for v in d.get("vehicles", [])]
        d["pedestrians"] = [Pedestrian(**p) for p in d.get("pedestrians", [])]
        d["roadside"] = [RoadsideRow(**r) for r in d.get("roadside", [])]
        d["traffic_light"] = TrafficLight(**d["traffic_light"]) if d.get("traffic_light") else None
        return Scene(**d)


def _choice(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene graph. Distributions roughly follow what DSEC drives look like."""
    layout = _choice(rng, LAYOUTS, [0.4, 0.2, 0.2, 0.2])
    ego = _choice(rng, EGO_STATES, [0.3, 0.35, 0.35])
    lo, hi = EGO_SPEED[ego]
    time_of_day = _choice(rng, TIMES_OF_DAY, [0.55, 0.2, 0.25])
    curvature = {"curve_left": -1, "curve_right": 1}.get(layout, 0) * float(rng.uniform(0.004, 0.007))
    scene = Scene(layout, ego, float(rng.uniform(lo, hi)), time_of_day, curvature)
    if layout == "intersection":
        scene.intersection_z = float(rng.uniform(18, 35))

    n_vehicles = int(rng.choice(5, p=[0.12, 0.3, 0.3, 0.18, 0.1]))
    for _ in range(n_vehicles):
        state = _choice(rng, VEHICLE_STATES, [0.3, 0.3, 0.25, 0.15])
        if state == "crossing" and layout != "intersection":
            state = "parked"
        kind = _choice(rng, VEHICLE_KINDS, [0.6, 0.16, 0.12, 0.12])
        colour = _choice(rng, COLOUR_NAMES)
        if state == "parked":
            side = _choice(rng, ("left", "right"))
            x = ROAD_RIGHT + 1.3 if side == "right" else ROAD_LEFT - 1.3
            speed, z0 = 0.0, float(rng.uniform(8, 45))
        elif state == "same_direction":
            side, x = "ahead", 0.0
            speed, z0 = scene.ego_speed + float(rng.uniform(-1.5, 1.5)), float(rng.uniform(10, 30))
            speed = max(speed, 0.0) if ego != "stopped" else float(rng.uniform(2, 6))
        elif state == "oncoming":
            side, x = "left", -LANE_WIDTH
            speed, z0 = float(rng.uniform(6, 12)), float(rng.uniform(15, 55))
        else:  # crossing at the intersection
            side = _choice(rng, ("left", "right"))
            x = float(rng.uniform(-12, 8))
            speed, z0 = float(rng.uniform(4, 8)) * (1 if side == "left" else -1), scene.intersection_z
        scene.vehicles.append(Vehicle(kind, colour, state, side, x, z0, speed))
    scene.vehicles.sort(key=lambda v: (VEHICLE_STATES.index(v.state), v.z0))

    n_peds = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    for _ in range(n_peds):
        state = _choice(rng, PEDESTRIAN_STATES, [0.45, 0.35, 0.2])
        side = _choice(rng, ("left", "right"))
        x = ROAD_RIGHT + 2.0 if side == "right" else ROAD_LEFT - 2.0
        z0 = float(rng.uniform(7, 30))
        if state == "crossing":
            x = float(rng.uniform(ROAD_LEFT, ROAD_RIGHT))
            z0 = scene.intersection_z if scene.intersection_z else float(rng.uniform(10, 20))
        scene.pedestrians.append(Pedestrian(state, side, x, z0, _choice(rng, COLOUR_NAMES)))

    for side in ("left", "right"):
        for kind, p in (("tree", 0.5), ("pole", 0.35), ("building", 0.45)):
            if rng.random() < p:
                spacing = {"tree": 9.0, "pole": 22.0, "building": 16.0}[kind] * float(rng.uniform(0.85, 1.2))
                colour = _choice(rng, COLOUR_NAMES) if kind == "building" else None
                height = float(rng.uniform(7, 14)) if kind == "building" else 0.0
                scene.roadside.append(RoadsideRow(kind, side, spacing, float(rng.uniform(0, spacing)), colour, height))

    if rng.random() < (0.8 if layout == "intersection" else 0.3):
        z0 = (scene.intersection_z - 4) if scene.intersection_z else float(rng.uniform(15, 40))
        scene.traffic_light = TrafficLight(_choice(rng, LIGHT_STATES), "right", z0)
    return scene


def wrap(z, lo: float = Z_NEAR, hi: float = Z_FAR):
    """Depths leave at one end of the visible range and come back at the other."""
    return lo + np.mod(np.asarray(z) - lo, hi - lo)


def ego_distance(scene: Scene, t: float) -> float:
    return scene.ego_speed * t


def vehicle_position(scene: Scene, v: Vehicle, t: float) -> tuple[float, float]:
    """(x, z) of a vehicle at time t (seconds)."""
    d = ego_distance(scene, t)
    if v.state == "parked":
        return v.x, float(wrap(v.z0 - d))
    if v.state == "same_direction":
        return v.x, float(wrap(v.z0 + v.speed * t - d, 6.0, Z_FAR))
    if v.state == "oncoming":
        return v.x, float(wrap(v.z0 - v.speed * t - d))
    x = -16 + np.mod(v.x + 16 + v.speed * t, 32.0)  # crossing: lateral, wraps over the intersection
    return float(x), float(wrap(v.z0 - d))


def pedestrian_position(scene: Scene, p: Pedestrian, t: float) -> tuple[float, float]:
    d = ego_distance(scene, t)
    if p.state == "walking":
        return p.x, float(wrap(p.z0 + 1.4 * t - d))
    if p.state == "crossing":
        span = ROAD_RIGHT - ROAD_LEFT + 4.0
        x = ROAD_LEFT - 2.0 + np.mod(p.x - ROAD_LEFT + 2.0 + 1.3 * t, span)
        return float(x), float(wrap(p.z0 - d))
    return p.x, float(wrap(p.z0 - d))


def row_depths(scene: Scene, row: RoadsideRow, t: float) -> np.ndarray:
    """Depths of the visible repeats of a roadside row at time t."""
    first = row.phase - ego_distance(scene, t)
    k0 = np.ceil((Z_NEAR - first) / row.spacing)
    z = first + row.spacing * np.arange(k0, k0 + int((Z_FAR - Z_NEAR) / row.spacing) + 2)
    return z[(z >= Z_NEAR) & (z <= Z_FAR)]
