"""Guidance: the batched JointCFG equals the formula WRITTEN OUT BY HAND from separate model calls.

The references below never call ``JointCFG.combine`` (the code under test): each branch set has its own
hand-written sum, with a different weight for every (branch, modality), so a dropped weight, a weight
used for the wrong modality or a flipped sign changes the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import AUDIO_SHAPE, VIDEO_SHAPE, random_condition  # noqa: E402

from jointdit.config import compose  # noqa: E402
from jointdit.diffusion.guidance import JointCFG, build_guidance  # noqa: E402
from jointdit.diffusion.sampler import initial_noise, make_scheduler, sample_latents  # noqa: E402
from jointdit.models import Condition  # noqa: E402

# one distinct weight per (branch, modality)
W = dict(w_v=1.3, w_a=0.4, w_txt_v=1.7, w_txt_a=0.6, w_neg_v=0.9, w_neg_a=0.25, w_img_v=1.1, w_img_a=0.35,
         w_stg_v=0.8, w_stg_a=0.45)
STG_BLOCKS = (1,)


class CountingModel(torch.nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, zv, *args, **kwargs):
        self.calls.append(zv.shape[0])
        return self.model(zv, *args, **kwargs)


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    zv, za = torch.randn(b, *VIDEO_SHAPE, generator=g), torch.randn(b, *AUDIO_SHAPE, generator=g)
    tv = torch.rand(b, VIDEO_SHAPE[0], generator=g)
    tv[:, 0] = 0.0  # i2sv-like per-frame times
    ta = torch.rand(b, generator=g)
    return zv, za, tv, ta


def _flags(b):
    return dict(drop_text=torch.zeros(b, dtype=torch.bool), drop_image=torch.zeros(b, dtype=torch.bool))


def _neg_rows(neg, image, b):
    return Condition(neg.text_tokens.expand(b, -1, -1), neg.text_pooled.expand(b, -1), image, **_flags(b))


@torch.inference_mode()
def test_all_branches_batched_equal_hand_written_formula(tiny_loaded):
    zv, za, tv, ta = _inputs()
    cond, neg = random_condition(2, seed=3), random_condition(1, seed=4)
    g = JointCFG(**W, stg_blocks=STG_BLOCKS)
    counter = CountingModel(tiny_loaded)
    gv, ga = g(counter, zv, za, tv, ta, cond, neg)
    assert counter.calls == [2 * 6], "pos, iso, no_text, neg_text, no_image, stg must be ONE forward"

    m, b = tiny_loaded, 2
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **_flags(b))
    pos_v, pos_a = m(zv, za, tv, ta, pos_c, "full")
    iso_v = m(zv, za, tv, ta, pos_c, "iso_v")[0]         # the seed formula's literal branches
    iso_a = m(zv, za, tv, ta, pos_c, "iso_a")[1]
    nt_v, nt_a = m(zv, za, tv, ta, pos_c.with_drop(text=True), "full")
    ng_v, ng_a = m(zv, za, tv, ta, _neg_rows(neg, cond.image, b), "full")
    ni_v, ni_a = m(zv, za, tv, ta, pos_c.with_drop(image=True), "full")
    st_v, st_a = m(zv, za, tv, ta, pos_c, "full", skip_attention_blocks=list(STG_BLOCKS))
    ref_v = (pos_v + 1.3 * (pos_v - iso_v) + 1.7 * (pos_v - nt_v) + 0.9 * (pos_v - ng_v)
             + 1.1 * (pos_v - ni_v) + 0.8 * (pos_v - st_v))
    ref_a = (pos_a + 0.4 * (pos_a - iso_a) + 0.6 * (pos_a - nt_a) + 0.25 * (pos_a - ng_a)
             + 0.35 * (pos_a - ni_a) + 0.45 * (pos_a - st_a))
    torch.testing.assert_close(gv, ref_v, atol=2e-5, rtol=0)
    torch.testing.assert_close(ga, ref_a, atol=2e-5, rtol=0)
    # every branch really differs from pos, so the equality checks each term
    for name, (bv, ba) in {"iso": (iso_v, iso_a), "no_text": (nt_v, nt_a), "neg": (ng_v, ng_a),
                           "no_image": (ni_v, ni_a), "stg": (st_v, st_a)}.items():
        assert (pos_v - bv).abs().max() > 1e-3 and (pos_a - ba).abs().max() > 1e-3, name


@torch.inference_mode()
def test_shared_weights_text_and_image_cfg(tiny_loaded):
    """``w_txt`` / ``w_img`` (no ``_v``/``_a``) apply to both modalities; no iso, no negative prompt."""
    zv, za, tv, ta = _inputs(seed=1)
    cond = random_condition(2, seed=6)
    gv, ga = JointCFG(w_txt=2.5, w_img=0.7)(tiny_loaded, zv, za, tv, ta, cond, None)
    m, b = tiny_loaded, 2
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **_flags(b))
    pv, pa = m(zv, za, tv, ta, pos_c, "full")
    tv_, ta_ = m(zv, za, tv, ta, pos_c.with_drop(text=True), "full")
    iv, ia = m(zv, za, tv, ta, pos_c.with_drop(image=True), "full")
    torch.testing.assert_close(gv, pv + 2.5 * (pv - tv_) + 0.7 * (pv - iv), atol=2e-5, rtol=0)
    torch.testing.assert_close(ga, pa + 2.5 * (pa - ta_) + 0.7 * (pa - ia), atol=2e-5, rtol=0)


@torch.inference_mode()
def test_iso_only_uses_each_modalitys_own_weight(tiny_loaded):
    zv, za, tv, ta = _inputs(seed=2)
    cond = random_condition(2, seed=7)
    gv, ga = JointCFG(w_v=2.0, w_a=0.5)(tiny_loaded, zv, za, tv, ta, cond)
    m = tiny_loaded
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **_flags(2))
    pv, pa = m(zv, za, tv, ta, pos_c, "full")
    torch.testing.assert_close(gv, pv + 2.0 * (pv - m(zv, za, tv, ta, pos_c, "iso_v")[0]), atol=2e-5, rtol=0)
    torch.testing.assert_close(ga, pa + 0.5 * (pa - m(zv, za, tv, ta, pos_c, "iso_a")[1]), atol=2e-5, rtol=0)


@torch.inference_mode()
def test_negative_prompt_alone(tiny_loaded):
    """No positive prompt, no image: pred = null + w_neg·(null − neg). (It used to get the null condition
    in the negative branch too, so the negative prompt silently did nothing.)"""
    zv, za, tv, ta = _inputs(b=1, seed=3)
    neg = random_condition(1, seed=8)
    counter = CountingModel(tiny_loaded)
    gv, ga = JointCFG(w_neg=1.5)(counter, zv, za, tv, ta, None, neg)
    assert counter.calls == [2]
    m = tiny_loaded
    nv, na = m(zv, za, tv, ta, None, "full")
    negv, nega = m(zv, za, tv, ta, Condition(text_tokens=neg.text_tokens, text_pooled=neg.text_pooled), "full")
    assert (nv - negv).abs().max() > 1e-3
    torch.testing.assert_close(gv, nv + 1.5 * (nv - negv), atol=2e-5, rtol=0)
    torch.testing.assert_close(ga, na + 1.5 * (na - nega), atol=2e-5, rtol=0)


@torch.inference_mode()
def test_negative_prompt_with_image_only_condition(tiny_loaded):
    zv, za, tv, ta = _inputs(b=1, seed=4)
    image = random_condition(1, seed=9).image
    neg = random_condition(1, seed=10)
    gv, ga = JointCFG(w_neg=0.8, w_img=0.3)(tiny_loaded, zv, za, tv, ta, Condition(image=image), neg)
    m = tiny_loaded
    pv, pa = m(zv, za, tv, ta, Condition(image=image), "full")
    nv, na = m(zv, za, tv, ta, Condition(text_tokens=neg.text_tokens, text_pooled=neg.text_pooled, image=image), "full")
    iv, ia = m(zv, za, tv, ta, None, "full")
    torch.testing.assert_close(gv, pv + 0.8 * (pv - nv) + 0.3 * (pv - iv), atol=2e-5, rtol=0)
    torch.testing.assert_close(ga, pa + 0.8 * (pa - na) + 0.3 * (pa - ia), atol=2e-5, rtol=0)


@torch.inference_mode()
def test_guidance_rescale_matches_hand_written_std_ratio(tiny_loaded):
    zv, za, tv, ta = _inputs(seed=5)
    cond = random_condition(2, seed=11)
    rho_v, rho_a = 0.7, 0.3
    gv, ga = JointCFG(w_txt=3.0, guidance_rescale_v=rho_v, guidance_rescale_a=rho_a)(tiny_loaded, zv, za, tv, ta, cond)
    m = tiny_loaded
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **_flags(2))
    pv, pa = m(zv, za, tv, ta, pos_c, "full")
    nv, na = m(zv, za, tv, ta, pos_c.with_drop(text=True), "full")
    for got, p, n, rho in ((gv, pv, nv, rho_v), (ga, pa, na, rho_a)):
        cfg = p + 3.0 * (p - n)
        for i in range(2):  # per sample: std over every other dim (unbiased, as torch.std)
            ratio = p[i].std() / cfg[i].std()
            torch.testing.assert_close(got[i], rho * cfg[i] * ratio + (1 - rho) * cfg[i], atol=2e-5, rtol=0)
        assert (got - cfg).abs().max() > 1e-3  # it did rescale


@torch.inference_mode()
def test_times_are_passed_to_every_branch(tiny_loaded):
    zv, za, tv, ta = _inputs(seed=6)
    cond = random_condition(2, seed=12)
    times_v = torch.arange(VIDEO_SHAPE[0]) / 8.0 + 0.3
    times_a = torch.arange(AUDIO_SHAPE[1]) / 100.0
    gv, _ = JointCFG(w_txt=1.0)(tiny_loaded, zv, za, tv, ta, cond, video_times=times_v, audio_times=times_a)
    m = tiny_loaded
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **_flags(2))
    pv = m(zv, za, tv, ta, pos_c, "full", video_times=times_v, audio_times=times_a)[0]
    nv = m(zv, za, tv, ta, pos_c.with_drop(text=True), "full", video_times=times_v, audio_times=times_a)[0]
    torch.testing.assert_close(gv, pv + (pv - nv), atol=2e-5, rtol=0)


@torch.inference_mode()
def test_zero_weight_branches_are_skipped(tiny_loaded):
    zv, za, tv, ta = _inputs(b=1)
    cond, neg = random_condition(1), random_condition(1, seed=5)
    for weights, n in [({}, 1), ({"w_txt": 2.0}, 2), ({"w_txt_a": 2.0}, 2), ({"w_v": 1.0}, 2),
                       ({"w_v": 1.0, "w_a": 1.0}, 2), ({"w_neg": 1.0}, 2), ({"w_img": 1.0, "w_txt": 1.0}, 3),
                       ({"w_stg": 1.0}, 1), ({"w_stg": 1.0, "stg_blocks": [0]}, 2)]:
        counter = CountingModel(tiny_loaded)
        JointCFG(**weights)(counter, zv, za, tv, ta, cond, neg)
        assert counter.calls == [n], (weights, counter.calls)
    # without any condition, text/image/negative branches would equal pos: skipped
    counter = CountingModel(tiny_loaded)
    JointCFG(w_txt=2.0, w_img=1.0, w_neg=1.0)(counter, zv, za, tv, ta, None, None)
    assert counter.calls == [1]


@torch.inference_mode()
def test_zero_weights_equal_plain_sampling(tiny_loaded):
    """JointCFG with every weight 0 == a hand-written unguided Euler loop on the positive condition."""
    steps, seed = 4, 7
    cond = random_condition(1, seed=2)
    zero = build_guidance({"name": "jointcfg", "w_v": 0, "w_a": 0, "w_txt": 0, "w_neg": 0, "w_img": 0})
    zv, za = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=steps, seed=seed, guidance=zero, cond=cond,
                            neg_cond=random_condition(1, seed=9))
    xv, xa = initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, seed)
    ts = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        vv, va = tiny_loaded(xv, xa, ts[i].expand(1), ts[i].expand(1), cond, "full")
        xv, xa = xv + (ts[i + 1] - ts[i]) * vv, xa + (ts[i + 1] - ts[i]) * va
    torch.testing.assert_close(zv, xv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(za, xa, atol=1e-5, rtol=1e-5)
    guided = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=steps, seed=seed,
                            guidance=JointCFG(w_v=1.0, w_a=1.0, w_txt=1.0), cond=cond)
    assert (guided[0] - zv).abs().max() > 1e-3 and (guided[1] - za).abs().max() > 1e-3


def test_scheduler_sigmas_are_flow_times():
    s = make_scheduler(4)
    assert torch.allclose(s.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = make_scheduler(4, shift=3.0)
    # s·σ/(1+(s−1)σ) at σ = 0.75, 0.5, 0.25
    torch.testing.assert_close(shifted.sigmas, torch.tensor([1.0, 2.25 / 2.5, 1.5 / 2.0, 0.75 / 1.5, 0.0]))


# ----------------------------------------------------------------------------------------------
# build_guidance and the presets
# ----------------------------------------------------------------------------------------------
def test_build_guidance_names_and_per_modality_overrides():
    assert build_guidance({"name": "none", "w_txt": 3.0}).weights == JointCFG().weights
    with pytest.warns(UserWarning, match=r"guidance=cfg does not use \['w_stg', 'w_v'\]"):
        g = build_guidance({"name": "cfg", "w_v": 1.0, "w_txt": 3.0, "w_img": 0.5, "w_stg": 1.0})
    assert g.weights == {"iso": (0.0, 0.0), "no_text": (3.0, 3.0), "neg_text": (0.0, 0.0), "no_image": (0.5, 0.5),
                         "stg": (0.0, 0.0)}
    g = build_guidance({"name": "jointcfg", "w_v": 1.0, "w_a": 2.0, "w_txt": 3.0, "w_txt_a": 5.0, "w_img_v": 0.25},
                       iso_prob=0.2)
    assert g.weights["iso"] == (1.0, 2.0) and g.weights["no_text"] == (3.0, 5.0) and g.weights["no_image"] == (0.25, 0.0)
    with pytest.raises(ValueError, match="unknown guidance"):
        build_guidance({"name": "bogus"})
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        JointCFG(guidance_rescale=1.5)


@pytest.mark.parametrize("iso_prob,kept", [
    (None, (0.0, 0.0)), (0.0, (0.0, 0.0)), (0.2, (1.2, 1.2)), ({"iso": 0.1}, (1.2, 1.2)),
    ({"iso_v": 0.1}, (1.2, 0.0)), ({"iso_a": 0.1}, (0.0, 1.2)),
])
def test_untrained_iso_branches_are_zeroed(iso_prob, kept):
    cfg = {"name": "jointcfg", "w_v": 1.2, "w_a": 1.2, "w_txt": 1.5}
    if kept == (1.2, 1.2):
        g = build_guidance(cfg, iso_prob=iso_prob)
    else:
        with pytest.warns(UserWarning, match="not trained with an iso mode"):
            g = build_guidance(cfg, iso_prob=iso_prob)
    assert g.weights["iso"] == kept and g.weights["no_text"] == (1.5, 1.5)
    # explicitly allowed: kept, no check
    assert build_guidance({**cfg, "allow_untrained_iso": True}, iso_prob=None).weights["iso"] == (1.2, 1.2)


@pytest.mark.parametrize("preset,expect", [
    ("none", {}),
    ("cfg", {"no_text": (3.0, 3.0)}),
    ("jointcfg", {"iso": (1.2, 1.2), "no_text": (1.5, 1.5), "no_image": (1.0, 1.0)}),
    ("stg", {"no_text": (1.5, 1.5), "no_image": (1.0, 1.0), "stg": (1.0, 1.0)}),
    ("ltx2", {"iso": (2.0, 2.0), "no_text": (2.0, 6.0), "no_image": (1.0, 1.0), "stg": (1.0, 1.0)}),
])
def test_presets_compose_and_build(preset, expect):
    cfg = compose("sample", [f"guidance={preset}", "checkpoint=/x"])
    g = build_guidance(cfg.guidance, iso_prob=0.2)
    assert {k: v for k, v in g.weights.items() if any(v)} == expect
    if preset in ("stg", "ltx2"):
        assert g.stg_blocks == (-2,) and g.rescale == (0.7, 0.7)
