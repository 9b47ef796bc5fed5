"""Embedded audio codec: AudioLDM2's log-mel spectrogram, inverted by Griffin-Lim.

Parameters are AudioLDM2's (16 kHz, n_fft 1024, hop 160, win 1024 Hann, 64 Slaney mel bands over
0–8 kHz, magnitude (power 1) STFT, natural log with a floor of 1e-5). The STFT is ``torch.stft``,
the mel filterbank ``librosa.filters.mel``, the inversion ``librosa.feature.inverse.mel_to_stft``
(NNLS) followed by ``librosa.griffinlim``; no hand-written DSP.

Time alignment
--------------
Two framings are provided by :func:`log_mel`:

* ``"center"`` (this codec): the wave is zero-padded to a multiple of ``hop``, framed with
  ``center=True`` and the trailing extra frame is dropped, so a wave of ``N`` samples gives
  ``La = ceil(N / hop)`` frames and frame ``k`` is centred on sample ``k·hop`` (time ``k·hop/sr``).
  Griffin-Lim uses the same centred framing, so :meth:`MelAudioCodec.decode` returns
  ``La·hop`` samples aligned with the input (trim to the original ``N`` if needed).
* ``"hifigan"`` (AudioLDM2's own training framing, used by the AudioLDM2 codec): reflect-pad
  ``(n_fft-hop)/2`` on both sides and frame with ``center=False``; again ``ceil(N/hop)`` frames, but
  frame ``k`` covers samples ``[k·hop, (k+1)·hop)`` (centre ``(k+½)·hop``), which is exactly the span
  a HiFi-GAN vocoder writes for that frame.

Normalization (this codec)
--------------------------
``z = 2·(log_mel − log_floor)/(log_ceil − log_floor) − 1`` with FIXED ``log_floor = ln(1e-5)``
(the clamp, i.e. digital silence → −1) and ``log_ceil`` (default ``ln 10``: a full-scale tone or square wave peaks near it, so +1).
It is the same affine map for every clip, so loudness survives: a quieter clip encodes lower.
Values may exceed 1 for very loud input; nothing is clipped above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Framing = Literal["center", "hifigan"]


@dataclass(frozen=True)
class MelParams:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    clip_val: float = 1e-5  # AudioLDM2's log floor (dynamic range compression clamp)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Mel frames for a wave of ``num_samples`` samples (both framings): ``ceil(N / hop)``."""
        return -(-int(num_samples) // self.hop_length)


@lru_cache(maxsize=8)
def _mel_basis_np(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=False, norm="slaney")


def mel_filterbank(params: MelParams, device=None, dtype=torch.float32) -> Tensor:
    """Slaney mel filterbank ``[n_mels, n_fft//2+1]`` (librosa, as AudioLDM2 uses)."""
    fb = _mel_basis_np(params.sample_rate, params.n_fft, params.n_mels, float(params.fmin), float(params.fmax))
    return torch.from_numpy(fb).to(device=device, dtype=dtype)


def stft_magnitude(wave: Tensor, params: MelParams, framing: Framing = "center") -> Tensor:
    """``[B, N]`` -> magnitude STFT ``[B, n_fft//2+1, ceil(N/hop)]`` (see module doc for framing)."""
    if wave.dim() != 2:
        raise ValueError(f"expected a wave batch [B, N], got {tuple(wave.shape)}")
    x = wave.float()
    hop = params.hop_length
    n = x.shape[-1]
    n_pad = params.num_frames(n) * hop
    if n_pad > n:
        x = F.pad(x, (0, n_pad - n))
    window = torch.hann_window(params.win_length, device=x.device, dtype=x.dtype)
    if framing == "center":
        spec = torch.stft(
            x, params.n_fft, hop_length=hop, win_length=params.win_length, window=window,
            center=True, pad_mode="constant", return_complex=True,
        )[..., :-1]
    elif framing == "hifigan":
        p = (params.n_fft - hop) // 2
        mode = "reflect" if n_pad > p else "constant"
        x = F.pad(x.unsqueeze(1), (p, p), mode=mode).squeeze(1)
        spec = torch.stft(
            x, params.n_fft, hop_length=hop, win_length=params.win_length, window=window,
            center=False, return_complex=True,
        )
    else:
        raise ValueError(f"unknown framing {framing!r}; use 'center' or 'hifigan'")
    return spec.abs()


def log_mel(wave: Tensor, params: MelParams = MelParams(), framing: Framing = "center") -> Tensor:
    """AudioLDM2 log-mel: ``ln(clamp(mel_basis @ |STFT|, clip_val))``, time-first ``[B, frames, n_mels]``."""
    mag = stft_magnitude(wave, params, framing)
    mel = torch.matmul(mel_filterbank(params, mag.device, mag.dtype), mag)
    return torch.log(torch.clamp(mel, min=params.clip_val)).transpose(1, 2)


def log_mel_to_wave(
    logmel: Tensor,
    params: MelParams = MelParams(),
    n_iter: int = 64,
    momentum: float = 0.99,
    seed: int = 0,
) -> Tensor:
    """Invert a time-first log-mel ``[B, frames, n_mels]`` (``"center"`` framing) to ``[B, frames·hop]`` in [-1, 1].

    NNLS mel→linear magnitude (``librosa.feature.inverse.mel_to_stft``) then ``librosa.griffinlim``
    with a fixed ``seed``. Runs in numpy on the CPU.
    """
    import librosa

    if logmel.dim() != 3:
        raise ValueError(f"expected a log-mel batch [B, frames, n_mels], got {tuple(logmel.shape)}")
    frames = logmel.shape[1]
    length = frames * params.hop_length
    mel = torch.exp(logmel.detach().float().cpu()).transpose(1, 2).numpy().astype(np.float64)  # [B, M, T]
    mag = librosa.feature.inverse.mel_to_stft(
        mel, sr=params.sample_rate, n_fft=params.n_fft, power=1.0,
        fmin=params.fmin, fmax=params.fmax, htk=False, norm="slaney",
    )
    # Centred framing of ``length = frames·hop`` samples has ``frames + 1`` frames; the encoder dropped
    # the last one (centred on the very end of the padded wave), so repeat the final frame for it.
    mag = np.concatenate([mag, mag[..., -1:]], axis=-1)
    wave = librosa.griffinlim(
        mag, n_iter=int(n_iter), hop_length=params.hop_length, win_length=params.win_length,
        n_fft=params.n_fft, window="hann", center=True, length=length, pad_mode="constant",
        momentum=momentum, init="random", random_state=seed,
    )
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).clamp_(-1.0, 1.0).to(logmel.device)


