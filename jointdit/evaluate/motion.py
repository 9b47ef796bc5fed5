"""Video events: where distinct moving objects change velocity (bounces, collisions), and where the
overall motion peaks.

Objects. The background is a per-pixel temporal median over the frames where that pixel looks like
background (see ``estimate_background``). An object pixel differs from it by more than
``foreground_threshold`` (max over RGB, values in [0, 1]); an object is a connected component of
those pixels whose area lies in [min_object_area, max_object_area] of the frame. Its position is
the difference-weighted centroid, in units of the frame's longer side.

Acceleration. For every object c at frame t, with p and q its nearest objects at t − 1 and t + 1
(no farther than ``max_jump``; near-ties are all tried, see ``_candidates``):

    α_c[t] = (q − c) − (c − p)              velocity change per frame², fraction of the frame size
    g      = median over all c, t of α_c[t] the clip's steady acceleration (gravity, or 0)
    a[t]   = max(0, max_c ‖α_c[t] − g‖ − ‖g‖)

A bounce or a collision reverses the velocity, so a[t] peaks at the frame nearest the event; free
flight (constant velocity or constant gravity) gives a[t] ≈ 0, and so does a release from rest or a
landing to rest (a change by g itself, not an impact).

Energy. e[t] = mean_pixels |x[t] − x[t − 1]| (values in [0, 1]), placed at frame t; its peaks are
motion peaks as in AV-Align (which uses optical-flow magnitude).

Events are the peaks of the chosen sources (``video_sources``) at or above their ABSOLUTE thresholds,
at time t / fps, the time frame t is shown. A still or blank clip has no objects and no energy, so
no events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jointdit.evaluate.settings import DetectorSettings


@dataclass
class MotionAnalysis:
    objects: list[np.ndarray]   # per frame: [K_t, 2] centroids (y, x) in frame-size units
    acceleration: np.ndarray    # [T] a[t] (0 where undefined: first/last frame, no object)
    energy: np.ndarray          # [T] e[t] (e[0] = 0)
    travel: float               # largest distance any tracked object covers from its first position
    object_frames: float        # fraction of frames with at least one object
    brightness: float           # mean pixel value in [0, 1]
    fps: float

    def times(self) -> np.ndarray:
        return np.arange(self.acceleration.shape[0]) / self.fps


def _to_unit(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] → [T, H, W, 3] float32 in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
    return np.clip((frames.transpose(0, 2, 3, 1) + 1.0) * 0.5, 0.0, 1.0)


def estimate_background(pictures: np.ndarray, settings: DetectorSettings) -> np.ndarray:
    """[T, H, W, 3] → [H, W, 3]: per pixel, the temporal median over the frames where it looks like background.

    A pixel "looks like background" in a frame when it is within ``foreground_threshold`` of that
    frame's median colour (objects cover a small part of the frame). A pixel that never does (a
    textured scene) takes its plain temporal median. This keeps an object that covers some pixels in
    more than half the frames (a slow or large one) out of the background, where the plain median
    would leave a ghost of it.
    """
    typical = np.median(pictures.reshape(pictures.shape[0], -1, 3), axis=1)[:, None, None, :]  # [T, 1, 1, 3]
    plain = np.median(pictures, axis=0)
    agrees = np.abs(pictures - typical).max(axis=-1, keepdims=True) <= settings.foreground_threshold  # [T, H, W, 1]
    # Median over the agreeing frames only: NaNs sort last, so the valid values are the first `count`.
    ordered = np.sort(np.where(agrees, pictures, np.nan), axis=0)  # [T, H, W, 3]
    count = agrees.sum(axis=0)  # [H, W, 1]
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
    high = np.take_along_axis(ordered, np.maximum(count // 2, 0)[None], axis=0)[0]
    robust = np.where(count > 0, 0.5 * (low + high), np.nan)
    return np.where(np.isnan(robust), plain, robust)


def find_objects(pictures: np.ndarray, settings: DetectorSettings) -> list[np.ndarray]:
    """[T, H, W, 3] in [0, 1] → per frame the [K, 2] (y, x) centroids of distinct objects, frame-size units."""
    from scipy import ndimage

    _, height, width, _ = pictures.shape
    scale = float(max(height, width))
    background = estimate_background(pictures, settings)  # [H, W, 3]
    difference = np.abs(pictures - background).max(axis=-1)  # [T, H, W]
    area_lo, area_hi = settings.min_object_area * height * width, settings.max_object_area * height * width
    objects = []
    for diff in difference:
        labels, count = ndimage.label(diff > settings.foreground_threshold, structure=np.ones((3, 3)))
        if count == 0:
            objects.append(np.zeros((0, 2)))
            continue
        index = np.arange(1, count + 1)
        areas = ndimage.sum_labels(np.ones_like(diff), labels, index)
        keep = index[(areas >= area_lo) & (areas <= area_hi)]
        if keep.size == 0:
            objects.append(np.zeros((0, 2)))
            continue
        centres = np.array(ndimage.center_of_mass(diff, labels, keep), dtype=np.float64).reshape(-1, 2)
        objects.append((centres + 0.5) / scale)
    return objects


def _candidates(point: np.ndarray, candidates: np.ndarray, max_jump: float) -> np.ndarray:
    """The nearest candidate within ``max_jump``, plus any other almost as near (within 25 % + 0.02).

    Two objects that touch in a collision merge into one blob; from that blob both objects at the
    next frame are almost equally near, and trying each keeps the collision's velocity change.
    """
    if candidates.shape[0] == 0:
        return candidates
    distance = np.linalg.norm(candidates - point, axis=1)
    nearest = distance.min()
    if nearest > max_jump:
        return candidates[:0]
    return candidates[distance <= min(1.25 * nearest + 0.02, max_jump)]


def acceleration_signal(objects: list[np.ndarray], settings: DetectorSettings) -> tuple[np.ndarray, float]:
    """a[t] (see the module docstring) and the largest travel of an object followed frame to frame."""
    num_frames = len(objects)
    samples: list[tuple[int, np.ndarray]] = []  # (frame, acceleration vector) for every object and pairing
    for t in range(1, num_frames - 1):
        for centre in objects[t]:
            for before in _candidates(centre, objects[t - 1], settings.max_jump):
                for after in _candidates(centre, objects[t + 1], settings.max_jump):
                    samples.append((t, (after - centre) - (centre - before)))
    accel = np.zeros(num_frames)
    if samples:
        # Steady acceleration (gravity) is not an event: measure the change from the clip's median one.
        steady = np.median(np.stack([vector for _, vector in samples]), axis=0)
        dead_zone = float(np.linalg.norm(steady))
        for t, vector in samples:
            accel[t] = max(accel[t], float(np.linalg.norm(vector - steady)) - dead_zone)
    travel = 0.0
    for start in range(num_frames):  # follow each object from where it first appears
        for origin in objects[start]:
            current = origin
            for t in range(start + 1, num_frames):
                nearby = _candidates(current, objects[t], settings.max_jump)
                if nearby.shape[0] == 0:
                    break
                current = nearby[0] if nearby.shape[0] == 1 else nearby[np.argmin(np.linalg.norm(nearby - current, axis=1))]
                travel = max(travel, float(np.linalg.norm(current - origin)))
        if travel > 0:
            break
    return accel, travel


def analyse_motion(frames: torch.Tensor | np.ndarray, fps: float,
                   settings: DetectorSettings = DetectorSettings()) -> MotionAnalysis:
    """Objects, acceleration a[t], energy e[t] and the gate figures of one clip's frames [T, 3, H, W]."""
    pictures = _to_unit(frames)
    objects = find_objects(pictures, settings)
    accel, travel = acceleration_signal(objects, settings)
    energy = np.zeros(pictures.shape[0])
    if pictures.shape[0] > 1:
        energy[1:] = np.abs(np.diff(pictures, axis=0)).mean(axis=(1, 2, 3))
    return MotionAnalysis(objects=objects, acceleration=accel, energy=energy, travel=travel,
                          object_frames=float(np.mean([o.shape[0] > 0 for o in objects])) if objects else 0.0,
                          brightness=float(pictures.mean()) if pictures.size else 0.0, fps=float(fps))


