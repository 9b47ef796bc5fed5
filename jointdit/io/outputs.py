"""Sample outputs: one fresh folder per sampling call, and the files of one sample.

Nothing is overwritten by accident. :func:`claim_output_dir` gives every call its own folder under
``out_dir``: ``<YYYYmmdd-HHMMSS>_<task>_seed<first seed>`` by default (``-2``, ``-3`` … appended when
that name is already taken, so two calls in the same second still get two folders), or the
caller's ``name``. An existing ``name`` is refused unless ``overwrite=True``. Folders are claimed
with an exclusive ``mkdir``, so two processes never share one.

Every file is written to a temp name beside it and renamed into place (:mod:`jointdit.safeio`), so a
crash never leaves a half-written MP4/WAV/PNG under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from jointdit.data.media import atomic_write, write_mp4, write_wav
from jointdit.errors import ConfigError

OUTPUT_KINDS: tuple[str, ...] = ("mp4", "video_mp4", "wav", "png")


class OutputExistsError(ConfigError, FileExistsError):
    """The requested sample folder already holds files and ``overwrite`` is off."""


def default_name(task: str, seeds: Sequence[int], now: datetime | None = None) -> str:
    """``<YYYYmmdd-HHMMSS>_<task>_seed<first seed>`` (``+<n-1>`` when several seeds share the folder)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    more = f"+{len(seeds) - 1}" if len(seeds) > 1 else ""
    return f"{stamp}_{task}_seed{int(seeds[0])}{more}"


def check_output_name(out_dir: str | os.PathLike, name: str | None = None, *, overwrite: bool = False) -> None:
    """Raise what :func:`claim_output_dir` would for ``name``, without creating anything (a check before
    any work; the claim itself stays exclusive)."""
    if not name:
        return
    root = Path(out_dir).expanduser()
    name = str(name)
    if Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"name={name!r} must be a plain folder name (no '/' or '..')",
                          hint=f"it is created under out_dir ({root}); change out_dir to write elsewhere")
    folder = root / name
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} exists and is not a folder", hint="choose another name=")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{folder} already holds samples; they are kept",
            hint="choose another name=, leave name unset for a fresh timestamped folder, or pass "
                 "overwrite=true to replace its files")


def claim_output_dir(out_dir: str | os.PathLike, name: str | None = None, *, overwrite: bool = False,
                     task: str = "sample", seeds: Sequence[int] = (0,)) -> Path:
    """Create and return this call's own folder under ``out_dir`` (see the module docstring)."""
    root = Path(out_dir).expanduser()
    check_output_name(root, name, overwrite=overwrite)
    root.mkdir(parents=True, exist_ok=True)
    if name:
        folder = root / str(name)
        try:
            folder.mkdir()
        except FileExistsError:
            check_output_name(root, name, overwrite=overwrite)   # filled meanwhile by another process?
        return folder
    base = default_name(task, seeds)
    for n in range(1, 10_000):
        folder = root / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise OutputExistsError(f"could not find a free folder name under {root} for {base}")


def write_preview(path: str | os.PathLike, frames: Tensor | None, wave: Tensor | None, sample_rate: int,
                  title: str = "", max_frames: int = 8) -> Path:
    """A PNG: up to ``max_frames`` evenly spaced frames in a strip, above the log-mel spectrogram; a
    single-stream sample (``frames`` or ``wave`` None: t2a / t2v) gets only its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jointdit.codecs.mel import MelParams, log_mel

    if frames is None and wave is None:
        raise ValueError("a preview needs frames or a wave; both are None")
    panels = [kind for kind, x in (("frames", frames), ("mel", wave)) if x is not None]
    width = 6.0
    if frames is not None:
        t = frames.shape[0]
        idx = np.unique(np.linspace(0, t - 1, min(max_frames, t)).round().astype(int))
        width = max(6.0, 1.2 * len(idx))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.5 * len(panels)), squeeze=False)
    for ax, kind in zip(axes[:, 0], panels):
        if kind == "frames":
            strip = torch.cat([frames[i] for i in idx], dim=-1)                          # [3, H, k·W]
            ax.imshow(((strip.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy())
            ax.set_axis_off()
        else:
            params = MelParams(sample_rate=int(sample_rate), fmax=min(8000.0, sample_rate / 2))
            mel = log_mel(wave.reshape(1, -1).float().cpu(), params)[0].T.numpy()       # [n_mels, frames]
            ax.imshow(mel, origin="lower", aspect="auto", cmap="magma",
                      extent=(0, wave.numel() / sample_rate, 0, params.n_mels))
            ax.set_xlabel("seconds")
            ax.set_ylabel("mel band")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, dpi=80, format="png"))
    finally:
        plt.close(fig)


def write_sample(folder: str | os.PathLike, stem: str, frames: Tensor | None, wave: Tensor | None, fps: float,
                 sample_rate: int, *, title: str = "", kinds: Sequence[str] = OUTPUT_KINDS) -> dict[str, Path]:
    """Write one sample's files into ``folder``; returns ``{kind: path}`` for the ``kinds`` written.

    mp4        ``<stem>.mp4``        H.264 + AAC (the sounding video); without ``wave`` (t2v): H.264 only
    video_mp4  ``<stem>_video.mp4``  H.264 only (not written without ``wave``: ``mp4`` is that file already)
    wav        ``<stem>.wav``        16-bit PCM mono
    png        ``<stem>.png``        frame strip above the mel spectrogram (only the stream there is)
    A stream that is None (t2v's audio, t2a's video) writes nothing that needs it: t2a gives no MP4.
    """
    unknown = set(kinds) - set(OUTPUT_KINDS)
    if unknown:
        raise ValueError(f"unknown output kinds {sorted(unknown)}; choose from {list(OUTPUT_KINDS)}")
    base = Path(folder) / stem
    files: dict[str, Path] = {}
    if "mp4" in kinds and frames is not None:
        files["mp4"] = write_mp4(base.with_suffix(".mp4"), frames, fps, wave, sample_rate)
    if "video_mp4" in kinds and frames is not None and wave is not None:
        files["video_mp4"] = write_mp4(base.with_name(f"{stem}_video.mp4"), frames, fps)
    if "wav" in kinds and wave is not None:
        files["wav"] = write_wav(base.with_suffix(".wav"), wave, sample_rate)
    if "png" in kinds:
        files["png"] = write_preview(base.with_suffix(".png"), frames, wave, sample_rate, title=title)
    return files
