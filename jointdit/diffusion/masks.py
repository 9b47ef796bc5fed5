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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from jointdit.diffusion.flow import TASKS, draw_names, interpolate, sample_t

MODES: tuple[str, ...] = TASKS + ("extend_v", "extend_a", "inpaint_v", "inpaint_a", "t2v", "t2a")

# attention restriction each mode imposes: (video may see audio, audio may see video)
_SEES = {"t2v": (False, True), "t2a": (True, False)}
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


def sample_modes(probabilities: Mapping[str, float], batch: int, generator: torch.Generator | None = None) -> list[str]:
    """A mode per sample from ``objective.tasks`` probabilities (normalised; unknown names refused)."""
    return [MODES[i] for i in draw_names(probabilities, MODES, batch, generator).tolist()]


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
# Training objective on a mask
# --------------------------------------------------------------------------------------------------
@dataclass
class MaskedFlowBatch:
    """Noised inputs, model timesteps, targets and the mask of one training batch."""

    video: Tensor          # [B, Tv, Cv, hv, wv] x_t (given latents = x0 exactly)
    audio: Tensor          # [B, Ca, La, Fa]
    t_video: Tensor        # [B, Tv] or [B, Tv·hv·wv]
    t_audio: Tensor        # [B] or [B, La]
    target_video: Tensor   # ε − x0
    target_audio: Tensor
    mask: ConditionMask
    attention: list[str]   # per-sample attention mode for the model


def make_masked_flow_batch(video: Tensor, audio: Tensor, mask: ConditionMask, mean: float = 0.0, std: float = 1.0,
                           generator: torch.Generator | None = None, attention: str | Sequence[str] = "full", *,
                           shift_video: float = 1.0, shift_audio: float = 1.0) -> MaskedFlowBatch:
    """Noise clean latents under ``mask``: ``t_m = sigmoid(N(mean + ln shift_m, std))`` per sample and
    modality, then t = 0 on given latents and t = 1 on an absent stream, ``x_t = (1 − t)·x0 + t·ε`` per element.

    Draw order (video t, audio t, video noise, audio noise) matches ``flow.make_flow_batch``. ``attention``:
    the requested mode(s) (e.g. iso modes drawn by the objective), further restricted by t2v / t2a.
    """
    b = video.shape[0]
    t_v = sample_t(b, mean + math.log(shift_video), std, generator)   # [B]
    t_a = sample_t(b, mean + math.log(shift_audio), std, generator)   # [B]
    noise_v = torch.randn(video.shape, generator=generator, device=video.device, dtype=video.dtype)
    noise_a = torch.randn(audio.shape, generator=generator, device=audio.device, dtype=audio.dtype)
    mask = mask.to(video.device)
    model_t_v, model_t_a = mask.timesteps(t_v.to(video.device), t_a.to(video.device))
    tv, hv, wv = mask.video.shape[1:]
    elem_t_v = model_t_v.reshape(b, tv, 1, hv, wv) if model_t_v.shape[1] != tv else model_t_v[:, :, None, None, None]
    elem_t_a = model_t_a[:, None, :, None] if model_t_a.ndim == 2 else model_t_a[:, None, None, None]
    return MaskedFlowBatch(
        video=interpolate(video, noise_v, elem_t_v.to(video.dtype)),
        audio=interpolate(audio, noise_a, elem_t_a.to(audio.dtype)),
        t_video=model_t_v, t_audio=model_t_a,
        target_video=noise_v - video, target_audio=noise_a - audio,
        mask=mask, attention=mask.attention_modes(attention))


def masked_flow_loss(pred_video: Tensor, pred_audio: Tensor, batch: MaskedFlowBatch, weight_video: float = 1.0,
                     weight_audio: float = 1.0) -> dict[str, Tensor]:
    """``L = w_v·Σ W_v|v̂ − v|² / (Σ W_v·Cv) + w_a·Σ W_a|â − a|² / (Σ W_a·Ca·Fa)`` over generated latents.

    Also each modality's loss and per-mode losses (detached; NaN for a mode absent from the batch).
    A batch with nothing generated in a modality contributes 0 for it.
    """
    w_v, w_a = batch.mask.loss_weights()                                       # [B,Tv,1,hv,wv], [B,1,La,1]
    se_v = (pred_video.float() - batch.target_video.float()).pow(2) * w_v      # [B, Tv, Cv, hv, wv]
    se_a = (pred_audio.float() - batch.target_audio.float()).pow(2) * w_a      # [B, Ca, La, Fa]
    n_v = w_v.expand_as(se_v).sum((1, 2, 3, 4))                                # [B]
    n_a = w_a.expand_as(se_a).sum((1, 2, 3))                                   # [B]
    s_v, s_a = se_v.sum((1, 2, 3, 4)), se_a.sum((1, 2, 3))                     # [B]
    loss_v = s_v.sum() / n_v.sum().clamp_min(1)
    loss_a = s_a.sum() / n_a.sum().clamp_min(1)
    out = {"loss": weight_video * loss_v + weight_audio * loss_a, "loss_video": loss_v.detach(),
           "loss_audio": loss_a.detach()}
    per_sample = (weight_video * s_v / n_v.clamp_min(1) + weight_audio * s_a / n_a.clamp_min(1)).detach()  # [B]
    for mode in dict.fromkeys(batch.mask.modes):
        chosen = torch.tensor([m == mode for m in batch.mask.modes], device=per_sample.device)
        out[f"loss_{mode}"] = per_sample[chosen].mean()
    return out


