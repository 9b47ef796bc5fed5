"""JointDiT contract: shapes, zero init, exact isolation, per-sample modes, memory knobs, export/import, names."""

import fnmatch

import jointdit  # noqa: F401
import pytest
import torch

from jointdit.models import Condition, JointDiT, build_model, count_flops, model_config

pytestmark = pytest.mark.usefixtures("one_thread")

B = 4


def make_model(**overrides) -> JointDiT:
    cfg = model_config("tiny", depth=2, hidden_size=64, num_heads=4, video_in_channels=4, audio_in_channels=2,
                       video_patch_size=(1, 2, 2), audio_patch_size=(2, 4), video_latent_fps=4.0,
                       audio_latent_fps=8.0, text_token_dim=12, text_pooled_dim=10, image_embed_dim=14, text_len=5)
    cfg.update(overrides)
    return JointDiT(**cfg)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, including the zero-initialised adaLN and outputs, so that every path
    (attention across modalities, conditions, gates) influences the output and a test can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(seed: int = 1, b: int = B, frames: int = 4, audio_len: int = 8):
    g = torch.Generator().manual_seed(seed)
    zv = torch.randn(b, frames, 4, 4, 6, generator=g)   # [B, Tv, Cv, hv, wv] -> 4*2*3 = 24 tokens
    za = torch.randn(b, 2, audio_len, 8, generator=g)    # [B, Ca, La, Fa]     -> 4*2 = 8 tokens
    tv, ta = torch.rand(b, generator=g), torch.rand(b, generator=g)
    cond = Condition(text_tokens=torch.randn(b, 5, 12, generator=g), text_pooled=torch.randn(b, 10, generator=g),
                     image=torch.randn(b, 14, generator=g))
    return zv, za, tv, ta, cond


@pytest.fixture(scope="module")
def model() -> JointDiT:
    torch.manual_seed(0)
    return randomize(make_model()).eval()


def test_shapes_and_untrained_model_outputs_exactly_zero():
    m = make_model()
    zv, za, tv, ta, cond = inputs()
    vv, va = m(zv, za, tv, ta, cond)
    assert vv.shape == zv.shape and va.shape == za.shape
    assert torch.equal(vv, torch.zeros_like(vv)) and torch.equal(va, torch.zeros_like(va))


def test_default_data_shapes_and_token_counts():
    m = build_model("tiny", depth=1)
    zv, za = torch.randn(1, 16, 192, 8, 8), torch.randn(1, 1, 200, 64)
    assert m.grids(zv, za) == ((16, 4, 4), (50, 4))  # 256 video + 200 audio tokens
    vv, va = m(zv, za, torch.rand(1), torch.rand(1))
    assert vv.shape == zv.shape and va.shape == za.shape


@pytest.mark.parametrize("bad,match", [
    ((torch.randn(1, 3, 4, 4, 6), torch.randn(1, 2, 8, 8)), None),
    ((torch.randn(1, 4, 4, 5, 6), torch.randn(1, 2, 8, 8)), "height hv=5 is not divisible by patch_h=2"),
    ((torch.randn(1, 4, 4, 4, 6), torch.randn(1, 2, 7, 8)), "time La=7 is not divisible by patch_t=2"),
    ((torch.randn(1, 4, 4, 4, 6), torch.randn(1, 2, 8, 6)), "freq Fa=6 is not divisible by patch_f=4"),
])
def test_patch_sizes_must_divide_latent_dims(bad, match):
    m = make_model(video_patch_size=(2, 2, 2))
    zv, za = bad
    with pytest.raises(ValueError, match=match or "frames Tv=3 is not divisible by patch_t=2") as err:
        m(zv, za, torch.rand(1), torch.rand(1))
    assert "audio_patch_size" in str(err.value) or "video_patch_size" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Isolation (exact, both directions)
# ---------------------------------------------------------------------------------------------
def _changed(model, mode, which: str, **knobs):
    model.set_memory_knobs(**knobs)
    try:
        zv, za, tv, ta, cond = inputs()
        vv, va = model(zv, za, tv, ta, cond, mode)
        zv2, za2 = (zv + torch.randn_like(zv), za) if which == "video" else (zv, za + torch.randn_like(za))
        vv2, va2 = model(zv2, za2, tv, ta, cond, mode)
    finally:
        model.set_memory_knobs()
    return (vv, va), (vv2, va2)


@torch.no_grad()
@pytest.mark.parametrize("knobs", [{}, {"kv_downsample": 2}, {"q_chunk_v": 5, "q_chunk_a": 3, "kv_downsample": 3},
                                   {"kv_pool_space": 2}, {"kv_pool_space": 2, "kv_downsample": 2}])
