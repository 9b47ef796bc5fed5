"""Video and audio codecs (``conf/codec/``): pixel frames / waves <-> the latents the model sees.

``build_codecs(cfg.codec)`` returns ``(VideoCodec, AudioCodec)`` for ``cfg.codec.name``:

* ``pixel_mel`` — embedded, no weights: :class:`PixelVideoCodec` (space-to-depth) +
  :class:`MelAudioCodec` (AudioLDM2 log-mel, Griffin-Lim).
* ``svd_audioldm2`` — pretrained, from local folders: :class:`SVDVideoCodec` +
  :class:`AudioLDM2AudioCodec`. The pretrained modules import lazily.

Config layout (plain fields, no ``_target_``)::

    name: pixel_mel | svd_audioldm2
    device: auto            # optional, pretrained codecs only
    dtype: float32          # optional, pretrained codecs only
    video: {...}            # keyword arguments of the video codec class
    audio: {...}            # keyword arguments of the audio codec class
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from jointdit.config import to_plain
from jointdit.codecs.base import AudioCodec, VideoCodec, apply_in_chunks, balanced_chunks
from jointdit.codecs.mel import MelAudioCodec, MelParams, log_mel, log_spectral_distance
from jointdit.codecs.pixel import PixelVideoCodec

CODEC_CHOICES = ("pixel_mel", "svd_audioldm2")

__all__ = [
    "AudioCodec", "VideoCodec", "PixelVideoCodec", "MelAudioCodec", "MelParams", "SVDVideoCodec",
    "AudioLDM2AudioCodec", "build_codecs", "log_mel", "log_spectral_distance", "apply_in_chunks",
    "balanced_chunks", "CODEC_CHOICES",
]


def __getattr__(name: str):  # lazy: diffusers/transformers load only when a pretrained codec is asked for
    if name == "SVDVideoCodec":
        from jointdit.codecs.svd import SVDVideoCodec

        return SVDVideoCodec
    if name == "AudioLDM2AudioCodec":
        from jointdit.codecs.audioldm2 import AudioLDM2AudioCodec

        return AudioLDM2AudioCodec
    raise AttributeError(name)


def _to_dict(cfg: Any) -> dict:
    c = to_plain(cfg)
    if c is None:
        return {}
    if not isinstance(c, Mapping):
        raise TypeError(f"codec config must be a mapping, got {type(cfg).__name__}")
    return dict(c)


def _kwargs(cls, section: Mapping | None, where: str, renames: Mapping[str, str] | None = None, **extra) -> dict:
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "vae", "vocoder")]
    kw = {}
    for key, value in dict(section or {}).items():
        key = (renames or {}).get(key, key)
        if key not in allowed:
            raise ValueError(f"codec config `{where}.{key}` is not a parameter of {cls.__name__}; allowed: {', '.join(allowed)}")
        kw[key] = value
    for key, value in extra.items():
        if key in allowed and value is not None:
            kw.setdefault(key, value)
    return kw


def build_codecs(cfg: Any) -> tuple[VideoCodec, AudioCodec]:
    """Build ``(video_codec, audio_codec)`` from a codec config (DictConfig or dict); see module doc."""
    c = _to_dict(cfg)
    name = c.get("name")
    if name == "pixel_mel":
        video = PixelVideoCodec(**_kwargs(PixelVideoCodec, c.get("video"), "video", {"space_to_depth": "factor"}))
        audio = MelAudioCodec(**_kwargs(MelAudioCodec, c.get("audio"), "audio"))
        return video, audio
    if name == "svd_audioldm2":
        from jointdit.codecs.audioldm2 import AudioLDM2AudioCodec
        from jointdit.codecs.svd import SVDVideoCodec

        common = {"device": c.get("device"), "dtype": c.get("dtype")}
        if not (c.get("video") or {}).get("vae_path"):
            raise ValueError("codec=svd_audioldm2 needs `video.vae_path` (the SVD VAE folder)")
        a = c.get("audio") or {}
        if not (a.get("root") or (a.get("vae_path") and a.get("vocoder_path"))):
            raise ValueError("codec=svd_audioldm2 needs `audio.vae_path` and `audio.vocoder_path` (or `audio.root`)")
        video = SVDVideoCodec(**_kwargs(SVDVideoCodec, c.get("video"), "video", **common))
        audio = AudioLDM2AudioCodec(**_kwargs(AudioLDM2AudioCodec, c.get("audio"), "audio", **common))
        return video, audio
    raise ValueError(f"unknown codec name {name!r}; choose one of: {', '.join(CODEC_CHOICES)}")
