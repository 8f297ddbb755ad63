"""Synthetic raw DSEC inputs for the data tests: random sorted events on a 64x48 sensor, random RGB at 20 Hz."""

from __future__ import annotations

import numpy as np

SENSOR = (64, 48)  # (width, height)
T_OFFSET = 58_000_000_000  # absolute us; DSEC-like magnitude
FIRST_IMAGE = T_OFFSET + 20_347  # not a whole millisecond, so window edges fall inside ms_to_idx bins


def synth_sequence(
    seconds: int = 3, fps: int = 20, n_events: int = 30_000, gap: tuple[int, int] | None = None, seed: int = 0
) -> dict:
    """Arguments for write_raw_sequence. gap: (start, end) us after the first image with no events."""
    rng = np.random.default_rng(seed)
    image_ts = FIRST_IMAGE + np.arange(seconds * fps + 1, dtype=np.int64) * (1_000_000 // fps)
    t = np.sort(rng.integers(T_OFFSET + 1_000, int(image_ts[-1]) + 5_000, n_events))  # repeats are likely
    if gap is not None:
        t = t[~((t >= FIRST_IMAGE + gap[0]) & (t < FIRST_IMAGE + gap[1]))]
    n = len(t)
    events = {
        "x": rng.integers(0, SENSOR[0], n).astype(np.uint16),
        "y": rng.integers(0, SENSOR[1], n).astype(np.uint16),
        "t": t.astype(np.int64),
        "p": rng.integers(0, 2, n).astype(np.uint8),
    }
    frames = [rng.integers(0, 256, (SENSOR[1], SENSOR[0], 3), dtype=np.uint8) for _ in image_ts]
    return {"events": events, "image_ts": image_ts, "frames": frames, "t_offset": T_OFFSET, "sensor_size": SENSOR}
