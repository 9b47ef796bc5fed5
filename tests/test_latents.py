"""LatentSpec: crop consistency, JSON, normalisation, time origins, old exports, and the vram.max_t fix end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from jointdit.latents import LatentSpec, crop_lengths

# pixel_mel latents of 2 s of 32x32 video at 8 fps: video [16, 192, 4, 4], log-mel [1, 200, 64] at 100 steps/s.
SPEC = LatentSpec(fps=8, size=32, seconds=2.0, sample_rate=16000, video_shape=(16, 192, 4, 4), audio_shape=(1, 200, 64),
                  video_latent_fps=8.0, audio_latent_fps=100.0, codec={"name": "pixel_mel"})


@pytest.mark.parametrize("max_t,patches,expected", [
    (0, None, (16, 200, 2.0)),
    (4, None, (4, 50, 0.5)),
    (6, (1, 4), (6, 72, 0.75)),      # 75 mel steps are not whole patches of 4: 72
    (5, (2, 4), (4, 48, 0.5)),       # 5 frames are not whole patches of 2: 4 frames, then 50 -> 48 steps
    (99, (1, 4), (16, 200, 2.0)),    # a crop never lengthens
])
def test_crop_keeps_seconds_audio_length_and_patches_consistent(max_t, patches, expected):
    spec = SPEC if patches is None else SPEC.with_patches(*patches)
    cropped = spec.crop(max_t)
    t, l_, seconds = expected
    assert (cropped.video_shape[0], cropped.audio_shape[1], cropped.seconds) == (t, l_, seconds)
    assert cropped.video_shape[1:] == SPEC.video_shape[1:] and cropped.audio_shape[::2] == SPEC.audio_shape[::2]
    assert cropped.num_frames == t and cropped.num_samples == round(seconds * 16000)
    audio_patch = (patches or (1, 1))[1]
    # the audio never runs past the video, and falls short of it by less than one audio patch
    assert 0 <= cropped.seconds - cropped.audio_seconds < audio_patch / 100.0
    assert cropped.crop(max_t) == cropped  # idempotent
    if patches:  # order does not matter
        assert SPEC.crop(max_t).with_patches(*patches) == cropped


def test_crop_refuses_less_than_one_patch():
    with pytest.raises(ValueError, match="less than one temporal patch"):
        SPEC.with_patches(4, 4).crop(3)
    assert crop_lengths(16, 200, 8.0, 100.0, 1) == (1, 12)  # 12.5 -> 12 (round half to even)


def test_json_round_trip_and_unknown_fields():
    spec = SPEC.with_patches(1, 4).with_stats(([0.5] * 192, [2.0] * 192), ([-0.3], [0.7]))
    text = json.dumps(spec.to_json())
    again = LatentSpec.from_json(text)
    assert again == spec and isinstance(again.video_shape, tuple) and again.audio_mean == (-0.3,)
    with pytest.raises(ValueError, match="unknown LatentSpec fields"):
        LatentSpec.from_json({**spec.to_json(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seconds = 3.0  # type: ignore[misc]


def test_normalisation_is_per_channel_and_inverts():
    mean_v, std_v = torch.linspace(-1, 1, 192), torch.linspace(0.5, 2.0, 192)
    spec = SPEC.with_stats((mean_v.tolist(), std_v.tolist()), ([0.25], [4.0]))
    z = torch.randn(2, 16, 192, 4, 4, dtype=torch.float64)
    n = spec.normalize_video(z)
    # oracle written out: channel c of every frame and pixel is (z - mean_c) / std_c
    for c in (0, 77, 191):
        torch.testing.assert_close(n[:, :, c], (z[:, :, c] - mean_v[c].double()) / std_v[c].double())
    torch.testing.assert_close(spec.denormalize_video(n), z)
    a = torch.randn(3, 1, 200, 64)
    torch.testing.assert_close(spec.normalize_audio(a), (a - 0.25) / 4.0)
    torch.testing.assert_close(spec.denormalize_audio(spec.normalize_audio(a)), a)
    assert torch.equal(SPEC.normalize_video(z), z)  # no statistics: identity
    with pytest.raises(ValueError, match="channels"):
        SPEC.with_stats(([0.0], [1.0]), None)


def test_latent_times_are_true_centres():
    from jointdit.codecs import build_codecs
    from jointdit.latents import codec_time_offsets

    video, audio = build_codecs({"name": "pixel_mel"})
    assert codec_time_offsets(video, audio) == (0.0, 0.0)
    spec = LatentSpec.from_codecs(video, audio, fps=8, size=32, seconds=1.0, sample_rate=16000)
    assert spec.video_shape == (8, 192, 4, 4) and spec.audio_shape == (1, 100, 64)
    # A click at tau: the mel frame with the most energy is the one whose centre time is nearest tau.
    for tau in (0.2031, 0.5, 0.7777):
        wave = torch.zeros(1, 16000)
        wave[0, round(tau * 16000)] = 1.0
        energy = audio.encode(wave)[0, 0].mean(-1)  # [L]
        t_audio = spec.audio_latent_times()[int(energy.argmax())]
        assert abs(float(t_audio) - tau) <= 0.5 * 160 / 16000 + 1e-9
    # Video frame k is the picture shown at k / fps.
    torch.testing.assert_close(spec.video_latent_times(), torch.arange(8, dtype=torch.float64) / 8)


def test_audioldm2_latent_steps_centre_on_their_four_hifigan_mel_frames():
    """AudioLDM2 frames mel ``m`` over samples [m·hop, (m+1)·hop) and merges 4 per latent step: centre (j+½)·40 ms."""
    from jointdit.latents import codec_time_offsets

    class FakeAudioLDM2:  # the offset depends only on the framing rule, hop, rate and time downsampling
        sample_rate, hop_length, time_downsample = 16000, 160, 4

    FakeAudioLDM2.__name__ = "AudioLDM2AudioCodec"

    class NoTimeCompression:
        @staticmethod
        def latent_fps(fps):
            return fps

    assert codec_time_offsets(NoTimeCompression(), FakeAudioLDM2()) == (0.0, 0.02)
    spec = dataclasses.replace(SPEC, audio_shape=(8, 50, 16), audio_latent_fps=25.0, audio_time_offset=0.02)
    torch.testing.assert_close(spec.audio_latent_times()[:3], torch.tensor([0.02, 0.06, 0.10], dtype=torch.float64))


def test_an_old_export_loads_through_the_one_adapter():
    """A format-1 jointdit.json written by hand: max_t-cropped latents beside the UNcropped data.seconds."""
    old = {"step": 2, "stage": "a",
           "latent": {"video_shape": [4, 192, 4, 4], "audio_shape": [1, 48, 64], "video_latent_fps": 8.0,
                      "audio_latent_fps": 100.0, "clip_widths": {"text_len": 77, "text_token_dim": 64}},
           "codec": {"name": "pixel_mel", "audio": {"sample_rate": 16000}},
           "data": {"name": "synthetic", "fps": 8, "size": 32, "seconds": 1.0, "sample_rate": 16000}}
    spec = LatentSpec.from_export_meta(old, model_config={"video_patch_size": [1, 2, 2], "audio_patch_size": [4, 16]})
    assert spec.seconds == 0.5 and spec.num_frames == 4 and spec.num_samples == 8000  # not the stale 1.0 s
    assert spec.video_shape == (4, 192, 4, 4) and spec.audio_shape == (1, 48, 64)
    assert (spec.video_patch_t, spec.audio_patch_t) == (1, 4) and spec.clip_widths["text_len"] == 77
    assert spec.size == (32, 32) and spec.sample_rate == 16000 and spec.codec["name"] == "pixel_mel"
    new = {"format": 2, "spec": spec.to_json()}
    assert LatentSpec.from_export_meta(new) == spec


def test_cache_writes_its_spec_with_per_channel_statistics(compose_cfg, synthetic_root):
    from safetensors import safe_open

    from jointdit.data.cache import build_cache, read_cache_spec, read_index

    cfg = compose_cfg("cache", [f"data.root={synthetic_root}", "data.num_clips=8", "data.size=32", "data.seconds=1.0"])
    build_cache(cfg.data, cfg.codec, cfg.out_dir, "train", progress=False, log=lambda *_: None)
    spec = read_cache_spec(cfg.out_dir)
    assert spec.video_shape == (8, 192, 4, 4) and spec.audio_shape == (1, 100, 64) and spec.seconds == 1.0
    rows = read_index(cfg.out_dir, "train")
    videos, audios = [], []
    for row in rows:
        with safe_open(f"{cfg.out_dir}/{row['shard']}", framework="pt") as handle:
            videos.append(handle.get_tensor(row["tensors"]["video"]))
            audios.append(handle.get_tensor(row["tensors"]["audio"]))
    v = torch.stack(videos).double()  # [N, T, C, h, w]
    mean_c = v.mean(dim=(0, 1, 3, 4))
    std_c = v.std(dim=(0, 1, 3, 4), unbiased=False).clamp_min(1e-3)
    torch.testing.assert_close(torch.tensor(spec.video_mean, dtype=torch.float64), mean_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(spec.video_std, dtype=torch.float64), std_c, atol=1e-6, rtol=1e-6)
    a = torch.stack(audios).double()
    assert spec.audio_mean[0] == pytest.approx(float(a.mean()), abs=1e-6)
    assert spec.audio_std[0] == pytest.approx(float(a.std(unbiased=False)), abs=1e-6)


@pytest.mark.slow  # ~50 s on a loaded 2-core box: training, then four samples through Griffin-Lim
def test_a_model_trained_with_max_t_samples_every_task_with_equal_durations(compose_cfg, tmp_path):
    """The vram.max_t bug: the export stored the cropped latents with the uncropped seconds, so joint
    sampling gave 0.5 s of video and 1 s of audio and v2a failed. Train in-process with max_t=4, sample each task."""
    from jointdit.checkpoints import load_export_meta, load_model
    from jointdit.data.media import write_mp4, write_wav
    from jointdit.diffusion.sampler import sample_to_files
    from jointdit.training import train

    cfg = compose_cfg("train", [
        "data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
        "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "vram.max_t=4",
        "codec.audio.griffin_lim_iters=2", "max_steps=2", "checkpoint.every=100", "sample_every=-1", "logger=none", f"paths.output_dir={tmp_path / 'run'}"])
    train(cfg)
    folder = tmp_path / "run" / "export" / "last"
    meta = load_export_meta(folder)
    spec = LatentSpec.from_export_meta(meta)
    assert meta["format"] == 2 and meta["attention"] == {"kv_downsample": 1, "kv_pool_space": 1}
    assert spec.video_shape[0] == 4 and spec.audio_shape[1] == 48 and spec.seconds == 0.5
    assert load_model(folder).config.video_latent_fps == spec.video_latent_fps

    n = 16000  # 1 s of conditioning input; the sampler reads the spec's 0.5 s of it
    frames = torch.linspace(-1, 1, 8)[:, None, None, None].expand(8, 3, 32, 32).contiguous()
    wave = 0.3 * torch.sin(2 * math.pi * 330 * torch.arange(n) / 16000)
    mp4, wav = write_mp4(tmp_path / "in.mp4", frames, 8, wave, 16000), write_wav(tmp_path / "in.wav", wave, 16000)
    inputs = {"joint": [], "i2sv": [f"reference={mp4}"], "a2v": [f"audio={wav}"], "v2a": [f"video={mp4}"]}
    hop_seconds = 160 / 16000
    for task, extra in inputs.items():
        sample_cfg = compose_cfg("sample", [f"checkpoint={folder}", f"task={task}", "steps=2", "seeds=[0]",
                                            "progress=false", "guidance=none", f"out_dir={tmp_path / task}", *extra])
        (result,) = sample_to_files(sample_cfg)
        video_seconds = result.frames.shape[0] / result.fps
        audio_seconds = result.wave.shape[0] / result.sample_rate
        assert result.frames.shape[0] == 4, task
        assert abs(video_seconds - audio_seconds) <= hop_seconds, (task, video_seconds, audio_seconds)
