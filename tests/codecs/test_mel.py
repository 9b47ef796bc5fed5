import math
from pathlib import Path

import numpy as np
import pytest
import torch

import jointdit  # noqa: F401
from jointdit.codecs import AudioCodec, MelAudioCodec, build_codecs, log_spectral_distance
from jointdit.codecs.mel import MelParams, log_mel

SR = 16000
ONSETS = (0.20, 0.55, 0.93, 1.31, 1.62, 2.05)  # seconds
CONF = Path(__file__).resolve().parents[2] / "conf" / "codec"


def percussive_clip(seconds=2.5, onsets=ONSETS, seed=0) -> np.ndarray:
    """Decaying tone+noise bursts (40 ms decay) starting at known times, peak 0.5."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    y = np.zeros(n, np.float32)
    freqs = (440, 1200, 300, 2500, 700, 1800)
    for i, on in enumerate(onsets):
        n0, length = int(on * SR), int(0.18 * SR)
        t = np.arange(length) / SR
        burst = np.exp(-t / 0.04) * (0.6 * np.sin(2 * np.pi * freqs[i % len(freqs)] * t) + 0.3 * rng.standard_normal(length))
        y[n0 : n0 + length] += burst[: n - n0]
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def detect_onsets(y: np.ndarray) -> np.ndarray:
    import librosa

    return librosa.onset.onset_detect(y=y.astype(np.float32), sr=SR, hop_length=64, units="time", backtrack=False)


def test_round_trip_keeps_onsets_and_reports_lsd():
    codec = MelAudioCodec()
    y = percussive_clip()
    z = codec.encode(torch.from_numpy(y)[None])
    assert z.shape == (1, *codec.latent_shape(len(y))) == (1, 1, 250, 64)
    est = codec.decode(z)[0].numpy()
    assert est.shape == (codec.samples_for_latent(250),) == (len(y),)

    found = detect_onsets(est)
    errors_ms = [1000 * float(np.min(np.abs(found - on))) for on in ONSETS]
    lsd = log_spectral_distance(y, est, SR)
    print(f"\nmel+Griffin-Lim: onset errors (ms) {[round(e, 1) for e in errors_ms]}, "
          f"detected {len(found)}/{len(ONSETS)}, LSD {lsd:.2f} dB")
    assert len(found) == len(ONSETS), found
    assert max(errors_ms) <= 20.0, errors_ms
    # Griffin-Lim from 64 mel bands is lossy (8.7 dB measured); an unrelated clip scores ~42 dB and the
    # same clip shifted by 30 ms ~14 dB
    assert 0.0 < lsd < 12.0, lsd


def test_decode_is_time_aligned_with_encode():
    # frame k <-> time k*hop/sr: an impulse at 0.5 s peaks in latent frame 50, and the decoded
    # energy peaks within one hop of 0.5 s
    codec = MelAudioCodec()
    y = torch.zeros(1, SR)
    y[0, SR // 2] = 0.9
    z = codec.encode(y)
    assert int(z[0, 0].mean(dim=1).argmax()) == 50
    est = codec.decode(z)[0]
    env = est.square().unfold(0, 32, 32).mean(dim=1)
    assert abs(int(env.argmax()) * 32 + 16 - SR // 2) <= codec.hop_length


def test_fixed_normalization_keeps_loudness():
    codec = MelAudioCodec()
    y = torch.from_numpy(percussive_clip())[None]
    quiet = y * 10 ** (-20 / 20)
    z_loud, z_quiet = codec.encode(y), codec.encode(quiet)
    print(f"\nlatent mean: loud {z_loud.mean():.3f}, -20 dB {z_quiet.mean():.3f}")
    assert z_quiet.mean() < z_loud.mean() - 0.05
    # not per-clip min-max: the loud clip's maximum is not forced to 1 and the quiet one's is lower
    assert z_quiet.max() < z_loud.max() < 1.0
    # fixed range: digital silence is exactly -1, a full-scale tone peaks near +1
    assert torch.equal(codec.encode(torch.zeros(1, 3200)), torch.full((1, 1, 20, 64), -1.0))
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(SR) / SR)[None]
    assert 0.8 < float(codec.encode(tone).max()) < 1.1


def test_shapes_rates_and_partial_hop():
    codec = MelAudioCodec()
    assert isinstance(codec, AudioCodec)
    assert codec.latent_fps == 100.0 and codec.sample_rate == SR
    for n in (160, 161, 16000, 16001):
        z = codec.encode(torch.randn(2, n) * 0.1)
        assert z.shape == (2, *codec.latent_shape(n)) == (2, 1, -(-n // 160), 64)
    assert codec.decode(z).shape == (2, 101 * 160)


def test_mel_follows_audioldm2_recipe():
    """log-mel equals AudioLDM2's training recipe, recomputed here with librosa (numpy)."""
    import librosa

    y = percussive_clip(seconds=1.0, onsets=(0.2, 0.6))
    p = MelParams()
    pad = (p.n_fft - p.hop_length) // 2
    spec = np.abs(librosa.stft(np.pad(y, (pad, pad), mode="reflect"), n_fft=1024, hop_length=160, win_length=1024,
                               window="hann", center=False))
    ref = np.log(np.clip(librosa.filters.mel(sr=SR, n_fft=1024, n_mels=64, fmin=0, fmax=8000) @ spec, 1e-5, None)).T
    ours = log_mel(torch.from_numpy(y)[None], p, framing="hifigan")[0].numpy()
    assert ours.shape == ref.shape == (100, 64)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_log_spectral_distance_basics():
    y = percussive_clip(seconds=1.0, onsets=(0.3,))
    assert log_spectral_distance(y, y, SR) == pytest.approx(0.0, abs=1e-6)
    assert log_spectral_distance(y, 0.1 * y, SR) > log_spectral_distance(y, 0.5 * y, SR) > 1.0
    # torch input, batched input, unequal lengths
    t = torch.from_numpy(y)
    assert log_spectral_distance(t[None], t[None, :-100], SR) == pytest.approx(0.0, abs=1e-6)


def test_pixel_mel_yaml_builds_audioldm2_parameters():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "pixel_mel.yaml")
    video, audio = build_codecs(cfg)
    p = audio.params
    assert (cfg.name, video.factor) == ("pixel_mel", 8)
    assert (p.sample_rate, p.n_fft, p.hop_length, p.win_length, p.n_mels, p.fmin, p.fmax) == (
        16000, 1024, 160, 1024, 64, 0.0, 8000.0)
    assert audio.log_floor == pytest.approx(math.log(1e-5)) and audio.log_ceil == pytest.approx(math.log(10))
