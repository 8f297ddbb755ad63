"""The target's RGB camera: auto-exposure, exposure blur, shot and read noise, 8-bit output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specalign.world.render import render
from specalign.world.scene import Scene

# Auto-exposure runs out of range at night: the exposure is capped, so frames come out dark, long
# (blurred) and noisy. Exposure in seconds, analogue gain, full-well electrons at radiance 1.
EXPOSURE_S = {"day": 0.004, "dusk": 0.010, "night": 0.030}
GAIN = {"day": 1.0, "dusk": 1.0, "night": 2.0}


@dataclass
class FrameCameraConfig:
    width: int = 128
    height: int = 96
    fps: float = 20.0
    full_well: float = 2500.0  # electrons collected at radiance 1 over the day exposure
    read_noise: float = 4.0  # electrons
    substep_s: float = 0.002  # exposure is integrated from renders this far apart


def exposure_samples(scene: Scene, cfg: FrameCameraConfig) -> int:
    return max(1, int(round(EXPOSURE_S[scene.time_of_day] / cfg.substep_s)))


def capture_frame(scene: Scene, t_mid: float, cfg: FrameCameraConfig, rng: np.random.Generator) -> np.ndarray:
    """One RGB frame exposed around t_mid (seconds): uint8 [height, width, 3]."""
    exposure = EXPOSURE_S[scene.time_of_day]
    n = exposure_samples(scene, cfg)
    times = t_mid + (np.arange(n) + 0.5) / n * exposure - exposure / 2
    radiance = sum(render(scene, float(t), cfg.width, cfg.height, 3) for t in times) / n
    electrons = radiance.astype(np.float64) * cfg.full_well * (exposure / EXPOSURE_S["day"])
    noisy = electrons + rng.standard_normal(electrons.shape) * np.sqrt(np.maximum(electrons, 0) + cfg.read_noise**2)
    value = noisy / cfg.full_well * GAIN[scene.time_of_day]
    return np.clip(np.round(value * 255.0), 0, 255).astype(np.uint8)
