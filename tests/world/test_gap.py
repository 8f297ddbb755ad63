"""The cross-modal gap is real: what the target's RGB camera sees and the draft's event camera does not,
and the other way round."""

import dataclasses

import numpy as np
import pytest

from specalign.world.build import WorldConfig, simulate_sequence
from specalign.world.render import render
from specalign.world.scene import (
    COLOUR_NAMES,
    Pedestrian,
    RoadsideRow,
    Scene,
    TrafficLight,
    Vehicle,
    sample_scene,
)

W, H = 64, 48


def _cfg(**event):
    cfg = WorldConfig(out="unused", width=W, height=H)
    cfg.event = dataclasses.replace(cfg.event, **event)
    return cfg


def _scene(ego="stopped", time_of_day="day", moving=True, speed=None) -> Scene:
    s = Scene("straight", ego, {"stopped": 0.0, "slow": 4.0, "fast": 14.0}[ego] if speed is None else speed,
              time_of_day, 0.0)  # fmt: skip
    s.vehicles = [Vehicle("car", "red", "parked", "right", 3.0, 12.0, 0.0),
                  Vehicle("truck", "blue", "parked", "left", -6.5, 20.0, 0.0)]  # fmt: skip
    if moving:
        s.vehicles.append(Vehicle("car", "green", "oncoming", "left", -3.5, 16.0, 10.0))
    s.pedestrians = [Pedestrian("standing", "right", 4.0, 10.0, "purple")]
    s.roadside = [RoadsideRow("tree", "left", 9.0, 2.0), RoadsideRow("building", "right", 16.0, 5.0, "yellow", 9.0)]
    s.traffic_light = TrafficLight("red", "right", 25.0)
    return s


def _recolour(scene: Scene, shift: int) -> Scene:
    s = Scene.from_dict(scene.to_dict())
    for obj in [*s.vehicles, *s.pedestrians, *(r for r in s.roadside if r.colour)]:
        obj.colour = COLOUR_NAMES[(COLOUR_NAMES.index(obj.colour) + shift) % len(COLOUR_NAMES)]
    return s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_events_carry_no_colour(seed):
    """Change every colour in the scene: the RGB frames change, the event stream stays bit-identical."""
    scene = sample_scene(np.random.default_rng(seed))
    scene.ego, scene.ego_speed = "fast", 13.0
    other = _recolour(scene, 3)
    ev_a, _, rgb_a = simulate_sequence(scene, 0.3, _cfg(), np.random.default_rng(7))
    ev_b, _, rgb_b = simulate_sequence(other, 0.3, _cfg(), np.random.default_rng(7))
    assert len(ev_a["t"]) > 100
    for k in ("x", "y", "t", "p"):
        assert np.array_equal(ev_a[k], ev_b[k])
    if scene.vehicles or any(r.colour for r in scene.roadside):
        assert any(not np.array_equal(a, b) for a, b in zip(rgb_a, rgb_b, strict=True)), "RGB does see colour"
    assert np.array_equal(render(scene, 0.1, W, H, 1), render(other, 0.1, W, H, 1))


def test_static_objects_are_invisible_to_events_when_stopped():
    cfg = _cfg(noise_hz=0.0)
    still, _, frames = simulate_sequence(_scene("stopped", moving=False), 0.5, cfg, np.random.default_rng(0))
    assert len(still["t"]) == 0, "nothing moves, nothing fires"
    assert frames[0].std() > 20, "while the RGB frame shows the parked cars, trees and buildings"
    driving, _, _ = simulate_sequence(_scene("slow", moving=False), 0.5, cfg, np.random.default_rng(0))
    assert len(driving["t"]) > 500, "the same static scene fires once the ego vehicle moves"
    # with background noise on, a stopped static scene is noise only: about noise_hz per pixel
    noisy, _, _ = simulate_sequence(_scene("stopped", moving=False), 0.5, _cfg(noise_hz=0.1), np.random.default_rng(0))
    assert len(noisy["t"]) < 3 * 0.1 * W * H * 0.55


