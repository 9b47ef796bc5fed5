"""Pretrained metrics, each from a local folder under ``models_dir`` (nothing is downloaded):

    <models_dir>/clip/  open_clip's folder format: open_clip_config.json + open_clip_model.safetensors
                        (or open_clip_pytorch_model.bin), loaded as ``local-dir:<folder>``
                        → clip_score: text ↔ frames
    <models_dir>/clap/  transformers ``ClapModel`` + ``ClapProcessor`` (save_pretrained format)
                        → clap_score: text ↔ audio; fad_clap: Fréchet distance on CLAP audio embeddings
    <models_dir>/i3d/i3d_torchscript.pt
                        the TorchScript I3D used by StyleGAN-V and most FVD code, called as
                        ``model(videos[B, 3, T, H, W] in [0, 255], rescale=True, resize=True, return_features=True)``
                        → fvd: Fréchet distance on its features (generated vs real)

Scores follow the usual definitions: CLIP/CLAP score = 100 · max(cos(text, x), 0), averaged over a
clip's frames (CLIP) and then over clips. A missing folder skips its metrics with one line in the
report's notes. TorchScript archives hold code for TorchScript's interpreter, not pickled Python
objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jointdit.data.media import Clip
from jointdit.evaluate.distances import frechet_distance

CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")
I3D_FILE = "i3d/i3d_torchscript.pt"


def _cosine_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """100 · max(cos(a_i, b_i), 0) row-wise."""
    return 100.0 * F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(min=0)


def _features(output: Any) -> torch.Tensor:
    """transformers ≥ 5 returns a model output whose ``pooler_output`` holds the features; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ----------------------------------------------------------------------------------------------
# CLIP (open_clip, local folder)
# ----------------------------------------------------------------------------------------------


