"""Sanity gates: a silent, blank or still clip must not score by accident.

A clip passes when all hold (thresholds in ``DetectorSettings``, all absolute):

    audio RMS  = 20·log10(sqrt(mean(x²)))  ≥ min_rms_db                     (not silent)
    brightness = mean pixel value in [0, 1] within [min_brightness, max_brightness]   (not blank)
    a distinct moving object: present in ≥ min_object_frames of the frames and travelling
    ≥ min_travel of the frame size                                           (not still, not noise)

The gated sync figure is the sync score times 1 for a passing clip and 0 for a failing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from jointdit.evaluate.motion import MotionAnalysis
from jointdit.evaluate.settings import DetectorSettings


@dataclass(frozen=True)
class Gate:
    rms_db: float
    brightness: float
    object_frames: float
    travel: float
    failures: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("silent",); empty when passed

    @property
    def audio_ok(self) -> bool:
        return "silent" not in self.failures

    @property
    def video_ok(self) -> bool:
        return not ({"blank", "no moving object"} & set(self.failures))

    @property
    def passed(self) -> bool:
        return not self.failures


def rms_db(wave: torch.Tensor | np.ndarray) -> float:
    """RMS level in dBFS (a full-scale square wave reads 0 dB); −inf for digital silence."""
    samples = wave.detach().double().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float64)
    power = float(np.mean(samples**2)) if samples.size else 0.0
    return 10.0 * np.log10(power) if power > 0 else float("-inf")


def check_gates(wave: torch.Tensor | np.ndarray, motion: MotionAnalysis,
                settings: DetectorSettings = DetectorSettings()) -> Gate:
    """Evaluate the three gates of one clip from its wave and its motion analysis."""
    level = rms_db(wave)
    failures = []
    if not level >= settings.min_rms_db:
        failures.append("silent")
    if not settings.min_brightness <= motion.brightness <= settings.max_brightness:
        failures.append("blank")
    if motion.object_frames < settings.min_object_frames or motion.travel < settings.min_travel:
        failures.append("no moving object")
    return Gate(rms_db=level, brightness=motion.brightness, object_frames=motion.object_frames,
                travel=motion.travel, failures=tuple(failures))
