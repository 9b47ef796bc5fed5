"""Conditioning masks: which latents of a sample are GIVEN, for every task mode — defined once, used by
training (what is noised and what the loss counts) and sampling (what is held fixed).

For a mode the mask splits each modality's latent into *given* elements G and the rest. With the
rectified-flow path ``x_t = (1 − t)·x0 + t·ε`` (t = 0 is data):

- a given element gets the clean timestep ``t = 0``, so ``x_t = x0`` exactly (the condition itself);
- it is excluded from the loss: ``L = Σ w·|v̂ − (ε − x0)|² / Σ w`` with ``w = 1`` only on generated,
  present elements;
- while sampling it is reset to the condition after every solver step, so it never moves.

A modality that is *absent* (``t2v``'s audio, ``t2a``'s video) is neither given nor generated: it has
no loss, stays at its initial noise with ``t = 1``, and the other stream is isolated from it
structurally (attention mode ``iso_v`` / ``iso_a``, see :mod:`jointdit.models.attention`).

=============  =================================================  ==========================
mode           given (clean, fixed, no loss)                      generated
=============  =================================================  ==========================
``joint``      nothing                                            video, audio
``a2v``        all audio                                          video
``v2a``        all video                                          audio
``i2sv``       latent video frame 0                               frames 1.., audio
``extend_v``   video of the first k seconds (+ audio's, if both)  the rest
``extend_a``   audio of the first k seconds (+ video's, if both)  the rest
``inpaint_v``  video outside a region: spatial (a box in every    the region; all audio
               frame) or temporal (a span of frames)
``inpaint_a``  audio outside a time span                          the span; all video
``t2v``        nothing; audio absent, video blind to it           video
``t2a``        nothing; video absent, audio blind to it           audio
=============  =================================================  ==========================

Shapes: ``z_video [B, Tv, Cv, hv, wv]``, ``z_audio [B, Ca, La, Fa]``; masks are per latent position,
``video [B, Tv, hv, wv]`` and ``audio [B, La]`` (shared by channels and mel bins). Masks are snapped to
the model's patch grid, so no patch mixes given and generated latents and every given token's
adaLN sees exactly ``t = 0``. Times follow ``LatentSpec``: latent j of a stream at rate r is centred at
``offset + j/r`` and covers ±½/r; "the first k seconds" are the latents wholly inside ``[0, k)`` (then
narrowed to whole patches), a span to regenerate takes every latent that meets it (widened to patches).

This module only says WHICH latents are given; the noise, timesteps, attention modes and loss on a mask
are :mod:`jointdit.diffusion.flow` (``make_flow_batch`` / ``flow_loss`` / ``FlowObjective``), and the
solver that holds the given part is :func:`jointdit.diffusion.sampler.integrate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# Every training task and sampling task. The first four are the tasks the objective had before masks
# (``flow.TASKS``); each is a mask like the others.
MODES: tuple[str, ...] = ("joint", "a2v", "v2a", "i2sv", "extend_v", "extend_a", "inpaint_v", "inpaint_a", "t2v", "t2a")
MASK_TASKS: tuple[str, ...] = MODES[4:]   # the modes that need a Geometry and drawn parameters

# attention restriction each mode imposes: (video may see audio, audio may see video)
_SEES = {"t2v": (False, True), "t2a": (True, False)}
# the streams a mode generates or keeps; the other one is absent (no loss, never integrated, not decoded)
_PRESENT = {"t2v": ("video",), "t2a": ("audio",)}


def present_streams(mode: str) -> tuple[str, ...]:
    """``("video", "audio")``, or the one stream of ``t2v`` (video) / ``t2a`` (audio)."""
    if mode not in MODES:
        raise ValueError(f"unknown conditioning mode {mode!r}; choose from {list(MODES)}")
    return _PRESENT.get(mode, ("video", "audio"))
_ATTN = {(True, True): "full", (False, True): "iso_v", (True, False): "iso_a", (False, False): "iso"}


@dataclass
class ConditionMask:
    """Given / present flags of one batch (see the module docstring)."""

    video: Tensor          # [B, Tv, hv, wv] bool: True = given
    audio: Tensor          # [B, La]         bool: True = given
    video_present: Tensor  # [B] bool: False = the video stream is absent (t2a)
    audio_present: Tensor  # [B] bool: False = the audio stream is absent (t2v)
    modes: list[str]       # the mode of each sample

    @property
    def batch_size(self) -> int:
        return self.video.shape[0]

    def loss_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_video [B, Tv, 1, hv, wv], w_audio [B, 1, La, 1])``: 1 on generated, present latents."""
        w_v = (~self.video & self.video_present[:, None, None, None]).float()
        w_a = (~self.audio & self.audio_present[:, None]).float()
        return w_v[:, :, None], w_a[:, None, :, None]

    def attention_modes(self, requested: str | Sequence[str] = "full") -> list[str]:
        """Per-sample attention mode: ``requested`` further restricted by t2v/t2a isolation."""
        from jointdit.models.attention import audio_sees_video, video_sees_audio

        requested = [requested] * self.batch_size if isinstance(requested, str) else list(requested)
        out = []
        for mode, req in zip(self.modes, requested):
            v_ok, a_ok = _SEES.get(mode, (True, True))
            out.append(_ATTN[(v_ok and video_sees_audio(req), a_ok and audio_sees_video(req))])
        return out

    def timesteps(self, t_video: Tensor, t_audio: Tensor) -> tuple[Tensor, Tensor]:
        """Model timesteps from per-sample times ``t_video [B]`` (or ``[B, Tv]``) and ``t_audio [B]``.

        Given latents get 0, an absent stream 1. Returns the coarsest form the model takes:
        ``t_video`` ``[B, Tv]`` (per frame) or ``[B, Tv·hv·wv]`` (per position, (t, h, w) row-major) when
        some frame is only partly given; ``t_audio`` ``[B]`` or ``[B, La]`` when some clip is partly given.
        """
        b, tv, hv, wv = self.video.shape
        t_v = t_video.reshape(b, -1).expand(b, tv)[:, :, None, None].expand(b, tv, hv, wv).clone()  # [B, Tv, hv, wv]
        t_v[~self.video_present] = 1.0
        t_v[self.video] = 0.0
        per_frame = bool((self.video == self.video[:, :, :1, :1]).all())
        t_v = t_v[:, :, 0, 0] if per_frame else t_v.reshape(b, -1)
        la = self.audio.shape[1]
        t_a = t_audio.reshape(b, 1).expand(b, la).clone()                                          # [B, La]
        t_a[~self.audio_present] = 1.0
        t_a[self.audio] = 0.0
        whole = bool((self.audio == self.audio[:, :1]).all())
        return t_v, (t_a[:, 0] if whole else t_a)

    def hold(self, x_video: Tensor, x_audio: Tensor, given_video: Tensor | None,
             given_audio: Tensor | None) -> tuple[Tensor, Tensor]:
        """Put the condition back into the given latents (sampling): ``x ← G·cond + (1 − G)·x``."""
        if given_video is not None and bool(self.video.any()):
            x_video = torch.where(self.video[:, :, None].to(x_video.device), given_video.to(x_video), x_video)
        if given_audio is not None and bool(self.audio.any()):
            x_audio = torch.where(self.audio[:, None, :, None].to(x_audio.device), given_audio.to(x_audio), x_audio)
        return x_video, x_audio

    def to(self, device: torch.device | str) -> ConditionMask:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "modes"})