class ClipScorer:
    """open_clip from a local folder; ``score(frames, caption)`` = 100 · mean over frames of max(cos, 0)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", frames_per_clip: int = 8):
        import jointdit  # noqa: F401  (torchvision fix before open_clip imports it)
        import open_clip

        folder = Path(folder).resolve()
        self.model = open_clip.create_model(f"local-dir:{folder}", device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess.get("size", self.model.visual.image_size)
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.frames_per_clip = frames_per_clip

    def _images(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] in [-1, 1] → [K, 3, h, w] normalised: K evenly spaced frames, short side resized, centre crop."""
        picks = torch.linspace(0, frames.shape[0] - 1, min(self.frames_per_clip, frames.shape[0])).round().long()
        images = frames[picks].float().add(1).mul(0.5).clamp(0, 1)
        height, width = images.shape[-2:]
        scale = max(self.size[0] / height, self.size[1] / width)
        resized = (max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale)))
        images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (resized[0] - self.size[0]) // 2, (resized[1] - self.size[1]) // 2
        images = images[:, :, top : top + self.size[0], left : left + self.size[1]]
        return ((images - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def score(self, frames: torch.Tensor, caption: str) -> float:
        image = self.model.encode_image(self._images(frames))  # [K, D]
        text = self.model.encode_text(self.tokenizer([caption]).to(self.device))  # [1, D]
        return float(_cosine_score(image, text.expand_as(image)).mean())


# ----------------------------------------------------------------------------------------------
# CLAP (transformers, local folder)
# ----------------------------------------------------------------------------------------------


class ClapScorer:
    """transformers ``ClapModel`` + ``ClapProcessor`` from a local folder."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        import jointdit  # noqa: F401
        from transformers import ClapModel, ClapProcessor

        self.model = ClapModel.from_pretrained(str(folder)).to(device).eval()
        self.processor = ClapProcessor.from_pretrained(str(folder))
        self.rate = int(self.processor.feature_extractor.sampling_rate)
        self.device = torch.device(device)

    def _wave(self, clip: Clip) -> np.ndarray:
        import librosa

        wave = clip.wave.detach().float().cpu().numpy()
        return librosa.resample(wave, orig_sr=clip.sample_rate, target_sr=self.rate) if clip.sample_rate != self.rate else wave

    @torch.no_grad()
    def audio_embeddings(self, clips: Sequence[Clip]) -> torch.Tensor:
        """[B, D] unit-norm CLAP audio embeddings."""
        inputs = self.processor(audio=[self._wave(c) for c in clips], sampling_rate=self.rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return F.normalize(_features(self.model.get_audio_features(**inputs)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(captions), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return F.normalize(_features(self.model.get_text_features(**inputs)).float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# I3D (TorchScript, StyleGAN-V's FVD detector)
# ----------------------------------------------------------------------------------------------


class I3DFeatures:
    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, clips: Sequence[Clip]) -> np.ndarray:
        """[B, D] features; every clip cut to the shortest clip's frame count."""
        length = min(c.frames.shape[0] for c in clips)
        videos = torch.stack([c.frames[:length].float().add(1).mul(127.5).clamp(0, 255) for c in clips])  # [B, T, 3, H, W]
        videos = videos.permute(0, 2, 1, 3, 4).to(self.device)  # [B, 3, T, H, W] in [0, 255]
        return self.model(videos, rescale=True, resize=True, return_features=True).float().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------


def _captioned(clips: Sequence[Clip], names: Sequence[str], captions: Mapping[str, str]) -> list[tuple[Clip, str]]:
    from jointdit.evaluate.events import reference_id

    out = []
    for clip, name in zip(clips, names):
        key = reference_id(name, captions)
        if key is not None and captions[key]:
            out.append((clip, captions[key]))
    return out


def pretrained_metrics(generated: Sequence[Clip], real: Sequence[Clip], models_dir: str | os.PathLike,
                       captions: Mapping[str, str] | None = None, generated_names: Sequence[str] | None = None,
                       device: str = "cpu") -> tuple[dict[str, float], list[str]]:
    """Figures from whichever local folders exist, and one note per metric skipped (and why).

    ``captions`` maps clip ids to captions; a generated clip takes the caption of the id its name
    refers to (see ``events.reference_id``). Text scores are computed on the generated clips, or on
    the real ones when there are no generated clips.
    """
    models_dir = Path(models_dir)
    figures: dict[str, float] = {}
    notes: list[str] = []
    scored, names = (generated, generated_names) if generated else (real, None)
    from jointdit.evaluate.sync import clip_name

    names = list(names or [clip_name(c, f"clip_{i:04d}") for i, c in enumerate(scored)])
    pairs = _captioned(scored, names, captions or {})

    clip_dir = models_dir / "clip"
    if not (clip_dir / "open_clip_config.json").exists():
        notes.append(f"clip_score: skipped, no open_clip folder at {clip_dir} (open_clip_config.json + "
                     f"{' or '.join(CLIP_FILES[:2])})")
    elif not pairs:
        notes.append("clip_score: skipped, no clip name matches a captioned id")
    else:
        scorer = ClipScorer(clip_dir, device)
        figures["clip_score"] = float(np.mean([scorer.score(c.frames, text) for c, text in pairs]))

    clap_dir = models_dir / "clap"
    if not (clap_dir / "config.json").exists():
        notes.append(f"clap_score, fad_clap: skipped, no transformers ClapModel folder at {clap_dir}")
    else:
        scorer = ClapScorer(clap_dir, device)
        if pairs:
            audio = scorer.audio_embeddings([c for c, _ in pairs])
            text = scorer.text_embeddings([t for _, t in pairs])
            figures["clap_score"] = float(_cosine_score(audio, text).mean())
        else:
            notes.append("clap_score: skipped, no clip name matches a captioned id")
        if len(generated) >= 2 and len(real) >= 2:
            figures["fad_clap"] = frechet_distance(scorer.audio_embeddings(generated).numpy(),
                                                   scorer.audio_embeddings(real).numpy(), standardise=False)
        else:
            notes.append("fad_clap: skipped, needs at least 2 generated and 2 real clips")

    i3d = models_dir / I3D_FILE
    if not i3d.exists():
        notes.append(f"fvd: skipped, no TorchScript I3D at {i3d}")
    elif len(generated) >= 2 and len(real) >= 2:
        features = I3DFeatures(i3d, device)
        figures["fvd"] = frechet_distance(features(generated), features(real), standardise=False)
    else:
        notes.append("fvd: skipped, needs at least 2 generated and 2 real clips")
    return figures, notes