def log_spectral_distance(ref, est, sr: int = 16000, n_fft: int = 1024, hop_length: int | None = None,
                          eps: float = 1e-8) -> float:
    """Log-spectral distance in dB between two mono waves (numpy or torch, ``[N]`` or ``[B, N]``).

    ``LSD = mean_frames sqrt(mean_freq (10·log10((|X|²+eps)/(|Y|²+eps)))²)`` on a Hann STFT
    (``n_fft``, hop ``n_fft//4`` by default, centred). Both waves are cut to the shorter length;
    batched input is averaged over the batch. ``sr`` is accepted for symmetry with other metrics
    (the value does not depend on it for fixed ``n_fft``).
    """
    del sr
    r = torch.as_tensor(np.asarray(ref) if not isinstance(ref, Tensor) else ref).detach().float().cpu()
    e = torch.as_tensor(np.asarray(est) if not isinstance(est, Tensor) else est).detach().float().cpu()
    if r.dim() == 1:
        r = r[None]
    if e.dim() == 1:
        e = e[None]
    n = min(r.shape[-1], e.shape[-1])
    r, e = r[..., :n], e[..., :n]
    hop = hop_length or n_fft // 4
    win = torch.hann_window(n_fft)
    pr = torch.stft(r, n_fft, hop, window=win, center=True, return_complex=True).abs() ** 2
    pe = torch.stft(e, n_fft, hop, window=win, center=True, return_complex=True).abs() ** 2
    d = 10.0 * (torch.log10(pr + eps) - torch.log10(pe + eps))  # [B, F, T]
    return float(torch.sqrt((d**2).mean(dim=1)).mean())


