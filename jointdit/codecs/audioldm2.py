"""Pretrained audio codec: AudioLDM2's mel VAE (diffusers ``AutoencoderKL``) + ``SpeechT5HifiGan`` vocoder.

What AudioLDM2 expects (its training code, ``audioldm_train/utilities/data/dataset.py``, and the
diffusers ``AudioLDM2Pipeline``):

* 16 kHz mono; magnitude STFT (n_fft 1024, hop 160, win 1024 Hann) after reflect-padding
  ``(n_fft-hop)/2 = 432`` samples on each side with ``center=False`` (HiFi-GAN framing);
  64 Slaney mel bands 0–8 kHz (``librosa.filters.mel``); ``log(clamp(mel, 1e-5))`` — natural log,
  NO further normalization — laid out time-first ``[B, 1, n_frames, 64]``.
  (:func:`jointdit.codecs.mel.log_mel` with ``framing="hifigan"`` computes exactly this.)
* The VAE maps that to ``[B, 8, n_frames/4, 16]``; latents are multiplied by the VAE's
  ``scaling_factor`` (read from its config). ``n_frames`` must be a multiple of the VAE downsampling
  (4), so waves are zero-padded to a multiple of ``hop·4 = 640`` samples (40 ms).
* Decoding: ``vae.decode(z / scaling_factor)`` -> log-mel -> ``vocoder(mel.squeeze(1))`` (the vocoder's
  config sets ``normalize_before=False``: it consumes the raw log-mel). The vocoder's upsampling
  (product of ``upsample_rates`` = 160 = hop) writes ``hop`` samples per frame; its transposed
  convolutions may add a few samples, so the output is cut (or zero-padded) to exactly
  ``n_frames·hop`` samples, like the pipeline's ``audio[:, :original_waveform_length]``.
* AudioLDM2's data loader also removes the mean and rescales every clip to a peak of 0.5. That is a
  per-clip normalization which would erase loudness, so it is OFF by default (``normalize_wave``).

Folders: ``<root>/vae`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, ``AutoencoderKL``) and
``<root>/vocoder`` (``config.json`` + ``model.safetensors``, ``SpeechT5HifiGan``) as in ``cvssp/audioldm2``;
each path may also point at the component folder itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from jointdit.codecs.base import find_model_folder, resolve_device, resolve_dtype
from jointdit.codecs.mel import MelParams, MelTiming, log_mel

AUDIOLDM2_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
AUDIOLDM2_VAE_CLASS = "AutoencoderKL"
VOCODER_FILES = ("config.json", "model.safetensors")
VOCODER_CLASS = "SpeechT5HifiGan"


def load_audioldm2_vae(path: str | Path, device="cpu", dtype=torch.float32):
    folder = find_model_folder(
        path, "vae", AUDIOLDM2_VAE_FILES, AUDIOLDM2_VAE_CLASS, "AudioLDM2 audio VAE",
        weight_alternatives=("diffusion_pytorch_model.bin",),
    )
    import jointdit  # noqa: F401  (torchvision fix before diffusers)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype)
    if vae.config.in_channels != 1 or vae.config.out_channels != 1:
        raise ValueError(
            f"{folder}: AudioLDM2's VAE works on 1-channel mel images, but this AutoencoderKL has "
            f"in_channels={vae.config.in_channels}, out_channels={vae.config.out_channels} (an image VAE?)"
        )
    return vae.to(device=device).eval().requires_grad_(False)


def load_vocoder(path: str | Path, device="cpu", dtype=torch.float32):
    folder = find_model_folder(
        path, "vocoder", VOCODER_FILES, VOCODER_CLASS, "AudioLDM2 vocoder",
        weight_alternatives=("pytorch_model.bin",), expected_model_type="speecht5_hifigan",
    )
    import jointdit  # noqa: F401
    from transformers import SpeechT5HifiGan

    voc = SpeechT5HifiGan.from_pretrained(str(folder), dtype=dtype)
    return voc.to(device=device).eval().requires_grad_(False)


class AudioLDM2AudioCodec(MelTiming):
    name = "audioldm2"

    def __init__(
        self,
        vae_path: str | Path | None = None,
        vocoder_path: str | Path | None = None,
        root: str | Path | None = None,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 160,
        win_length: int = 1024,
        n_mels: int = 64,
        fmin: float = 0.0,
        fmax: float = 8000.0,
        scaling_factor: float | None = None,
        sample_posterior: bool = False,
        normalize_wave: bool = False,
        encode_batch: int = 8,
        decode_batch: int = 8,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "float32",
        vae=None,
        vocoder=None,
    ):
        if root is not None:
            vae_path = vae_path if vae_path is not None else Path(root) / "vae"
            vocoder_path = vocoder_path if vocoder_path is not None else Path(root) / "vocoder"
        if (vae is None and vae_path is None) or (vocoder is None and vocoder_path is None):
            raise ValueError("AudioLDM2AudioCodec needs `root` (holding vae/ and vocoder/) or both `vae_path` and `vocoder_path`")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.vae = vae if vae is not None else load_audioldm2_vae(vae_path, self.device, self.dtype)
        self.vocoder = vocoder if vocoder is not None else load_vocoder(vocoder_path, self.device, self.dtype)
        self.vae_path, self.vocoder_path = vae_path, vocoder_path
        self.params = MelParams(
            sample_rate=int(sample_rate), n_fft=int(n_fft), hop_length=int(hop_length),
            win_length=int(win_length), n_mels=int(n_mels), fmin=float(fmin), fmax=float(fmax),
        )
        vcfg, ccfg = self.vae.config, self.vocoder.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vcfg.scaling_factor)
        self.latent_channels = int(vcfg.latent_channels)
        self.downsample = 2 ** (len(vcfg.block_out_channels) - 1)
        if self.params.n_mels % self.downsample:
            raise ValueError(f"n_mels={n_mels} is not divisible by the VAE downsampling {self.downsample}")
        if int(ccfg.model_in_dim) != self.params.n_mels:
            raise ValueError(f"vocoder expects {ccfg.model_in_dim} mel bands, codec computes {n_mels}")
        if int(ccfg.sampling_rate) != self.params.sample_rate:
            raise ValueError(f"vocoder runs at {ccfg.sampling_rate} Hz, codec at {sample_rate} Hz")
        self.sample_posterior = bool(sample_posterior)
        self.normalize_wave = bool(normalize_wave)
        self.encode_batch = int(encode_batch or 0)
        self.decode_batch = int(decode_batch or 0)

    # shapes ----------------------------------------------------------------------------------------
    @property
    def time_downsample(self) -> int:
        return self.downsample

    def mel_frames(self, num_samples: int) -> int:
        """Mel frames after padding to a multiple of the VAE downsampling."""
        f = self.params.num_frames(num_samples)
        return -(-f // self.downsample) * self.downsample

    def latent_shape(self, num_samples: int) -> tuple[int, int, int]:
        return (self.latent_channels, self.mel_frames(num_samples) // self.downsample, self.params.n_mels // self.downsample)

    def samples_for_latent(self, latent_frames: int) -> int:
        """Wave length ``decode`` returns for ``latent_frames`` latent time steps."""
        return int(latent_frames) * self.downsample * self.params.hop_length

    def to(self, device=None, dtype=None) -> "AudioLDM2AudioCodec":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        self.vae.to(device=self.device, dtype=self.dtype)
        self.vocoder.to(device=self.device, dtype=self.dtype)
        return self

    # pieces ----------------------------------------------------------------------------------------
    def wave_to_mel(self, wave: Tensor) -> Tensor:
        """``[B, N]`` -> AudioLDM2 log-mel ``[B, 1, mel_frames(N), n_mels]`` (float32, wave's device)."""
        if wave.dim() != 2:
            raise ValueError(f"AudioLDM2AudioCodec expects a wave batch [B, N], got {tuple(wave.shape)}")
        x = wave.float()
        if self.normalize_wave:
            x = x - x.mean(dim=-1, keepdim=True)
            x = 0.5 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-8)
        n_target = self.mel_frames(x.shape[-1]) * self.params.hop_length
        x = F.pad(x, (0, n_target - x.shape[-1]))
        return log_mel(x, self.params, framing="hifigan").unsqueeze(1)

    def mel_to_wave(self, mel: Tensor) -> Tensor:
        """Log-mel ``[B, 1, F, n_mels]`` -> ``[B, F·hop]`` through the vocoder."""
        frames = mel.shape[2]
        wave = self.vocoder(mel.squeeze(1).to(device=self.device, dtype=self.dtype))
        if wave.dim() == 1:
            wave = wave[None]
        n = frames * self.params.hop_length
        wave = wave[:, :n] if wave.shape[-1] >= n else F.pad(wave, (0, n - wave.shape[-1]))
        return wave.float().clamp_(-1.0, 1.0)

    # codec -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wave: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mel = self.wave_to_mel(wave)
        step = self.encode_batch if self.encode_batch > 0 else mel.shape[0]
        out = []
        for i in range(0, mel.shape[0], step):
            dist = self.vae.encode(mel[i : i + step].to(device=self.device, dtype=self.dtype)).latent_dist
            z = dist.sample(generator=generator) if self.sample_posterior else dist.mode()
            out.append((z * self.scaling_factor).float().to(wave.device))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def decode_mel(self, z: Tensor) -> Tensor:
        """Scaled latent ``[B, C, La, Fa]`` -> log-mel ``[B, 1, La·4, n_mels]`` (on the codec device)."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"AudioLDM2AudioCodec.decode expects [B,{self.latent_channels},La,Fa], got {tuple(z.shape)}")
        return self.vae.decode(z.to(device=self.device, dtype=self.dtype) / self.scaling_factor).sample

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent ``[B, C, La, Fa]`` -> wave ``[B, La·4·hop]`` (float32, z's device)."""
        step = self.decode_batch if self.decode_batch > 0 else z.shape[0]
        out = [self.mel_to_wave(self.decode_mel(z[i : i + step])).to(z.device) for i in range(0, z.shape[0], step)]
        return torch.cat(out, dim=0)

    def __repr__(self) -> str:
        return (f"AudioLDM2AudioCodec(vae={self.vae_path}, vocoder={self.vocoder_path}, scaling={self.scaling_factor}, "
                f"latent_fps={self.latent_fps}, device={self.device})")
