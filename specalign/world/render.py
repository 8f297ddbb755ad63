"""A small anti-aliased rasterizer: the scene at time t as a linear radiance image.

Everything is drawn as vertical-edged trapezoids (rectangles are the flat case), far to near, with
fractional pixel coverage on every edge so that sub-pixel motion changes intensity smoothly: the event
simulator needs that, or edges would move in whole-pixel jumps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specalign.world.scene import (  # noqa: I001
    COLOURS,
    LANE_WIDTH,
    LUMA,
    ROAD_LEFT,
    ROAD_RIGHT,
    VEHICLE_SIZE,
    Z_FAR,
    Z_NEAR,
    Scene,
    ego_distance,
    pedestrian_position,
    row_depths,
    vehicle_position,
    wrap,
)

# Bump when a drawing changes: a world's build settings record it, so resuming a world drawn by an older
# renderer stops with an error instead of mixing two looks. 2: trucks as cargo boxes, buses with a window band.
RENDER_VERSION = 2
CAM_HEIGHT = 1.4  # m
HORIZON = 0.42  # horizon row as a fraction of image height
FOCAL = 0.8  # focal length as a fraction of image width

ILLUMINATION = {"day": 1.0, "dusk": 0.35, "night": 0.025}
SKY = {"day": (0.55, 0.72, 0.95), "dusk": (0.85, 0.55, 0.45), "night": (0.3, 0.3, 0.5)}
ASPHALT, SIDEWALK, GRASS, MARKING = (0.22, 0.22, 0.24), (0.55, 0.55, 0.52), (0.2, 0.4, 0.15), (0.95, 0.95, 0.9)
TRUNK, CROWN, POLE, DARK = (0.35, 0.25, 0.15), (0.1, 0.42, 0.12), (0.5, 0.5, 0.52), (0.06, 0.06, 0.07)
GLASS, SKIN, LEGS = (0.12, 0.15, 0.2), (0.85, 0.65, 0.5), (0.15, 0.15, 0.25)
LAMPS = {"red": (1.0, 0.08, 0.05), "yellow": (1.0, 0.8, 0.0), "green": (0.1, 1.0, 0.35)}
SIDEWALK_WIDTH = 2.5
DASH_PERIOD, DASH_LENGTH = 9.0, 3.0


@dataclass
class Canvas:
    """An image being drawn: float32 [H, W, C] with C = 3 (RGB) or 1 (luminance)."""

    img: np.ndarray
    scene: Scene
    illum: float

    def __post_init__(self):
        self.h, self.w = self.img.shape[:2]
        self.f = FOCAL * self.w
        self._colours: dict = {}

    def colour(self, rgb, emissive: bool = False) -> np.ndarray:
        """Albedo times illumination (or emitted light), in the canvas's channels."""
        # a cheap key (tens of thousands of calls a clip): the tuple itself, or an array's bytes
        key = (rgb if isinstance(rgb, tuple) else np.asarray(rgb, dtype=np.float64).tobytes(), emissive)
        if key not in self._colours:
            albedo = np.asarray(rgb, dtype=np.float64)
            # Rounded so that colours of equal luminance give bit-identical luminance images.
            lum = round(float(LUMA @ albedo), 6)
            c = np.append(albedo, lum) * (1.0 if emissive else self.illum)
            self._colours[key] = c[{1: [3], 3: [0, 1, 2], 4: [0, 1, 2, 3]}[self.img.shape[2]]].astype(np.float32)
        return self._colours[key]

    def project(self, x, y, z):
        """World (x, y, z) -> pixel (u, v); the road's curve shifts everything at depth z."""
        u = self.w / 2 + self.f * (x + self.scene.curvature * z * z / 2.0) / z
        v = HORIZON * self.h + self.f * (CAM_HEIGHT - y) / z
        return u, v


_IDX = np.arange(4096, dtype=np.float32)


def _coverage(lo: float, hi: float, start: int, stop: int) -> np.ndarray:
    """Fraction of each pixel [i, i+1) for i in start..stop-1 inside [lo, hi]."""
    i = _IDX[start:stop]
    cov = np.minimum(hi, i + 1) - np.maximum(lo, i)
    return np.maximum(cov, 0.0, out=cov)  # never above 1: both terms are within one pixel


