"""Checks on what a browser uploads, before any of it reaches the sampler.

Every check opens the file with the library that will later read it (PIL for images, PyAV for clips and
sounds, soundfile for WAV/FLAC/OGG) and fails with an :class:`UploadError` whose message names the file,
what is wrong and what to upload instead — never a traceback. Limits: file size (``max_mb``) and
duration (``max_seconds``); both come from ``conf/ui.yaml`` (``uploads``). A clip the sampler reads whole
must also be at least as long as the clip the model samples (``check_video``'s ``min_seconds``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp4", ".mov")     # what the sampler reads (soundfile / a clip's track)
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")
SOUNDFILE_SUFFIXES = (".wav", ".flac", ".ogg")
MIN_SECONDS_SLACK = 1e-3   # a container's duration is rounded to its time base


class UploadError(ValueError):
    """An uploaded file the app refuses; ``str(err)`` is the message shown in the page."""


@dataclass(frozen=True)
class UploadLimits:
    max_mb: float = 50.0            # file size
    max_seconds: float = 60.0       # clip / sound duration
    max_pixels: int = 4096 * 4096   # image width · height

    @classmethod
    def from_cfg(cls, cfg) -> UploadLimits:
        cfg = cfg or {}
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: d)
        return cls(float(get("max_mb", cls.max_mb)), float(get("max_seconds", cls.max_seconds)),
                   int(get("max_pixels", cls.max_pixels)))


def _common(path: str | os.PathLike, kind: str, suffixes: tuple[str, ...], limits: UploadLimits) -> Path:
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in suffixes:
        raise UploadError(f"{name}: a {path.suffix or 'suffix-less'} file is not accepted as {kind}; "
                          f"upload one of {', '.join(suffixes)}")
    if not path.is_file():
        raise UploadError(f"{name}: the upload did not arrive (no file on the server); upload it again")
    size = path.stat().st_size
    if size == 0:
        raise UploadError(f"{name}: the file is empty (0 bytes)")
    if size > limits.max_mb * 1024 * 1024:
        raise UploadError(f"{name}: {size / 2**20:.1f} MB is over the {limits.max_mb:g} MB upload limit")
    return path


def check_image(path: str | os.PathLike, limits: UploadLimits = UploadLimits()) -> Path:
    """An image PIL can decode, at most ``max_pixels`` pixels."""
    from PIL import Image, UnidentifiedImageError

    path = _common(path, "an image", IMAGE_SUFFIXES, limits)
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = str(err).replace(str(path), path.name)
        raise UploadError(f"{path.name}: not a readable image ({reason}); "
                          f"upload a PNG or JPEG") from None
    if w * h > limits.max_pixels:
        raise UploadError(f"{path.name}: {w}×{h} pixels is over the {limits.max_pixels:,} pixel limit")
    return path


def _probe_av(path: Path, stream: str, kind: str, limits: UploadLimits) -> float:
    """Open with PyAV, demand a ``stream`` ('video'|'audio') stream, decode its first frame; return seconds."""
    import av

    try:
        with av.open(str(path)) as container:
            streams = container.streams.video if stream == "video" else container.streams.audio
            if not streams:
                raise UploadError(f"{path.name}: the file has no {stream} track; upload {kind}")
            seconds = (container.duration / av.time_base if container.duration is not None
                       else max((float(s.duration * s.time_base) for s in container.streams if s.duration), default=0.0))
            next(container.decode(streams[0]))
    except UploadError:
        raise
    except StopIteration:
        raise UploadError(f"{path.name}: its {stream} track holds no decodable frame; upload {kind}") from None
    except (av.error.FFmpegError, OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err).replace(str(path), path.name)
        raise UploadError(f"{path.name}: not a readable media file — it is not {kind} or it is corrupt "
                          f"({reason})") from None
    return seconds


def _check_duration(path: Path, seconds: float, limits: UploadLimits) -> None:
    if seconds > limits.max_seconds:
        raise UploadError(f"{path.name}: {seconds:.1f} s is over the {limits.max_seconds:g} s duration limit")


def check_video(path: str | os.PathLike, limits: UploadLimits = UploadLimits(), min_seconds: float = 0.0) -> Path:
    """A clip PyAV can open, with a decodable video track, at most ``max_seconds`` long and at least
    ``min_seconds`` (the clip the model samples: the sampler reads a kept video whole, and refuses a
    shorter one with its server path in the message)."""
    path = _common(path, "a video", VIDEO_SUFFIXES, limits)
    seconds = _probe_av(path, "video", "a video clip (MP4, MOV, WebM, MKV)", limits)
    _check_duration(path, seconds, limits)
    if seconds < min_seconds - MIN_SECONDS_SLACK:
        raise UploadError(f"{path.name}: {seconds:.2f} s is shorter than the {min_seconds:g} s clip the model samples; "
                          f"upload a clip at least that long")
    return path


def check_audio(path: str | os.PathLike, limits: UploadLimits = UploadLimits()) -> Path:
    """A sound soundfile (WAV/FLAC/OGG) can read, or a clip (MP4/MOV) with a video and an audio track that
    PyAV can read; at most ``max_seconds``."""
    path = _common(path, "audio", AUDIO_SUFFIXES, limits)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except (RuntimeError, sf.LibsndfileError) as err:
            reason = str(err).replace(str(path), path.name)
            raise UploadError(f"{path.name}: not a readable {path.suffix.lstrip('.').upper()} sound ({reason}); "
                              f"upload a WAV, FLAC or OGG file") from None
        if info.frames == 0:
            raise UploadError(f"{path.name}: the sound holds no samples")
        seconds = info.frames / info.samplerate
    else:
        kind = "a sound (WAV, FLAC, OGG) or a clip with an audio track"
        _probe_av(path, "video", kind, limits)  # the sampler reads a clip's sound through its frames' reader
        seconds = _probe_av(path, "audio", kind, limits)
    _check_duration(path, seconds, limits)
    return path
