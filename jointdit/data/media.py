"""Read and write sounding video: MP4 (H.264 + AAC) through PyAV, WAV through soundfile, images through Pillow.

Frames are ``[T, 3, H, W]`` float32 in [-1, 1]; audio is a mono ``[N]`` float32 wave in [-1, 1].
Every read places samples by their presentation timestamps, so a clip's audio and frames cover
the same seconds ``[start, start + seconds)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F


class MediaError(ValueError):
    """A media file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Clip:
    frames: torch.Tensor  # [T, 3, H, W] in [-1, 1]
    wave: torch.Tensor  # [N] in [-1, 1]
    fps: float
    sample_rate: int
    path: str = ""
    has_audio: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.frames.shape[0] / self.fps


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    try:
        return av.open(str(path))
    except (av.error.InvalidDataError, av.error.FFmpegError) as err:
        raise MediaError(path, f"cannot be opened as media, the file is truncated or corrupt ({err})") from err


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file (PNG, JPEG, ...) → ``[3, H, W]`` float32 in [-1, 1] (RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(path, f"cannot be read as an image ({err})") from err
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).div(127.5).sub(1.0)


def probe_duration(path: str | os.PathLike) -> float:
    """Duration in seconds of the longest stream, read from the container header."""
    path = Path(path)
    with _open(path) as container:
        if container.duration is not None:
            return container.duration / av.time_base
        return max(float(s.duration * s.time_base) for s in container.streams if s.duration)


def probe_video(path: str | os.PathLike) -> tuple[float, tuple[int, int], float]:
    """``(fps, (height, width), seconds)`` of a file's first video stream, from its header (seconds =
    frames / fps when the frame count is stored)."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise MediaError(path, "video stream has no frame rate")
        if stream.frames:
            seconds = stream.frames / fps
        elif stream.duration is not None:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = container.duration / av.time_base
        return fps, (int(stream.height), int(stream.width)), float(seconds)


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T,3,H,W] -> [T,3,h,w]: scale so the frame covers (h, w), then crop the centre."""
    target_h, target_w = size
    _, _, height, width = frames.shape
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if (new_h, new_w) != (height, width):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return frames[:, :, top : top + target_h, left : left + target_w]


def _read_frames(container, path: Path, start: float, seconds: float, fps: float) -> torch.Tensor:
    """Frames at the target times start + k/fps: each is the source frame on screen at that time."""
    stream = container.streams.video[0]
    num_frames = int(round(seconds * fps))
    targets = start + np.arange(num_frames) / fps
    period = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    picked: list[np.ndarray] = []
    last, last_time = None, 0.0
    eps = 1e-3  # timestamp rounding
    try:
        for frame in container.decode(stream):
            time = float(frame.pts * frame.time_base) if frame.pts is not None else last_time + period
            if time > targets[len(picked)] + eps:
                current = frame.to_ndarray(format="rgb24")
                while len(picked) < num_frames and time > targets[len(picked)] + eps:
                    # A target before the very first frame takes that first frame.
                    picked.append(last if last is not None else current)
                last, last_time = current, time
            else:
                last, last_time = frame.to_ndarray(format="rgb24"), time
            if len(picked) == num_frames:
                break
    except av.error.FFmpegError as err:
        raise MediaError(path, f"video stream is truncated or corrupt ({err})") from err
    # The last decoded frame stays on screen for one source-frame period, and no longer.
    while last is not None and len(picked) < num_frames and targets[len(picked)] < last_time + period - eps:
        picked.append(last)
    if len(picked) < num_frames:
        covered = (last_time + period - start) if last is not None else 0.0
        raise MediaError(path, f"clip is shorter than requested: video covers {max(covered, 0):.3f} s of the "
                         f"{seconds:g} s requested from {start:g} s ({len(picked)} of {num_frames} frames at {fps:g} fps)")
    array = np.stack(picked)  # [T, H, W, 3] uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _read_audio(container, path: Path, start: float, seconds: float, sample_rate: int) -> torch.Tensor:
    """Mono wave of exactly round(seconds * sample_rate) samples starting at ``start``."""
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    wanted = int(round(seconds * sample_rate))
    first_sample = int(round(start * sample_rate))
    out = np.zeros(first_sample + wanted, dtype=np.float32)
    filled_until = 0
    position = None  # sample index (at sample_rate) of the next resampled sample

    def place(frames) -> None:
        nonlocal filled_until, position
        for resampled in frames:
            data = resampled.to_ndarray().reshape(-1)
            if position is None:
                position = 0
            lo, hi = max(position, 0), min(position + data.shape[0], out.shape[0])
            if hi > lo:
                out[lo:hi] = data[lo - position : hi - position]
                filled_until = max(filled_until, hi)
            position += data.shape[0]

    try:
        for frame in container.decode(stream):
            if position is None and frame.pts is not None:
                # Anchor the resampled stream on the first decoded frame's timestamp.
                position = int(round(float(frame.pts * frame.time_base) * sample_rate))
            frame.pts = None  # the resampler keeps its own continuous clock
            place(resampler.resample(frame))
            if filled_until >= out.shape[0]:
                break
        else:
            place(resampler.resample(None))
    except av.error.FFmpegError as err:
        raise MediaError(path, f"audio stream is truncated or corrupt ({err})") from err
    # AAC pads its last frame, so allow up to one AAC frame (1024 samples at 48 kHz ~ 21 ms) short.
    tolerance = int(0.025 * sample_rate)
    if filled_until < out.shape[0] - tolerance:
        have = max(filled_until - first_sample, 0) / sample_rate
        raise MediaError(path, f"clip is shorter than requested: audio covers {have:.3f} s of the "
                         f"{seconds:g} s requested from {start:g} s")
    return torch.from_numpy(out[first_sample:])