def fill(c: Canvas, u0, u1, top0, bot0, top1=None, bot1=None, colour=None) -> None:
    """Fill the trapezoid with vertical edges at u0 < u1, top/bottom linear between them."""
    top1 = top0 if top1 is None else top1
    bot1 = bot0 if bot1 is None else bot1
    if u1 <= 0 or u0 >= c.w or u1 - u0 < 1e-3:
        return
    ia, ib = max(math.floor(u0), 0), min(math.ceil(u1), c.w)
    va, vb = max(math.floor(min(top0, top1)), 0), min(math.ceil(max(bot0, bot1)), c.h)
    if ia >= ib or va >= vb:
        return
    cx = _coverage(u0, u1, ia, ib)
    if top0 == top1 and bot0 == bot1:
        cov = _coverage(top0, bot0, va, vb)[:, None] * cx[None, :]
    else:
        s = np.clip((np.arange(ia, ib) + 0.5 - u0) / (u1 - u0), 0, 1)
        top, bot = top0 + s * (top1 - top0), bot0 + s * (bot1 - bot0)
        rows = np.arange(va, vb, dtype=np.float32)[:, None]
        cov = np.clip(np.minimum(bot, rows + 1) - np.maximum(top, rows), 0, 1) * cx[None, :]
    region = c.img[va:vb, ia:ib]
    region += cov[..., None] * (colour - region)


def box(c: Canvas, x0, x1, y0, y1, z, colour) -> None:
    """A world-space rectangle facing the camera at depth z (x0 < x1, y0 < y1)."""
    if z < 0.5:
        return
    u0, v1 = c.project(x0, y0, z)
    u1, v0 = c.project(x1, y1, z)
    fill(c, u0, u1, v0, v1, colour=colour)


