"""codec=svd_audioldm2 with tiny random-init models saved in the real folder layout (see conftest.py)."""

import math
import shutil
from pathlib import Path

import pytest
import torch

import jointdit  # noqa: F401
from jointdit.codecs import AudioCodec, VideoCodec, build_codecs

CONF = Path(__file__).resolve().parents[2] / "conf" / "codec"


def smooth_video(b=1, t=9, h=16, w=16) -> torch.Tensor:
    """A moving pattern in [-1,1] (temporally coherent, like real video)."""
    tt = torch.arange(t)[:, None, None, None]
    yy = torch.arange(h)[None, None, :, None]
    xx = torch.arange(w)[None, None, None, :]
    c = torch.arange(3)[None, :, None, None]
    vid = torch.sin(2 * math.pi * (xx + 0.5 * tt) / w + c) * torch.cos(2 * math.pi * yy / h)
    return torch.stack([vid * (1 - 0.3 * i) for i in range(b)]).float()


@pytest.fixture(scope="module")
def codecs(tiny_pretrained):
    """Built from conf/codec/svd_audioldm2.yaml, the way the entry points build them."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge({"paths": {"assets_dir": str(tiny_pretrained["assets_dir"])}},
                          {"codec": OmegaConf.load(CONF / "svd_audioldm2.yaml")})
    cfg.codec.device = "cpu"
    return build_codecs(cfg.codec)


def test_yaml_resolves_and_loads_real_layout(codecs, tiny_pretrained, monkeypatch):
    from omegaconf import OmegaConf

    video, audio = codecs
    assert isinstance(video, VideoCodec) and isinstance(audio, AudioCodec)
    assert video.vae_path == tiny_pretrained["svd_vae"]
    assert Path(audio.vae_path) == tiny_pretrained["audio_vae"] and Path(audio.vocoder_path) == tiny_pretrained["vocoder"]
    assert video.scaling_factor == pytest.approx(0.18215) and audio.scaling_factor == pytest.approx(0.75)
    assert video.decode_chunk == 8  # ${oc.env:JOINTDIT_VID_DECODE_CHUNK,8}
    monkeypatch.setenv("JOINTDIT_VID_DECODE_CHUNK", "3")
    cfg = OmegaConf.merge({"paths": {"assets_dir": str(tiny_pretrained["assets_dir"])}},
                          {"codec": OmegaConf.load(CONF / "svd_audioldm2.yaml")})
    cfg.codec.device = "cpu"
    assert build_codecs(cfg.codec)[0].decode_chunk == 3


def test_video_encode_decode_end_to_end(codecs):
    video, _ = codecs
    x = smooth_video(b=2, t=5)
    z = video.encode(x)
    assert z.shape == (2, *video.latent_shape(5, 16, 16)) == (2, 5, 4, 8, 8)
    assert video.latent_fps(24) == 24.0
    # the latent is the posterior mode times the scaling factor
    mode = video.vae.encode(x[0, :1]).latent_dist.mode()
    torch.testing.assert_close(z[0, :1], mode * 0.18215, rtol=1e-4, atol=1e-5)
    y = video.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1.0
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("t,chunk", [(1, 3), (5, 3), (7, 3), (10, 4), (9, 8), (13, 8)])
def test_decode_returns_every_frame(codecs, t, chunk):
    video, _ = codecs
    z = torch.randn(2, t, 4, 4, 4) * 0.2
    assert video.decode(z, decode_chunk=chunk, decode_overlap=0).shape == (2, t, 3, 8, 8)
    assert video.decode(z, decode_chunk=chunk, decode_overlap=2).shape == (2, t, 3, 8, 8)


def test_decode_calls_use_chunk_length_as_num_frames(codecs, monkeypatch):
    video, _ = codecs
    calls = []
    real = video.vae.decode

    def spy(z, num_frames=1, **kw):
        calls.append((z.shape[0], num_frames))
        return real(z, num_frames=num_frames, **kw)

    monkeypatch.setattr(video.vae, "decode", spy)
    video.decode(torch.randn(3, 10, 4, 4, 4) * 0.2, decode_chunk=4, decode_overlap=0)
    # 10 frames in chunks of <= 4 -> 4,3,3 (balanced: no lonely 1-2 frame tail), whole batch per call
    assert calls == [(12, 4), (9, 3), (9, 3)]
    calls.clear()
    video.decode(torch.randn(1, 10, 4, 4, 4) * 0.2, decode_chunk=4, decode_overlap=2)
    assert calls == [(6, 6), (7, 7), (5, 5)]  # [0,6) [2,9) [5,10) around 0-4, 4-7, 7-10


def test_chunked_decode_keeps_videos_of_a_batch_apart(codecs):
    video, _ = codecs
    z = video.encode(smooth_video(b=3, t=7))
    together = video.decode(z, decode_chunk=3)
    alone = torch.cat([video.decode(z[i : i + 1], decode_chunk=3) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_chunked_matches_unchunked(codecs):
    video, _ = codecs
    t = 26  # not a multiple of the chunk
    z = video.encode(smooth_video(t=t))
    full = video.decode(z, decode_chunk=0)

    def rel(y):
        return float((y - full).norm() / full.norm())

    # context covering the whole clip: chunk bookkeeping (slicing, order, assembly) must be exact
    torch.testing.assert_close(video.decode(z, decode_chunk=8, decode_overlap=t), full, rtol=0, atol=1e-5)
    r = video.temporal_radius
    outs = {ov: video.decode(z, decode_chunk=8, decode_overlap=ov) for ov in (0, 2, r)}
    errs = {ov: round(rel(y), 4) for ov, y in outs.items()}
    print(f"\nSVD tiny decoder, {t} frames in chunks of 8: relative error vs unchunked by overlap {errs} "
          f"(temporal radius {r})")
    # with the decoder's full temporal reach as context only the GroupNorm statistics differ
    assert errs[r] < 0.05
    assert float((outs[r] - full).abs().max()) < 0.15
    # seams shrink as context grows
    assert errs[r] < errs[2] < errs[0]


def test_audio_encode_decode_end_to_end(codecs):
    _, audio = codecs
    assert audio.latent_fps == 25.0 and audio.sample_rate == 16000
    for n in (16000, 16001, 3000):
        wave = torch.randn(2, n) * 0.1
        z = audio.encode(wave)
        assert z.shape == (2, *audio.latent_shape(n))
        assert z.shape[1:] == (8, -(-n // 640), 16)
        out = audio.decode(z)
        assert out.shape == (2, audio.samples_for_latent(z.shape[2])) and out.shape[1] >= n
        assert torch.isfinite(out).all() and out.abs().max() <= 1.0
    # the latent carries the audio (the seed code cached silence): silence and a tone encode differently
    silence, tone = torch.zeros(1, 6400), 0.5 * torch.sin(2 * math.pi * 440 * torch.arange(6400) / 16000)[None]
    assert (audio.encode(tone) - audio.encode(silence)).abs().mean() > 1e-2


def test_audio_pipeline_matches_audioldm2_steps(codecs):
    """encode = VAE(log-mel [B,1,F,64]) * scaling; decode = vocoder(VAE.decode(z / scaling)) cut to F*hop."""
    from jointdit.codecs.mel import log_mel

    _, audio = codecs
    wave = torch.randn(1, 6400) * 0.1
    mel = log_mel(wave, audio.params, framing="hifigan").unsqueeze(1)
    assert mel.shape == (1, 1, 40, 64)
    torch.testing.assert_close(audio.wave_to_mel(wave), mel)
    z = audio.encode(wave)
    torch.testing.assert_close(z, audio.vae.encode(mel).latent_dist.mode() * 0.75, rtol=1e-4, atol=1e-5)
    ref_mel = audio.vae.decode(z / 0.75).sample
    ref_wave = audio.vocoder(ref_mel.squeeze(1))
    assert ref_wave.shape[-1] > 6400  # the vocoder overshoots (odd kernel - rate) ...
    torch.testing.assert_close(audio.decode(z), ref_wave[:, :6400].clamp(-1, 1))  # ... and is cut


def test_build_codecs_requires_paths():
    with pytest.raises(ValueError, match="video.vae_path"):
        build_codecs({"name": "svd_audioldm2", "audio": {"root": "x"}})
    with pytest.raises(ValueError, match="audio.vae_path"):
        build_codecs({"name": "svd_audioldm2", "video": {"vae_path": "x"}})


def test_folder_layouts_accepted(tiny_pretrained):
    from jointdit.codecs.audioldm2 import AudioLDM2AudioCodec
    from jointdit.codecs.svd import SVDVideoCodec

    root = tiny_pretrained["root"]
    assert SVDVideoCodec(root / "svd", device="cpu").vae_path == root / "svd"  # parent with vae/
    a = AudioLDM2AudioCodec(root=root / "audioldm2", device="cpu")
    assert a.latent_channels == 8
    AudioLDM2AudioCodec(vae_path=root / "audioldm2", vocoder_path=root / "audioldm2", device="cpu")


def test_missing_or_wrong_folders_give_clear_errors(tiny_pretrained, tmp_path):
    from jointdit.codecs.audioldm2 import AudioLDM2AudioCodec
    from jointdit.codecs.svd import SVDVideoCodec

    root = tiny_pretrained["root"]
    with pytest.raises(FileNotFoundError, match=r"does not exist.*config\.json, diffusion_pytorch_model\.safetensors"
                       r".*AutoencoderKLTemporalDecoder"):
        SVDVideoCodec(tmp_path / "nowhere", device="cpu")
    # weights missing
    partial = tmp_path / "partial" / "vae"
    partial.mkdir(parents=True)
    shutil.copy(root / "svd" / "vae" / "config.json", partial)
    with pytest.raises(FileNotFoundError, match=r"missing diffusion_pytorch_model\.safetensors"):
        SVDVideoCodec(partial.parent, device="cpu")
    # wrong model class: the audio VAE where the SVD VAE belongs, and the other way round
    with pytest.raises(ValueError, match=r"holds AutoencoderKL, expected AutoencoderKLTemporalDecoder"):
        SVDVideoCodec(root / "audioldm2" / "vae", device="cpu")
    with pytest.raises(ValueError, match=r"holds AutoencoderKLTemporalDecoder, expected AutoencoderKL\b"):
        AudioLDM2AudioCodec(vae_path=root / "svd" / "vae", vocoder_path=root / "audioldm2", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors.*SpeechT5HifiGan"):
        AudioLDM2AudioCodec(vae_path=root / "audioldm2", vocoder_path=root / "audioldm2" / "vae", device="cpu")
    only_vae = tmp_path / "only_vae"
    shutil.copytree(root / "audioldm2" / "vae", only_vae / "vae")
    with pytest.raises(FileNotFoundError, match=r"only_vae/vocoder.*config\.json, model\.safetensors"):
        AudioLDM2AudioCodec(root=only_vae, device="cpu")
