"""Guidance on JointDiT's velocity prediction: JointCFG, plain CFG and none.

JointCFG (the seed formula, applied to each modality's velocity; ``m ∈ {video, audio}``)::

    pred_m = pos_m + w_iso(m)·(pos_m − iso_m) + w_txt·(pos_m − no_text_m)
                   + w_neg·(pos_m − neg_text_m) + w_img·(pos_m − no_image_m)

with ``w_iso(video) = w_v``, ``w_iso(audio) = w_a`` and the branches

==============  =========================================  =====================================
branch          model call                                 used when
==============  =========================================  =====================================
``pos``         mode ``full``, the condition               always
``iso``         mode ``iso``, the condition                w_v ≠ 0 or w_a ≠ 0
``no_text``     mode ``full``, text dropped                w_txt ≠ 0 and the condition has text
``neg_text``    mode ``full``, negative-prompt text        w_neg ≠ 0 and a negative prompt is given
``no_image``    mode ``full``, image dropped               w_img ≠ 0 and the condition has an image
==============  =========================================  =====================================

``iso_v`` (video blind to audio) and ``iso_a`` (audio blind to video) of the seed formula share ONE
``iso`` branch: by the model contract an isolated modality computes exactly what it would with the
other modality absent, so the video output of ``iso`` equals that of ``iso_v`` and the audio output of
``iso`` equals that of ``iso_a`` (the tests check this against the literal two-branch evaluation).

A branch whose weight is 0 is not computed. A branch that would be identical to ``pos`` (no text to
drop, no image to drop, no negative prompt) contributes exactly 0 and is skipped too. All computed
branches go through the model as ONE forward: the latents are repeated along the batch, each copy
gets its own ``mode`` (per-sample mode list) and its own ``Condition`` rows (per-sample drop flags;
the negative prompt is ordinary text in its rows).

``guidance=cfg`` is the same formula with only ``w_txt`` and ``w_img`` (classifier-free guidance on
the text and image conditions); ``guidance=none`` evaluates ``pos`` alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jointdit.models.conditioning import Condition

BRANCHES: tuple[str, ...] = ("pos", "iso", "no_text", "neg_text", "no_image")
GUIDANCE_CHOICES: tuple[str, ...] = ("jointcfg", "cfg", "none")


@dataclass
class Branch:
    """One guidance branch: its name, attention mode and condition (None = every condition null)."""

    name: str
    mode: str
    cond: Condition | None


def _has_text(cond: Condition | None) -> bool:
    return cond is not None and (cond.text_tokens is not None or cond.text_pooled is not None)


def _has_image(cond: Condition | None) -> bool:
    return cond is not None and cond.image is not None


def _rows(cond: Condition | None, batch: int) -> Condition | None:
    """``cond`` with explicit per-sample drop flags (so ``Condition.cat`` keeps each branch's own)."""
    if cond is None or all(v is None for v in (cond.text_tokens, cond.text_pooled, cond.image)):
        return None
    out = Condition(**{k: getattr(cond, k) for k in ("text_tokens", "text_pooled", "image", "drop_text", "drop_image")})
    dev = next(v for v in (out.text_tokens, out.text_pooled, out.image) if v is not None).device
    if out.drop_text is None:
        out.drop_text = torch.zeros(batch, dtype=torch.bool, device=dev)
    if out.drop_image is None:
        out.drop_image = torch.zeros(batch, dtype=torch.bool, device=dev)
    return out


class JointCFG:
    """JointCFG with weights ``w_v, w_a, w_txt, w_neg, w_img`` (see the module docstring for the math).

    Call it like the model: ``guidance(model, z_video, z_audio, t_video, t_audio, cond, neg_cond)``
    returns the guided ``(v_video, v_audio)``. ``neg_cond`` holds the negative prompt's CLIP text
    features (its image fields are ignored; the positive image is used).
    """

    def __init__(self, w_v: float = 0.0, w_a: float = 0.0, w_txt: float = 0.0, w_neg: float = 0.0,
                 w_img: float = 0.0) -> None:
        self.w_v, self.w_a, self.w_txt, self.w_neg, self.w_img = (float(w) for w in (w_v, w_a, w_txt, w_neg, w_img))

    def __repr__(self) -> str:
        return (f"JointCFG(w_v={self.w_v}, w_a={self.w_a}, w_txt={self.w_txt}, w_neg={self.w_neg}, "
                f"w_img={self.w_img})")

    # ------------------------------------------------------------------------------------------
    def branches(self, cond: Condition | None, neg_cond: Condition | None, batch: int) -> list[Branch]:
        """The branches this call computes, ``pos`` first; zero-weight and no-op branches are left out."""
        pos = _rows(cond, batch)
        out = [Branch("pos", "full", pos)]
        if self.w_v or self.w_a:
            out.append(Branch("iso", "iso", pos))
        if self.w_txt and _has_text(pos):
            out.append(Branch("no_text", "full", pos.with_drop(text=True)))
        if self.w_neg and _has_text(neg_cond):
            neg = Condition(text_tokens=neg_cond.text_tokens, text_pooled=neg_cond.text_pooled,
                            image=None if pos is None else pos.image,
                            drop_text=torch.zeros(batch, dtype=torch.bool, device=_device(neg_cond)),
                            drop_image=None if pos is None else pos.drop_image)
            out.append(Branch("neg_text", "full", _expand(neg, batch)))
        if self.w_img and _has_image(pos):
            out.append(Branch("no_image", "full", pos.with_drop(image=True)))
        return out

    def combine(self, preds: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Apply the formula to per-branch predictions ``{name: (v_video, v_audio)}``.

        ``preds`` may name ``iso`` (used for both modalities) or ``iso_v`` / ``iso_a`` (the literal
        seed branches: video from ``iso_v``, audio from ``iso_a``).
        """
        pv, pa = preds["pos"]
        gv, ga = pv.clone(), pa.clone()
        if self.w_v:
            iso_v = preds["iso_v"][0] if "iso_v" in preds else preds["iso"][0]
            gv = gv + self.w_v * (pv - iso_v)
        if self.w_a:
            iso_a = preds["iso_a"][1] if "iso_a" in preds else preds["iso"][1]
            ga = ga + self.w_a * (pa - iso_a)
        for name, w in (("no_text", self.w_txt), ("neg_text", self.w_neg), ("no_image", self.w_img)):
            if w and name in preds:
                bv, ba = preds[name]
                gv = gv + w * (pv - bv)
                ga = ga + w * (pa - ba)
        return gv, ga

    def __call__(self, model, z_video: Tensor, z_audio: Tensor, t_video: Tensor, t_audio: Tensor,
                 cond: Condition | None = None, neg_cond: Condition | None = None) -> tuple[Tensor, Tensor]:
        b = z_video.shape[0]
        branches = self.branches(cond, neg_cond, b)
        n = len(branches)
        if n == 1:
            return model(z_video, z_audio, t_video, t_audio, branches[0].cond, "full")
        t_video = torch.as_tensor(t_video, device=z_video.device)
        t_audio = torch.as_tensor(t_audio, device=z_video.device)
        t_audio = t_audio.reshape(b, -1) if t_audio.ndim == 2 else t_audio.reshape(-1).expand(b)  # [B] or [B, La]
        t_video = t_video.reshape(b, -1)                                    # [B, 1] or [B, Tv]
        modes = [br.mode for br in branches for _ in range(b)]
        conds = [br.cond for br in branches]
        big_cond = None if conds[0] is None else Condition.cat(conds)
        v, a = model(z_video.repeat(n, *([1] * (z_video.ndim - 1))),
                     z_audio.repeat(n, *([1] * (z_audio.ndim - 1))),
                     t_video.repeat(n, 1),
                     t_audio.repeat(n, *([1] * (t_audio.ndim - 1))), big_cond, modes)
        preds = {br.name: (vv, aa) for br, vv, aa in zip(branches, v.split(b), a.split(b))}
        return self.combine(preds)


def _device(cond: Condition) -> torch.device:
    return next(v for v in (cond.text_tokens, cond.text_pooled, cond.image) if v is not None).device


def _expand(cond: Condition, batch: int) -> Condition:
    """Broadcast a batch-1 condition (e.g. one negative prompt) to ``batch`` rows."""
    if cond.batch_size == batch:
        return cond
    if cond.batch_size != 1:
        raise ValueError(f"condition has {cond.batch_size} rows for a batch of {batch}")
    return Condition(**{k: (None if getattr(cond, k) is None else getattr(cond, k).expand(batch, *getattr(cond, k).shape[1:]))
                        for k in ("text_tokens", "text_pooled", "image", "drop_text", "drop_image")})


def build_guidance(cfg: Mapping[str, Any] | Any | None) -> JointCFG:
    """The ``guidance`` config group → a :class:`JointCFG`.

    ``name=jointcfg`` uses all five weights; ``name=cfg`` uses only ``w_txt`` and ``w_img`` (others are
    ignored with a warning when non-zero); ``name=none`` uses none.
    """
    if cfg is None:
        return JointCFG()
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    name = str(get("name", "jointcfg"))
    w = {k: float(get(k, 0.0) or 0.0) for k in ("w_v", "w_a", "w_txt", "w_neg", "w_img")}
    if name == "jointcfg":
        return JointCFG(**w)
    if name == "cfg":
        ignored = {k: v for k, v in w.items() if k in ("w_v", "w_a", "w_neg") and v}
        if ignored:
            warnings.warn(f"guidance=cfg uses only w_txt and w_img; ignoring {ignored}", stacklevel=2)
        return JointCFG(w_txt=w["w_txt"], w_img=w["w_img"])
    if name == "none":
        return JointCFG()
    raise ValueError(f"unknown guidance name {name!r}; choose one of {', '.join(GUIDANCE_CHOICES)}")
