"""``LatentSpec``: the ONE description of clip and latent geometry (see docs/contracts.md).

The cache writes it (``meta.json`` → ``spec``), and the dataset, trainer, export (``jointdit.json`` →
``spec``), sampler, evaluation and memory planner read it. Nobody else computes a latent shape, a latent
rate, a duration or a time origin.

Geometry. A clip of ``seconds`` at ``fps`` frames/s and ``sample_rate`` Hz, ``size`` = (H, W) pixels,
encodes to

    z_video [T, C, h, w]   T latent frames at ``video_latent_fps``
    z_audio [C, L, F]      L latent steps at ``audio_latent_fps`` (channels, TIME, frequency)

Time origin. Latent ``k`` of a stream covers an interval of the clip whose centre is

    t_video(k) = video_time_offset + k / video_latent_fps      (seconds)
    t_audio(j) = audio_time_offset + j / audio_latent_fps

(:meth:`LatentSpec.video_latent_times`, :meth:`LatentSpec.audio_latent_times`). The offsets are per codec
(:func:`codec_time_offsets`): frame ``k`` of a clip is shown at ``k / fps`` (PyAV presentation time), so
pixel and SVD video (no temporal compression) have offset 0; the mel codec frames ``center=True`` (mel
frame ``j`` centred on sample ``j·hop``): offset 0; AudioLDM2 frames HiFi-GAN style (mel frame ``m``
covers samples ``[m·hop, (m+1)·hop)``) and its VAE merges ``d = 4`` mel frames per latent step, so step
``j`` covers ``[j·d·hop, (j+1)·d·hop)`` with centre ``(j + ½)·d·hop / sr``: offset ``d·hop / (2·sr)`` = 20 ms.

Crop. ``spec.crop(max_t)`` is the only way to shorten a clip: at most ``max_t`` latent video frames,
the audio cut to the same seconds, both trimmed to whole temporal patches of the model when the patch
sizes are known (:meth:`LatentSpec.with_patches`), and ``seconds`` = the video span ``T / video_latent_fps``.
The audio then covers ``L / audio_latent_fps`` ≤ ``seconds``, less by under one audio patch; decoders pad
the tail.

Normalisation. ``video_mean``/``video_std``/``audio_mean``/``audio_std`` are per-channel statistics the
cache measured over the train split; ``None`` means identity. ``normalize_video(z) = (z − μ_c) / σ_c``
per channel ``c`` (the channel axis is −3 in both layouts), ``denormalize_*`` inverts it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

SPEC_FORMAT = 1
EXPORT_FORMAT = 2  # jointdit.json: 1 = {latent, data, codec, clip}; 2 = adds {format, spec, attention}
CLIP_WIDTH_KEYS = ("text_len", "text_token_dim", "text_pooled_dim", "image_embed_dim")


def aligned_lengths(video_frames: int, audio_steps: int, video_fps: float, audio_fps: float) -> tuple[int, int]:
    """The longest ``(T, L)`` both streams hold for one common time span starting at 0.

    ``T = floor(span · video_fps)`` with ``span = min(T_held / video_fps, L_held / audio_fps)``, and
    ``L = round(T · audio_fps / video_fps)`` (never more than held).
    """
    span = min(video_frames / video_fps, audio_steps / audio_fps)
    t = min(int(video_frames), int(math.floor(span * video_fps + 1e-6)))
    return t, min(int(audio_steps), int(round(t * audio_fps / video_fps)))


def crop_lengths(video_frames: int, audio_steps: int, video_fps: float, audio_fps: float, max_t: int = 0,
                 video_patch_t: int | None = None, audio_patch_t: int | None = None) -> tuple[int, int]:
    """``(T, L)`` after the ``max_t`` crop and the temporal patch trim — the rule :meth:`LatentSpec.crop` uses.

    ``T`` is the longest multiple of ``video_patch_t`` (``pv``), at most ``max_t`` (``<= 0``: no limit) and at
    most held, for which ``L = min(L_held, round(T · audio_fps / video_fps))`` rounded down to a multiple
    of ``audio_patch_t`` (``pa``) covers the video span to within one audio patch:
    ``0 <= T / video_fps − L / audio_fps < pa / audio_fps``. Idempotent. Raises ``ValueError`` when less
    than one patch of either stream is left.
    """
    pv, pa = int(video_patch_t or 1), int(audio_patch_t or 1)
    t = int(video_frames) if not (max_t and int(max_t) > 0) else min(int(video_frames), int(max_t))
    t -= t % pv
    while t >= pv:
        l_ = min(int(audio_steps), int(round(t * audio_fps / video_fps)))
        l_ -= l_ % pa
        if l_ >= pa and t / video_fps - l_ / audio_fps < pa / audio_fps - 1e-9:
            return t, l_
        t -= pv
    raise ValueError(f"a crop of max_t={max_t} leaves less than one temporal patch ({pv} video frames / {pa} audio "
                     f"steps) of the {video_frames} / {audio_steps} held; raise vram.max_t or data.seconds, or use a "
                     f"smaller model.video_patch_size / audio_patch_size")


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@dataclass(frozen=True)
class LatentSpec:
    """Clip and latent geometry; see the module docstring for every field's meaning."""

    fps: float                                  # pixel frames per second of the clip
    size: tuple[int, int]                       # (H, W) pixels
    seconds: float                              # clip duration (after a crop: the video span T / video_latent_fps)
    sample_rate: int                            # audio samples per second
    video_shape: tuple[int, int, int, int]      # [T, C, h, w]
    audio_shape: tuple[int, int, int]           # [C, L, F]
    video_latent_fps: float
    audio_latent_fps: float
    video_time_offset: float = 0.0              # centre time (s) of latent video frame 0
    audio_time_offset: float = 0.0              # centre time (s) of latent audio step 0
    video_patch_t: int | None = None            # the model's temporal patch sizes, once known
    audio_patch_t: int | None = None
    clip_widths: dict[str, int] = field(default_factory=dict)  # text_len, text_token_dim, text_pooled_dim, image_embed_dim
    codec: dict[str, Any] = field(default_factory=dict)        # the codec config the latents were made with
    video_mean: tuple[float, ...] | None = None  # per-channel statistics (None = identity)
    video_std: tuple[float, ...] | None = None
    audio_mean: tuple[float, ...] | None = None
    audio_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise types once)
        size = self.size
        set_("size", (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1])))
        set_("fps", float(self.fps)), set_("seconds", float(self.seconds)), set_("sample_rate", int(self.sample_rate))
        set_("video_shape", tuple(int(v) for v in self.video_shape))
        set_("audio_shape", tuple(int(v) for v in self.audio_shape))
        set_("video_latent_fps", float(self.video_latent_fps)), set_("audio_latent_fps", float(self.audio_latent_fps))
        set_("video_time_offset", float(self.video_time_offset)), set_("audio_time_offset", float(self.audio_time_offset))
        for key in ("video_patch_t", "audio_patch_t"):
            set_(key, None if getattr(self, key) is None else int(getattr(self, key)))
        set_("clip_widths", {k: int(v) for k, v in dict(self.clip_widths or {}).items()})
        set_("codec", json.loads(json.dumps(dict(self.codec or {}))))  # a private plain copy
        for key in ("video_mean", "video_std", "audio_mean", "audio_std"):
            set_(key, _floats(getattr(self, key)))
        if len(self.video_shape) != 4 or len(self.audio_shape) != 3:
            raise ValueError(f"video_shape must be [T, C, h, w] and audio_shape [C, L, F]; got {self.video_shape}, "
                             f"{self.audio_shape}")
        for name, stats, channels in (("video", (self.video_mean, self.video_std), self.video_shape[1]),
                                      ("audio", (self.audio_mean, self.audio_std), self.audio_shape[0])):
            if (stats[0] is None) != (stats[1] is None):
                raise ValueError(f"{name}_mean and {name}_std must both be set or both be None")
            if stats[0] is not None and not (len(stats[0]) == len(stats[1]) == channels):
                raise ValueError(f"{name} statistics have {len(stats[0])}/{len(stats[1])} values for {channels} channels")
            if stats[1] is not None and min(stats[1]) <= 0:
                raise ValueError(f"{name}_std must be positive, got {stats[1]}")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Pixel frames of the clip."""
        return int(round(self.seconds * self.fps))

    @property
    def num_samples(self) -> int:
        """Audio samples of the clip."""
        return int(round(self.seconds * self.sample_rate))

    @property
    def audio_seconds(self) -> float:
        """Seconds the audio latent covers (``L / audio_latent_fps``)."""
        return self.audio_shape[1] / self.audio_latent_fps

    def video_latent_times(self) -> Tensor:
        """``[T]`` float64: centre time in seconds of each latent video frame."""
        return self.video_time_offset + torch.arange(self.video_shape[0], dtype=torch.float64) / self.video_latent_fps

    def audio_latent_times(self) -> Tensor:
        """``[L]`` float64: centre time in seconds of each latent audio step."""
        return self.audio_time_offset + torch.arange(self.audio_shape[1], dtype=torch.float64) / self.audio_latent_fps

    # -- shortening ------------------------------------------------------------------------------
    def crop(self, max_t: int = 0) -> "LatentSpec":
        """At most ``max_t`` latent video frames (0: all), audio on the same seconds, whole patches (see module doc)."""
        t, l_ = crop_lengths(self.video_shape[0], self.audio_shape[1], self.video_latent_fps, self.audio_latent_fps,
                             max_t, self.video_patch_t, self.audio_patch_t)
        if (t, l_) == (self.video_shape[0], self.audio_shape[1]) and math.isclose(self.seconds, t / self.video_latent_fps):
            return self
        return dataclasses.replace(self, seconds=t / self.video_latent_fps, video_shape=(t, *self.video_shape[1:]),
                                   audio_shape=(self.audio_shape[0], l_, self.audio_shape[2]))

    def with_patches(self, video_patch_t: int, audio_patch_t: int) -> "LatentSpec":
        """The model's temporal patch sizes recorded, and both streams trimmed to whole patches."""
        return dataclasses.replace(self, video_patch_t=int(video_patch_t), audio_patch_t=int(audio_patch_t)).crop(0)

    def with_stats(self, video: tuple[Sequence[float], Sequence[float]] | None,
                   audio: tuple[Sequence[float], Sequence[float]] | None) -> "LatentSpec":
        """Per-channel ``(mean, std)`` of each stream (``None``: identity)."""
        return dataclasses.replace(self, video_mean=None if video is None else video[0],
                                   video_std=None if video is None else video[1],
                                   audio_mean=None if audio is None else audio[0],
                                   audio_std=None if audio is None else audio[1])

    def model_kwargs(self) -> dict[str, Any]:
        """The JointDiT arguments the latents fix: input channels, latent rates and the cached CLIP widths."""
        return {"video_in_channels": self.video_shape[1], "audio_in_channels": self.audio_shape[0],
                "video_latent_fps": self.video_latent_fps, "audio_latent_fps": self.audio_latent_fps,
                **self.clip_widths}

    # -- normalisation ---------------------------------------------------------------------------
    @staticmethod
    def _affine(z: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, inverse: bool) -> Tensor:
        if mean is None:
            return z
        shape = (len(mean), 1, 1)  # channel axis -3 of [.., T, C, h, w] and [.., C, L, F]
        m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        s = torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return z * s + m if inverse else (z - m) / s

    def normalize_video(self, z: Tensor) -> Tensor:
        """``[.., T, C, h, w]``: ``(z − μ_c) / σ_c``."""
        return self._affine(z, self.video_mean, self.video_std, inverse=False)

    def denormalize_video(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize_video`: ``z·σ_c + μ_c``."""
        return self._affine(z, self.video_mean, self.video_std, inverse=True)

    def normalize_audio(self, z: Tensor) -> Tensor:
        """``[.., C, L, F]``: ``(z − μ_c) / σ_c``."""
        return self._affine(z, self.audio_mean, self.audio_std, inverse=False)

    def denormalize_audio(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`normalize_audio`."""
        return self._affine(z, self.audio_mean, self.audio_std, inverse=True)

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict (lists for tuples) with ``format``."""
        out = {"format": SPEC_FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "LatentSpec":
        """Inverse of :meth:`to_json` (a dict or its JSON text); unknown keys are refused."""
        data = dict(json.loads(data) if isinstance(data, str) else data)
        fmt = data.pop("format", SPEC_FORMAT)
        if int(fmt) > SPEC_FORMAT:
            raise ValueError(f"LatentSpec format {fmt} is newer than this code understands ({SPEC_FORMAT}); update jointdit")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown LatentSpec fields {unknown}")
        return cls(**data)

    # -- builders --------------------------------------------------------------------------------
    @classmethod
    def from_codecs(cls, video_codec, audio_codec, *, fps: float, size: int | Sequence[int], seconds: float,
                    sample_rate: int | None = None, codec: Mapping[str, Any] | None = None,
                    clip_widths: Mapping[str, int] | None = None) -> "LatentSpec":
        """The spec of a clip read at ``fps``/``size``/``seconds`` (as ``media.read_clip`` reads it), from the codecs."""
        spec_size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        sr = int(audio_codec.sample_rate)
        if sample_rate is not None and int(sample_rate) != sr:
            raise ValueError(f"data.sample_rate={sample_rate} but the audio codec runs at {sr} Hz; "
                             f"set data.sample_rate={sr}")
        frames, samples = int(round(float(seconds) * float(fps))), int(round(float(seconds) * sr))
        video_offset, audio_offset = codec_time_offsets(video_codec, audio_codec)
        return cls(fps=fps, size=spec_size, seconds=seconds, sample_rate=sr,
                   video_shape=video_codec.latent_shape(frames, *spec_size),
                   audio_shape=audio_codec.latent_shape(samples),
                   video_latent_fps=video_codec.latent_fps(float(fps)), audio_latent_fps=audio_codec.latent_fps,
                   video_time_offset=video_offset, audio_time_offset=audio_offset,
                   codec=dict(codec or {}), clip_widths=dict(clip_widths or {}))

    @classmethod
    def from_export_meta(cls, meta: Mapping[str, Any], model_config: Mapping[str, Any] | None = None) -> "LatentSpec":
        """The spec of an exported model folder's ``jointdit.json`` — the ONE adapter for old exports.

        Format 2 stores ``spec``. Format 1 (no ``format`` key) stored ``latent`` {video_shape, audio_shape,
        video_latent_fps, audio_latent_fps, clip_widths} and ``data`` {fps, size, seconds, sample_rate}, with
        the UNcropped ``data.seconds`` even when ``vram.max_t`` had cropped the latents: the adapter takes
        the duration from the latent video span instead. Patch sizes come from ``model_config`` (the
        folder's ``config.json``) when given.
        """
        if meta.get("spec"):
            spec = cls.from_json(meta["spec"])
        else:
            latent, data, codec = dict(meta.get("latent") or {}), dict(meta.get("data") or {}), dict(meta.get("codec") or {})
            missing = [k for k, src in (("latent.video_shape", latent), ("latent.audio_shape", latent), ("data.fps", data),
                                        ("data.size", data)) if src.get(k.split(".")[1]) is None]
            if missing:
                raise ValueError(f"the export's jointdit.json lacks {missing}; give the shapes with "
                                 "manual_shapes='{seconds: 2.0, fps: 8, size: 64, sample_rate: 16000}'")
            video_shape, audio_shape = latent["video_shape"], latent["audio_shape"]
            fv = float(latent.get("video_latent_fps") or data["fps"])
            audio = codec.get("audio") or {}
            sr = int(data.get("sample_rate") or audio.get("sample_rate") or 16000)
            hop = int(audio.get("hop_length") or 160)
            down = 4 if codec.get("name") == "svd_audioldm2" else 1
            fa = float(latent.get("audio_latent_fps") or sr / hop / down)
            spec = cls(fps=data["fps"], size=data["size"], seconds=int(video_shape[0]) / fv, sample_rate=sr,
                       video_shape=video_shape, audio_shape=audio_shape, video_latent_fps=fv, audio_latent_fps=fa,
                       audio_time_offset=down * hop / (2 * sr) if down > 1 else 0.0,
                       clip_widths=latent.get("clip_widths") or {}, codec=codec)
        if model_config is not None and spec.video_patch_t is None:
            pv, pa = model_config.get("video_patch_size"), model_config.get("audio_patch_size")
            if pv and pa:
                spec = dataclasses.replace(spec, video_patch_t=int(pv[0]), audio_patch_t=int(pa[0]))
        return spec


def codec_time_offsets(video_codec, audio_codec) -> tuple[float, float]:
    """``(video_time_offset, audio_time_offset)`` in seconds: the centre time of latent 0 of each codec.

    Video: frame ``k`` is shown at ``k / fps``; a codec that merges ``r = fps / latent_fps`` frames per
    latent frame centres latent 0 at ``(r − 1) / (2·fps)`` (0 for pixel and SVD, ``r = 1``). Audio (mel
    based, ``d`` mel frames per latent step, hop ``h``, rate ``sr``): ``center`` framing puts mel frame ``m``
    at ``m·h``, so latent 0 sits at ``(d − 1)·h / (2·sr)``; HiFi-GAN framing (AudioLDM2) puts it at ``(m + ½)·h``,
    so latent 0 sits at ``d·h / (2·sr)``.
    """
    probe_fps = 24.0
    ratio = probe_fps / float(video_codec.latent_fps(probe_fps))
    video_offset = (ratio - 1.0) / (2.0 * probe_fps) if ratio > 1 else 0.0
    hop, sr = getattr(audio_codec, "hop_length", None), float(audio_codec.sample_rate)
    if hop is None:
        return video_offset, 0.0
    down = int(getattr(audio_codec, "time_downsample", 1))
    hifigan = type(audio_codec).__name__ == "AudioLDM2AudioCodec"
    audio_offset = (down if hifigan else down - 1) * int(hop) / (2.0 * sr)
    return video_offset, audio_offset


def clip_widths_of(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """CLIP widths from one clip's stored embeddings (``clip_text_tokens`` [L, Dt], ``clip_text_pooled`` [Dp],
    ``clip_image`` [Di]); empty when none are stored."""
    widths = {}
    if "clip_text_tokens" in tensors:
        widths["text_len"], widths["text_token_dim"] = (int(n) for n in tensors["clip_text_tokens"].shape[-2:])
    if "clip_text_pooled" in tensors:
        widths["text_pooled_dim"] = int(tensors["clip_text_pooled"].shape[-1])
    if "clip_image" in tensors:
        widths["image_embed_dim"] = int(tensors["clip_image"].shape[-1])
    return widths


def _analytic_pretrained_spec(data: Mapping[str, Any], codec: Mapping[str, Any]) -> LatentSpec:
    """``svd_audioldm2`` geometry without loading weights: the SVD VAE (4 channels, /8 in space, none in time)
    and the AudioLDM2 VAE (8 channels, /4 over mel frames of hop 160 padded to a multiple of 4, 64 → 16 bins)."""
    audio = dict(codec.get("audio") or {})
    sr, hop, n_mels = int(audio.get("sample_rate", 16000)), int(audio.get("hop_length", 160)), int(audio.get("n_mels", 64))
    size = data["size"]
    h, w = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    seconds, fps = float(data["seconds"]), float(data["fps"])
    mel_frames = -(-int(round(seconds * sr)) // hop)
    mel_frames = -(-mel_frames // 4) * 4
    return LatentSpec(fps=fps, size=(h, w), seconds=seconds, sample_rate=sr,
                      video_shape=(int(round(seconds * fps)), 4, h // 8, w // 8), audio_shape=(8, mel_frames // 4, n_mels // 4),
                      video_latent_fps=fps, audio_latent_fps=sr / hop / 4, audio_time_offset=4 * hop / (2 * sr),
                      codec=dict(codec))


def spec_for_data(data_cfg: Any, codec_cfg: Any) -> LatentSpec:
    """The uncropped spec of one clip of ``data_cfg`` encoded with ``codec_cfg`` (no cache needed, no weights loaded)."""
    from jointdit.config import to_plain

    data, codec = to_plain(data_cfg), to_plain(codec_cfg)
    if codec.get("name") == "svd_audioldm2":
        return _analytic_pretrained_spec(data, codec)
    from jointdit.codecs import build_codecs

    video, audio = build_codecs(codec)
    return LatentSpec.from_codecs(video, audio, fps=data["fps"], size=data["size"], seconds=data["seconds"],
                                  sample_rate=data.get("sample_rate"), codec=codec)


def spec_for_config(cfg: Any, patches: bool = True, crop: bool = True) -> LatentSpec:
    """What a training run of the composed ``train`` config sees: the cache's spec when the cache exists
    (else computed from data/codec), with ``patches`` trimmed to the temporal patches of ``cfg.model``,
    with ``crop`` cropped to ``vram.max_t``."""
    from jointdit.data.cache import cache_dir_for, read_cache_spec

    spec = None
    if cfg.get("paths") is not None and cfg.paths.get("cache_dir"):
        spec = read_cache_spec(cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir))
    if spec is None:
        spec = spec_for_data(cfg.data, cfg.codec)
    if patches:
        from jointdit.config import model_fields
        from jointdit.models.jointdit import full_config, model_config

        fields = model_fields(cfg.model)
        full = full_config(model_config(fields.pop("preset"), **fields))
        spec = dataclasses.replace(spec, video_patch_t=int(full["video_patch_size"][0]),
                                   audio_patch_t=int(full["audio_patch_size"][0]))
    if not crop:
        return spec
    vram = cfg.get("vram") or {}
    return spec.crop(int(vram.get("max_t", 0) or 0))


__all__ = ["LatentSpec", "SPEC_FORMAT", "EXPORT_FORMAT", "aligned_lengths", "crop_lengths", "codec_time_offsets",
           "clip_widths_of", "spec_for_data", "spec_for_config"]
