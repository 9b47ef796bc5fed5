"""Pretrained video codec: the Stable Video Diffusion temporal VAE (diffusers ``AutoencoderKLTemporalDecoder``).

Loads from a local folder in diffusers format (``config.json`` + ``diffusion_pytorch_model.safetensors``),
given either as the VAE folder itself or as a parent with a ``vae/`` subfolder (the layout of
``stabilityai/stable-video-diffusion-img2vid``; ``python -m jointdit.assets fetch`` mirrors it into
``assets/models/svd/vae``).

* encode: frames go through the (per-image) encoder ``encode_batch`` frames at a time; the latent is the
  posterior mode (or a sample) times ``scaling_factor`` (0.18215 in SVD's config). Time is not
  compressed: ``[B,T,3,H,W] -> [B,T,4,H/8,W/8]``.
* decode: the temporal decoder mixes neighbouring frames, so it runs on contiguous chunks of one video
  with ``num_frames=<chunk length>``. The T frames are split into ``ceil(T/decode_chunk)`` nearly equal
  chunks (all frames are returned; no one-frame tail chunk). ``decode_overlap`` extra context frames on
  each side of a chunk are decoded and discarded, which reduces seams between chunks. Chunked decoding is
  not bit-identical to decoding all frames at once: the decoder's temporal convolutions (reach
  :attr:`SVDVideoCodec.temporal_radius` frames, 29 for SVD's VAE) and the GroupNorm statistics of its
  temporal blocks see only the decoded window. The overlap trades compute for smaller seams (measured on a
  tiny random-init decoder, 26 frames in chunks of 8: relative error 0.30 with no overlap, 0.11 with 2
  frames (the default), 0.05 with 4, 0.02 with its full radius of 11; tests/codecs/test_pretrained.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from jointdit.codecs.base import balanced_chunks, find_model_folder, resolve_device, resolve_dtype

SVD_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
SVD_VAE_CLASS = "AutoencoderKLTemporalDecoder"


def load_svd_vae(path: str | Path, device="cpu", dtype=torch.float32):
    """Load an ``AutoencoderKLTemporalDecoder`` from ``path`` (the folder or its parent with ``vae/``)."""
    folder = find_model_folder(
        path, "vae", SVD_VAE_FILES, SVD_VAE_CLASS, "SVD video VAE",
        weight_alternatives=("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"),
    )
    import jointdit  # noqa: F401  (torchvision fix before diffusers)
    from diffusers import AutoencoderKLTemporalDecoder

    kwargs = {}
    if not (folder / "diffusion_pytorch_model.safetensors").is_file() and (
        folder / "diffusion_pytorch_model.fp16.safetensors"
    ).is_file():
        kwargs["variant"] = "fp16"
    vae = AutoencoderKLTemporalDecoder.from_pretrained(str(folder), torch_dtype=dtype, **kwargs)
    return vae.to(device=device).eval().requires_grad_(False)


class SVDVideoCodec:
    name = "svd"

    def __init__(
        self,
        vae_path: str | Path,
        encode_batch: int = 16,
        decode_chunk: int = 8,
        decode_overlap: int = 2,
        scaling_factor: float | None = None,
        sample_posterior: bool = False,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "float32",
        vae=None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.vae = vae if vae is not None else load_svd_vae(vae_path, self.device, self.dtype)
        self.vae_path = None if vae_path is None else Path(vae_path)
        cfg = self.vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.encode_batch = int(encode_batch or 0)
        self.decode_chunk = int(decode_chunk or 0)
        self.decode_overlap = max(0, int(decode_overlap or 0))
        self.sample_posterior = bool(sample_posterior)

    def to(self, device=None, dtype=None) -> "SVDVideoCodec":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        self.vae.to(device=self.device, dtype=self.dtype)
        return self

    @property
    def temporal_radius(self) -> int:
        """How many frames each side one decoded frame depends on through the decoder's temporal
        convolutions (its GroupNorms still see the whole chunk). ``decode_overlap >= temporal_radius``
        removes chunk seams apart from those normalization statistics."""
        return sum(
            (m.kernel_size[0] - 1) // 2 * m.dilation[0]
            for m in self.vae.decoder.modules()
            if isinstance(m, torch.nn.Conv3d)
        )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"SVDVideoCodec: frame size {height}x{width} must be divisible by {f}")
        return (int(num_frames), self.latent_channels, height // f, width // f)

    def latent_fps(self, fps: float) -> float:
        return float(fps)

    frames_per_second = latent_fps

    @torch.no_grad()
    def encode(self, frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"SVDVideoCodec.encode expects [B,T,3,H,W], got {tuple(frames.shape)}")
        b, t, _, h, w = frames.shape
        self.latent_shape(t, h, w)
        flat = frames.reshape(b * t, 3, h, w)
        step = self.encode_batch if self.encode_batch > 0 else b * t
        out = []
        for i in range(0, b * t, step):
            x = flat[i : i + step].to(device=self.device, dtype=self.dtype)
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator=generator) if self.sample_posterior else dist.mode()
            out.append((z * self.scaling_factor).float().to(frames.device))
        z = torch.cat(out, dim=0)
        return z.reshape(b, t, *z.shape[1:])

    @torch.no_grad()
    def decode(self, z: Tensor, decode_chunk: int | None = None, decode_overlap: int | None = None) -> Tensor:
        """``[B,T,C,h,w]`` scaled latent -> ``[B,T,3,H,W]`` clamped to [-1,1]; ALL ``T`` frames.

        Decodes at most ``decode_chunk`` (+ ``2·decode_overlap`` context) frames per VAE call;
        ``decode_chunk <= 0`` decodes all frames in one call.
        """
        if z.dim() != 5 or z.shape[2] != self.latent_channels:
            raise ValueError(
                f"SVDVideoCodec.decode expects [B,T,{self.latent_channels},h,w], got {tuple(z.shape)}"
            )
        chunk = self.decode_chunk if decode_chunk is None else int(decode_chunk)
        overlap = self.decode_overlap if decode_overlap is None else max(0, int(decode_overlap))
        b, t = z.shape[:2]
        out_device = z.device
        zs = z.to(device=self.device, dtype=self.dtype) / self.scaling_factor
        pieces = []
        for start, stop in balanced_chunks(t, chunk):
            lo, hi = max(0, start - overlap), min(t, stop + overlap)
            n = hi - lo
            # [B, n, C, h, w] -> [B*n, C, h, w], batch-major as the temporal decoder reshapes it back
            x = self.vae.decode(zs[:, lo:hi].reshape(b * n, *zs.shape[2:]), num_frames=n).sample
            x = x.reshape(b, n, *x.shape[1:])[:, start - lo : stop - lo]
            pieces.append(x.float().clamp_(-1.0, 1.0).to(out_device))
        frames = torch.cat(pieces, dim=1)
        assert frames.shape[1] == t, (frames.shape, t)
        return frames

    def __repr__(self) -> str:
        return (f"SVDVideoCodec(vae={self.vae_path}, scaling={self.scaling_factor}, encode_batch={self.encode_batch}, "
                f"decode_chunk={self.decode_chunk}, decode_overlap={self.decode_overlap}, device={self.device})")
