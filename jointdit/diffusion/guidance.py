"""Guidance on JointDiT's velocity prediction: JointCFG with per-modality weights, STG and CFG rescale.

For each modality ``m ∈ {v (video), a (audio)}`` (the seed formula, with LTX-2's additions)::

    g_m = pos_m + w_iso_m·(pos_m − iso_m) + w_txt_m·(pos_m − no_text_m) + w_neg_m·(pos_m − neg_text_m)
                + w_img_m·(pos_m − no_image_m) + w_stg_m·(pos_m − stg_m)
    pred_m = ρ_m·(g_m·σ(pos_m)/σ(g_m)) + (1 − ρ_m)·g_m          (CFG rescale, ρ_m = guidance_rescale)

with ``w_iso_v = w_v``, ``w_iso_a = w_a``, ``σ`` the per-sample standard deviation over all non-batch
dims (diffusers' ``rescale_noise_cfg``; Lin et al. 2023 §3.4) and the branches

============  ==================================================  ===============================================
branch        model call                                          computed when
============  ==================================================  ===============================================
``pos``       mode ``full``, the condition                        always
``iso``       mode ``iso``, the condition                         w_v ≠ 0 or w_a ≠ 0
``no_text``   mode ``full``, text dropped                         w_txt_v/a ≠ 0 and the condition has text
``neg_text``  mode ``full``, negative-prompt text (+ pos image)   w_neg_v/a ≠ 0 and a negative prompt is given
``no_image``  mode ``full``, image dropped                        w_img_v/a ≠ 0 and the condition has an image
``stg``       mode ``full``, the condition, attention residual    w_stg_v/a ≠ 0 and ``stg_blocks`` is not empty
              of ``stg_blocks`` skipped (STG, Hyung et al. 2024;
              LTX-2's perturbed pass)
============  ==================================================  ===============================================

``iso_v`` (video blind to audio) and ``iso_a`` (audio blind to video) of the seed formula share ONE
``iso`` branch: an isolated modality computes exactly what it would with the other modality absent, so
the video output of ``iso`` equals that of ``iso_v`` and its audio output that of ``iso_a``.

The iso branch is only meaningful for a model trained with iso modes (``objective.iso_prob``, see
:mod:`jointdit.diffusion.flow`); :func:`build_guidance` zeroes ``w_v`` / ``w_a`` with a warning for a
model that never learned them.

A branch whose weights are all 0 is not computed; a branch identical to ``pos`` (no text to drop, no
image, no negative prompt) contributes exactly 0 and is skipped too. All computed branches go through
the model as ONE forward: the latents are repeated along the batch, each copy gets its own ``mode``,
its own ``Condition`` rows (per-sample drop flags) and its own ``skip_attention_blocks``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg
from torch import Tensor

from jointdit.diffusion.flow import IsoProb, trained_iso
from jointdit.models.conditioning import Condition

BRANCHES: tuple[str, ...] = ("pos", "iso", "no_text", "neg_text", "no_image", "stg")
# weight families: config key prefix -> branch it subtracts
FAMILIES: dict[str, str] = {"txt": "no_text", "neg": "neg_text", "img": "no_image", "stg": "stg"}
# what each guidance name honours ("iso" = w_v / w_a; "rescale" = guidance_rescale)
PRESET_FAMILIES: dict[str, tuple[str, ...]] = {
    "none": (),
    "cfg": ("txt", "neg", "img", "rescale"),
    "stg": ("txt", "neg", "img", "stg", "rescale"),
    "jointcfg": ("iso", "txt", "neg", "img", "stg", "rescale"),
    "ltx2": ("iso", "txt", "neg", "img", "stg", "rescale"),
}
GUIDANCE_CHOICES: tuple[str, ...] = tuple(PRESET_FAMILIES)


@dataclass
class Branch:
    """One guidance branch: name, attention mode, condition (None = every condition null), STG blocks."""

    name: str
    mode: str
    cond: Condition | None
    skip_blocks: tuple[int, ...] | None = None


def _has_text(cond: Condition | None) -> bool:
    return cond is not None and (cond.text_tokens is not None or cond.text_pooled is not None)


def _has_image(cond: Condition | None) -> bool:
    return cond is not None and cond.image is not None


def _rows(cond: Condition | None, batch: int) -> Condition | None:
    """``cond`` with explicit per-sample drop flags (so ``Condition.cat`` keeps each branch's own)."""
    if cond is None or all(v is None for v in (cond.text_tokens, cond.text_pooled, cond.image)):
        return None
    out = Condition(**{k: getattr(cond, k) for k in ("text_tokens", "text_pooled", "image", "drop_text", "drop_image")})
    dev = _device(out)
    if out.drop_text is None:
        out.drop_text = torch.zeros(batch, dtype=torch.bool, device=dev)
    if out.drop_image is None:
        out.drop_image = torch.zeros(batch, dtype=torch.bool, device=dev)
    return out


def _null(batch: int, device: torch.device) -> Condition:
    """A condition with no features and every sample dropped: the model's learned null, as rows that
    ``Condition.cat`` can stack beside branches that do carry features."""
    flags = torch.ones(batch, dtype=torch.bool, device=device)
    return Condition(drop_text=flags, drop_image=flags.clone())


def _pair(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one number or a (video, audio) pair, got {value!r}")
        return float(value[0]), float(value[1])
    return float(value), float(value)


class JointCFG:
    """JointCFG with per-modality weights, STG and CFG rescale (see the module docstring for the math).

    Args (``*_v`` / ``*_a`` override the shared value for video / audio):
        w_v, w_a: iso guidance of video, audio.
        w_txt, w_neg, w_img, w_stg: text, negative-prompt, image and STG weights for both modalities.
        stg_blocks: block indices whose attention residual the ``stg`` branch skips.
        guidance_rescale: CFG rescale factor ρ for both modalities (0 = off).

    Call it like the model: ``guidance(model, z_video, z_audio, t_video, t_audio, cond, neg_cond)``
    returns the guided ``(v_video, v_audio)``. ``neg_cond`` holds the negative prompt's CLIP text
    features (its image fields are ignored; the positive image is used).
    """

    def __init__(self, w_v: float = 0.0, w_a: float = 0.0, w_txt: float = 0.0, w_neg: float = 0.0,
                 w_img: float = 0.0, *, w_stg: float = 0.0,
                 w_txt_v: float | None = None, w_txt_a: float | None = None,
                 w_neg_v: float | None = None, w_neg_a: float | None = None,
                 w_img_v: float | None = None, w_img_a: float | None = None,
                 w_stg_v: float | None = None, w_stg_a: float | None = None,
                 stg_blocks: Sequence[int] = (), guidance_rescale: float = 0.0,
                 guidance_rescale_v: float | None = None, guidance_rescale_a: float | None = None) -> None:
        given = locals()

        def per(shared: float, v: float | None, a: float | None) -> tuple[float, float]:
            return (float(shared if v is None else v), float(shared if a is None else a))

        # weights[branch] = (video weight, audio weight)
        self.weights: dict[str, tuple[float, float]] = {"iso": (float(w_v), float(w_a))}
        for fam, branch in FAMILIES.items():
            self.weights[branch] = per(given[f"w_{fam}"], given[f"w_{fam}_v"], given[f"w_{fam}_a"])
        self.rescale = per(guidance_rescale, guidance_rescale_v, guidance_rescale_a)
        self.stg_blocks = tuple(int(b) for b in stg_blocks)
        for r in self.rescale:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"guidance_rescale must be in [0, 1], got {r}")

    @property
    def w_v(self) -> float:
        return self.weights["iso"][0]

    @property
    def w_a(self) -> float:
        return self.weights["iso"][1]

    def __repr__(self) -> str:
        parts = [f"{b}={w}" for b, w in self.weights.items() if any(w)]
        if self.weights["stg"] != (0.0, 0.0):
            parts.append(f"stg_blocks={list(self.stg_blocks)}")
        if any(self.rescale):
            parts.append(f"rescale={self.rescale}")
        return f"JointCFG({', '.join(parts)})"

    def active(self, branch: str) -> bool:
        return self.weights[branch] != (0.0, 0.0)

    def without(self, branch: str) -> JointCFG:
        """A copy with ``branch``'s weights set to 0 (so that branch is not computed)."""
        if branch not in self.weights:
            raise ValueError(f"unknown guidance branch {branch!r}; choose from {list(self.weights)}")
        out = copy.copy(self)
        out.weights = {**self.weights, branch: (0.0, 0.0)}
        return out

    # ------------------------------------------------------------------------------------------
    def branches(self, cond: Condition | None, neg_cond: Condition | None, batch: int) -> list[Branch]:
        """The branches this call computes, ``pos`` first; zero-weight and no-op branches are left out."""
        pos = _rows(cond, batch)
        out = [Branch("pos", "full", pos)]
        if self.active("iso"):
            out.append(Branch("iso", "iso", pos))
        if self.active("no_text") and _has_text(pos):
            out.append(Branch("no_text", "full", pos.with_drop(text=True)))
        if self.active("neg_text") and _has_text(neg_cond):
            dev = _device(neg_cond)
            neg = Condition(text_tokens=neg_cond.text_tokens, text_pooled=neg_cond.text_pooled,
                            image=None if pos is None else pos.image,
                            drop_text=torch.zeros(batch, dtype=torch.bool, device=dev),
                            drop_image=None if pos is None else pos.drop_image)
            out.append(Branch("neg_text", "full", _expand(neg, batch)))
        if self.active("no_image") and _has_image(pos):
            out.append(Branch("no_image", "full", pos.with_drop(image=True)))
        if self.active("stg") and self.stg_blocks:
            out.append(Branch("stg", "full", pos, self.stg_blocks))
        return out

    def combine(self, preds: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Apply the formula to per-branch predictions ``{name: (v_video, v_audio)}``.

        ``preds`` may name ``iso`` (used for both modalities) or ``iso_v`` / ``iso_a`` (the literal
        seed branches: video from ``iso_v``, audio from ``iso_a``). Absent branches contribute 0.
        """
        pos = preds["pos"]
        out = []
        for m in (0, 1):  # 0 = video, 1 = audio
            g = pos[m].clone()
            for branch, weights in self.weights.items():
                w = weights[m]
                if not w:
                    continue
                if branch == "iso":
                    literal = ("iso_v", "iso_a")[m]
                    other = preds[literal][m] if literal in preds else preds["iso"][m]
                elif branch in preds:
                    other = preds[branch][m]
                else:
                    continue
                g = g + w * (pos[m] - other)
            if self.rescale[m]:
                g = rescale_noise_cfg(g, pos[m], self.rescale[m])
            out.append(g)
        return out[0], out[1]

    def __call__(self, model, z_video: Tensor, z_audio: Tensor, t_video: Tensor, t_audio: Tensor,
                 cond: Condition | None = None, neg_cond: Condition | None = None, *,
                 video_times: Tensor | None = None, audio_times: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Guided velocities. ``video_times`` / ``audio_times`` (latent centre seconds, ``[T]`` or
        ``[B, T]``) are passed on to the model when given."""
        b = z_video.shape[0]
        branches = self.branches(cond, neg_cond, b)
        n = len(branches)
        extra: dict[str, Any] = {}
        if n == 1:
            if video_times is not None:
                extra["video_times"] = video_times
            if audio_times is not None:
                extra["audio_times"] = audio_times
            return model(z_video, z_audio, t_video, t_audio, branches[0].cond, "full", **extra)
        t_video = torch.as_tensor(t_video, device=z_video.device)
        t_audio = torch.as_tensor(t_audio, device=z_video.device)
        t_audio = t_audio.reshape(b, -1) if t_audio.ndim == 2 else t_audio.reshape(-1).expand(b)  # [B] or [B, La]
        t_video = t_video.reshape(b, -1)                                    # [B, 1] or [B, Tv]
        modes = [br.mode for br in branches for _ in range(b)]
        conds = [br.cond for br in branches]
        if all(c is None for c in conds):
            big_cond = None
        else:  # a branch without features (e.g. pos with no prompt beside a negative prompt) gets null rows
            dev = _device(next(c for c in conds if c is not None))
            big_cond = Condition.cat([_null(b, dev) if c is None else c for c in conds])
        for name, times in (("video_times", video_times), ("audio_times", audio_times)):
            if times is not None:
                times = torch.as_tensor(times)
                extra[name] = times.repeat(n, 1) if times.ndim == 2 else times
        if any(br.skip_blocks for br in branches):
            extra["skip_attention_blocks"] = [br.skip_blocks for br in branches for _ in range(b)]
        v, a = model(z_video.repeat(n, *([1] * (z_video.ndim - 1))),
                     z_audio.repeat(n, *([1] * (z_audio.ndim - 1))),
                     t_video.repeat(n, 1),
                     t_audio.repeat(n, *([1] * (t_audio.ndim - 1))), big_cond, modes, **extra)
        preds = {br.name: (vv, aa) for br, vv, aa in zip(branches, v.split(b), a.split(b))}
        return self.combine(preds)


def _device(cond: Condition) -> torch.device:
    return next(v for v in (cond.text_tokens, cond.text_pooled, cond.image, cond.drop_text, cond.drop_image)
                if v is not None).device


def _expand(cond: Condition, batch: int) -> Condition:
    """Broadcast a batch-1 condition (e.g. one negative prompt) to ``batch`` rows."""
    if cond.batch_size == batch:
        return cond
    if cond.batch_size != 1:
        raise ValueError(f"condition has {cond.batch_size} rows for a batch of {batch}")
    return Condition(**{k: (None if getattr(cond, k) is None else getattr(cond, k).expand(batch, *getattr(cond, k).shape[1:]))
                        for k in ("text_tokens", "text_pooled", "image", "drop_text", "drop_image")})


def build_guidance(cfg: Mapping[str, Any] | Any | None, iso_prob: IsoProb = None) -> JointCFG:
    """The ``guidance`` config group → a :class:`JointCFG`.

    ``name`` selects which weight families are honoured (:data:`PRESET_FAMILIES`): ``none`` none;
    ``cfg`` text, negative prompt, image, rescale; ``stg`` those plus STG; ``jointcfg`` / ``ltx2`` all,
    including the iso weights ``w_v`` / ``w_a``. A non-zero weight the name does not honour is ignored
    with a warning. ``w_txt`` etc. set both modalities; ``w_txt_v`` / ``w_txt_a`` etc. override one.

    ``iso_prob``: the ``objective.iso_prob`` the model was trained with (its export's ``iso_prob``;
    None, the default, = unknown or trained without iso modes). The iso branch of a modality whose iso
    mode never trained is unsupervised, so its weight is set to 0 with a warning — unless the config
    says ``allow_untrained_iso: true``. So the default guidance only uses branches the model learned.
    """
    if cfg is None:
        return JointCFG()
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    name = str(get("name", "jointcfg"))
    if name not in PRESET_FAMILIES:
        raise ValueError(f"unknown guidance name {name!r}; choose one of {', '.join(GUIDANCE_CHOICES)}")
    families = PRESET_FAMILIES[name]

    def num(key: str) -> float | None:
        value = get(key, None)
        return None if value is None else float(value)

    kwargs: dict[str, Any] = {}
    ignored: dict[str, float] = {}
    for key in ("w_v", "w_a"):
        value = num(key) or 0.0
        if "iso" in families:
            kwargs[key] = value
        elif value:
            ignored[key] = value
    for fam in FAMILIES:
        for key in (f"w_{fam}", f"w_{fam}_v", f"w_{fam}_a"):
            value = num(key)
            if value is None:
                continue
            if fam in families:
                kwargs[key] = value
            elif value:
                ignored[key] = value
    for key in ("guidance_rescale", "guidance_rescale_v", "guidance_rescale_a"):
        value = num(key)
        if value is not None:
            if "rescale" in families:
                kwargs[key] = value
            elif value:
                ignored[key] = value
    if ignored:
        warnings.warn(f"guidance={name} does not use {sorted(ignored)}; ignoring {ignored}", stacklevel=2)
    blocks = get("stg_blocks", None)
    if blocks is not None and "stg" in families:
        kwargs["stg_blocks"] = [int(b) for b in blocks]
    guidance = JointCFG(**kwargs)
    if guidance.active("stg") and not guidance.stg_blocks:
        warnings.warn("STG weights are set but stg_blocks is empty: the stg branch is not computed", stacklevel=2)

    if guidance.active("iso") and not bool(get("allow_untrained_iso", False)):
        video_ok, audio_ok = trained_iso(iso_prob)
        w_v, w_a = guidance.weights["iso"]
        drop = {k: w for k, w, ok in (("w_v", w_v, video_ok), ("w_a", w_a, audio_ok)) if w and not ok}
        if drop:
            warnings.warn(f"the model was not trained with an iso mode for {sorted(drop)} (iso_prob={iso_prob!r}); "
                          f"its iso branch is unsupervised, so {drop} is set to 0. Train with objective.iso_prob > 0, "
                          f"or set guidance.allow_untrained_iso=true to use it anyway", stacklevel=2)
            guidance.weights["iso"] = (0.0 if "w_v" in drop else w_v, 0.0 if "w_a" in drop else w_a)
    return guidance
