"""One objective path for every task: ``FlowObjective.batch`` → ``make_flow_batch`` → ``flow_loss``.

Oracles written out here, not taken from the code under test:
- which latents each task gives, as index ranges worked out by hand from the rates and patches below;
- the path ``x_t = (1 − t)·x0 + t·ε`` and target ``ε − x0`` element by element, with one ``t`` per sample
  and modality on generated latents, ``t = 0`` (x_t = x0) on given ones, ``t = 1`` (x_t = ε) on an absent stream;
- the loss as the masked mean over generated elements only;
- iso modes drawn at the configured rate in every task (t2v / t2a restrict them further);
- the resolution-aware shift in every task: logit(t) ~ N(mean + ln s_m, std) for each generated modality.
"""

from __future__ import annotations

import math

import pytest
import torch

from jointdit.diffusion.flow import FlowObjective, flow_loss, make_flow_batch
from jointdit.diffusion.masks import MODES, Geometry, expand_mask, sampling_mask
from jointdit.diffusion.schedule import ShiftRule

# 1 s clip: 8 latent video frames of 4x4 at 8 fps (patch 1x2x2), 100 audio steps at 100 Hz of 16 bins (patch 4)
VIDEO, AUDIO = (8, 3, 4, 4), (1, 100, 16)
GEOM = Geometry.of(VIDEO, AUDIO, 8.0, 100.0, video_patch=(1, 2, 2), audio_patch=(4, 8))
MEAN, STD, ISO = 0.2, 0.7, 0.3
SHIFT_V, SHIFT_A = 2.0, 0.5  # sd3: sqrt(1024 / 256), sqrt(64 / 256)


def objective(**kw) -> FlowObjective:
    return FlowObjective(mean=MEAN, std=STD, iso_prob=ISO, shift_rule=ShiftRule(method="sd3", reference_tokens=256),
                         video_tokens=1024, audio_tokens=64, geometry=GEOM, tasks={m: 1.0 for m in MODES}, **kw)


def given_by_hand(mode: str) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(video given [Tv, hv, wv], audio given [La], video present, audio present) for the cases below."""
    v, a = torch.zeros(8, 4, 4, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    if mode == "a2v":
        a[:] = True
    elif mode == "v2a":
        v[:] = True
    elif mode == "i2sv":
        v[0] = True
    elif mode == "extend_v":       # frame j covers j/8 ± 1/16 s: frames 0, 1 lie wholly inside [0, 0.3)
        v[:2] = True
    elif mode == "extend_a":       # steps j/100 ± 5 ms: 30 inside, narrowed to patches of 4 → 28; both: frames 0, 1
        a[:28], v[:2] = True, True
    elif mode == "inpaint_v":      # box rows 1.2..2, cols 0..2 → rows 0..2 (patch 2), cols 0..2 regenerated
        v[:] = True
        v[:, 0:2, 0:2] = False
    elif mode == "inpaint_a":      # span 0.205..0.41 s meets steps 20..41 → 20..44 (patch 4) regenerated
        a[:] = True
        a[20:44] = False
    return v, a, mode != "t2a", mode != "t2v"


PARAMS = {"extend_v": {"seconds_given": 0.3}, "extend_a": {"seconds_given": 0.3, "both": True},
          "inpaint_v": {"region": (0.3, 0.0, 0.5, 0.5)}, "inpaint_a": {"span": (0.205, 0.41)}}


def per_element_t(t_video: torch.Tensor, t_audio: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's timesteps broadcast to ``[B, Tv, hv, wv]`` and ``[B, La]``."""
    tv = t_video.reshape(b, 8, -1).expand(b, 8, 16).reshape(b, 8, 4, 4)
    ta = t_audio.reshape(b, -1).expand(b, 100)
    return tv, ta


