"""Sync score (AV-Align style): how well a clip's audio onsets coincide with its video events.

Per clip, with onsets A (audio) and events V (video) detected under the same ``DetectorSettings``:

    sync       = IoU of the maximum one-to-one matching of A and V within ±tolerance_frames / fps
    sync_gated = sync if the clip passes its sanity gates (gates.py), else 0

References on the same data and settings:

    ceiling  = mean sync of real (held-out) clips
    floor    = mean sync of shuffled pairs: the video of clip i with the audio of clip i + 1 (mod n),
               the audio's onsets cut to the video's duration
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jointdit.data.media import Clip
from jointdit.evaluate.gates import Gate, check_gates
from jointdit.evaluate.matching import iou
from jointdit.evaluate.motion import MotionAnalysis, analyse_motion, events_from_analysis
from jointdit.evaluate.onsets import detect_onsets
from jointdit.evaluate.settings import DetectorSettings


@dataclass
class ClipAnalysis:
    """Everything the metrics need from one clip: its detections and its gate."""

    name: str
    onsets: np.ndarray       # [A] seconds
    events: np.ndarray       # [V] seconds
    gate: Gate
    fps: float
    seconds: float
    motion: MotionAnalysis

    def tolerance(self, settings: DetectorSettings) -> float:
        return settings.tolerance_frames / self.fps


def clip_name(clip: Clip, fallback: str) -> str:
    from pathlib import Path

    return str(clip.meta.get("id") or (Path(clip.path).stem if clip.path else fallback))


def analyse_clip(clip: Clip, settings: DetectorSettings = DetectorSettings(), name: str | None = None) -> ClipAnalysis:
    """Detect onsets and video events of one clip and check its gates."""
    motion = analyse_motion(clip.frames, clip.fps, settings)
    return ClipAnalysis(
        name=name or clip_name(clip, "clip"),
        onsets=detect_onsets(clip.wave, clip.sample_rate, settings),
        events=events_from_analysis(motion, settings),
        gate=check_gates(clip.wave, motion, settings),
        fps=float(clip.fps),
        seconds=float(clip.frames.shape[0] / clip.fps),
        motion=motion,
    )


def sync_score(analysis: ClipAnalysis, settings: DetectorSettings = DetectorSettings()) -> float:
    """IoU of the clip's own onsets and events."""
    return iou(analysis.onsets, analysis.events, analysis.tolerance(settings))


def shuffled_pairs(analyses: Sequence[ClipAnalysis], settings: DetectorSettings = DetectorSettings()
                   ) -> list[tuple[float, bool]]:
    """(sync, both gates passed) for video i with audio i + 1 (mod n); empty for fewer than 2 clips."""
    n = len(analyses)
    if n < 2:
        return []
    out = []
    for i, video in enumerate(analyses):
        audio = analyses[(i + 1) % n]
        onsets = audio.onsets[audio.onsets < video.seconds]
        passed = video.gate.video_ok and audio.gate.audio_ok
        out.append((iou(onsets, video.events, video.tolerance(settings)), passed))
    return out


@dataclass(frozen=True)
class SyncSummary:
    mean: float          # mean sync
    gated: float         # mean sync_gated
    count: int

    @staticmethod
    def of(scores: Sequence[float], passed: Sequence[bool]) -> SyncSummary:
        scores = np.asarray(scores, dtype=np.float64)
        gated = scores * np.asarray(passed, dtype=np.float64)
        nan = float("nan")
        return SyncSummary(float(scores.mean()) if scores.size else nan, float(gated.mean()) if gated.size else nan,
                           int(scores.size))
