"""Distribution distances between generated and real clips on weight-free features.

Features (one vector per clip, no downloads):

    video [31]: colour histogram (8 bins per RGB channel, frequencies), mean spatial gradient
                magnitude (sharpness), frame-difference energy mean and std, acceleration-signal
                mean and max, mean objects per frame, fraction of frames with an object, travel
    audio [34]: 16 coarse log-mel bands' mean and std over time (dB), onset rate (per second),
                RMS (dBFS, floored at −100)

Both sets are standardised with the pooled mean and std of the two sets, then

    FD  = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^{1/2})                    (Fréchet distance)
    KID = unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy / d + 1)³   (kernel inception distance's estimator)

What they tell: whether the colours, sharpness, amount and jerkiness of motion, loudness, spectral
balance and onset density of the generated clips are distributed like the real ones. What they do
not: whether objects look right, what a clip depicts, whether sound and picture agree in time (that
is the sync score), or fine perceptual quality. FD is biased upwards at small n and with more
dimensions than clips its covariance is rank-deficient, so compare FD only at equal n; KID is unbiased
and is the one to trust for a few dozen clips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jointdit.evaluate.onsets import mel_db
from jointdit.evaluate.settings import DetectorSettings
from jointdit.evaluate.sync import ClipAnalysis
from jointdit.data.media import Clip


def video_features(clip: Clip, analysis: ClipAnalysis) -> np.ndarray:
    """[31] weight-free video features of one clip (see the module docstring)."""
    pictures = np.clip((clip.frames.detach().float().cpu().numpy() + 1.0) * 0.5, 0.0, 1.0)  # [T, 3, H, W]
    histogram = [np.histogram(pictures[:, c], bins=8, range=(0.0, 1.0))[0] / pictures[:, c].size for c in range(3)]
    gy, gx = np.gradient(pictures.mean(axis=1), axis=(1, 2))
    motion = analysis.motion
    per_frame = np.array([o.shape[0] for o in motion.objects], dtype=np.float64)
    return np.concatenate([
        *histogram,
        [np.hypot(gy, gx).mean(), motion.energy[1:].mean() if motion.energy.size > 1 else 0.0,
         motion.energy[1:].std() if motion.energy.size > 1 else 0.0, motion.acceleration.mean(),
         motion.acceleration.max(initial=0.0), per_frame.mean() if per_frame.size else 0.0,
         motion.object_frames, motion.travel],
    ])


def audio_features(clip: Clip, analysis: ClipAnalysis, settings: DetectorSettings = DetectorSettings()) -> np.ndarray:
    """[34] weight-free audio features of one clip (see the module docstring)."""
    db = mel_db(clip.wave, clip.sample_rate, settings)  # [n_mels, frames]
    bands = np.array_split(db, 16, axis=0)
    return np.concatenate([
        [band.mean() for band in bands], [band.mean(axis=0).std() for band in bands],
        [len(analysis.onsets) / max(analysis.seconds, 1e-6), max(analysis.gate.rms_db, -100.0)],
    ])


def _standardise(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pooled = np.concatenate([a, b])
    mean, std = pooled.mean(axis=0), pooled.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (a - mean) / std, (b - mean) / std


def frechet_distance(a: np.ndarray, b: np.ndarray, standardise: bool = True) -> float:
    """FD between the Gaussians fitted to rows of ``a`` [n, d] and ``b`` [m, d] (n, m ≥ 2).

    Tr (Σa Σb)^{1/2} is the sum of the square roots of the eigenvalues of Σa Σb, which are those of
    Σa^{1/2} Σb Σa^{1/2} (symmetric: ``eigvalsh``). With fewer clips than features, Σa = AᵀA and Σb = BᵀB
    for the centred, 1/√(n−1)-scaled data A, B, and the same trace is the nuclear norm of A Bᵀ (n × m):
    exact, and cheap where a d × d matrix square root is slow and ill-conditioned.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs at least 2 clips per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if standardise:
        a, b = _standardise(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    centred_a = (a - mu_a) / np.sqrt(a.shape[0] - 1)  # Σa = centred_aᵀ centred_a
    centred_b = (b - mu_b) / np.sqrt(b.shape[0] - 1)
    if min(a.shape[0], b.shape[0]) < a.shape[1]:
        trace_root = float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum())
    else:
        cov_a, cov_b = centred_a.T @ centred_a, centred_b.T @ centred_b
        w, v = np.linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + (centred_a**2).sum() + (centred_b**2).sum() - 2.0 * trace_root)
    return max(value, 0.0)


def kernel_distance(a: np.ndarray, b: np.ndarray, standardise: bool = True) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (KID's estimator) between rows of ``a`` and ``b``."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"KID needs at least 2 clips per set, got {a.shape[0]} and {b.shape[0]}")
    if standardise:
        a, b = _standardise(a, b)
    d = a.shape[1]
    kernel = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    n, m = a.shape[0], b.shape[0]
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2.0 * k_ab.mean())


def distances(generated: Sequence[Clip], generated_analyses: Sequence[ClipAnalysis], real: Sequence[Clip],
              real_analyses: Sequence[ClipAnalysis], settings: DetectorSettings = DetectorSettings()) -> dict[str, float]:
    """``{fd_video, kid_video, fd_audio, kid_audio}`` between the generated and the real clips."""
    out = {}
    for name, features in (("video", lambda c, a: video_features(c, a)),
                           ("audio", lambda c, a: audio_features(c, a, settings))):
        g = np.stack([features(c, a) for c, a in zip(generated, generated_analyses)])
        r = np.stack([features(c, a) for c, a in zip(real, real_analyses)])
        out[f"fd_{name}"] = frechet_distance(g, r)
        out[f"kid_{name}"] = kernel_distance(g, r)
    return out
