"""The training objective, checked against the rectified-flow definitions written out here by hand:
x_t = (1 − t)·x0 + t·ε, target ε − x0, logit-normal t (shifted by ln s), per-modality t, task masks
(the clean part sits at t = 0 with its data and carries no loss) and per-sample attention modes."""

from __future__ import annotations

import math

import pytest
import torch

from jointdit.diffusion.flow import (
    TASKS,
    FlowObjective,
    flow_loss,
    make_flow_batch,
    mode_probabilities,
    sample_modes,
    trained_iso,
)

B, TV, LA = 6, 5, 12


def clean(b=B, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, TV, 3, 2, 2, generator=g) if value is None else torch.full((b, TV, 3, 2, 2), value)
    audio = torch.randn(b, 1, LA, 4, generator=g) if value is None else torch.full((b, 1, LA, 4), -value)
    return video, audio


def tasks_of(*names):
    return torch.tensor([TASKS.index(n) for n in names])


def test_path_and_velocity_target():
    """x_t is the straight line from the data (t=0) to the noise (t=1) and the target is its velocity
    ε − x0. The noise is recovered as target + x0 and must be N(0, 1), independent of the data."""
    video, audio = clean(b=64, value=3.0)
    batch = make_flow_batch(video, audio, tasks_of(*["joint"] * 64), generator=torch.Generator().manual_seed(1))
    eps_v, eps_a = batch.target_video + video, batch.target_audio + audio
    tv = batch.t_video[:, :, None, None, None]
    ta = batch.t_audio[:, None, None, None]
    torch.testing.assert_close(batch.video, (1 - tv) * video + tv * eps_v)
    torch.testing.assert_close(batch.audio, (1 - ta) * audio + ta * eps_a)
    # ε ~ N(0, 1): data 3 / −3 shows up in the target's mean with the right sign
    assert abs(float(eps_v.mean())) < 0.1 and abs(float(eps_v.std()) - 1) < 0.1
    assert abs(float(eps_a.mean())) < 0.1 and abs(float(eps_a.std()) - 1) < 0.1
    assert abs(float(batch.target_video.mean()) + 3.0) < 0.1 and abs(float(batch.target_audio.mean()) - 3.0) < 0.1
    # d x_t / d t = target: moving t by δ along the same noise moves x_t by δ·target
    delta = 1e-3
    moved = (1 - (tv + delta)) * video + (tv + delta) * eps_v
    torch.testing.assert_close((moved - batch.video) / delta, batch.target_video, atol=2e-3, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_logit_normal_times_per_modality(shift):
    n = 4000
    video, audio = torch.zeros(n, 1, 1, 1, 1), torch.zeros(n, 1, 1, 1)
    batch = make_flow_batch(video, audio, torch.zeros(n, dtype=torch.long), mean=0.3, std=0.8,
                            generator=torch.Generator().manual_seed(2), shift_video=shift, shift_audio=1.0)
    logit_v = torch.logit(batch.t_video[:, 0].double())
    logit_a = torch.logit(batch.t_audio.double())
    assert abs(float(logit_v.mean()) - (0.3 + math.log(shift))) < 0.05 and abs(float(logit_v.std()) - 0.8) < 0.05
    assert abs(float(logit_a.mean()) - 0.3) < 0.05 and abs(float(logit_a.std()) - 0.8) < 0.05
    # each modality draws its own t
    assert float(torch.corrcoef(torch.stack([logit_v, logit_a]))[0, 1]) ** 2 < 0.01


def test_task_masks_clean_parts_are_data_at_t0_without_loss():
    video, audio = clean()
    names = ["joint", "a2v", "v2a", "i2sv", "joint", "a2v"]
    batch = make_flow_batch(video, audio, tasks_of(*names), generator=torch.Generator().manual_seed(3))
    assert batch.tasks == names
    w_v, w_a = batch.mask.loss_weights()                         # [B, Tv, 1, h, w], [B, 1, La, 1]
    frame_counted, clip_counted = w_v.amax(dim=(2, 3, 4)), w_a.amax(dim=(1, 2, 3))  # [B, Tv], [B]
    for i, name in enumerate(names):
        audio_clean = name == "a2v"
        video_clean = name == "v2a"
        if audio_clean:
            assert float(batch.t_audio[i]) == 0.0 and float(clip_counted[i]) == 0.0
            assert torch.equal(batch.audio[i], audio[i])
        else:
            assert 0 < float(batch.t_audio[i]) < 1 and torch.all(w_a[i] == 1)
            assert not torch.allclose(batch.audio[i], audio[i])
        if video_clean:
            assert torch.all(batch.t_video[i] == 0) and torch.all(w_v[i] == 0)
            assert torch.equal(batch.video[i], video[i])
        elif name == "i2sv":
            assert float(batch.t_video[i, 0]) == 0.0 and torch.all(w_v[i, 0] == 0)
            assert torch.equal(batch.video[i, 0], video[i, 0])
            assert torch.all(batch.t_video[i, 1:] == batch.t_video[i, 1]) and 0 < float(batch.t_video[i, 1]) < 1
            assert torch.all(frame_counted[i, 1:] == 1) and torch.all(w_v[i, 1:] == 1)
        else:
            assert torch.all(batch.t_video[i] == batch.t_video[i, 0]) and 0 < float(batch.t_video[i, 0]) < 1
            assert torch.all(w_v[i] == 1)


def test_flow_loss_is_the_masked_mse_and_ignores_clean_parts():
    video, audio = clean()
    names = ["joint", "a2v", "v2a", "i2sv", "joint", "i2sv"]
    batch = make_flow_batch(video, audio, tasks_of(*names), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    pv, pa = torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g)
    out = flow_loss(pv, pa, batch, weight_video=0.7, weight_audio=1.9)
    # by hand: video over counted frames (every frame but v2a samples and i2sv frame 0), audio over counted clips
    frames = [(i, f) for i, n in enumerate(names) for f in range(TV) if n != "v2a" and not (n == "i2sv" and f == 0)]
    clips = [i for i, n in enumerate(names) if n != "a2v"]
    lv = sum(float(((pv[i, f] - batch.target_video[i, f]) ** 2).mean()) for i, f in frames) / len(frames)
    la = sum(float(((pa[i] - batch.target_audio[i]) ** 2).mean()) for i in clips) / len(clips)
    assert float(out["loss_video"]) == pytest.approx(lv, rel=1e-5)
    assert float(out["loss_audio"]) == pytest.approx(la, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(0.7 * lv + 1.9 * la, rel=1e-5)
    # predictions on clean parts do not matter
    pv2, pa2 = pv.clone(), pa.clone()
    pv2[2] += 100.0
    pv2[3, 0] += 100.0
    pv2[5, 0] -= 100.0
    pa2[1] += 100.0
    assert float(flow_loss(pv2, pa2, batch, 0.7, 1.9)["loss"]) == pytest.approx(float(out["loss"]), rel=1e-6)
    # the exact target gives zero loss
    assert float(flow_loss(batch.target_video, batch.target_audio, batch)["loss"]) == 0.0


def test_attention_modes_are_drawn_per_sample():
    video, audio = clean()
    tasks = tasks_of(*["joint"] * B)
    plain = make_flow_batch(video, audio, tasks, generator=torch.Generator().manual_seed(6))
    zero = make_flow_batch(video, audio, tasks, generator=torch.Generator().manual_seed(6), iso_prob=0.0)
    assert plain.modes == zero.modes == ["full"] * B
    assert torch.equal(plain.video, zero.video) and torch.equal(plain.t_audio, zero.t_audio)
    # iso modes do not change the path: same noise and times, only the modes are drawn after them
    with_iso = make_flow_batch(video, audio, tasks, generator=torch.Generator().manual_seed(6), iso_prob=0.5)
    assert torch.equal(with_iso.video, plain.video) and torch.equal(with_iso.target_audio, plain.target_audio)
    assert with_iso.modes.count("iso") == 3 and with_iso.modes.count("full") == 3  # this seed's draw
    modes = sample_modes({"iso": 0.2, "iso_v": 0.1}, 20000, torch.Generator().manual_seed(7))
    freq = {m: modes.count(m) / len(modes) for m in ("full", "iso_v", "iso_a", "iso")}
    assert freq["iso_a"] == 0.0
    assert freq["iso"] == pytest.approx(0.2, abs=0.015) and freq["iso_v"] == pytest.approx(0.1, abs=0.015)
    assert freq["full"] == pytest.approx(0.7, abs=0.015)
    assert sample_modes(1.0, 5) == ["iso"] * 5


def test_mode_probabilities_and_trained_branches():
    assert mode_probabilities(0.2) == pytest.approx({"full": 0.8, "iso_v": 0.0, "iso_a": 0.0, "iso": 0.2})
    assert mode_probabilities(None)["full"] == 1.0
    assert trained_iso(0.2) == (True, True) and trained_iso(None) == (False, False)
    assert trained_iso({"iso_v": 0.1}) == (True, False) and trained_iso({"iso_a": 0.1}) == (False, True)
    with pytest.raises(ValueError, match="unknown attention mode"):
        mode_probabilities({"iso_video": 0.1})
    with pytest.raises(ValueError, match="sum to at most 1"):
        mode_probabilities({"iso": 0.7, "iso_v": 0.6})


def test_flow_loss_reports_per_mode_losses():
    video, audio = clean()
    batch = make_flow_batch(video, audio, tasks_of(*["joint"] * B), generator=torch.Generator().manual_seed(8))
    batch.modes = ["full", "iso", "full", "iso", "iso", "full"]
    pv, pa = torch.zeros_like(video), torch.zeros_like(audio)
    out = flow_loss(pv, pa, batch)
    per = [float((batch.target_video[i] ** 2).mean() + (batch.target_audio[i] ** 2).mean()) for i in range(B)]
    assert float(out["loss_mode_iso"]) == pytest.approx(sum(per[i] for i in (1, 3, 4)) / 3, rel=1e-5)
    assert float(out["loss_mode_full"]) == pytest.approx(sum(per[i] for i in (0, 2, 5)) / 3, rel=1e-5)
    assert math.isnan(float(out["loss_mode_iso_v"]))


def test_flow_objective_from_config_shifts_times_and_export():
    """The run-level objective: shifts from each modality's token count, the spec's latent times for RoPE, a
    validation batch with the fixed (unshifted, all-full) distribution, and the export entry."""
    from types import SimpleNamespace

    spec = SimpleNamespace(video_shape=(16, 48, 8, 8), audio_shape=(1, 200, 64), video_latent_fps=8.0,
                           audio_latent_fps=100.0, video_time_offset=0.0, audio_time_offset=0.0,
                           video_latent_times=lambda: torch.arange(16, dtype=torch.float64) / 8,
                           audio_latent_times=lambda: torch.arange(200, dtype=torch.float64) / 100)
    model_config = {"video_patch_size": (1, 1, 1), "audio_patch_size": (4, 16)}
    objective = {"logit_normal_mean": 0.0, "logit_normal_std": 1.0, "iso_prob": {"iso": 0.2},
                 "timestep_shift": {"method": "sd3", "reference_tokens": 256}}
    obj = FlowObjective.from_config(objective, model_config, spec)
    assert (obj.video_tokens, obj.audio_tokens) == (1024, 200)
    assert obj.shifts == pytest.approx((2.0, math.sqrt(200 / 256)))
    assert torch.equal(obj.model_kwargs()["video_times"], spec.video_latent_times())
    meta = obj.export_meta()
    assert meta["iso_prob"] == {"iso": 0.2} and meta["timestep_shift"]["shift_video"] == pytest.approx(2.0)
    assert meta["tasks"] == {"joint": 1.0}  # no objective.tasks: joint only
    n = 2000
    video, audio = torch.zeros(n, 1, 1, 1, 1), torch.zeros(n, 1, 1, 1)
    train = obj.batch(video, audio, torch.Generator().manual_seed(0))
    assert float(torch.logit(train.t_video[:, 0].double()).mean()) == pytest.approx(math.log(2.0), abs=0.07)
    assert 0.15 < train.modes.count("iso") / n < 0.25
    val = obj.validation_batch(video, audio, torch.Generator().manual_seed(0))
    assert abs(float(torch.logit(val.t_video[:, 0].double()).mean())) < 0.07 and set(val.modes) == {"full"}
    # no timestep_shift in the config: shift 1
    assert FlowObjective.from_config({"iso_prob": 0.0}, model_config, spec).shifts == (1.0, 1.0)
