"""Fixtures for the codec tests: tiny random-init pretrained codecs saved in the real folder layout."""

from __future__ import annotations

from pathlib import Path

import pytest

import jointdit  # noqa: F401  (torchvision fix before diffusers/transformers)

TINY_AUDIO_VAE_SCALING = 0.75  # != 1 so a missing (un)scaling shows up
TINY_SVD_SCALING = 0.18215


def make_tiny_pretrained(root: Path) -> dict[str, Path]:
    """Build tiny random-init codec models and ``save_pretrained`` them like the real repositories.

    Layout (what ``python -m jointdit.assets fetch`` produces under ``assets/models``)::

        root/svd/vae/                  AutoencoderKLTemporalDecoder  config.json diffusion_pytorch_model.safetensors
        root/audioldm2/vae/            AutoencoderKL (1 ch mel, 8 latent ch, /4)   same two files
        root/audioldm2/vocoder/        SpeechT5HifiGan (64 mels, x160 = hop)       config.json model.safetensors

    Returns the three folder paths keyed ``svd_vae``, ``audio_vae``, ``vocoder`` (plus ``root``).
    """
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    root = Path(root)
    paths = {
        "root": root,
        "svd_vae": root / "svd" / "vae",
        "audio_vae": root / "audioldm2" / "vae",
        "vocoder": root / "audioldm2" / "vocoder",
    }
    torch.manual_seed(0)
    # GroupNorm in the temporal decoder is hard-wired to 32 groups: channels must be multiples of 32.
    svd = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16,
        scaling_factor=TINY_SVD_SCALING,
    )
    svd.save_pretrained(paths["svd_vae"])

    vae = AutoencoderKL(
        in_channels=1, out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8,
        sample_size=64, scaling_factor=TINY_AUDIO_VAE_SCALING,
    )
    vae.save_pretrained(paths["audio_vae"])

    # Like the real vocoder: 16 kHz, 64 mels, raw log-mel input, upsampling product = hop = 160,
    # with one odd (kernel - rate) so the output overshoots by a few samples and must be trimmed.
    voc_cfg = SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=32,
        upsample_rates=[5, 4, 8], upsample_kernel_sizes=[16, 8, 16],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
    )
    SpeechT5HifiGan(voc_cfg).save_pretrained(paths["vocoder"])
    return paths


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory) -> dict[str, Path]:
    """Tiny codecs under ``<tmp>/models`` so ``paths.assets_dir=<tmp>`` resolves the real config."""
    base = tmp_path_factory.mktemp("assets")
    paths = make_tiny_pretrained(base / "models")
    paths["assets_dir"] = base
    return paths