def _row_depths(h: int, f: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth range [near, far] of the ground seen by each image row below the horizon."""
    v = np.arange(h, dtype=np.float64)
    dv_top = v - HORIZON * h
    dv_bot = dv_top + 1
    far = np.where(dv_top > 0, f * CAM_HEIGHT / np.maximum(dv_top, 1e-6), 1e9)
    near = np.where(dv_bot > 0, f * CAM_HEIGHT / np.maximum(dv_bot, 1e-6), 1e9)
    return near, np.minimum(far, 4 * Z_FAR)


_BASE_CACHE: dict = {}


def _ground(c: Canvas) -> np.ndarray:
    """Sky, grass, sidewalks, road and edge lines: static for a scene, so drawn once and cached."""
    key = (c.w, c.h, c.img.shape[2], c.illum, c.scene.curvature, c.scene.time_of_day)
    if key in _BASE_CACHE:
        return _BASE_CACHE[key]
    base = Canvas(np.zeros_like(c.img), c.scene, c.illum)
    h, w = c.h, c.w
    grad = np.linspace(1.0, 0.75, h)[:, None, None].astype(np.float32)
    base.img[:] = grad * base.colour(SKY[c.scene.time_of_day])
    near, far = _row_depths(h, base.f)
    z = np.sqrt(near * far)  # a representative depth per row
    below = np.arange(h) + 1 > HORIZON * h
    u = np.arange(w, dtype=np.float64)[None, :] + 0.5
    frac = np.clip(np.arange(h) + 1 - HORIZON * h, 0, 1)[:, None]  # the horizon row is partly ground

    def band(x0, x1, colour):
        ua, _ = base.project(x0, 0.0, z)
        ub, _ = base.project(x1, 0.0, z)
        cov = np.clip(np.minimum(ub[:, None], u + 0.5) - np.maximum(ua[:, None], u - 0.5), 0, 1) * frac
        cov[~below] = 0
        base.img[:] += cov[..., None].astype(np.float32) * (base.colour(colour) - base.img)

    band(-1e4, 1e4, GRASS)
    band(ROAD_LEFT - SIDEWALK_WIDTH, ROAD_RIGHT + SIDEWALK_WIDTH, SIDEWALK)
    band(ROAD_LEFT, ROAD_RIGHT, ASPHALT)
    band(ROAD_LEFT + 0.1, ROAD_LEFT + 0.25, MARKING)
    band(ROAD_RIGHT - 0.25, ROAD_RIGHT - 0.1, MARKING)
    if len(_BASE_CACHE) > 64:
        _BASE_CACHE.clear()
    _BASE_CACHE[key] = base.img
    return base.img


def _dash_fraction(s0, s1):
    """Fraction of [s0, s1] (road distance) covered by centre-line dashes."""

    def cum(s):
        return np.floor(s / DASH_PERIOD) * DASH_LENGTH + np.minimum(np.mod(s, DASH_PERIOD), DASH_LENGTH)

    return (cum(s1) - cum(s0)) / np.maximum(s1 - s0, 1e-6)


def _moving_ground(c: Canvas, t: float) -> None:
    """Centre-line dashes and the intersection: they move with the ego vehicle."""
    near, far = _row_depths(c.h, c.f)
    d = ego_distance(c.scene, t)
    rows = np.nonzero((np.arange(c.h) + 1 > HORIZON * c.h) & (near < 2 * Z_FAR))[0]
    dash = _dash_fraction(near[rows] + d, far[rows] + d)
    z = np.sqrt(near[rows] * far[rows])
    x0, x1 = -LANE_WIDTH / 2 - 0.08, -LANE_WIDTH / 2 + 0.08
    ua, _ = c.project(x0, 0.0, z)
    ub, _ = c.project(x1, 0.0, z)
    u = np.arange(c.w)[None, :]
    cov = np.clip(np.minimum(ub[:, None], u + 1) - np.maximum(ua[:, None], u), 0, 1) * dash[:, None]
    if c.scene.intersection_z is not None:
        zi = float(wrap(c.scene.intersection_z - d))
        inside = np.clip(np.minimum(far[rows], zi + 5) - np.maximum(near[rows], zi - 5), 0, None)
        cross = inside / np.maximum(far[rows] - near[rows], 1e-6)
        cov *= 1 - cross[:, None]
        # the crossing road spans the whole width: paint asphalt over sidewalk and grass
        band = c.img[rows]
        band += (cross[:, None, None] * (c.colour(ASPHALT) - band)).astype(np.float32)
        stop = np.clip(np.minimum(far[rows], zi - 5) - np.maximum(near[rows], zi - 5.5), 0, None)
        stop = stop / np.maximum(far[rows] - near[rows], 1e-6)
        uL, _ = c.project(ROAD_LEFT + LANE_WIDTH, 0.0, z)
        uR, _ = c.project(ROAD_RIGHT, 0.0, z)
        scov = np.clip(np.minimum(uR[:, None], u + 1) - np.maximum(uL[:, None], u), 0, 1) * stop[:, None]
        band += (scov[..., None] * (c.colour(MARKING) - band)).astype(np.float32)
        c.img[rows] = band
    band = c.img[rows]
    band += (cov[..., None] * (c.colour(MARKING) - band)).astype(np.float32)
    c.img[rows] = band


def _draw_building(c: Canvas, x_face: float, z: float, length: float, height: float, colour, night: bool):
    """The side wall of a building along the road, from depth z to z + length: a trapezoid on screen."""
    # its two ends, the one further left on screen first (the near end on the left side of the road)
    ends = sorted((max(z, Z_NEAR * 0.7), z + length), key=lambda d: c.project(x_face, 0.0, d)[0])
    ua, ub = (c.project(x_face, 0.0, d)[0] for d in ends)

    def rows(y_top, y_bot):  # top and bottom screen rows of a horizontal band at both ends
        (_, t0), (_, b0) = c.project(x_face, y_top, ends[0]), c.project(x_face, y_bot, ends[0])
        (_, t1), (_, b1) = c.project(x_face, y_top, ends[1]), c.project(x_face, y_bot, ends[1])
        return t0, b0, t1, b1

    fill(c, ua, ub, *rows(height, 0.0), c.colour(colour))
    win = c.colour((1.0, 0.85, 0.4), emissive=True) * 0.5 if night else c.colour(GLASS)
    for level in (0.3, 0.6):  # two bands of windows, lit at night
        fill(c, ua, ub, *rows(height * level + 1.2, height * level), win)


def _draw_vehicle(c: Canvas, kind: str, colour: str, state: str, x: float, z: float, night: bool):
    w, h = VEHICLE_SIZE[kind]
    side = state == "crossing"
    if side:
        w = {"car": 4.4, "van": 5.0, "truck": 7.5, "bus": 11.0}[kind]  # seen from the side
    body, cabin, glass = c.colour(COLOURS[colour]), c.colour(COLOURS[colour] * 0.8), c.colour(GLASS)
    left, right = x - w / 2, x + w / 2
    # trucks and buses are about the same size, so they must differ in shape to be told apart
    if kind == "truck":  # a cargo box: no glass; from the side, a cab with a windscreen in front of the box
        if side:
            box(c, left, left + 2.0, 0.3, 0.7 * h, z, cabin)
            box(c, left + 0.2, left + 1.4, 0.45 * h, 0.65 * h, z, glass)
            box(c, left + 2.1, right, 0.3, h, z, body)
        else:
            box(c, left, right, 0.3, h, z, body)
            box(c, x - 0.04, x + 0.04, 0.45, h - 0.15, z, c.colour(DARK))  # the doors' seam
    elif kind == "bus":  # a tall body with a band of windows along its whole width
        box(c, left, right, 0.3, h, z, body)
        box(c, left + 0.15, right - 0.15, 0.55 * h, 0.85 * h, z, glass)
    else:
        box(c, left, right, 0.3, 0.3 + 0.55 * (h - 0.3), z, body)
        box(c, x - w * 0.42, x + w * 0.42, 0.3 + 0.55 * (h - 0.3), h, z, cabin)
        box(c, x - w * 0.36, x + w * 0.36, 0.35 + 0.6 * (h - 0.3), h - 0.12, z, glass)
    box(c, left + 0.05, left + 0.45, 0.0, 0.35, z, c.colour(DARK))
    box(c, right - 0.45, right - 0.05, 0.0, 0.35, z, c.colour(DARK))
    if side:  # lamps face ahead or behind
        return
    lamp = (1.0, 1.0, 0.95) if state == "oncoming" else (1.0, 0.1, 0.05)
    lamp_c = c.colour(lamp, emissive=True) if night else c.colour(np.asarray(lamp) * 0.8)
    for sx in (-1, 1):
        cx = x + sx * (w / 2 - 0.3)
        box(c, cx - 0.15, cx + 0.15, 0.55, 0.75, z - 0.01, lamp_c)


def _draw_pedestrian(c: Canvas, colour: str, x: float, z: float, t: float, moving: bool):
    swing = 0.12 * np.sin(2 * np.pi * 1.8 * t) if moving else 0.0  # walking legs
    box(c, x - 0.2 + swing, x - 0.02 + swing, 0.0, 0.85, z, c.colour(LEGS))
    box(c, x + 0.02 - swing, x + 0.2 - swing, 0.0, 0.85, z, c.colour(LEGS))
    box(c, x - 0.25, x + 0.25, 0.85, 1.5, z, c.colour(COLOURS[colour]))
    box(c, x - 0.11, x + 0.11, 1.5, 1.75, z, c.colour(SKIN))


def _draw_tree(c: Canvas, x: float, z: float):
    box(c, x - 0.18, x + 0.18, 0.0, 2.4, z, c.colour(TRUNK))
    box(c, x - 1.4, x + 1.4, 2.0, 5.0, z - 0.01, c.colour(CROWN))


def _draw_pole(c: Canvas, x: float, z: float, sign: int):
    """A street lamp: a pole with an arm reaching over the road."""
    box(c, x - 0.1, x + 0.1, 0.0, 7.0, z, c.colour(POLE))
    arm = (x - 1.5, x + 0.1) if sign > 0 else (x - 0.1, x + 1.5)
    box(c, arm[0], arm[1], 6.8, 7.1, z, c.colour(POLE))


def _draw_traffic_light(c: Canvas, x: float, z: float, state: str):
    box(c, x - 0.08, x + 0.08, 0.0, 3.4, z, c.colour(POLE))
    box(c, x - 0.25, x + 0.25, 3.2, 4.5, z - 0.01, c.colour(DARK))
    for i, name in enumerate(("red", "yellow", "green")):
        y = 4.3 - 0.4 * i
        lamp = c.colour(LAMPS[name], emissive=True) if name == state else c.colour(np.asarray(LAMPS[name]) * 0.15)
        box(c, x - 0.14, x + 0.14, y - 0.3, y, z - 0.02, lamp)


def render(scene: Scene, t: float, width: int, height: int, channels: int = 3) -> np.ndarray:
    """The scene at time t (seconds) as linear radiance, float32 [height, width, channels].

    channels=3 gives RGB for the frame camera, 1 luminance for the event camera, 4 both (RGB + luminance):
    luminance is composited from each colour's own luminance, so equal-luminance colours give equal images.
    """
    illum = ILLUMINATION[scene.time_of_day]
    night = scene.time_of_day == "night"
    c = Canvas(np.empty((height, width, channels), np.float32), scene, illum)
    c.img[:] = _ground(c)
    _moving_ground(c, t)

    items = []  # (depth, draw function, its arguments), drawn far to near
    for row in scene.roadside:
        sign = 1 if row.side == "right" else -1
        edge = ROAD_RIGHT + SIDEWALK_WIDTH if sign > 0 else ROAD_LEFT - SIDEWALK_WIDTH
        for z in row_depths(scene, row, t).tolist():
            if row.kind == "tree":
                items.append((z, _draw_tree, (c, edge + sign * 1.5, z)))
            elif row.kind == "pole":
                items.append((z, _draw_pole, (c, edge - sign * 0.6, z, sign)))
            else:  # buildings stand behind everything on the road
                args = (c, edge + sign * 4.0, z, row.spacing * 0.7, row.height, COLOURS[row.colour], night)
                items.append((z + 100, _draw_building, args))
    if scene.traffic_light is not None:
        z = float(wrap(scene.traffic_light.z0 - ego_distance(scene, t)))
        items.append((z, _draw_traffic_light, (c, ROAD_RIGHT + 0.8, z, scene.traffic_light.state)))
    for v in scene.vehicles:
        x, z = vehicle_position(scene, v, t)
        items.append((z, _draw_vehicle, (c, v.kind, v.colour, v.state, x, z, night)))
    for p in scene.pedestrians:
        x, z = pedestrian_position(scene, p, t)
        items.append((z, _draw_pedestrian, (c, p.colour, x, z, t, p.state != "standing")))

    for z, draw, args in sorted(items, key=lambda it: -it[0]):
        if z >= Z_NEAR * 0.7:
            draw(*args)
    return c.img
