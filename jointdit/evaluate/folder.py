"""Read a folder of MP4s with audio as ``Clip``s, each at its own frame rate, size and length."""

from __future__ import annotations

import os
from pathlib import Path

from jointdit.data.media import Clip, probe_video, read_clip
from jointdit.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def list_videos(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Video files under ``folder``, sorted by path; an empty or missing folder is a ``DataError`` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of clips", hint="samples_dir= names a folder of MP4s with audio")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: holds no video files ({', '.join(VIDEO_SUFFIXES)})",
                        hint="samples_dir= names a folder of MP4s with audio")
    return files


def read_video_file(path: str | os.PathLike, sample_rate: int = 16000) -> Clip:
    """One file at its native fps and size; audio resampled to ``sample_rate`` mono."""
    fps, size, seconds = probe_video(path)
    return read_clip(path, fps=fps, size=size, seconds=seconds, sample_rate=sample_rate)


def read_folder(folder: str | os.PathLike, sample_rate: int = 16000, limit: int | None = None) -> list[Clip]:
    """Every video under ``folder`` (sorted), read with ``read_video_file``."""
    files = list_videos(folder)
    return [read_video_file(p, sample_rate) for p in files[: limit or None]]