# --------------------------------------------------------------------------------------------------
# Sampling on a mask
# --------------------------------------------------------------------------------------------------
class RestrictedModes(torch.nn.Module):
    """Wrap a model so every call's attention modes are restricted by the mask (t2v / t2a isolation).

    Guidance batches its branches branch-major (``[branch0 × B, branch1 × B, ...]``), so row ``i`` of a
    call belongs to sample ``i mod B`` of the mask.
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


@torch.inference_mode()
def sample_masked(model: torch.nn.Module, noise_video: Tensor, noise_audio: Tensor, mask: ConditionMask, *,
                  steps: int, given_video: Tensor | None = None, given_audio: Tensor | None = None, guidance=None,
                  cond=None, neg_cond=None, shift_video: float = 1.0, shift_audio: float = 1.0,
                  video_times: Tensor | None = None, audio_times: Tensor | None = None,
                  callback=None) -> tuple[Tensor, Tensor]:
    """Euler integration of the guided flow ODE from t = 1 to 0 with the mask's given latents held.

    Each step: ``t`` per latent from :meth:`ConditionMask.timesteps` (0 on given latents, 1 on an absent
    stream), guided velocity ``v̂`` (JointCFG branches through :class:`RestrictedModes`), the scheduler's
    Euler update ``x ← x + (σ_{i+1} − σ_i)·v̂`` on present streams, then :meth:`ConditionMask.hold` puts the
    condition back — so given latents equal the condition exactly at every step and at the end.
    noise [B, ...]; given_video [1|B, Tv, Cv, hv, wv], given_audio [1|B, Ca, La, Fa] (needed where the
    mask gives latents of that stream); video_times [Tv] / audio_times [La]: latent centre times for the
    model's RoPE (the LatentSpec's). Returns fp32 ``(z_video, z_audio)``.
    """
    from jointdit.diffusion.guidance import JointCFG
    from jointdit.diffusion.sampler import make_scheduler

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    b = noise_video.shape[0]
    mask = expand_mask(mask.to(device), b)
    for given, flags, what in ((given_video, mask.video, "video"), (given_audio, mask.audio, "audio")):
        if given is None and bool(flags.any()):
            raise ValueError(f"modes {sorted(set(mask.modes))} give part of the {what}; pass the encoded "
                             f"conditioning {what} (condition_{what}=<file>)")
    gv = None if given_video is None else given_video.to(device, dtype).expand(b, *noise_video.shape[1:])
    ga = None if given_audio is None else given_audio.to(device, dtype).expand(b, *noise_audio.shape[1:])
    x_v, x_a = mask.hold(noise_video.to(device, dtype), noise_audio.to(device, dtype), gv, ga)
    guidance = guidance or JointCFG()
    cond = None if cond is None else cond.to(device=device)
    neg_cond = None if neg_cond is None else neg_cond.to(device=device)
    net = RestrictedModes(model, mask)
    sched_v, sched_a = make_scheduler(steps, shift_video, device), make_scheduler(steps, shift_audio, device)
    video_on, audio_on = bool(mask.video_present.any()), bool(mask.audio_present.any())
    times = {k: v.to(device) for k, v in (("video_times", video_times), ("audio_times", audio_times)) if v is not None}
    for i in range(int(steps)):
        sig_v = torch.full((b,), float(sched_v.sigmas[i]), device=device)
        sig_a = torch.full((b,), float(sched_a.sigmas[i]), device=device)
        t_v, t_a = mask.timesteps(sig_v, sig_a)
        pred_v, pred_a = guidance(net, x_v, x_a, t_v, t_a, cond, neg_cond, **times)
        if video_on:
            x_v = sched_v.step(pred_v, sched_v.timesteps[i], x_v, return_dict=False)[0]
        if audio_on:
            x_a = sched_a.step(pred_a, sched_a.timesteps[i], x_a, return_dict=False)[0]
        x_v, x_a = mask.hold(x_v, x_a, gv, ga)
        if callback is not None and callback(i + 1, int(steps)) is True:
            try:
                from jointdit.diffusion.sampler import SamplingCancelled
            except ImportError:  # pragma: no cover - older sampler
                SamplingCancelled = RuntimeError
            raise SamplingCancelled(i + 1, int(steps))
    return x_v.float(), x_a.float()


def uses_masks(probabilities: Mapping[str, float]) -> bool:
    """Whether ``objective.tasks`` gives weight to a mode beyond flow.py's joint/a2v/v2a/i2sv."""
    return any(float(p) > 0 for name, p in probabilities.items() if name in MASK_TASKS)


def training_batch(video: Tensor, audio: Tensor, probabilities: Mapping[str, float], geometry: Geometry, *,
                   params: MaskParams = MaskParams(), mean: float = 0.0, std: float = 1.0,
                   generator: torch.Generator | None = None, attention: str | Sequence[str] = "full",
                   shift_video: float = 1.0, shift_audio: float = 1.0) -> MaskedFlowBatch:
    """What the trainer calls per micro-batch: draw each sample's mode (``objective.tasks``), its mask
    (``objective.masks``), then noise under it (:func:`make_masked_flow_batch`). All draws from ``generator``."""
    modes = sample_modes(probabilities, video.shape[0], generator)
    mask = training_mask(modes, geometry, params, generator)
    return make_masked_flow_batch(video, audio, mask, mean, std, generator, attention, shift_video=shift_video,
                                  shift_audio=shift_audio)


# modes beyond flow.py's joint / a2v / v2a / i2sv: training draws them through :func:`training_batch`
MASK_TASKS: tuple[str, ...] = ("extend_v", "extend_a", "inpaint_v", "inpaint_a", "t2v", "t2a")