@pytest.mark.parametrize("mode", MODES)
def test_path_target_and_given_parts_of_every_task(mode):
    b = 16
    g = torch.Generator().manual_seed(0)
    x0_v, x0_a = torch.randn(b, *VIDEO, generator=g), torch.randn(b, *AUDIO, generator=g)
    mask = expand_mask(sampling_mask(mode, GEOM, **PARAMS.get(mode, {})), b)
    sv, sa = objective().shifts
    assert (sv, sa) == pytest.approx((SHIFT_V, SHIFT_A))
    fb = make_flow_batch(x0_v, x0_a, mask, MEAN, STD, torch.Generator().manual_seed(1), iso_prob=ISO,
                         shift_video=sv, shift_audio=sa)
    v_given, a_given, v_present, a_present = given_by_hand(mode)
    assert torch.equal(fb.mask.video, v_given.expand(b, 8, 4, 4)) and torch.equal(fb.mask.audio, a_given.expand(b, 100))
    eps_v, eps_a = fb.target_video + x0_v, fb.target_audio + x0_a             # the noise the batch drew
    tv, ta = per_element_t(fb.t_video, fb.t_audio, b)
    gv = v_given[None, :, None].expand(b, *VIDEO)                            # [B, Tv, Cv, hv, wv]
    ga = a_given[None, None, :, None].expand(b, *AUDIO)                      # [B, Ca, La, Fa]
    for x_t, x0, eps, given, t, present, elem in ((fb.video, x0_v, eps_v, gv, tv, v_present, v_given),
                                                  (fb.audio, x0_a, eps_a, ga, ta, a_present, a_given)):
        if not present:                                   # absent: pure noise at t = 1
            torch.testing.assert_close(x_t, eps, rtol=0, atol=1e-6)
            assert bool((t == 1).all())
            continue
        assert torch.equal(x_t[given], x0[given]) and bool((t[:, elem] == 0).all())
        gen = ~given
        if gen.any():
            # one t per sample on the generated part, in (0, 1), and x_t − x0 = t·(ε − x0) there
            tau = t[:, ~elem].reshape(b, -1)
            assert bool((tau == tau[:, :1]).all()) and bool(((tau > 0) & (tau < 1)).all())
            expect = (1 - tau[:, 0]).reshape(b, *[1] * (x0.ndim - 1)) * x0 + tau[:, 0].reshape(b, *[1] * (x0.ndim - 1)) * eps
            torch.testing.assert_close(x_t[gen], expect[gen], rtol=0, atol=1e-6)

    # the loss: masked mean over generated elements of present streams, written out by hand
    pred_v, pred_a = torch.randn(b, *VIDEO, generator=g), torch.randn(b, *AUDIO, generator=g)
    counted_v = ~gv if v_present else torch.zeros_like(gv)
    counted_a = ~ga if a_present else torch.zeros_like(ga)
    lv = ((pred_v - fb.target_video) ** 2)[counted_v].mean() if counted_v.any() else torch.tensor(0.0)
    la = ((pred_a - fb.target_audio) ** 2)[counted_a].mean() if counted_a.any() else torch.tensor(0.0)
    out = flow_loss(pred_v, pred_a, fb, weight_video=0.7, weight_audio=1.9)
    torch.testing.assert_close(out["loss"], 0.7 * lv + 1.9 * la, rtol=1e-5, atol=1e-7)
    # predictions on given / absent latents change nothing
    moved = flow_loss(pred_v + 50.0 * ~counted_v, pred_a + 50.0 * ~counted_a, fb, 0.7, 1.9)
    assert torch.equal(moved["loss"], out["loss"])
    assert math.isfinite(float(out[f"loss_{mode}"])) and all(
        math.isnan(float(out[f"loss_{m}"])) for m in MODES if m != mode)


@pytest.mark.parametrize("mode", MODES)
def test_objective_draws_iso_modes_and_applies_the_shift_in_every_task(mode):
    n = 1500
    x0_v, x0_a = torch.zeros(n, *VIDEO), torch.zeros(n, *AUDIO)
    fb = objective().batch(x0_v, x0_a, torch.Generator().manual_seed(2), tasks=[mode] * n)
    assert fb.tasks == [mode] * n
    # iso modes at ISO; t2v's video never sees audio (full → iso_v, iso_a → iso), t2a likewise
    rest = {"t2v": "iso_v", "t2a": "iso_a"}.get(mode, "full")
    assert set(fb.modes) <= {rest, "iso"}
    assert fb.modes.count("iso") / n == pytest.approx(ISO, abs=0.04)
    # the shifted logit-normal on every generated modality: logit(t) ~ N(MEAN + ln s, STD)
    tv, ta = per_element_t(fb.t_video, fb.t_audio, n)
    w_v, w_a = fb.mask.loss_weights()                         # 1 on generated latents
    for t, counted, shift in ((tv, w_v[:, :, 0] > 0, SHIFT_V), (ta, w_a[:, 0, :, 0] > 0, SHIFT_A)):
        rows = counted.reshape(n, -1).any(1)
        if not rows.any():
            continue
        tau = torch.stack([t[i][counted[i]][0] for i in range(n) if rows[i]]).double()
        logit = torch.logit(tau)
        assert float(logit.mean()) == pytest.approx(MEAN + math.log(shift), abs=0.08)
        assert float(logit.std()) == pytest.approx(STD, abs=0.06)


def test_objective_task_mix_and_drawn_spans():
    """Tasks are drawn from the mix; drawn extension prefixes stay within [extend_min, extend_max] of the clip."""
    n = 3000
    fb = objective().batch(torch.zeros(n, *VIDEO), torch.zeros(n, *AUDIO), torch.Generator().manual_seed(3))
    for mode in MODES:
        assert fb.tasks.count(mode) / n == pytest.approx(1 / len(MODES), abs=0.02)
    frames = [int(fb.mask.video[i].all(dim=(1, 2)).sum()) for i in range(n) if fb.tasks[i] == "extend_v"]
    # k ∈ [0.2, 0.7] s; frame j covers j/8 ± 1/16 s, so [0, k) holds floor(8k + ½) whole frames: 2 .. 6
    assert min(frames) >= 2 and max(frames) <= 6 and len(set(frames)) >= 4


def test_a_step_is_a_function_of_its_generator():
    obj = objective()
    x0_v, x0_a = torch.randn(6, *VIDEO), torch.randn(6, *AUDIO)
    a = obj.batch(x0_v, x0_a, torch.Generator().manual_seed(9))
    b = obj.batch(x0_v, x0_a, torch.Generator().manual_seed(9))
    c = obj.batch(x0_v, x0_a, torch.Generator().manual_seed(10))
    assert a.tasks == b.tasks and a.modes == b.modes and torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
    assert not torch.equal(a.video, c.video)
