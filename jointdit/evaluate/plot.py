"""A PNG of one clip: a frame strip above its mel spectrogram, with the detected audio onsets and
video events marked on the same time axis."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from jointdit.evaluate.onsets import hop_length, mel_db
from jointdit.evaluate.settings import DetectorSettings


def plot_sync(frames: torch.Tensor, wave: torch.Tensor, sr: int, fps: float, onsets: Sequence[float],
              video_events: Sequence[float], path: str | os.PathLike, settings: DetectorSettings = DetectorSettings(),
              title: str | None = None, max_frames: int = 16) -> Path:
    """Write the PNG to ``path`` (atomically) and return it.

    frames [T, 3, H, W] in [-1, 1]; wave [N] at ``sr``. The strip shows up to ``max_frames`` evenly
    spaced frames, each placed at its time; onsets are drawn as solid lines over the spectrogram,
    video events as dashed lines over both panels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pictures = frames.detach().float().cpu().add(1).mul(0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
    num_frames = pictures.shape[0]
    seconds = max(num_frames / fps, wave.shape[-1] / sr)
    picks = np.unique(np.linspace(0, num_frames - 1, min(max_frames, num_frames)).round().astype(int))
    db = mel_db(wave, sr, settings)
    hop = hop_length(sr, settings)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 4.4), sharex=True,
                                         gridspec_kw={"height_ratios": [0.8, 2]})
    width = seconds / max(len(picks), 1)
    for k in picks:
        start = k / fps
        top.imshow(pictures[k], extent=(start, start + min(width, 1 / fps) * 0.96, 0, 1), aspect="auto")
    top.set_xlim(0, seconds)
    top.set_ylim(0, 1)
    top.set_yticks([])
    top.set_title(title or "frames (dashed: video events) · mel spectrogram (solid: audio onsets)", fontsize=9)
    bottom.imshow(db, origin="lower", aspect="auto", cmap="magma",
                  extent=(0, db.shape[1] * hop / sr, 0, db.shape[0]), vmin=settings.floor_db, vmax=0)
    bottom.set_ylabel("mel band")
    bottom.set_xlabel("seconds")
    for t in onsets:
        bottom.axvline(float(t), color="cyan", linewidth=1.5, label="audio onset")
    for t in video_events:
        for axis in (top, bottom):
            axis.axvline(float(t), color="lime", linewidth=1.5, linestyle="--", label="video event")
    handles = {h.get_label(): h for h in bottom.get_lines()}
    if handles:
        bottom.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)
    return path
