"""The event simulator obeys its model: threshold crossings, polarity, interpolated times, refractory."""

import numpy as np
import pytest

from specalign.world.events import EventCameraConfig, EventSimulator, simulate


def _cfg(**kw):
    base = dict(width=8, height=4, c_pos=0.2, c_neg=0.2, c_sigma=0.0, refractory_us=0, noise_hz=0.0, eps=0.0)
    base.update(kw)
    return EventCameraConfig(**base)


def _ramp_video(rate_per_s: np.ndarray, seconds=1.0, step_us=10_000):
    """Luminance exp(rate * t) per pixel: log intensity changes linearly, so crossing times are exact."""
    for t_us in range(0, int(seconds * 1e6) + 1, step_us):
        yield t_us, np.exp(rate_per_s * t_us * 1e-6)


def test_events_fire_exactly_at_threshold_crossings():
    rate = np.zeros((4, 8))
    rate[1, 2] = 1.05  # log intensity rises by 1.05 over the second -> 5 crossings of 0.2
    rate[2, 5] = -0.7  # falls by 0.7 -> 3 crossings
    ev = simulate(_ramp_video(rate), _cfg(), np.random.default_rng(0))
    pos = (ev["y"] == 1) & (ev["x"] == 2)
    neg = (ev["y"] == 2) & (ev["x"] == 5)
    assert pos.sum() + neg.sum() == len(ev["t"]), "events only where the log intensity changed"
    assert pos.sum() == 5 and np.all(ev["p"][pos] == 1)
    assert neg.sum() == 3 and np.all(ev["p"][neg] == 0)
    # k-th crossing of log = rate * t at level k * C happens at t = k * C / |rate|
    expected_pos = np.array([k * 0.2 / 1.05 for k in range(1, 6)]) * 1e6
    expected_neg = np.array([k * 0.2 / 0.7 for k in range(1, 4)]) * 1e6
    assert np.allclose(ev["t"][pos], expected_pos, atol=2)
    assert np.allclose(ev["t"][neg], expected_neg, atol=2)


def test_reconstruction_from_events_tracks_log_intensity():
    rng = np.random.default_rng(1)
    cfg = _cfg(width=16, height=12, c_sigma=0.03)
    sim = EventSimulator(cfg, rng)
    frames = [np.exp(rng.normal(0, 1, (12, 16)).cumsum(0) * 0.1 + 0.5 * np.sin(k / 5)) for k in range(60)]
    for k, f in enumerate(frames):
        sim.step(k * 5000, f)
    ev = sim.events()
    recon = np.log(frames[0]).copy()
    np.add.at(
        recon, (ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1]), sim.c_pos[ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1]]
    )
    neg = ev["p"] == 0
    np.add.at(recon, (ev["y"][neg], ev["x"][neg]), -sim.c_neg[ev["y"][neg], ev["x"][neg]])
    err = np.abs(np.log(frames[-1]) - recon)
    assert np.all(err < np.maximum(sim.c_pos, sim.c_neg) + 1e-9), "every threshold crossing produced an event"


def test_timestamps_sorted_and_inside_the_stream():
    rng = np.random.default_rng(2)
    video = ((k * 3000 + 100, np.exp(rng.normal(0, 0.5, (6, 7)))) for k in range(40))
    ev = simulate(video, _cfg(width=7, height=6, noise_hz=50.0), rng)
    assert len(ev["t"]) > 100
    assert np.all(np.diff(ev["t"]) >= 0)
    assert ev["t"].min() >= 100 and ev["t"].max() < 39 * 3000 + 100
    assert ev["x"].max() < 7 and ev["y"].max() < 6 and set(np.unique(ev["p"])) <= {0, 1}


def test_refractory_period_is_respected():
    rate = np.full((4, 8), 20.0)  # a crossing every 10 ms
    ev = simulate(_ramp_video(rate, 0.5, 1000), _cfg(refractory_us=25_000), np.random.default_rng(0))
    for y in range(4):
        for x in range(8):
            t = ev["t"][(ev["y"] == y) & (ev["x"] == x)]
            assert len(t) > 3 and np.all(np.diff(t) >= 25_000)


def test_frames_out_of_order_are_rejected():
    sim = EventSimulator(_cfg(), np.random.default_rng(0))
    sim.step(10, np.ones((4, 8)))
    with pytest.raises(ValueError):
        sim.step(5, np.ones((4, 8)))
