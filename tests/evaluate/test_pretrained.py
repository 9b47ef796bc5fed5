"""Pretrained metrics from local folders: tiny random-init models saved in the on-disk formats users
have (open_clip folder, transformers save_pretrained, StyleGAN-V's TorchScript I3D), loaded through the
same code path as real ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jointdit.data.media import Clip
from jointdit.evaluate.pretrained import ClapScorer, ClipScorer, pretrained_metrics

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    _save_clip(root / "clip")
    _save_i3d(root / "i3d")
    return root


@pytest.fixture(scope="module")
def models_dir(clip_dir, tmp_path_factory):
    """clip_dir plus a CLAP folder (transformers: slow to import on a busy machine)."""
    _save_clap(clip_dir / "clap", tmp_path_factory.mktemp("tok"))
    return clip_dir


def _save_clip(folder):
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))


def _save_clap(folder, scratch):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in bytes_to_unicode().values():  # byte-level BPE over single bytes (no merges)
        vocab.setdefault(char, len(vocab))
    vocab["<mask>"] = len(vocab)
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"))
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=80),
        audio_config=dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                          window_size=4, spec_size=256, num_mel_bins=64, patch_size=16, patch_stride=[16, 16]),
        projection_dim=16)
    ClapModel(config).save_pretrained(str(folder))
    extractor = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=2, truncation="rand_trunc")
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(folder))


class _TinyI3D(torch.nn.Module):
    """StyleGAN-V's I3D call signature: videos [B, 3, T, H, W] in [0, 255] → features [B, 400]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(8, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        features = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return features if return_features else features.softmax(-1)


def _save_i3d(folder):
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(_TinyI3D()), str(folder / "i3d_torchscript.pt"))


def _clips(seed: int, n: int = 3, offset: float = 0.0) -> list[Clip]:
    g = torch.Generator().manual_seed(seed)
    return [Clip(frames=(torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 + offset).clamp(-1, 1),
                 wave=torch.randn(32000, generator=g) * 0.1, fps=8.0, sample_rate=16000,
                 meta={"id": f"clip{i}"}) for i in range(n)]


def test_clip_scorer_loads_the_saved_weights_and_scores_in_range(clip_dir):
    from safetensors.torch import load_file

    scorer = ClipScorer(clip_dir / "clip")
    saved = load_file(str(clip_dir / "clip" / "open_clip_model.safetensors"))
    loaded = scorer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())  # the folder's weights, not a fresh init
    score = scorer.score(_clips(0)[0].frames, "a red ball bouncing")
    assert 0.0 <= score <= 100.0
    assert scorer.score(_clips(0)[0].frames, "a red ball bouncing") == score


def test_fvd_from_the_torchscript_i3d(clip_dir):
    generated, real = _clips(2), _clips(3, offset=0.6)
    figures, notes = pretrained_metrics(generated, real, clip_dir, {})
    assert figures["fvd"] > 0
    same, _ = pretrained_metrics(real, real, clip_dir, {})
    assert same["fvd"] == pytest.approx(0.0, abs=1e-3)
    assert any(n.startswith("clip_score: skipped, no clip name matches") for n in notes)


@pytest.mark.slow
def test_clap_scorer_loads_the_saved_weights(models_dir):
    from safetensors.torch import load_file

    scorer = ClapScorer(models_dir / "clap")
    saved = load_file(str(models_dir / "clap" / "model.safetensors"))
    loaded = scorer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k in loaded)
    audio = scorer.audio_embeddings(_clips(1, n=2))
    assert audio.shape == (2, 16) and torch.allclose(audio.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_all_metrics_from_a_models_folder(models_dir):
    generated, real = _clips(2), _clips(3, offset=0.6)
    captions = {f"clip{i}": "a red ball bouncing on the floor" for i in range(3)}
    figures, notes = pretrained_metrics(generated, real, models_dir, captions)
    assert set(figures) == {"clip_score", "clap_score", "fad_clap", "fvd"}, notes
    assert 0 <= figures["clip_score"] <= 100 and 0 <= figures["clap_score"] <= 100
    assert figures["fvd"] > 0 and figures["fad_clap"] >= 0


def test_missing_folders_skip_with_one_line_each(tmp_path):
    figures, notes = pretrained_metrics(_clips(4), _clips(5), tmp_path / "nothing", {})
    assert figures == {}
    assert len(notes) == 3
    assert any(n.startswith("clip_score: skipped, no open_clip folder") for n in notes)
    assert any(n.startswith("clap_score, fad_clap: skipped") for n in notes)
    assert any(n.startswith("fvd: skipped, no TorchScript I3D") for n in notes)