def test_isolation_both_directions(model, knobs):
    # iso_v: video blind to audio -> changing audio leaves video output bit-identical (audio still sees video)
    (vv, va), (vv2, va2) = _changed(model, "iso_v", "audio", **knobs)
    assert torch.equal(vv, vv2) and not torch.allclose(va, va2)
    (vv, va), (vv2, va2) = _changed(model, "iso_v", "video", **knobs)
    assert not torch.allclose(va, va2)  # ... audio does see video
    # iso_a: audio blind to video
    (vv, va), (vv2, va2) = _changed(model, "iso_a", "video", **knobs)
    assert torch.equal(va, va2) and not torch.allclose(vv, vv2)
    (vv, va), (vv2, va2) = _changed(model, "iso_a", "audio", **knobs)
    assert not torch.allclose(vv, vv2)
    # iso: both blind
    (vv, va), (vv2, va2) = _changed(model, "iso", "audio", **knobs)
    assert torch.equal(vv, vv2)
    (vv, va), (vv2, va2) = _changed(model, "iso", "video", **knobs)
    assert torch.equal(va, va2)
    # full: each modality sees the other
    (vv, va), (vv2, va2) = _changed(model, "full", "audio", **knobs)
    assert not torch.allclose(vv, vv2, atol=1e-4)
    (vv, va), (vv2, va2) = _changed(model, "full", "video", **knobs)
    assert not torch.allclose(va, va2, atol=1e-4)


@torch.no_grad()
def test_isolated_modality_equals_other_modality_absent(model):
    # iso_v video output is what the video stream computes with no audio tokens at all: a different
    # audio LENGTH (so a different number of audio keys) must not matter either.
    zv, za, tv, ta, cond = inputs()
    vv, _ = model(zv, za, tv, ta, cond, "iso_v")
    vv_short, _ = model(zv, za[:, :, :4], tv, ta, cond, "iso_v")
    assert torch.equal(vv, vv_short)  # bit-for-bit
    _, va = model(zv, za, tv, ta, cond, "iso_a")
    _, va_short = model(zv[:, :2], za, tv, ta, cond, "iso_a")
    assert torch.equal(va, va_short)


def test_isolation_blocks_gradients(model):
    zv, za, tv, ta, cond = inputs()
    za = za.clone().requires_grad_(True)
    vv, _ = model(zv, za, tv, ta, cond, "iso_v")
    vv.square().sum().backward()
    assert za.grad is None or torch.count_nonzero(za.grad) == 0


@torch.no_grad()
def test_per_sample_modes_equal_separate_calls(model):
    zv, za, tv, ta, cond = inputs()
    modes = ["full", "iso_v", "iso", "iso_a"]
    vv, va = model(zv, za, tv, ta, cond, modes)
    for i, m in enumerate(modes):
        sv, sa = model(zv[i:i + 1], za[i:i + 1], tv[i:i + 1], ta[i:i + 1], cond.index(slice(i, i + 1)), m)
        torch.testing.assert_close(vv[i:i + 1], sv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va[i:i + 1], sa, rtol=1e-5, atol=1e-5)
    # repeated modes in any order, too
    modes = ["iso", "full", "iso", "full"]
    vv, va = model(zv, za, tv, ta, cond, modes)
    for m in ("iso", "full"):
        idx = [i for i, mi in enumerate(modes) if mi == m]
        sv, sa = model(zv[idx], za[idx], tv[idx], ta[idx], cond.index(idx), m)
        torch.testing.assert_close(vv[idx], sv, rtol=1e-5, atol=1e-5)


def test_bad_mode_is_rejected(model):
    zv, za, tv, ta, cond = inputs()
    with pytest.raises(ValueError, match="mode must be one of"):
        model(zv, za, tv, ta, cond, "iso_video")
    with pytest.raises(ValueError, match="per-sample mode list has 2 entries"):
        model(zv, za, tv, ta, cond, ["full", "iso"])


# ---------------------------------------------------------------------------------------------
# Timesteps and conditions
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_per_frame_video_timesteps(model):
    zv, za, tv, ta, cond = inputs()
    per_frame = tv[:, None].expand(B, zv.shape[1]).contiguous()
    torch.testing.assert_close(model(zv, za, per_frame, ta, cond)[0], model(zv, za, tv, ta, cond)[0])
    per_frame[:, 0] = 0.0  # image->video: frame 0 clean
    vv, _ = model(zv, za, per_frame, ta, cond)
    assert not torch.allclose(vv, model(zv, za, tv, ta, cond)[0])