def events_from_analysis(analysis: MotionAnalysis, settings: DetectorSettings = DetectorSettings()) -> np.ndarray:
    """Event times (seconds, ascending): peaks of the chosen sources above their absolute thresholds.

    Peaks of different sources closer than one frame are one event (the earlier frame kept).
    """
    from scipy.signal import find_peaks

    frames: set[int] = set()
    signals = {"acceleration": (analysis.acceleration, settings.accel_threshold),
               "energy": (analysis.energy, settings.energy_threshold)}
    for source in settings.video_sources:
        signal, threshold = signals[source]
        # Pad with zeros so a peak on the first or last defined frame is still a peak.
        peaks, _ = find_peaks(np.concatenate([[0.0], signal, [0.0]]), height=threshold)
        frames.update(int(p) - 1 for p in peaks)
    merged: list[int] = []
    for frame in sorted(frames):
        if not merged or frame - merged[-1] > 1:
            merged.append(frame)
    return np.asarray(merged, dtype=np.float64) / analysis.fps


def detect_video_events(frames: torch.Tensor | np.ndarray, fps: float,
                        settings: DetectorSettings = DetectorSettings()) -> np.ndarray:
    """Video event times in seconds: see the module docstring."""
    return events_from_analysis(analyse_motion(frames, fps, settings), settings)
