"""ClipConditioner on a tiny random open_clip config (no downloads), and its fit with JointDiT."""

import json

import jointdit  # noqa: F401
import pytest
import torch

from jointdit.models import ClipConditioner, Condition, JointDiT, model_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    (folder / "jd-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "jd-tiny-clip"


@pytest.fixture(scope="module")
def clip(clip_name) -> ClipConditioner:
    torch.manual_seed(0)
    return ClipConditioner(clip_name, pretrained=None)


def test_encodes_text_and_images_with_expected_shapes(clip):
    tokens, pooled = clip.encode_text(["a dog barks", "rain on a window"])
    assert tokens.shape == (2, 12, 32) and pooled.shape == (2, 24)
    assert not torch.allclose(tokens[0], tokens[1]) and not torch.allclose(pooled[0], pooled[1])
    images = torch.rand(3, 3, 48, 64) * 2 - 1  # [-1, 1], not square, not the CLIP size
    emb = clip.encode_image(images)
    assert emb.shape == (3, 24) and torch.isfinite(emb).all()
    assert clip.model_kwargs() == {"text_token_dim": 32, "text_pooled_dim": 24, "image_embed_dim": 24,
                                   "text_len": 12}


def test_is_frozen(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training
    tokens, _ = clip.encode_text(["x"])
    assert not tokens.requires_grad


def test_pretrained_local_checkpoint_path(clip, clip_name, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.model.state_dict(), path)
    torch.manual_seed(123)  # different random init: the loaded weights must win
    loaded = ClipConditioner(clip_name, pretrained=str(path))
    for a, b in zip(clip.encode_text(["hello"]), loaded.encode_text(["hello"])):
        torch.testing.assert_close(a, b)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(clip.encode_image(img), loaded.encode_image(img))


def test_condition_drives_jointdit_and_projections_train_and_save(clip, tmp_path):
    cond = clip.encode(["a dog barks", "a bell rings"], torch.rand(2, 3, 32, 32) * 2 - 1,
                       drop_text=torch.tensor([False, True]), drop_image=torch.tensor([True, False]))
    assert isinstance(cond, Condition) and cond.batch_size == 2
    cfg = model_config("tiny", depth=1, video_in_channels=3, audio_in_channels=1, video_patch_size=(1, 2, 2),
                       audio_patch_size=(2, 4), **clip.model_kwargs())
    m = JointDiT(**cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    zv, za = torch.randn(2, 2, 3, 4, 4), torch.randn(2, 1, 4, 8)
    vv, va = m(zv, za, torch.rand(2), torch.rand(2), cond)
    (vv.square().mean() + va.square().mean()).backward()
    for name in ("cond_embed.text_tokens.0.weight", "cond_embed.text_pooled.0.weight",
                 "cond_embed.image_token.0.weight", "cond_embed.null_text_tokens", "cond_embed.null_image_token"):
        assert m.get_parameter(name).grad is not None and m.get_parameter(name).grad.abs().sum() > 0, name
    m.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    assert "cond_embed.text_tokens.0.weight" in saved and "cond_embed.null_text_pooled" in saved
    assert not any(k.startswith("model.") or "visual" in k for k in saved)  # CLIP itself is not in the model


def test_condition_to_keeps_flags_boolean():
    c = Condition(text_pooled=torch.randn(2, 3), drop_text=torch.tensor([True, False]))
    d = c.to("cpu", torch.float64)
    assert d.text_pooled.dtype == torch.float64 and d.drop_text.dtype == torch.bool and d.image is None
    assert Condition(image=torch.zeros(3, 1)).with_drop(image=True).drop_image.tolist() == [True] * 3
