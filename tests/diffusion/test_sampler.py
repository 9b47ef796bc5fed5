"""The flow-ODE solver alone (pure tensors): determinism, seed batches, fixed conditions, schedules, cancel.

The oracles are hand-written Euler loops over the flow times ``t_i`` (independent of diffusers'
scheduler), and the conditioning inputs themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import AUDIO_SHAPE, VIDEO_SHAPE, random_condition  # noqa: E402

from jointdit.diffusion.guidance import JointCFG  # noqa: E402
from jointdit.diffusion.sampler import SamplingCancelled, initial_noise, sample_latents  # noqa: E402


def _euler(model, xv, xa, ts_v, ts_a, *, fixed_v=False, fixed_a=False, first=None):
    """x_{i+1} = x_i + (t_{i+1} − t_i)·v(x_i, t_i) with per-modality flow times; no guidance."""
    b, tv = xv.shape[:2]
    for i in range(len(ts_v) - 1):
        t_v = torch.zeros(b, tv) if fixed_v else torch.full((b, tv), float(ts_v[i]))
        if first is not None:
            t_v[:, 0] = 0.0
        t_a = torch.zeros(b) if fixed_a else torch.full((b,), float(ts_a[i]))
        vv, va = model(xv, xa, t_v, t_a, None, "full")
        if not fixed_v:
            xv = xv + (ts_v[i + 1] - ts_v[i]) * vv
            if first is not None:
                xv[:, 0] = first
        if not fixed_a:
            xa = xa + (ts_a[i + 1] - ts_a[i]) * va
    return xv, xa


def _shifted(steps: int, s: float) -> torch.Tensor:
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (s * t / (1 + (s - 1) * t)).float()


@torch.inference_mode()
def test_same_seed_same_output(tiny_loaded):
    g = JointCFG(w_v=1.0, w_a=1.0)
    a = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=11, guidance=g)
    b = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=11, guidance=g)
    c = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=12, guidance=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0] - c[0]).abs().max() > 1e-2 and (a[1] - c[1]).abs().max() > 1e-2


@torch.inference_mode()
def test_shifted_schedules_match_a_hand_written_euler_loop(tiny_loaded):
    steps, seed = 3, 4
    zv, za = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=steps, seed=seed, guidance=JointCFG(),
                            shift_video=3.0, shift_audio=0.5)
    xv, xa = initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, seed)
    ov, oa = _euler(tiny_loaded, xv, xa, _shifted(steps, 3.0), _shifted(steps, 0.5))
    torch.testing.assert_close(zv, ov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(za, oa, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_batch_of_seeds_equals_each_seed_alone(tiny_loaded):
    g = JointCFG(w_v=0.5, w_a=0.5)
    zv, za = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=2, seed=[5, 6], guidance=g)
    assert zv.shape == (2, *VIDEO_SHAPE) and za.shape == (2, *AUDIO_SHAPE)
    for k, seed in enumerate([5, 6]):
        v, a = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=2, seed=seed, guidance=g)
        torch.testing.assert_close(zv[k:k + 1], v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(za[k:k + 1], a, atol=1e-5, rtol=1e-5)
    # noise= is the same as the seed's noise
    v, a = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=2, noise=initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, 6),
                          guidance=g)
    torch.testing.assert_close(zv[1:], v, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("task", ["i2sv", "a2v", "v2a"])
def test_conditioning_latents_stay_fixed(task, tiny_loaded):
    """The conditioning part comes back exactly as given, and the rest follows the plain Euler loop."""
    g = torch.Generator().manual_seed(1)
    video = torch.randn(1, *VIDEO_SHAPE, generator=g)
    audio = torch.randn(1, *AUDIO_SHAPE, generator=g)
    kw = {"i2sv": {"first_frame": video[:, 0]}, "a2v": {"audio_latent": audio}, "v2a": {"video_latent": video}}[task]
    zv, za = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=2, seed=3, task=task, guidance=JointCFG(), **kw)
    xv, xa = initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, 3)
    ts = torch.linspace(1, 0, 3)
    if task == "i2sv":
        xv[:, 0] = video[:, 0]
        ov, oa = _euler(tiny_loaded, xv, xa, ts, ts, first=video[:, 0])
        assert torch.equal(zv[:, 0], video[:, 0])
    elif task == "a2v":
        ov, oa = _euler(tiny_loaded, xv, audio, ts, ts, fixed_a=True)
        assert torch.equal(za, audio)
    else:
        ov, oa = _euler(tiny_loaded, video, xa, ts, ts, fixed_v=True)
        assert torch.equal(zv, video)
    torch.testing.assert_close(zv, ov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(za, oa, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("task, params", [("extend_v", {"seconds_given": 0.5}),
                                          ("inpaint_a", {"span": (0.2, 0.6)})])
def test_partial_conditions_follow_the_mask(task, params, tiny_loaded):
    """extend_v keeps the first 0.5 s of video (4 of 8 latent frames); inpaint_a regenerates 0.2–0.6 s of
    audio (the steps meeting it, j/100 ± 5 ms: 20..60, widened to whole patches of 4: 20..64) and keeps the
    rest. Oracle: an Euler loop with per-frame / per-step times, written out here."""
    g = torch.Generator().manual_seed(2)
    video, audio = torch.randn(1, *VIDEO_SHAPE, generator=g), torch.randn(1, *AUDIO_SHAPE, generator=g)
    kw = {"video_latent": video} if task == "extend_v" else {"audio_latent": audio}
    zv, za = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=2, seed=5, task=task, guidance=JointCFG(),
                            mask_params=params, **kw)
    xv, xa = initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, 5)
    keep_v = torch.zeros(VIDEO_SHAPE[0], dtype=torch.bool)
    keep_a = torch.zeros(AUDIO_SHAPE[1], dtype=torch.bool)
    if task == "extend_v":
        keep_v[:4] = True
    else:
        keep_a[:] = True
        keep_a[20:64] = False
    xv[:, keep_v], xa[:, :, keep_a] = video[:, keep_v], audio[:, :, keep_a]
    ts = torch.linspace(1, 0, 3)
    for i in range(2):
        t_v = torch.full((1, VIDEO_SHAPE[0]), float(ts[i]))
        t_v[:, keep_v] = 0
        t_a = torch.full((1, AUDIO_SHAPE[1]), float(ts[i]))
        t_a[:, keep_a] = 0
        vv, va = tiny_loaded(xv, xa, t_v, t_a if task == "inpaint_a" else t_a[:, 0], None, "full")
        xv, xa = xv + (ts[i + 1] - ts[i]) * vv, xa + (ts[i + 1] - ts[i]) * va
        xv[:, keep_v], xa[:, :, keep_a] = video[:, keep_v], audio[:, :, keep_a]
    torch.testing.assert_close(zv, xv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(za, xa, atol=1e-5, rtol=1e-5)
    assert torch.equal(zv[:, keep_v], video[:, keep_v]) and torch.equal(za[:, :, keep_a], audio[:, :, keep_a])
    with pytest.raises(ValueError, match=f"task={task} needs the encoded conditioning"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1, seed=5, task=task, mask_params=params)


@torch.inference_mode()
def test_callback_sees_every_step_and_can_cancel(tiny_loaded):
    seen = []
    sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=0, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    with pytest.raises(SamplingCancelled, match="after step 2 of 5"):
        sample_latents(Counting(tiny_loaded), VIDEO_SHAPE, AUDIO_SHAPE, steps=5, seed=0, callback=lambda i, n: i == 2)
    assert len(calls) == 2  # no model call after the stop


def test_bad_inputs_are_named(tiny_loaded):
    with pytest.raises(ValueError, match="extend_v needs seconds_given > 0"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1, seed=0, task="extend_v",
                       video_latent=torch.zeros(1, *VIDEO_SHAPE))
    with pytest.raises(ValueError, match="unknown task 'x2y'"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1, seed=0, task="x2y")
    with pytest.raises(ValueError, match="a2v needs the encoded conditioning audio"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1, seed=0, task="a2v")
    with pytest.raises(ValueError, match=r"the audio latent has shape \(1, 1, 50, 64\)"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1, seed=0, task="a2v",
                       audio_latent=torch.zeros(1, 1, 50, 64))
    with pytest.raises(ValueError, match="exactly one of seed"):
        sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=1)


@torch.inference_mode()
@pytest.mark.parametrize("task", ["t2v", "t2a"])
def test_single_stream_tasks_isolate_every_guidance_branch(task, tiny_loaded):
    """t2v / t2a: every branch runs with the present stream blind to the absent one (t2v: ``iso_v``, t2a:
    ``iso_a``), the absent stream stays at its noise with t = 1, and JointCFG's iso branch (identically 0
    there) is not computed. Oracle, written out: Euler on ``pos + w_txt·(pos − no_text)`` with both model
    calls made one at a time in the isolated mode."""
    w_txt, steps, seed = 2.0, 2, 7
    cond = random_condition(1, seed=3)
    rows: list[tuple[int, object]] = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, z_v, z_a, t_v, t_a, c=None, mode="full", **kw):
            rows.append((z_v.shape[0], [mode] * z_v.shape[0] if isinstance(mode, str) else list(mode)))
            return self.inner(z_v, z_a, t_v, t_a, c, mode, **kw)

    zv, za = sample_latents(Recording(tiny_loaded), VIDEO_SHAPE, AUDIO_SHAPE, steps=steps, seed=seed, task=task,
                            guidance=JointCFG(w_v=1.5, w_a=1.5, w_txt=w_txt), cond=cond)
    isolated = "iso_v" if task == "t2v" else "iso_a"
    assert rows == [(2, [isolated] * 2)] * steps  # pos + no_text as one batch; no iso branch
    xv, xa = initial_noise(VIDEO_SHAPE, AUDIO_SHAPE, seed)
    noise_v, noise_a = xv.clone(), xa.clone()
    ts = torch.linspace(1, 0, steps + 1)
    no_text = random_condition(1, seed=3)
    no_text.drop_text = torch.ones(1, dtype=torch.bool)
    cond.drop_text, cond.drop_image = torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    no_text.drop_image = torch.zeros(1, dtype=torch.bool)
    for i in range(steps):
        t_v = torch.full((1, VIDEO_SHAPE[0]), float(ts[i])) if task == "t2v" else torch.ones(1, VIDEO_SHAPE[0])
        t_a = torch.full((1,), float(ts[i])) if task == "t2a" else torch.ones(1)
        pos = tiny_loaded(xv, xa, t_v, t_a, cond, isolated)
        drop = tiny_loaded(xv, xa, t_v, t_a, no_text, isolated)
        guided = [p + w_txt * (p - d) for p, d in zip(pos, drop)]
        if task == "t2v":
            xv = xv + (ts[i + 1] - ts[i]) * guided[0]
        else:
            xa = xa + (ts[i + 1] - ts[i]) * guided[1]
    torch.testing.assert_close(zv, xv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(za, xa, atol=1e-5, rtol=1e-5)
    assert torch.equal(za if task == "t2v" else zv, noise_a if task == "t2v" else noise_v)  # the absent stream