def test_night_rgb_is_dark_and_noisy_while_events_still_show_motion():
    day_ev, _, day = simulate_sequence(_scene("stopped", "day"), 0.5, _cfg(noise_hz=0.0), np.random.default_rng(0))
    night_ev, _, night = simulate_sequence(
        _scene("stopped", "night"), 0.5, _cfg(noise_hz=0.0), np.random.default_rng(0)
    )
    day_mean, night_mean = np.mean(day), np.mean(night)
    assert night_mean < 0.35 * day_mean, "night frames are dark"

    def snr(frames):  # static background rows: frame-to-frame change is noise
        a, b = frames[2].astype(float)[-8:], frames[3].astype(float)[-8:]
        return a.mean() / (np.std(a - b) / np.sqrt(2) + 1e-9)

    assert snr(night) < snr(day) / 2, "night frames are noisy"
    # the oncoming car moves: events at night, on the car, not elsewhere (no noise here)
    assert len(night_ev["t"]) > 0.3 * len(day_ev["t"]) and len(night_ev["t"]) > 50


def test_fast_motion_blurs_rgb_but_not_events():
    """A street lamp passes close by at 14 m/s at night (45 ms exposure): smeared in RGB, sharp in events."""
    from specalign.world.camera import exposure_window

    w, h = 128, 96
    scene = Scene("straight", "fast", 14.0, "night", 0.0)
    scene.roadside = [RoadsideRow("pole", "right", 22.0, 10.0)]
    cfg = WorldConfig(out="unused", width=w, height=h)
    cfg.event = dataclasses.replace(cfg.event, noise_hz=0.0)
    ev, ts, _ = simulate_sequence(scene, 0.3, cfg, np.random.default_rng(0))
    t_mid = 0.15

    def lum(t):
        return render(scene, t, w, h, 1)[..., 0]

    lo, hi = exposure_window(scene, t_mid)
    sharp = lum(t_mid)
    exposed = np.mean([lum(t) for t in np.linspace(lo, hi, 16)], 0)  # what the RGB sensor integrates
    moving = np.abs(lum(lo) - lum(hi)) > 1e-4

    def energy(img):  # squared gradient: blur spreads an edge and lowers it
        gy, gx = np.gradient(img)
        return (gx**2 + gy**2)[moving].sum()

    assert moving.sum() > 100
    assert energy(exposed) < 0.7 * energy(sharp)
    # events within 2.5 ms of t_mid (the event clock is the scene clock) sit on the edges of the sharp image
    near = np.abs(ev["t"] - int(t_mid * 1e6)) < 2500
    assert near.sum() > 10
    gy, gx = np.gradient(np.log(sharp + cfg.event.eps))
    edge = np.hypot(gx, gy) > 0.05
    grown = np.zeros_like(edge)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(np.roll(edge, dy, 0), dx, 1)
    assert grown[ev["y"][near], ev["x"][near]].mean() > 0.9


@pytest.mark.parametrize("state", ["same_direction", "crossing"])
def test_trucks_and_buses_look_different(state):
    """A truck and a bus are about the same size (2.4 x 3.2 m, 2.5 x 3.0 m), so their shapes must tell them
    apart: a truck is a cargo box in its body colour, a bus has a band of windows along its whole width. Measured
    as the share of the vehicle's pixels not in its (red) body colour, which does not depend on size: about 0.08
    for a truck and 0.36 for a bus (it was 0.33 against 0.34 when both were drawn as cars)."""
    empty = render(Scene("straight", "stopped", 0.0, "day", 0.0), 0.0, 128, 96, 3)
    share = {}
    for kind in ("truck", "bus"):
        s = Scene("straight", "stopped", 0.0, "day", 0.0)
        s.vehicles = [Vehicle(kind, "red", state, "ahead", -1.75, 14.0, 0.0)]
        img = render(s, 0.0, 128, 96, 3)
        covered = np.abs(img - empty).max(-1) > 0.05
        red = (img[..., 0] > 2 * img[..., 1]) & (img[..., 0] > 2 * img[..., 2])
        share[kind] = 1 - (covered & red).sum() / covered.sum()
    assert share["bus"] - share["truck"] > 0.15, share
