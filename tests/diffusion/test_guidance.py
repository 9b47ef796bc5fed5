"""JointCFG: batched branches equal the literal one-after-another evaluation; zero weights skip branches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import AUDIO_SHAPE, VIDEO_SHAPE, random_condition  # noqa: E402

from jointdit.diffusion.guidance import JointCFG, build_guidance  # noqa: E402
from jointdit.diffusion.sampler import initial_noise, make_scheduler, sample_latents  # noqa: E402
from jointdit.models import Condition  # noqa: E402


def sequential_jointcfg(g: JointCFG, model, zv, za, tv, ta, cond, neg):
    """Reference: the seed formula, each branch its own model call (iso_v and iso_a separately)."""
    b = zv.shape[0]
    flags = dict(drop_text=torch.zeros(b, dtype=torch.bool), drop_image=torch.zeros(b, dtype=torch.bool))
    pos_c = Condition(cond.text_tokens, cond.text_pooled, cond.image, **flags)
    preds = {"pos": model(zv, za, tv, ta, pos_c, "full"),
             "iso_v": model(zv, za, tv, ta, pos_c, "iso_v"),
             "iso_a": model(zv, za, tv, ta, pos_c, "iso_a"),
             "no_text": model(zv, za, tv, ta, pos_c.with_drop(text=True), "full"),
             "neg_text": model(zv, za, tv, ta, Condition(neg.text_tokens.expand(b, -1, -1),
                                                          neg.text_pooled.expand(b, -1), cond.image, **flags), "full"),
             "no_image": model(zv, za, tv, ta, pos_c.with_drop(image=True), "full")}
    return g.combine(preds), preds


class CountingModel(torch.nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, zv, *args):
        self.calls.append(zv.shape[0])
        return self.model(zv, *args)


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    zv, za = torch.randn(b, *VIDEO_SHAPE, generator=g), torch.randn(b, *AUDIO_SHAPE, generator=g)
    tv = torch.rand(b, VIDEO_SHAPE[0], generator=g)
    tv[:, 0] = 0.0  # i2sv-like per-frame times
    ta = torch.rand(b, generator=g)
    return zv, za, tv, ta


@torch.inference_mode()
def test_batched_equals_sequential(tiny_loaded):
    g = JointCFG(w_v=1.2, w_a=0.7, w_txt=1.5, w_neg=0.5, w_img=1.0)
    zv, za, tv, ta = _inputs()
    cond, neg = random_condition(2, seed=3), random_condition(1, seed=4)
    counter = CountingModel(tiny_loaded)
    gv, ga = g(counter, zv, za, tv, ta, cond, neg)
    assert counter.calls == [2 * 5], "all branches must go through ONE forward (pos, iso, no_text, neg, no_image)"
    (rv, ra), preds = sequential_jointcfg(g, tiny_loaded, zv, za, tv, ta, cond, neg)
    torch.testing.assert_close(gv, rv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ga, ra, atol=1e-5, rtol=0)
    # every branch really differs from pos, so the equality above checks each term
    for name in ("iso_v", "no_text", "neg_text", "no_image"):
        assert (preds["pos"][0] - preds[name][0]).abs().max() > 1e-4, name
    assert (preds["pos"][1] - preds["iso_a"][1]).abs().max() > 1e-4
    assert (gv - preds["pos"][0]).abs().max() > 1e-3


@torch.inference_mode()
def test_zero_weight_branches_are_skipped(tiny_loaded):
    zv, za, tv, ta = _inputs(b=1)
    cond, neg = random_condition(1), random_condition(1, seed=5)
    for weights, n in [({}, 1), ({"w_txt": 2.0}, 2), ({"w_v": 1.0}, 2), ({"w_v": 1.0, "w_a": 1.0}, 2),
                       ({"w_neg": 1.0}, 2), ({"w_img": 1.0, "w_txt": 1.0}, 3)]:
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
    # and guidance actually changes the result
    guided = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=steps, seed=seed,
                            guidance=JointCFG(w_v=1.0, w_a=1.0, w_txt=1.0), cond=cond)
    assert (guided[0] - zv).abs().max() > 1e-3 and (guided[1] - za).abs().max() > 1e-3


def test_scheduler_sigmas_are_flow_times():
    s = make_scheduler(4)
    assert torch.allclose(s.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = make_scheduler(4, shift=3.0)
    assert shifted.sigmas[0] == 1.0 and shifted.sigmas[-1] == 0.0 and shifted.sigmas[2] > 0.5


def test_build_guidance_names():
    assert repr(build_guidance({"name": "none", "w_txt": 3.0})) == repr(JointCFG())
    with pytest.warns(UserWarning, match="only w_txt and w_img"):
        g = build_guidance({"name": "cfg", "w_v": 1.0, "w_txt": 3.0, "w_img": 0.5})
    assert (g.w_v, g.w_a, g.w_neg, g.w_txt, g.w_img) == (0.0, 0.0, 0.0, 3.0, 0.5)
    with pytest.raises(ValueError, match="unknown guidance"):
        build_guidance({"name": "bogus"})