@torch.no_grad()
def test_each_modality_uses_its_own_timestep(model):
    zv, za, tv, ta, cond = inputs()
    vv, va = model(zv, za, tv, ta, cond, "iso")
    vv2, va2 = model(zv, za, tv, ta * 0.5, cond, "iso")
    assert torch.equal(vv, vv2) and not torch.allclose(va, va2)


@torch.no_grad()
def test_dropped_condition_equals_absent_condition(model):
    zv, za, tv, ta, cond = inputs()
    none = model(zv, za, tv, ta, None)
    dropped = model(zv, za, tv, ta, cond.with_drop(text=True, image=True))
    kept = model(zv, za, tv, ta, cond)
    for a, b in zip(none, dropped):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(kept[0], none[0])
    # per-sample: drop text for samples 0 and 2 only
    mixed = Condition(cond.text_tokens, cond.text_pooled, cond.image,
                      drop_text=torch.tensor([True, False, True, False]))
    out = model(zv, za, tv, ta, mixed)
    only_img = model(zv, za, tv, ta, Condition(image=cond.image))
    torch.testing.assert_close(out[0][[0, 2]], only_img[0][[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][[1, 3]], kept[0][[1, 3]], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_condition_cat_batches_guidance_branches(model):
    zv, za, tv, ta, cond = inputs(b=2)
    branches = Condition.cat([cond, cond.with_drop(text=True), Condition(image=cond.image)])
    vv, _ = model(zv.repeat(3, 1, 1, 1, 1), za.repeat(3, 1, 1, 1), tv.repeat(3), ta.repeat(3), branches)
    torch.testing.assert_close(vv[2:4], vv[4:6], rtol=1e-5, atol=1e-5)   # dropped text == absent text
    torch.testing.assert_close(vv[:2], model(zv, za, tv, ta, cond)[0], rtol=1e-5, atol=1e-5)


def test_text_length_mismatch_is_explained(model):
    zv, za, tv, ta, _ = inputs()
    with pytest.raises(ValueError, match="text_len=5"):
        model(zv, za, tv, ta, Condition(text_tokens=torch.randn(B, 7, 12)))


# ---------------------------------------------------------------------------------------------
# Memory knobs
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("mode", ["full", "iso_v", ["full", "iso", "iso_a", "full"]])
def test_query_chunking_equals_unchunked(model, mode):
    zv, za, tv, ta, cond = inputs()
    ref = model(zv, za, tv, ta, cond, mode)
    for qv, qa in ((1, 1), (5, 3), (7, 0), (0, 5), (1000, 1000)):
        model.set_memory_knobs(q_chunk_v=qv, q_chunk_a=qa)
        out = model(zv, za, tv, ta, cond, mode)
        model.set_memory_knobs()
        for a, b in zip(ref, out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("knob", ["kv_downsample", "kv_pool_space"])
def test_kv_pooling_changes_output_but_keeps_shapes(model, knob):
    zv, za, tv, ta, cond = inputs()
    ref = model(zv, za, tv, ta, cond)
    model.set_memory_knobs(**{knob: 2})
    out = model(zv, za, tv, ta, cond)
    model.set_memory_knobs()
    assert out[0].shape == ref[0].shape and not torch.allclose(out[0], ref[0])
    assert out[1].shape == ref[1].shape and not torch.allclose(out[1], ref[1])


def test_gradient_checkpointing_gives_same_gradients():
    m = randomize(make_model())
    zv, za, tv, ta, cond = inputs()

    def grads():
        m.zero_grad()
        vv, va = m(zv, za, tv, ta, cond, ["full", "iso", "iso_v", "full"])
        (vv.square().mean() + va.square().mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads()
    m.set_memory_knobs(gradient_checkpointing=True, q_chunk_v=7)
    out = grads()
    assert ref.keys() == out.keys() and len(ref) > 50
    for n in ref:
        torch.testing.assert_close(out[n], ref[n], rtol=1e-4, atol=1e-6)
    m.set_memory_knobs()
    m.enable_gradient_checkpointing()  # the diffusers switch works too
    assert m.gradient_checkpointing


def test_memory_knobs_are_not_config():
    m = make_model()
    m.set_memory_knobs(q_chunk_v=8, kv_downsample=2, gradient_checkpointing=True)
    assert not any(k in m.config for k in ("q_chunk_v", "kv_downsample", "gradient_checkpointing"))
    with pytest.raises(ValueError):
        m.set_memory_knobs(kv_downsample=0)


# ---------------------------------------------------------------------------------------------
# Export / names / presets / flops
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_export_import_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "export")
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= files
    loaded = JointDiT.from_pretrained(tmp_path / "export").eval()
    plain = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert plain(loaded.config) == plain(model.config) and tuple(loaded.config.video_patch_size) == (1, 2, 2)
    zv, za, tv, ta, cond = inputs()
    for a, b in zip(model(zv, za, tv, ta, cond, ["iso", "full", "iso_v", "iso_a"]),
                    loaded(zv, za, tv, ta, cond, ["iso", "full", "iso_v", "iso_a"])):
        assert torch.equal(a, b) and a.abs().max() > 0


def test_stage_b_globs_select_expected_parameters():
    m = make_model(depth=3)
    names = [n for n, _ in m.named_parameters()]
    video = fnmatch.filter(names, "blocks.*.video.*")
    expected = {f"blocks.{i}.video.{p}" for i in range(3) for p in (
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "qkv.weight", "qkv.bias", "q_norm.weight",
        "k_norm.weight", "proj.weight", "proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias")}
    assert set(video) == expected
    assert not any(".audio." in n or ".context." in n for n in video)
    assert set(fnmatch.filter(names, "blocks.*.audio.*")) == {n.replace(".video.", ".audio.") for n in expected}
    for prefix in ("video_in.", "audio_in.", "video_out.", "audio_out.", "time_embed.", "cond_embed.",
                   "blocks.0.context."):
        assert any(n.startswith(prefix) for n in names), prefix
    assert all(n.split(".")[0] in {"video_in", "audio_in", "time_embed", "cond_embed", "blocks", "video_out",
                                   "audio_out"} for n in names)


def test_presets_and_yaml_configs():
    from pathlib import Path

    import yaml
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from jointdit.models import PRESETS

    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    for name in ("tiny", "small", "base"):
        raw = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert raw["preset"] == name
        # sizes live only in PRESETS: the yaml carries no numbers
        assert all(v is None or isinstance(v, str) for v in raw.values())
        assert set(raw) - {"_target_", "preset"} <= set(JointDiT.__init__.__wrapped__.__code__.co_varnames)
    cfg = OmegaConf.load(conf / "tiny.yaml")
    cfg.depth, cfg.video_patch_size = 1, [1, 4, 4]
    m = instantiate(cfg)
    assert (m.config.hidden_size, m.config.depth, tuple(m.config.video_patch_size)) == (
        PRESETS["tiny"]["hidden_size"], 1, (1, 4, 4))
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")


def test_flop_count_matches_parameter_count_and_attention():
    m = build_model("small")
    n_v, n_a = 256, 200
    fwd = count_flops(m, n_v, n_a, backward=False)
    block_params = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks.") and "adaLN" not in n
                       and p.ndim == 2 and "context" not in n)
    matmul = 2 * block_params * (n_v + n_a) / 2  # each token passes through one modality's experts
    attn = 4 * 384 * 8 * (n_v + n_a) * (n_v + n_a + 78)
    assert 0.95 < fwd / (matmul + attn) < 1.15
    assert count_flops(m, n_v, n_a) == 3 * fwd
    assert count_flops(m, n_v, n_a, mode="iso", backward=False) < fwd


@torch.no_grad()
@pytest.mark.parametrize("t_shape", ["per_sample", "per_frame"])
def test_sample_prediction_returns_the_velocity_of_its_clean_estimate(t_shape):
    """prediction="sample": the network's output is x̂0 and forward returns (z_t − x̂0)/max(t, 0.05). Oracle:
    a velocity-prediction twin with the same weights outputs the raw network output, x̂0."""
    sample = randomize(make_model(prediction="sample"))
    twin = make_model()
    twin.load_state_dict(sample.state_dict())
    zv, za, tv, ta, cond = inputs()
    if t_shape == "per_frame":
        tv = torch.rand(zv.shape[0], zv.shape[1], generator=torch.Generator().manual_seed(3))
        tv[:, 0] = 0.0  # a given first frame: clamped, stays finite
    x0_v, x0_a = twin(zv, za, tv, ta, cond)
    v_v, v_a = sample(zv, za, tv, ta, cond)
    t_v = (tv.reshape(B, 1, 1, 1, 1) if tv.ndim == 1 else tv.reshape(B, -1, 1, 1, 1)).clamp(min=0.05)
    torch.testing.assert_close(v_v, (zv - x0_v) / t_v)
    torch.testing.assert_close(v_a, (za - x0_a) / ta.reshape(B, 1, 1, 1).clamp(min=0.05))
    assert torch.isfinite(v_v).all()


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction must be one of"):
        make_model(prediction="noise")
