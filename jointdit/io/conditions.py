"""Conditioning inputs for sampling, read at the model's clip geometry.

Every loader takes what a user or a UI has at hand — a file path, or data already in memory — and
returns tensors in the project's conventions: frames ``[T, 3, H, W]`` / an image ``[3, H, W]`` in
[-1, 1], a mono wave ``[N]`` in [-1, 1] at the model's sample rate, cut or zero-padded to the clip's
``round(seconds · sample_rate)`` samples. Files are read through :mod:`jointdit.data.media` (PyAV
for MP4, soundfile for WAV/FLAC/OGG, Pillow for images); a missing or unreadable file raises
:class:`~jointdit.data.media.MediaError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jointdit.data.media import read_clip, read_image, read_wav, resize_center_crop
from jointdit.errors import ConfigError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
PathLike = str | os.PathLike


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def fit_wave(wave: Tensor, n: int) -> Tensor:
    """``[N']`` → ``[n]``: cut, or zero-pad at the end."""
    wave = wave.reshape(-1)[:n]
    return torch.nn.functional.pad(wave, (0, n - wave.shape[0])) if wave.shape[0] < n else wave


def load_image(image: PathLike | Tensor | np.ndarray | Any, size: tuple[int, int]) -> Tensor:
    """An image → ``[3, H, W]`` in [-1, 1], scaled to cover ``size`` (H, W) and centre-cropped.

    ``image``: a file path; a PIL image; an ``[H, W, 3]`` uint8 array (as Gradio gives); or a
    ``[3, H', W']`` tensor in [-1, 1].
    """
    if _is_path(image):
        x = read_image(Path(image).expanduser())
    elif isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        x = image.detach().float().cpu()
    else:
        if hasattr(image, "convert"):  # PIL
            image = np.asarray(image.convert("RGB"))
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be [H, W, 3] uint8, got shape {arr.shape}")
        x = torch.from_numpy(arr[..., :3].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return resize_center_crop(x[None], tuple(size))[0].clamp(-1, 1)


def load_audio(audio: PathLike | Tensor | tuple[int, np.ndarray], *, seconds: float, sample_rate: int,
               fps: float | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """a2v's sound → ``[round(seconds·sample_rate)]`` in [-1, 1] at ``sample_rate``.

    ``audio``: a WAV/FLAC/OGG file; any other file is read as a clip's audio track (MP4) and needs
    ``fps``/``size`` only to open it; a wave tensor ``[N]`` already at ``sample_rate``; or a
    ``(rate, samples)`` pair (Gradio's numpy audio: int16 or float, mono or ``[N, channels]``).
    """
    n = int(round(seconds * sample_rate))
    if _is_path(audio):
        path = Path(audio).expanduser()
        if path.suffix.lower() in AUDIO_SUFFIXES:
            wave, _ = read_wav(path, sample_rate)
        else:
            wave = read_clip(path, fps=fps or 8.0, size=size or (8, 8), seconds=seconds, sample_rate=sample_rate).wave
    elif isinstance(audio, Tensor):
        wave = audio.detach().float().cpu()
    elif isinstance(audio, tuple) and len(audio) == 2:
        rate, samples = int(audio[0]), np.asarray(audio[1])
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
        samples = samples.astype(np.float32)
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        if rate != sample_rate:
            import librosa

            samples = librosa.resample(samples, orig_sr=rate, target_sr=sample_rate)
        wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    else:
        raise TypeError(f"audio must be a file path, a wave tensor or a (rate, samples) pair, got {type(audio).__name__}")
    return fit_wave(wave, n).clamp(-1, 1)


def load_video(video: PathLike | Tensor, *, fps: float, size: tuple[int, int], seconds: float,
               sample_rate: int) -> Tensor:
    """v2a's video → frames ``[round(seconds·fps), 3, H, W]`` at ``fps`` and ``size``.

    ``video``: an MP4 (or any container PyAV reads; its audio, if any, is ignored), or a frames tensor
    ``[T, 3, H, W]`` in [-1, 1] already at ``fps`` (resized to ``size``; it must hold the clip's frames).
    """
    t = int(round(seconds * fps))
    if _is_path(video):
        return read_clip(Path(video).expanduser(), fps=fps, size=size, seconds=seconds, sample_rate=sample_rate,
                         allow_missing_audio=True).frames
    if not isinstance(video, Tensor) or video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be a file path or frames [T, 3, H, W], got "
                         f"{getattr(video, 'shape', type(video).__name__)}")
    if video.shape[0] < t:
        raise ValueError(f"the video has {video.shape[0]} frames; the model needs {t} ({seconds:g} s at {fps:g} fps)")
    return resize_center_crop(video[:t].detach().float().cpu(), tuple(size)).clamp(-1, 1)


def cache_entry(clip_id: str, cache_dir: PathLike) -> dict:
    """The ``index.jsonl`` row of ``clip_id`` in the latent cache at ``cache_dir`` (``"dir"`` added)."""
    from jointdit.data.cache import read_index

    cache_dir = Path(cache_dir)
    rows = read_index(cache_dir) if (cache_dir / "index.jsonl").exists() else []
    for row in rows:
        if row["id"] == clip_id:
            return {**row, "dir": str(cache_dir)}
    raise ConfigError(f"reference={clip_id!r} is neither a file nor a clip id in the latent cache {cache_dir} "
                      f"({len(rows)} clips)", hint="give an MP4 path or an id from its index.jsonl")


def load_reference_frame(reference: PathLike | Mapping, *, fps: float, size: tuple[int, int],
                         sample_rate: int) -> Tensor:
    """i2sv's image from a reference: the first frame of an MP4, or the stored first frame of a cache row."""
    if isinstance(reference, Mapping):
        return load_image(Path(reference["dir"]) / reference["first_frame"], size)
    clip = read_clip(Path(reference).expanduser(), fps=fps, size=size, seconds=1.0 / fps, sample_rate=sample_rate,
                     allow_missing_audio=True)
    return clip.frames[0]