# --------------------------------------------------------------------------------------------------
# Building masks
# --------------------------------------------------------------------------------------------------
def _snap_down(n: int, p: int) -> int:
    return n - n % p


def _snap_up(n: int, p: int, limit: int) -> int:
    return min(limit, -(-n // p) * p)


@dataclass(frozen=True)
class Geometry:
    """Latent grid of one sample, its time origins and the model's patch sizes.

    Latent k of a stream at rate r is centred at ``offset + k / r`` seconds and covers ±½/r around it
    (:class:`jointdit.latents.LatentSpec`'s time origin).
    """

    video: tuple[int, int, int]         # (Tv, hv, wv)
    audio_steps: int                    # La
    video_rate: float                   # latent video frames per second
    audio_rate: float                   # latent audio steps per second
    video_patch: tuple[int, int, int] = (1, 1, 1)
    audio_patch_t: int = 1
    video_offset: float = 0.0           # centre time (s) of latent video frame 0
    audio_offset: float = 0.0

    @classmethod
    def of(cls, z_video_shape: Sequence[int], z_audio_shape: Sequence[int], video_rate: float, audio_rate: float,
           video_patch: Sequence[int] = (1, 1, 1), audio_patch: Sequence[int] = (1, 1), video_offset: float = 0.0,
           audio_offset: float = 0.0) -> Geometry:
        """From latent shapes ``[.., Tv, Cv, hv, wv]`` and ``[.., Ca, La, Fa]`` (a leading batch dim is fine)."""
        tv, _, hv, wv = (int(s) for s in z_video_shape[-4:])
        return cls((tv, hv, wv), int(z_audio_shape[-2]), float(video_rate), float(audio_rate),
                   tuple(int(p) for p in video_patch), int(audio_patch[0]), float(video_offset), float(audio_offset))

    @classmethod
    def from_spec(cls, spec, video_patch: Sequence[int] = (1, 1, 1), audio_patch: Sequence[int] = (1, 1)) -> Geometry:
        """From a :class:`jointdit.latents.LatentSpec` (shapes, rates, time origins) and the model's patches."""
        return cls.of(spec.video_shape, spec.audio_shape, spec.video_latent_fps, spec.audio_latent_fps, video_patch,
                      audio_patch, spec.video_time_offset, spec.audio_time_offset)

    @property
    def seconds(self) -> float:
        return min(self.video[0] / self.video_rate, self.audio_steps / self.audio_rate)

    def given_prefix(self, seconds: float, video: bool) -> int:
        """Latents wholly inside ``[0, seconds)`` (centre + ½/r ≤ seconds), narrowed to whole patches."""
        rate, off, n, patch = self._stream(video)
        count = max(0, min(n, math.floor((seconds - off) * rate + 0.5 + 1e-9)))
        return _snap_down(count, patch)

    def touched(self, start_s: float, end_s: float, video: bool) -> tuple[int, int]:
        """Latents ``[a, b)`` whose interval meets ``[start_s, end_s)``, widened to whole patches."""
        if end_s <= start_s:
            raise ValueError(f"span ({start_s}, {end_s}) is empty; give (start_s, end_s) with start_s < end_s")
        rate, off, n, patch = self._stream(video)
        a = max(0, min(n, math.floor((start_s - off) * rate - 0.5 + 1e-9) + 1))
        b = max(0, min(n, math.ceil((end_s - off) * rate + 0.5 - 1e-9)))
        a, b = _snap_down(a, patch), _snap_up(b, patch, n)
        if b <= a:
            raise ValueError(f"span ({start_s}, {end_s}) s lies outside the clip's {n / rate:.3g} s")
        return a, b

    def _stream(self, video: bool) -> tuple[float, float, int, int]:
        if video:
            return self.video_rate, self.video_offset, self.video[0], self.video_patch[0]
        return self.audio_rate, self.audio_offset, self.audio_steps, self.audio_patch_t


def empty_mask(batch: int, geometry: Geometry, device: torch.device | str = "cpu") -> ConditionMask:
    tv, hv, wv = geometry.video
    return ConditionMask(
        video=torch.zeros(batch, tv, hv, wv, dtype=torch.bool, device=device),
        audio=torch.zeros(batch, geometry.audio_steps, dtype=torch.bool, device=device),
        video_present=torch.ones(batch, dtype=torch.bool, device=device),
        audio_present=torch.ones(batch, dtype=torch.bool, device=device),
        modes=["joint"] * batch)


def set_mode(mask: ConditionMask, i: int, mode: str, geometry: Geometry, *, seconds_given: float | None = None,
             both: bool = False, region: Sequence[float] | None = None, span: Sequence[float] | None = None) -> None:
    """Write sample ``i``'s mask for ``mode`` in place (the ONE definition of every mode).

    seconds_given  extend_v / extend_a: k, the prefix length in seconds (its latents wholly in [0, k))
    both           extend_*: also give the other modality's first k seconds
    region         inpaint_v spatial: ``(top, left, bottom, right)`` fractions of the frame to regenerate
    span           inpaint_v temporal / inpaint_a: ``(start_s, end_s)`` seconds to regenerate
    A region/span is widened outward to whole patches (what is regenerated never shrinks).
    """
    if mode not in MODES:
        raise ValueError(f"unknown conditioning mode {mode!r}; choose from {list(MODES)}")
    tv, hv, wv = geometry.video
    pt, ph, pw = geometry.video_patch
    mask.modes[i] = mode
    mask.video[i], mask.audio[i] = False, False
    mask.video_present[i], mask.audio_present[i] = True, True
    if mode == "a2v":
        mask.audio[i] = True
    elif mode == "v2a":
        mask.video[i] = True
    elif mode == "i2sv":
        mask.video[i, :pt] = True  # the first latent frame, as a whole temporal patch
    elif mode in ("extend_v", "extend_a"):
        if seconds_given is None or seconds_given <= 0:
            raise ValueError(f"{mode} needs seconds_given > 0 (the length of the given prefix), got {seconds_given}")
        fv = geometry.given_prefix(seconds_given, video=True)
        fa = geometry.given_prefix(seconds_given, video=False)
        if mode == "extend_v" or both:
            mask.video[i, :fv] = True
        if mode == "extend_a" or both:
            mask.audio[i, :fa] = True
    elif mode == "inpaint_v":
        mask.video[i] = True
        if region is not None:
            top, left, bottom, right = (float(r) for r in region)
            y0, x0 = _snap_down(int(math.floor(top * hv)), ph), _snap_down(int(math.floor(left * wv)), pw)
            y1, x1 = _snap_up(int(math.ceil(bottom * hv)), ph, hv), _snap_up(int(math.ceil(right * wv)), pw, wv)
            if y1 <= y0 or x1 <= x0:
                raise ValueError(f"inpaint_v region {tuple(region)} is empty on a {hv}x{wv} latent grid")
            mask.video[i, :, y0:y1, x0:x1] = False
        elif span is not None:
            a, b = geometry.touched(*span, video=True)
            mask.video[i, a:b] = False
        else:
            raise ValueError("inpaint_v needs a spatial region=(top, left, bottom, right) or a temporal span=(start_s, end_s)")
    elif mode == "inpaint_a":
        if span is None:
            raise ValueError("inpaint_a needs span=(start_s, end_s), the seconds of audio to regenerate")
        mask.audio[i] = True
        a, b = geometry.touched(*span, video=False)
        mask.audio[i, a:b] = False
    elif mode == "t2v":
        mask.audio_present[i] = False
    elif mode == "t2a":
        mask.video_present[i] = False


def sampling_mask(mode: str, geometry: Geometry, **params) -> ConditionMask:
    """The batch-1 mask of a sampling request (``params`` as in :func:`set_mode`)."""
    mask = empty_mask(1, geometry)
    set_mode(mask, 0, mode, geometry, **params)
    return mask


@dataclass(frozen=True)
class MaskParams:
    """How training draws each mode's free parameters (``objective.masks`` in the config).

    extend_*: k ~ U[extend_min, extend_max]·seconds, and with probability ``extend_both`` the other
    modality's prefix is given too. inpaint_v: spatial with probability ``inpaint_spatial``, a box
    whose sides are U[inpaint_min, inpaint_max] of the frame; temporal (and inpaint_a) spans are
    U[inpaint_min, inpaint_max] of the clip at a uniform start.
    """

    extend_min: float = 0.2
    extend_max: float = 0.7
    extend_both: float = 0.5
    inpaint_min: float = 0.2
    inpaint_max: float = 0.6
    inpaint_spatial: float = 0.5

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> MaskParams:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown objective.masks key(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**{k: float(v) for k, v in cfg.items()})


def training_mask(modes: Sequence[str], geometry: Geometry, params: MaskParams = MaskParams(),
                  generator: torch.Generator | None = None) -> ConditionMask:
    """Masks for a training batch: each sample's free parameters drawn from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    mask = empty_mask(len(modes), geometry)
    u = torch.rand(len(modes), 5, generator=generator, device=device).cpu().tolist()
    seconds = geometry.seconds
    for i, mode in enumerate(modes):
        r = u[i]
        kw: dict = {}
        if mode in ("extend_v", "extend_a"):
            frac = params.extend_min + (params.extend_max - params.extend_min) * r[0]
            kw = dict(seconds_given=max(frac * seconds, 1e-6), both=r[1] < params.extend_both)
            # the prefix must cover at least one patch, or the mode degenerates to joint
            kw["seconds_given"] = max(kw["seconds_given"], geometry.video_patch[0] / geometry.video_rate
                                      if mode == "extend_v" else geometry.audio_patch_t / geometry.audio_rate)
        elif mode == "inpaint_v" and r[1] < params.inpaint_spatial:
            h = params.inpaint_min + (params.inpaint_max - params.inpaint_min) * r[0]
            w = params.inpaint_min + (params.inpaint_max - params.inpaint_min) * r[2]
            top, left = (1 - h) * r[3], (1 - w) * r[4]
            kw = dict(region=(top, left, top + h, left + w))
        elif mode in ("inpaint_v", "inpaint_a"):
            length = (params.inpaint_min + (params.inpaint_max - params.inpaint_min) * r[0]) * seconds
            start = (seconds - length) * r[2]
            kw = dict(span=(start, start + length))
        set_mode(mask, i, mode, geometry, **kw)
    return mask.to(device)


# --------------------------------------------------------------------------------------------------
# Sampling on a mask (the solver itself is jointdit.diffusion.sampler.integrate)
# --------------------------------------------------------------------------------------------------
class RestrictedModes(torch.nn.Module):
    """Wrap a model so every call's attention modes are restricted by the mask (t2v / t2a isolation).

    Guidance batches its branches branch-major (``[branch0 × B, branch1 × B, ...]``), so row ``i`` of a
    call belongs to sample ``i mod B`` of the mask. Without t2v / t2a the modes pass unchanged.
    """

    def __init__(self, model: torch.nn.Module, mask: ConditionMask) -> None:
        super().__init__()
        self.model, self.mask = model, mask

    @property
    def config(self):
        return self.model.config

    def forward(self, z_video: Tensor, z_audio: Tensor, t_video: Tensor, t_audio: Tensor, cond=None,
                mode: str | Sequence[str] = "full", **kwargs) -> tuple[Tensor, Tensor]:
        rows, b = z_video.shape[0], self.mask.batch_size
        requested = [mode] * rows if isinstance(mode, str) else list(mode)
        allowed = []
        for start in range(0, rows, b):
            allowed += self.mask.attention_modes(requested[start:start + b])
        return self.model(z_video, z_audio, t_video, t_audio, cond, allowed, **kwargs)


def expand_mask(mask: ConditionMask, batch: int) -> ConditionMask:
    """A batch-1 mask repeated for ``batch`` samples (a batch-sized mask passes unchanged)."""
    if mask.batch_size == batch:
        return mask
    if mask.batch_size != 1:
        raise ValueError(f"the mask has {mask.batch_size} samples for a batch of {batch}")
    rep = {f.name: getattr(mask, f.name).expand(batch, *getattr(mask, f.name).shape[1:]).clone()
           for f in fields(mask) if f.name != "modes"}
    return ConditionMask(**rep, modes=mask.modes * batch)
