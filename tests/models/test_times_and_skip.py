"""RoPE times in seconds from the latents' centre times, and STG's skipped attention, against oracles
built without the code under test (a shifted clock, a copy of the model with zeroed gates, codecs)."""

import copy
import sys
from pathlib import Path

import jointdit  # noqa: F401
import pytest
import torch

from jointdit.codecs import build_codecs
from jointdit.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from test_jointdit import inputs, make_model, randomize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(make_model(), seed=3).eval()


# video_latent_fps 4 (4 frames), audio_latent_fps 8 (8 steps, temporal patch 2)
def default_times():
    return torch.arange(4) / 4.0, torch.arange(8) / 8.0


@torch.no_grad()
def test_default_times_are_latent_instants(model):
    zv, za, tv, ta, cond = inputs()
    times_v, times_a = default_times()
    out = model(zv, za, tv, ta, cond)
    explicit = model(zv, za, tv, ta, cond, video_times=times_v, audio_times=times_a)
    for a, b in zip(out, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@torch.no_grad()
def test_token_time_is_the_mean_of_its_patch_and_clocks_matter(model):
    """Audio patch 2: latent times (0, .25), (.5, .75)... and (.1, .15), (.6, .65)... have the same token
    means, so the same output; moving the audio clock against the video clock changes both outputs;
    per-sample ``[B, T]`` clocks equal separate calls. (Context tokens carry no RoPE, so the absolute
    origin also matters: q·k_context sees the query's absolute rotation.)"""
    zv, za, tv, ta, cond = inputs()
    times_v, times_a = default_times()
    ref = model(zv, za, tv, ta, cond, video_times=times_v, audio_times=times_a)
    means = times_a.view(4, 2).mean(1)
    same_means = torch.stack([means - 0.01, means + 0.01], 1).flatten()
    same = model(zv, za, tv, ta, cond, video_times=times_v, audio_times=same_means)
    for a, b in zip(ref, same):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    offset = model(zv, za, tv, ta, cond, video_times=times_v, audio_times=times_a + 0.1)
    assert (offset[0] - ref[0]).abs().max() > 1e-3 and (offset[1] - ref[1]).abs().max() > 1e-3
    per_v = times_v.expand(4, -1)
    per_a = torch.stack([times_a, times_a + 0.1, times_a, times_a])
    mixed = model(zv, za, tv, ta, cond, video_times=per_v, audio_times=per_a)
    for m in (0, 1):
        torch.testing.assert_close(mixed[m][1], offset[m][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[m][0], ref[m][0], rtol=1e-5, atol=1e-5)


def test_times_of_the_wrong_length_are_refused(model):
    zv, za, tv, ta, cond = inputs()
    with pytest.raises(ValueError, match="audio_times has 6 latent times; the audio latent has 8 time steps"):
        model(zv, za, tv, ta, cond, audio_times=torch.zeros(6))


@torch.no_grad()
def test_an_event_gets_the_same_rope_phase_in_both_streams():
    """A flash and a click at τ, through the real pixel and mel codecs: the latent steps where each shows
    up get RoPE times within half an audio hop of each other (item 5: one time origin)."""
    fps, sr, seconds, tau = 8, 16000, 1.0, 0.375   # τ = frame 3 = 37.5 audio hops
    video_codec, audio_codec = build_codecs({"name": "pixel_mel", "video": {"space_to_depth": 8},
                                             "audio": {"sample_rate": sr}})
    frames = -torch.ones(1, int(seconds * fps), 3, 8, 8)
    frames[0, round(tau * fps)] = 1.0                                      # the flash, shown at τ
    wave = torch.zeros(1, int(seconds * sr))
    wave[0, round(tau * sr)] = 1.0                                         # the click, at τ
    zv, za = video_codec.encode(frames), audio_codec.encode(wave)          # [1, 8, 192, 1, 1], [1, 1, 100, 64]
    k = int(zv[0].flatten(1).mean(1).argmax())                             # latent frame of the flash
    j = int(za[0, 0].mean(1).argmax())                                     # latent step of the click
    hop = audio_codec.hop_length / sr
    model = build_model("tiny", depth=1, video_in_channels=192, audio_in_channels=1, video_patch_size=(1, 1, 1),
                        audio_patch_size=(1, 64), video_latent_fps=fps, audio_latent_fps=sr / audio_codec.hop_length)
    t_video, _, _ = model.rope.video_positions(zv.shape[1], 1, 1)          # the model's default latent times
    t_audio, _ = model.rope.audio_positions(za.shape[2], 1)
    assert abs(float(t_video[k]) - tau) < 1e-9
    assert abs(float(t_video[k]) - float(t_audio[j])) <= hop / 2 + 1e-9
    # so the fastest shared time band puts them within half an audio hop of phase
    phase = model.rope.time_freqs[0]
    assert abs(float(phase * (t_video[k] - t_audio[j]))) <= float(phase) * hop / 2 + 1e-9


# ----------------------------------------------------------------------------------------------
# STG: skip_attention_blocks
# ----------------------------------------------------------------------------------------------
def _without_attention(model, block: int):
    """Oracle: a copy whose block ``block`` has its attention gates (adaLN chunk 3 of 6) zeroed."""
    twin = copy.deepcopy(model)
    d = twin.config.hidden_size
    for expert in (twin.blocks[block].video, twin.blocks[block].audio):
        lin = expert.adaLN_modulation[-1]
        with torch.no_grad():
            lin.weight[2 * d:3 * d].zero_()
            lin.bias[2 * d:3 * d].zero_()
    return twin


@torch.no_grad()
def test_skip_attention_equals_zeroed_attention_gate(model):
    zv, za, tv, ta, cond = inputs()
    ref = model(zv, za, tv, ta, cond)
    for block in (0, 1):
        got = model(zv, za, tv, ta, cond, skip_attention_blocks=[block])
        want = _without_attention(model, block)(zv, za, tv, ta, cond)
        for g, w, r in zip(got, want, ref):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
            assert (g - r).abs().max() > 1e-3
    # negative indices count from the end
    for g, w in zip(model(zv, za, tv, ta, cond, skip_attention_blocks=[-1]),
                    model(zv, za, tv, ta, cond, skip_attention_blocks=[1])):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@torch.no_grad()
def test_per_sample_skip_equals_separate_calls(model):
    zv, za, tv, ta, cond = inputs()
    skips = [None, [0], [1], [0, 1]]
    vv, va = model(zv, za, tv, ta, cond, ["full", "full", "iso", "full"], skip_attention_blocks=skips)
    for i, (skip, mode) in enumerate(zip(skips, ["full", "full", "iso", "full"])):
        sv, sa = model(zv[i:i + 1], za[i:i + 1], tv[i:i + 1], ta[i:i + 1], cond.index(slice(i, i + 1)), mode,
                       skip_attention_blocks=skip)
        torch.testing.assert_close(vv[i:i + 1], sv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va[i:i + 1], sa, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="names block 2; the model has 2 blocks"):
        model(zv, za, tv, ta, cond, skip_attention_blocks=[2])
    with pytest.raises(ValueError, match="has 2 entries for a batch of 4"):
        model(zv, za, tv, ta, cond, skip_attention_blocks=[[0], None])