def read_clip(
    path: str | os.PathLike,
    *,
    fps: float,
    size: int | tuple[int, int],
    seconds: float,
    sample_rate: int,
    start: float = 0.0,
    allow_missing_audio: bool = False,
) -> Clip:
    """Read ``seconds`` of a clip as frames resampled to ``fps`` and ``size`` plus a mono wave.

    Frames are resized so the picture covers ``size`` (h, w) and then centre-cropped. Audio is mixed
    to mono and resampled to ``sample_rate``. Raises :class:`MediaError` naming the file and the
    problem: missing, empty, truncated or corrupt, no video stream, no audio stream (unless
    ``allow_missing_audio``, which gives silence), or shorter than requested.
    """
    path = Path(path)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds and fps must be positive, got seconds={seconds}, fps={fps}")
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        has_audio = bool(container.streams.audio)
        if not has_audio and not allow_missing_audio:
            raise MediaError(path, "no audio stream (set allow_missing_audio=true to read it with silence)")
        frames = _read_frames(container, path, start, seconds, fps)
    if has_audio:
        # A second open: seeking one container back and forth between streams is unreliable.
        with _open(path) as container:
            wave = _read_audio(container, path, start, seconds, sample_rate)
    else:
        wave = torch.zeros(int(round(seconds * sample_rate)))
    frames = resize_center_crop(frames, size).clamp(-1, 1)
    return Clip(frames=frames, wave=wave, fps=fps, sample_rate=sample_rate, path=str(path), has_audio=has_audio)


# ----------------------------------------------------------------------------------------------
# Writing (atomic: a temp file in the same folder, renamed into place)
# ----------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Run ``write(handle)`` on a temp file beside ``path``, then rename it into place
    (:func:`jointdit.safeio.atomic_file`): the file appears complete or not at all, with the permissions
    a plain ``open`` gives, and a full disk raises ``WriteError`` naming the file, leaving no temp file."""
    from jointdit.safeio import atomic_file

    with atomic_file(path, "wb") as handle:
        write(handle)
    return Path(path)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T,3,H,W] in [-1,1] -> [T,H,W,3] uint8."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
    array = frames.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(
    path: str | os.PathLike,
    frames: torch.Tensor,
    fps: float,
    wave: torch.Tensor | None = None,
    sample_rate: int | None = None,
    crf: int = 18,
) -> Path:
    """Write H.264 video (yuv420p, so H and W must be even) with an optional AAC mono track."""
    pictures = _to_uint8(frames)
    _, height, width, _ = pictures.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {height}x{width}")
    if wave is not None and sample_rate is None:
        raise ValueError("sample_rate is required with a wave")

    def write(handle: BinaryIO) -> None:
        with av.open(handle, "w", format="mp4") as container:
            video = container.add_stream("h264", rate=Fraction(fps).limit_denominator(1001))
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.options = {"crf": str(crf)}
            audio = None
            if wave is not None:
                audio = container.add_stream("aac", rate=int(sample_rate))
                audio.layout = "mono"
            for picture in pictures:
                for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
            if audio is not None:
                samples = wave.detach().float().clamp(-1, 1).reshape(-1).cpu().numpy()
                step = 1024
                for offset in range(0, samples.shape[0], step):
                    frame = av.AudioFrame.from_ndarray(samples[None, offset : offset + step].copy(), format="flt", layout="mono")
                    frame.sample_rate, frame.pts = int(sample_rate), offset
                    for packet in audio.encode(frame):
                        container.mux(packet)
                for packet in audio.encode():
                    container.mux(packet)

    try:
        return atomic_write(path, write)
    except av.error.FFmpegError as err:
        raise MediaError(path, f"cannot be encoded as H.264{' + AAC' if wave is not None else ''} ({err})") from err


def write_png(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write an image ``[3, H, W]`` in [-1, 1] as an 8-bit RGB PNG."""
    from PIL import Image

    picture = _to_uint8(image[None])[0]                                                  # [H, W, 3] uint8
    return atomic_write(path, lambda handle: Image.fromarray(picture).save(handle, format="PNG"))


def write_wav(path: str | os.PathLike, wave: torch.Tensor, sample_rate: int) -> Path:
    """Write a mono 16-bit PCM WAV."""
    samples = wave.detach().float().clamp(-1, 1).reshape(-1).cpu().numpy()
    return atomic_write(path, lambda handle: sf.write(handle, samples, int(sample_rate), subtype="PCM_16", format="WAV"))


def read_wav(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """Read a WAV (or any soundfile format) as mono float32, resampled with librosa if asked."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise MediaError(path, f"cannot be read as audio ({err})") from err
    mono = data.mean(axis=1)
    if sample_rate is not None and rate != sample_rate:
        import librosa

        mono, rate = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate), sample_rate
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)), int(rate)
