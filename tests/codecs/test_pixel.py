import pytest
import torch

import jointdit  # noqa: F401
from jointdit.codecs import PixelVideoCodec, VideoCodec, build_codecs


@pytest.mark.parametrize("factor", [1, 2, 8])
def test_round_trip_is_exact(factor):
    g = torch.Generator().manual_seed(factor)
    frames = torch.rand(2, 5, 3, 32, 48, generator=g) * 2 - 1
    codec = PixelVideoCodec(factor)
    z = codec.encode(frames)
    assert z.shape == (2, *codec.latent_shape(5, 32, 48)) == (2, 5, 3 * factor**2, 32 // factor, 48 // factor)
    assert torch.equal(codec.decode(z), frames)


def test_space_to_depth_layout_is_local():
    # each latent position holds exactly its own f x f pixel block (no mixing across blocks)
    codec = PixelVideoCodec(2)
    frames = torch.zeros(1, 1, 3, 4, 4)
    frames[0, 0, 1, 2:4, 0:2] = 1.0  # green channel, block (row 1, col 0)
    z = codec.encode(frames)
    nz = z[0, 0].abs().sum(dim=0)
    assert nz[1, 0] == 4 and nz.sum() == 4
    assert z[0, 0, 4:8, 1, 0].eq(1).all()  # channel c*f^2 + (dy*f + dx)


def test_rates_protocol_and_errors():
    codec = PixelVideoCodec(8)
    assert isinstance(codec, VideoCodec)
    assert codec.latent_fps(24.0) == 24.0 and codec.frames_per_second(12) == 12.0
    with pytest.raises(ValueError, match="not divisible by the space-to-depth factor 8"):
        codec.encode(torch.zeros(1, 2, 3, 30, 32))
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(4, 32, 33)
    with pytest.raises(ValueError, match=r"\[B,T,3,H,W\]"):
        codec.encode(torch.zeros(2, 3, 32, 32))


def test_build_codecs_dispatch():
    video, audio = build_codecs({"name": "pixel_mel", "video": {"space_to_depth": 4}})
    assert isinstance(video, PixelVideoCodec) and video.factor == 4
    assert audio.latent_fps == 100.0
    with pytest.raises(ValueError, match="pixel_mel, svd_audioldm2"):
        build_codecs({"name": "nope"})
    with pytest.raises(ValueError, match="not a parameter of PixelVideoCodec"):
        build_codecs({"name": "pixel_mel", "video": {"facter": 4}})
