"""Conditioning masks: every mode's given part is clean (x_t = x0, t = 0), excluded from the loss and
held exactly while sampling; the mask is snapped to patches; the model takes per-position / per-step
times. Expected index ranges are worked out by hand from the rates below, not from the code."""

from __future__ import annotations

import math

import pytest
import torch

from jointdit.diffusion import masks as M
from jointdit.diffusion.flow import MODES, flow_loss, make_flow_batch, sample_tasks
from jointdit.diffusion.sampler import integrate
from jointdit.models import build_model

# 1 s clip: 8 latent video frames of 4x4 at 8 fps, 100 audio steps at 100 Hz of 16 mel bins
VIDEO, AUDIO = (2, 8, 3, 4, 4), (2, 1, 100, 16)
GEOM = M.Geometry.of(VIDEO, AUDIO, 8.0, 100.0, video_patch=(1, 2, 2), audio_patch=(4, 8))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_mode_given_latents_by_hand():
    m = M.sampling_mask("extend_v", GEOM, seconds_given=0.3)       # 0.3 s · 8 fps = 2.4 → frames 0, 1
    assert m.video[0].all(dim=(1, 2)).tolist() == [True, True] + [False] * 6 and not m.audio.any()
    m = M.sampling_mask("extend_a", GEOM, seconds_given=0.3, both=True)  # 30 steps → 28 (patch 4); frames 0, 1
    assert m.audio[0].nonzero().flatten().tolist() == list(range(28))
    assert m.video[0, :2].all() and not m.video[0, 2:].any()
    m = M.sampling_mask("inpaint_v", GEOM, span=(0.3, 0.55))      # touches frames 2 (0.25-0.375) .. 4 (0.5-0.625)
    assert m.video[0].all(dim=(1, 2)).tolist() == [True, True, False, False, False, True, True, True]
    m = M.sampling_mask("inpaint_v", GEOM, region=(0.3, 0.0, 0.5, 0.5))  # rows 1.2..2 → 0..2 (patch 2), cols 0..2
    hole = torch.zeros(4, 4, dtype=torch.bool)
    hole[0:2, 0:2] = True
    assert torch.equal(m.video[0, 3], ~hole) and torch.equal(m.video[0, 0], ~hole)
    m = M.sampling_mask("inpaint_a", GEOM, span=(0.205, 0.41))    # steps 20.5..41 → 20..44 (patch 4)
    assert (~m.audio[0]).nonzero().flatten().tolist() == list(range(20, 44)) and not m.video.any()
    m = M.sampling_mask("i2sv", GEOM)
    assert m.video[0, 0].all() and not m.video[0, 1:].any()
    assert M.sampling_mask("a2v", GEOM).audio.all() and M.sampling_mask("v2a", GEOM).video.all()
    m = M.sampling_mask("t2v", GEOM)
    assert not m.audio_present[0] and m.video_present[0] and m.attention_modes("full") == ["iso_v"]
    m = M.sampling_mask("t2a", GEOM)
    assert not m.video_present[0] and m.attention_modes("iso_v") == ["iso"]
    assert M.sampling_mask("joint", GEOM).attention_modes(["iso_a"]) == ["iso_a"]


def test_clear_errors():
    with pytest.raises(ValueError, match="extend_v needs seconds_given"):
        M.sampling_mask("extend_v", GEOM)
    with pytest.raises(ValueError, match="inpaint_v needs a spatial region"):
        M.sampling_mask("inpaint_v", GEOM)
    with pytest.raises(ValueError, match="outside the clip"):
        M.sampling_mask("inpaint_a", GEOM, span=(3.0, 4.0))
    with pytest.raises(ValueError, match="unknown conditioning mode"):
        M.sampling_mask("outpaint", GEOM)
    with pytest.raises(ValueError, match="unknown training task"):
        sample_tasks({"joint": 1, "extnd_v": 1}, 4)
    with pytest.raises(ValueError, match="unknown objective.masks"):
        M.MaskParams.from_config({"extend_minn": 0.1})