class MelTiming:
    """Sample rate, hop and latent rate of a codec built on :class:`MelParams` (``self.params``);
    ``time_downsample`` is how many mel frames make one latent step."""

    params: MelParams
    time_downsample: int = 1

    @property
    def sample_rate(self) -> int:
        return self.params.sample_rate

    @property
    def hop_length(self) -> int:
        return self.params.hop_length

    @property
    def latent_fps(self) -> float:
        return self.params.frames_per_second / self.time_downsample

    @property
    def frames_per_second(self) -> float:  # the name docs/contracts.md uses
        return self.latent_fps


class MelAudioCodec(MelTiming):
    """Log-mel audio "latent" ``[B, 1, La, n_mels]`` (time-first), ``La = ceil(N/hop)``, 100 frames/s.

    ``decode`` runs Griffin-Lim and returns ``La·hop`` samples (the encoded wave zero-padded to a
    multiple of ``hop``; trim to the original length). See the module docstring for framing and the
    fixed normalization.
    """

    name = "mel"

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 160,
        win_length: int = 1024,
        n_mels: int = 64,
        fmin: float = 0.0,
        fmax: float = 8000.0,
        log_floor: float = math.log(1e-5),
        log_ceil: float = math.log(10.0),
        griffin_lim_iters: int = 64,
        griffin_lim_momentum: float = 0.99,
        encode_batch: int = 0,
        decode_batch: int = 0,
        seed: int = 0,
    ):
        if not log_ceil > log_floor:
            raise ValueError(f"log_ceil ({log_ceil}) must exceed log_floor ({log_floor})")
        self.params = MelParams(
            sample_rate=int(sample_rate), n_fft=int(n_fft), hop_length=int(hop_length),
            win_length=int(win_length), n_mels=int(n_mels), fmin=float(fmin), fmax=float(fmax),
            clip_val=float(math.exp(log_floor)),
        )
        self.log_floor = float(log_floor)
        self.log_ceil = float(log_ceil)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.griffin_lim_momentum = float(griffin_lim_momentum)
        self.encode_batch = int(encode_batch or 0)
        self.decode_batch = int(decode_batch or 0)
        self.seed = int(seed)
        self.scaling_factor = 1.0

    def latent_shape(self, num_samples: int) -> tuple[int, int, int]:
        return (1, self.params.num_frames(num_samples), self.params.n_mels)

    def samples_for_latent(self, latent_frames: int) -> int:
        """Wave length ``decode`` returns for ``latent_frames`` latent time steps."""
        return int(latent_frames) * self.params.hop_length

    # normalization -------------------------------------------------------------------------------
    def normalize(self, logmel: Tensor) -> Tensor:
        return 2.0 * (logmel - self.log_floor) / (self.log_ceil - self.log_floor) - 1.0

    def denormalize(self, z: Tensor) -> Tensor:
        return (z + 1.0) * 0.5 * (self.log_ceil - self.log_floor) + self.log_floor

    # codec -----------------------------------------------------------------------------------------
    def encode(self, wave: Tensor) -> Tensor:
        from jointdit.codecs.base import apply_in_chunks

        if wave.dim() != 2:
            raise ValueError(f"MelAudioCodec.encode expects [B, N], got {tuple(wave.shape)}")
        z = apply_in_chunks(lambda w: self.normalize(log_mel(w, self.params, "center")), wave, self.encode_batch)
        return z.unsqueeze(1)

    def decode(self, z: Tensor) -> Tensor:
        from jointdit.codecs.base import apply_in_chunks

        if z.dim() != 4 or z.shape[1] != 1 or z.shape[3] != self.params.n_mels:
            raise ValueError(f"MelAudioCodec.decode expects [B, 1, La, {self.params.n_mels}], got {tuple(z.shape)}")
        logmel = self.denormalize(z[:, 0].float())
        return apply_in_chunks(
            lambda m: log_mel_to_wave(m, self.params, self.griffin_lim_iters,
                                      momentum=self.griffin_lim_momentum, seed=self.seed),
            logmel, self.decode_batch,
        )

    def to(self, *args, **kwargs) -> "MelAudioCodec":  # stateless; kept for a uniform interface
        return self

    def __repr__(self) -> str:
        p = self.params
        return (f"MelAudioCodec(sr={p.sample_rate}, n_fft={p.n_fft}, hop={p.hop_length}, n_mels={p.n_mels}, "
                f"range=[{self.log_floor:.3f}, {self.log_ceil:.3f}], gl_iters={self.griffin_lim_iters})")
