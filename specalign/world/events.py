"""An ESIM-style event camera simulator, in NumPy.

Each pixel keeps a reference log intensity. Between two rendered frames the log intensity is taken to
change linearly; every time it crosses reference +/- C (C+ and C- drawn per pixel around their means) an
event fires at the linearly interpolated crossing time with polarity = sign of the change, and the
reference moves by C. A pixel cannot fire again within the refractory period (its reference still
moves). Background-activity noise adds events at random pixels and times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class EventCameraConfig:
    width: int = 96
    height: int = 72
    c_pos: float = 0.3  # mean contrast threshold for ON events (log units)
    c_neg: float = 0.3
    c_sigma: float = 0.03  # per-pixel spread of the thresholds
    refractory_us: int = 500
    noise_hz: float = 0.03  # background events per pixel per second (daylight)
    eps: float = 0.002  # dark signal added before the log; sets how contrast fades in the dark


class EventSimulator:
    """Feed luminance frames in time order with `step`; collect events with `events()`."""

    def __init__(self, cfg: EventCameraConfig, rng: np.random.Generator, noise_hz: float | None = None):
        self.cfg = cfg
        self.rng = rng
        self.noise_hz = cfg.noise_hz if noise_hz is None else noise_hz
        shape = (cfg.height, cfg.width)
        self.c_pos = np.maximum(cfg.c_pos + cfg.c_sigma * rng.standard_normal(shape), 0.05)
        self.c_neg = np.maximum(cfg.c_neg + cfg.c_sigma * rng.standard_normal(shape), 0.05)
        self.ref: np.ndarray | None = None  # reference log intensity per pixel
        self.log_prev: np.ndarray | None = None
        self.t_prev: int | None = None
        self.last_fire = np.full(shape, -(10**15), dtype=np.int64)
        self._chunks: list[tuple[np.ndarray, ...]] = []

    def log_intensity(self, luminance: np.ndarray) -> np.ndarray:
        return np.log(np.asarray(luminance, dtype=np.float64) + self.cfg.eps)

    def step(self, t_us: int, luminance: np.ndarray) -> None:
        """Advance to time t_us (int microseconds) where the scene has this luminance [H, W]."""
        log_now = self.log_intensity(luminance)
        if self.ref is None:
            self.ref, self.log_prev, self.t_prev = log_now.copy(), log_now, int(t_us)
            return
        t0, t1 = self.t_prev, int(t_us)
        if t1 <= t0:
            raise ValueError(f"frames must come in increasing time order ({t1} after {t0})")
        l0, l1 = self.log_prev, log_now
        change = l1 - l0
        ts, ys, xs, ps = [], [], [], []
        for polarity, c_map in ((1, self.c_pos), (0, self.c_neg)):
            sign = 1.0 if polarity else -1.0
            n = np.floor(sign * (l1 - self.ref) / c_map).astype(np.int64)
            n[n < 0] = 0
            if not n.any():
                continue
            yy, xx = np.nonzero(n)
            counts = n[yy, xx]
            c = c_map[yy, xx]
            ref = self.ref[yy, xx]
            a, d = l0[yy, xx], change[yy, xx]
            for k in range(1, int(counts.max()) + 1):  # k-th crossing of every pixel, vectorised
                alive = counts >= k
                level = ref[alive] + sign * k * c[alive]
                frac = np.clip((level - a[alive]) / np.where(d[alive] == 0, 1e-12, d[alive]), 0.0, 1.0)
                t = t0 + np.floor(frac * (t1 - t0)).astype(np.int64)
                y, x = yy[alive], xx[alive]
                ok = t - self.last_fire[y, x] >= self.cfg.refractory_us
                self.last_fire[y[ok], x[ok]] = t[ok]
                ts.append(t[ok]), ys.append(y[ok]), xs.append(x[ok])
                ps.append(np.full(int(ok.sum()), polarity, np.uint8))
            self.ref[yy, xx] = ref + sign * counts * c
        n_noise = self.rng.poisson(self.noise_hz * self.ref.size * (t1 - t0) * 1e-6)
        if n_noise:
            ts.append(self.rng.integers(t0, t1, n_noise))
            ys.append(self.rng.integers(0, self.cfg.height, n_noise))
            xs.append(self.rng.integers(0, self.cfg.width, n_noise))
            ps.append(self.rng.integers(0, 2, n_noise).astype(np.uint8))
        if ts:
            t = np.concatenate(ts)
            order = np.argsort(t, kind="stable")
            self._chunks.append(
                (t[order], np.concatenate(ys)[order], np.concatenate(xs)[order], np.concatenate(ps)[order])
            )
        self.log_prev, self.t_prev = log_now, t1

    def events(self) -> dict:
        """All events so far: x, y (uint16), t (int64 us, sorted), p (uint8 0/1)."""
        if not self._chunks:
            z = np.zeros(0, np.int64)
            return {"x": z.astype(np.uint16), "y": z.astype(np.uint16), "t": z, "p": z.astype(np.uint8)}
        t, y, x, p = (np.concatenate(parts) for parts in zip(*self._chunks, strict=True))
        return {"x": x.astype(np.uint16), "y": y.astype(np.uint16), "t": t.astype(np.int64), "p": p}


def simulate(frames: Iterable[tuple[int, np.ndarray]], cfg: EventCameraConfig, rng, noise_hz=None) -> dict:
    """Events of a luminance video given as (t_us, luminance [H, W]) pairs in time order."""
    sim = EventSimulator(cfg, rng, noise_hz)
    for t, lum in frames:
        sim.step(t, lum)
    return sim.events()