@pytest.mark.parametrize("mode", M.MODES)
def test_flow_batch_on_a_training_mask_keeps_the_given_part_clean_and_outside_the_loss(mode):
    g = torch.Generator().manual_seed(3)
    x0_v, x0_a = torch.randn(VIDEO, generator=g), torch.randn(AUDIO, generator=g)
    mask = M.training_mask([mode, mode], GEOM, M.MaskParams(), torch.Generator().manual_seed(5))
    fb = make_flow_batch(x0_v, x0_a, mask, generator=torch.Generator().manual_seed(7))
    gv = mask.video[:, :, None].expand(VIDEO)                      # [B, Tv, Cv, hv, wv]
    ga = mask.audio[:, None, :, None].expand(AUDIO)                 # [B, Ca, La, Fa]
    assert torch.equal(fb.video[gv], x0_v[gv]) and torch.equal(fb.audio[ga], x0_a[ga])  # x_t = x0 exactly
    # the model's timesteps: 0 on given latents (checked element-wise after broadcasting back)
    tv = fb.t_video.reshape(2, 8, -1).expand(2, 8, 16).reshape(2, 8, 4, 4)
    assert (tv[mask.video] == 0).all() and (tv[~mask.video & mask.video_present[:, None, None, None]] > 0).all()
    ta = fb.t_audio.reshape(2, -1).expand(2, 100)
    assert (ta[mask.audio] == 0).all()
    expect_given = {"joint": (0, 0), "a2v": (0, 1), "v2a": (1, 0), "t2v": (0, 0), "t2a": (0, 0)}
    if mode in expect_given:
        assert (mask.video.float().mean().item(), mask.audio.float().mean().item()) == expect_given[mode]
    if mode in ("extend_v", "extend_a", "inpaint_v", "inpaint_a", "i2sv"):
        assert 0 < (mask.video.float().mean() + mask.audio.float().mean()) < 2  # partly given

    # the loss ignores predictions on given / absent latents and counts the rest
    pred_v, pred_a = torch.randn(VIDEO, generator=g), torch.randn(AUDIO, generator=g)
    base = flow_loss(pred_v, pred_a, fb)["loss"]
    w_v, w_a = mask.loss_weights()
    ignored_v, ignored_a = w_v.expand(VIDEO) == 0, w_a.expand(AUDIO) == 0
    moved = flow_loss(pred_v + 100 * ignored_v, pred_a + 100 * ignored_a, fb)["loss"]
    assert torch.equal(base, moved)
    if (~ignored_v).any():
        assert not torch.equal(base, flow_loss(pred_v + 1.0 * ~ignored_v, pred_a, fb)["loss"])
    # an independent oracle of the loss: masked mean per modality
    sv = ((pred_v - (fb.target_video)) ** 2)[~ignored_v]
    sa = ((pred_a - (fb.target_audio)) ** 2)[~ignored_a]
    oracle = (sv.mean() if sv.numel() else 0.0) + (sa.mean() if sa.numel() else 0.0)
    torch.testing.assert_close(base, torch.as_tensor(oracle, dtype=base.dtype), rtol=1e-5, atol=1e-6)
    if mode == "t2v":
        assert fb.modes == ["iso_v", "iso_v"] and (fb.t_audio == 1).all()
        torch.testing.assert_close(fb.audio, fb.target_audio + x0_a)  # absent stream: pure noise (t = 1)


def test_modes_are_drawn_by_probability():
    modes = [MODES[i] for i in sample_tasks({"joint": 0.5, "extend_a": 0.5, "t2v": 0.0}, 4000,
                                            torch.Generator().manual_seed(0)).tolist()]
    assert set(modes) == {"joint", "extend_a"} and abs(modes.count("joint") / 4000 - 0.5) < 0.03


