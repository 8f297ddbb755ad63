"""The target's RGB camera: auto-exposure, exposure blur, shot and read noise, 8-bit output.

Auto-exposure runs out of range at night: exposure is capped, so night frames come out dark, blurred by
the long exposure, and noisy (few electrons, so shot and read noise dominate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specalign.world.scene import Scene

EXPOSURE_S = {"day": 0.004, "dusk": 0.015, "night": 0.045}
GAIN = {"day": 1.0, "dusk": 1.0, "night": 1.0}


@dataclass
class FrameCameraConfig:
    fps: float = 20.0
    full_well: float = 1500.0  # electrons at radiance 1 over the day exposure
    read_noise: float = 8.0  # electrons


def exposure_window(scene: Scene, t_mid: float) -> tuple[float, float]:
    """[start, end] (seconds) of the exposure of the frame stamped t_mid."""
    e = EXPOSURE_S[scene.time_of_day]
    return t_mid - e / 2, t_mid + e / 2


def expose(radiance: np.ndarray, scene: Scene, cfg: FrameCameraConfig, rng: np.random.Generator) -> np.ndarray:
    """Radiance averaged over the exposure, float [H, W, 3] -> the 8-bit frame uint8 [H, W, 3]."""
    exposure = EXPOSURE_S[scene.time_of_day]
    electrons = radiance.astype(np.float64) * cfg.full_well * (exposure / EXPOSURE_S["day"])
    sigma = np.sqrt(np.maximum(electrons, 0) + cfg.read_noise**2)
    noisy = electrons + rng.standard_normal(electrons.shape) * sigma
    value = noisy / cfg.full_well * GAIN[scene.time_of_day]
    return np.clip(np.round(value * 255.0), 0, 255).astype(np.uint8)