def tiny():
    torch.manual_seed(0)
    model = build_model("tiny", hidden_size=32, depth=2, num_heads=2, video_in_channels=3, video_patch_size=(1, 2, 2),
                        audio_in_channels=1, audio_patch_size=(4, 8), text_len=4, text_token_dim=8,
                        text_pooled_dim=8, image_embed_dim=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "_out." in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_model_takes_per_position_and_per_step_times():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    z_v, z_a = torch.randn(VIDEO, generator=g), torch.randn(AUDIO, generator=g)
    t_frame = torch.rand(2, 8, generator=g)
    with torch.no_grad():
        ref = model(z_v, z_a, t_frame, torch.tensor([0.3, 0.6]))
        per_pos = t_frame[:, :, None].expand(2, 8, 16).reshape(2, -1)      # uniform within each frame
        per_step = torch.tensor([0.3, 0.6])[:, None].expand(2, 100)
        same = model(z_v, z_a, per_pos, per_step)
        assert all(torch.equal(a, b) for a, b in zip(ref, same))
        # a clean patch in frame 3 (per-token group) and a clean first audio patch change the output
        t_pos = per_pos.clone().reshape(2, 8, 4, 4)
        t_pos[:, 3, :2, :2] = 0.0
        t_step = per_step.clone()
        t_step[:, :4] = 0.0
        out = model(z_v, z_a, t_pos.reshape(2, -1), t_step)
        assert not torch.equal(out[0], ref[0]) and not torch.equal(out[1], ref[1])
    # the per-token grouping is the mean within each patch ((t, h, w) row-major tokens)
    t_pos[:, 3, 0, 1] = 0.4
    groups = model._video_time(t_pos.reshape(2, -1), 2, 8, (4, 4))             # [B, Nv = 8·2·2]
    assert groups.shape == (2, 32)
    torch.testing.assert_close(groups[:, 3 * 4], torch.full((2,), 0.1))
    torch.testing.assert_close(groups[:, 3 * 4 + 1], t_frame[:, 3])
    assert model._audio_time(t_step, 2, 100).shape == (2, 25)


@pytest.mark.parametrize("mode,params", [("extend_v", {"seconds_given": 0.4, "both": True}),
                                         ("extend_a", {"seconds_given": 0.5}),
                                         ("inpaint_v", {"region": (0.0, 0.0, 0.5, 1.0)}),
                                         ("inpaint_v", {"span": (0.25, 0.75)}),
                                         ("inpaint_a", {"span": (0.2, 0.6)}),
                                         ("i2sv", {}), ("a2v", {}), ("v2a", {}), ("t2v", {}), ("t2a", {})])
def test_euler_sampling_holds_the_given_part_exactly(mode, params):
    """An Euler loop written here: x ← x + (t_next − t)·v̂ on the generated part, given part held."""
    from jointdit.diffusion.guidance import JointCFG

    model = tiny()
    g = torch.Generator().manual_seed(1)
    cond_v, cond_a = torch.randn(1, *VIDEO[1:], generator=g), torch.randn(1, *AUDIO[1:], generator=g)
    mask = M.sampling_mask(mode, GEOM, **params)
    x_v, x_a = torch.randn(1, *VIDEO[1:], generator=g), torch.randn(1, *AUDIO[1:], generator=g)
    x_v, x_a = mask.hold(x_v, x_a, cond_v, cond_a)
    start_v, start_a = x_v.clone(), x_a.clone()
    guidance = JointCFG(w_v=1.5, w_a=1.5)  # batched branches must accept per-position/per-step times
    sigmas = torch.linspace(1, 0, 5)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t_v, t_a = mask.timesteps(s.expand(1), s.expand(1))
            v_v, v_a = guidance(model, x_v, x_a, t_v, t_a)
            x_v = x_v + (s_next - s) * v_v if mask.video_present[0] else x_v
            x_a = x_a + (s_next - s) * v_a if mask.audio_present[0] else x_a
            x_v, x_a = mask.hold(x_v, x_a, cond_v, cond_a)
    gv, ga = mask.video[:, :, None].expand_as(x_v), mask.audio[:, None, :, None].expand_as(x_a)
    assert torch.equal(x_v[gv], cond_v[gv]) and torch.equal(x_a[ga], cond_a[ga])
    if (~gv).any() and mask.video_present[0]:
        assert not torch.equal(x_v[~gv], start_v[~gv])  # the rest was generated
    if not mask.audio_present[0]:
        assert torch.equal(x_a, start_a)


def test_time_origin_offsets_from_the_latent_spec():
    """AudioLDM2-style audio: 25 steps/s centred at 20 ms + j/25. Step j lies wholly in [0, 0.3 s) iff
    0.02 + j/25 + 0.02 <= 0.3, i.e. j <= 6.5: 7 steps. A span (0.1, 0.2) meets steps whose interval
    [j/25, (j+1)/25) intersects it: j = 2 .. 4."""
    g = M.Geometry.of(VIDEO, (1, 8, 25, 16), 8.0, 25.0, video_offset=0.0, audio_offset=0.02)
    assert M.sampling_mask("extend_a", g, seconds_given=0.3).audio[0].sum().item() == 7
    regen = ~M.sampling_mask("inpaint_a", g, span=(0.1, 0.2)).audio[0]
    assert regen.nonzero().flatten().tolist() == [2, 3, 4]


@pytest.mark.parametrize("mode,params", [("extend_v", {"seconds_given": 0.5}), ("extend_a", {"seconds_given": 0.3, "both": True}),
                                         ("inpaint_v", {"region": (0.5, 0.5, 1.0, 1.0)}), ("inpaint_a", {"span": (0.4, 0.8)})])
def test_integrate_holds_the_condition_with_guidance_batches(mode, params):
    from jointdit.diffusion.guidance import JointCFG

    model = tiny()
    g = torch.Generator().manual_seed(2)
    given_v, given_a = torch.randn(1, *VIDEO[1:], generator=g), torch.randn(1, *AUDIO[1:], generator=g)
    noise = torch.randn(2, *VIDEO[1:], generator=g), torch.randn(2, *AUDIO[1:], generator=g)   # two seeds
    mask = M.sampling_mask(mode, GEOM, **params)
    z_v, z_a = integrate(model, *noise, mask, steps=3, given_video=given_v, given_audio=given_a,
                               guidance=JointCFG(w_v=1.2, w_a=1.2))
    gv = mask.video[:, :, None].expand(2, *VIDEO[1:])
    ga = mask.audio[:, None, :, None].expand(2, *AUDIO[1:])
    assert torch.equal(z_v[gv], given_v.expand(2, *VIDEO[1:])[gv])
    assert torch.equal(z_a[ga], given_a.expand(2, *AUDIO[1:])[ga])
    assert not torch.equal(z_v[~gv], noise[0][~gv])


def test_t2v_and_t2a_are_blind_to_the_absent_stream():
    """t2v's video must be exactly what it is whatever the (absent) audio holds; t2a likewise."""
    from jointdit.diffusion.guidance import JointCFG

    model = tiny()
    g = torch.Generator().manual_seed(4)
    nv, na = torch.randn(1, *VIDEO[1:], generator=g), torch.randn(1, *AUDIO[1:], generator=g)
    other_v, other_a = torch.randn(1, *VIDEO[1:], generator=g), torch.randn(1, *AUDIO[1:], generator=g)
    guidance = JointCFG(w_v=1.2, w_a=1.2)
    run = lambda mode, v, a: integrate(model, v, a, M.sampling_mask(mode, GEOM), steps=3, guidance=guidance)  # noqa: E731
    v1, a1 = run("t2v", nv, na)
    v2, a2 = run("t2v", nv, other_a)
    assert torch.equal(v1, v2) and torch.equal(a1, na) and torch.equal(a2, other_a)   # absent audio untouched
    v1, a1 = run("t2a", nv, na)
    v2, a2 = run("t2a", other_v, na)
    assert torch.equal(a1, a2) and torch.equal(v1, nv)
    joint_a = run("joint", other_v, na)[1]
    assert not torch.equal(joint_a, run("joint", nv, na)[1])  # without isolation the video would leak in


# --------------------------------------------------------------------------------------------------
# through jointdit.sample (load_session / generate) on the tiny trained checkpoint
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def condition_files(tmp_path_factory):
    """A 1 s clip (moving square + 440 Hz tone) as MP4 and WAV, as a user would give it."""
    import math

    import soundfile as sf

    from jointdit.data.media import write_mp4

    root = tmp_path_factory.mktemp("cond")
    frames = torch.full((8, 3, 32, 32), -0.6)
    for t in range(8):
        frames[t, :, 8:20, 2 + 3 * t: 14 + 3 * t] = 0.7
    wave = 0.4 * torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    sf.write(root / "tone.wav", wave.numpy(), 16000, subtype="FLOAT")
    return {"mp4": write_mp4(root / "clip.mp4", frames, 8, wave, 16000), "wav": root / "tone.wav"}


def _encoded(session, path, video: bool):
    """The condition's latent computed here from the codec directly (PyAV decode → codec → normalise)."""
    from jointdit.data.media import read_clip

    spec = session.spec
    if str(path).endswith(".wav"):
        import soundfile as sf

        wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
    else:
        clip = read_clip(path, fps=spec.fps, size=spec.size, seconds=spec.seconds, sample_rate=spec.sample_rate)
        if video:
            return spec.normalize_video(session.video_codec.encode(clip.frames[None]))[0]
        wave = clip.wave
    return spec.normalize_audio(session.audio_codec.encode(wave[None])[:, :, : spec.audio_shape[1]])[0]


@pytest.mark.parametrize("task,kw,video_given,audio_given", [
    ("extend_v", {"seconds_given": 0.5}, 4, 0),                      # 4 of 8 latent frames (8 fps)
    ("extend_a", {"seconds_given": 0.5, "both": True}, 4, 48),       # 50 steps → 48 (audio patch 4)
    ("inpaint_a", {"span": (0.25, 0.5)}, 0, 100 - 28),               # steps 24..52 regenerated (patch-widened)
])
def test_generate_mask_tasks_keep_the_condition(tiny_checkpoint, condition_files, task, kw, video_given, audio_given):
    """Through jointdit.sample (whose sampler builds these masks): the kept part equals the encoded input."""
    from jointdit.sample import SampleRequest, generate, load_session

    session = load_session(tiny_checkpoint, device="cpu")
    given = {"extend_v": {"video": str(condition_files["mp4"])},
             "extend_a": {"audio": str(condition_files["wav"]), "video": str(condition_files["mp4"])},
             "inpaint_a": {"audio": str(condition_files["mp4"])}}[task]
    result = generate(session, SampleRequest(task=task, steps=2, seeds=[1], guidance="jointcfg", **given, **kw))
    sample = result.samples[0]
    if video_given:
        want = _encoded(session, condition_files["mp4"], video=True)
        assert torch.equal(sample.z_video[:video_given], want[:video_given].float())
        assert not torch.allclose(sample.z_video[video_given:], want[video_given:], atol=1e-3)
    if audio_given:
        source = condition_files["wav"] if task == "extend_a" else condition_files["mp4"]
        want = _encoded(session, source, video=False)
        keep = torch.ones(100, dtype=torch.bool)
        if task == "inpaint_a":
            keep[24:52] = False
        else:
            keep[audio_given:] = False
        assert keep.sum() == audio_given
        assert torch.equal(sample.z_audio[:, keep], want[:, keep].float())
        assert not torch.allclose(sample.z_audio[:, ~keep], want[:, ~keep], atol=1e-3)


@pytest.mark.slow
def test_trainer_draws_mask_modes_from_objective_tasks(tmp_path):
    """python -m jointdit.train with extension / inpainting / single-modality modes in objective.tasks."""
    import json

    from helpers import run_module

    run_dir = tmp_path / "run"
    result = run_module("jointdit.train", "data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25",
                        "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=4",
                        "batch_size=4", "max_steps=3", "logger=none", "sample_every=-1", "log_every=1",
                        "~objective.tasks", "+objective.tasks={extend_v: 0.2, extend_a: 0.2, inpaint_v: 0.2, "
                        "inpaint_a: 0.2, t2v: 0.1, t2a: 0.1}", "+objective.masks.extend_min=0.3",
                        f"hydra.run.dir={run_dir}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
