"""LoRA through PEFT: targets by glob group, per-group rank/alpha/dropout, only adapters train, the
on-disk format loads with peft's own PeftModel, scales and merging follow W' = W + Σ s·(α/r)·B·A."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from jointdit import lora
from jointdit.models import build_model

TINY = dict(hidden_size=32, depth=2, num_heads=2, video_in_channels=4, video_patch_size=(1, 2, 2),
            audio_in_channels=1, audio_patch_size=(4, 8), text_len=4, text_token_dim=8, text_pooled_dim=8,
            image_embed_dim=8)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny", **TINY)
    # adaLN-Zero and the output layers start at zero (the model outputs 0); give them values so that
    # every adapter changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "_out." in name:
                p.normal_(0, 0.05)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z_v = torch.randn(2, 4, 4, 4, 4, generator=g)   # [B, Tv, Cv, h, w]
    z_a = torch.randn(2, 1, 16, 16, generator=g)    # [B, Ca, La, Fa]
    return z_v, z_a, torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.2])


def randomise_adapters(model: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    """LoRA B starts at zero (no change); fill A and B so that the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_cfg(**extra):
    return {"rank": 4, "alpha": 8, "dropout": 0.0, **extra}


def test_groups_per_group_hyperparameters_and_errors():
    groups = lora.groups_from_config(lora_cfg(targets=["video_attn", "joint_attn"],
                                              groups={"joint_attn": {"rank": 2, "alpha": 2, "dropout": 0.5}}))
    assert [(g.name, g.rank, g.alpha, g.dropout) for g in groups] == [("video_attn", 4, 8.0, 0.0), ("joint_attn", 2, 2.0, 0.5)]
    assert lora.groups_from_config({"rank": 3})[0].alpha == 3.0  # alpha defaults to the rank
    with pytest.raises(ValueError, match="unknown group"):
        lora.groups_from_config(lora_cfg(targets=["video_atn"]))
    with pytest.raises(ValueError, match="rank must be > 0"):
        lora.groups_from_config({"rank": 0})
    bad = lora.groups_from_config(lora_cfg(targets=["x"], groups={"x": {"patterns": ["blocks.*.nothing"]}}))
    with pytest.raises(ValueError, match=r"\['x'\] match no linear layer"):
        lora.resolve_targets(tiny_model(), bad)
    assert not lora.lora_enabled({"rank": 0}) and lora.lora_enabled({"rank": 2}) and not lora.lora_enabled(None)


def test_only_adapters_train_and_base_is_bit_identical():
    model = tiny_model()
    groups = lora.groups_from_config(lora_cfg(targets=["video_attn", "audio_ff", "joint_attn"],
                                              groups={"audio_ff": {"rank": 2}}))
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = lora.add_lora(model, groups)
    # independent count: r·(d_in + d_out) per targeted linear, from the module shapes
    depth, d, mlp = TINY["depth"], TINY["hidden_size"], 4 * TINY["hidden_size"]
    assert counts["video_attn"] == depth * (4 * (d + 3 * d) + 4 * (d + d))
    assert counts["audio_ff"] == depth * (2 * (d + mlp) + 2 * (mlp + d))
    assert counts["joint_attn"] == depth * 4 * (d + 2 * d)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert counts["frozen"] == sum(v.numel() for v in base_before.values())

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    z_v, z_a, t_v, t_a = inputs()
    out0 = model(z_v, z_a, t_v, t_a)
    for _ in range(3):
        v, a = model(z_v, z_a, t_v, t_a)
        (v.pow(2).mean() + a.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for key, value in base_before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        stored = after[key] if key in after else after[peft_key]
        assert torch.equal(stored, value), key  # bit-identical base weights
    out1 = model(z_v, z_a, t_v, t_a)
    assert not torch.allclose(out0[0], out1[0])  # the adapters did learn something


def test_per_group_dropout_is_set_on_the_layers():
    model = tiny_model()
    groups = lora.groups_from_config(lora_cfg(dropout=0.1, targets=["video_attn", "audio_attn"],
                                              groups={"audio_attn": {"dropout": 0.0}}))
    lora.add_lora(model, groups)
    assert model.blocks[0].video.qkv.lora_dropout["default"].p == 0.1
    assert isinstance(model.blocks[0].audio.qkv.lora_dropout["default"], nn.Identity)


def test_saved_adapter_loads_with_peft_and_matches_merge(tmp_path):
    from peft import PeftModel, load_peft_weights

    base = tiny_model()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = copy.deepcopy(base)
    groups = lora.groups_from_config(lora_cfg(targets=["video_attn", "audio_attn", "video_ff"],
                                              groups={"video_ff": {"rank": 2, "alpha": 6}}))
    lora.add_lora(model, groups)
    randomise_adapters(model)
    folder = lora.save_adapter(model, tmp_path / "adapter", base_dir, meta={"step": 7})
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "jointdit_adapter.json"]
    meta = json.loads((folder / "jointdit_adapter.json").read_text())
    assert meta["base_model"] == "../base" and meta["step"] == 7
    assert lora.base_reference(folder) == base_dir.resolve()
    assert lora.adapter_size_bytes(folder) > 0

    z_v, z_a, t_v, t_a = inputs()
    with torch.no_grad():
        ours = model.eval()(z_v, z_a, t_v, t_a)
        # peft's own loader, on a fresh copy of the base
        weights = load_peft_weights(str(folder))
        assert "base_model.model.blocks.0.video_ff" not in weights
        assert weights["base_model.model.blocks.0.video.mlp.fc1.lora_A.weight"].shape == (2, TINY["hidden_size"])
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        theirs = peft_model(z_v, z_a, t_v, t_a)
        merged_model = lora.load_with_adapters(folder, merge=True).eval()
        assert not any("lora" in n for n, _ in merged_model.named_parameters())
        merged = merged_model(z_v, z_a, t_v, t_a)
    for a, b, c in zip(ours, theirs, merged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert not torch.allclose(merged[0], base.eval()(z_v, z_a, t_v, t_a)[0])


def test_two_adapters_with_scales_merge_by_the_formula(tmp_path):
    """Merged weight = W + Σ_i s_i·(α_i/r_i)·B_i·A_i, computed here from the saved files."""
    base = tiny_model()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    folders = []
    for index, (targets, rank, alpha) in enumerate(((["video_attn"], 4, 8), (["video_attn", "audio_ff"], 2, 1))):
        m = copy.deepcopy(base)
        lora.add_lora(m, lora.groups_from_config({"rank": rank, "alpha": alpha, "targets": targets}))
        randomise_adapters(m, seed=10 + index)
        folders.append(lora.save_adapter(m, tmp_path / f"adapter{index}", base_dir))
    specs = [lora.AdapterSpec(folders[0], 0.5), lora.AdapterSpec(folders[1], -2.0)]

    expected = {k: v.clone() for k, v in base.state_dict().items()}
    for spec, rank, alpha in zip(specs, (4, 2), (8, 1)):
        w = load_file(str(spec.path / "adapter_model.safetensors"))
        for key in w:
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                delta = w[key.replace("lora_A", "lora_B")] @ w[key]
                expected[f"{module}.weight"] += spec.scale * (alpha / rank) * delta
    merged = lora.load_with_adapters(base_dir, specs, merge=True)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0)

    # unmerged: both adapters active, same function as the merged weights
    unmerged = lora.load_with_adapters(base_dir, specs, merge=False).eval()
    z_v, z_a, t_v, t_a = inputs()
    with torch.no_grad():
        for a, b in zip(unmerged(z_v, z_a, t_v, t_a), merged.eval()(z_v, z_a, t_v, t_a)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in unmerged.parameters())


def test_parse_adapters_and_clear_errors(tmp_path):
    specs = lora.parse_adapters("a/one:0.5,b/two")
    assert [(s.path.name, s.scale) for s in specs] == [("one", 0.5), ("two", 1.0)]
    specs = lora.parse_adapters([{"path": "x", "scale": 2}, "y:-1"])
    assert [(str(s.path), s.scale) for s in specs] == [("x", 2.0), ("y", -1.0)]
    assert lora.parse_adapters(None) == []
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        lora.apply_adapters(tiny_model(), [lora.AdapterSpec(tmp_path)])


def test_config_stage_lora_and_rank_on_top_of_stage_b(compose_cfg):
    assert not lora.lora_enabled(compose_cfg("train", ["stage=a"]).stage.lora)
    cfg = compose_cfg("train", ["stage=b", "stage.init_from=x", "stage.lora.rank=4", "stage.lora.groups.audio_ff.rank=8",
                                "stage.lora.targets=[video_attn,audio_ff]"])
    groups = lora.groups_from_config(cfg.stage.lora)
    assert [(g.name, g.rank, g.alpha) for g in groups] == [("video_attn", 4, 4.0), ("audio_ff", 8, 8.0)]
    cfg = compose_cfg("train", ["stage=lora", "stage.init_from=x"])
    groups = lora.groups_from_config(cfg.stage.lora)
    # the yaml's groups are the library's defaults
    assert {g.name: list(g.patterns) for g in groups} == lora.DEFAULT_GROUPS
    assert all(g.rank == 16 for g in groups)


def test_training_groups_export_with_ema_and_base_reference(tmp_path):
    from diffusers.training_utils import EMAModel

    base = tiny_model()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    assert lora.base_reference_for(base_dir) == base_dir.resolve()
    assert lora.base_reference_for(tmp_path / "checkpoint") is None and lora.base_reference_for(None) is None
    model = copy.deepcopy(base)
    cfg = lora_cfg(lr=0.01, targets=["video_attn", "audio_ff"], groups={"audio_ff": {"lr": 0.5}})
    groups, counts = lora.training_groups(model, cfg)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("lora_video_attn", 0.01, 8), ("lora_audio_ff", 0.5, 8)]
    assert sum(p.numel() for g in groups for p in g["params"]) == counts["video_attn"] + counts["audio_ff"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=0.5)
    randomise_adapters(model)
    ema.step(trainable)  # shadow = 0.5·init + 0.5·random ≠ live weights
    live = [p.detach().clone() for p in trainable]
    folder = lora.export_adapter(model, ema, tmp_path / "export" / "last", base_dir, {"step": 3, "codec": {"name": "x"}})
    assert json.loads((folder / "jointdit.json").read_text())["codec"] == {"name": "x"}
    assert all(torch.equal(p, q) for p, q in zip(trainable, live))  # live weights restored after export
    saved = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.blocks.0.video.qkv.lora_A.weight"
    torch.testing.assert_close(saved[key], ema.shadow_params[0].cpu())  # the EMA weights were exported


def test_checkpoints_load_model_takes_an_adapter_folder(tmp_path):
    from jointdit import checkpoints

    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    lora.add_lora(model, lora.groups_from_config(lora_cfg(targets=["audio_attn"])))
    randomise_adapters(model)
    folder = lora.save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    loaded = checkpoints.load_model(folder).eval()  # what the sampler, UI and stage.init_from use
    assert type(loaded).__name__ == "JointDiT" and not any("lora" in n for n in loaded.state_dict())
    z_v, z_a, t_v, t_a = inputs()
    with torch.no_grad():
        for a, b in zip(loaded(z_v, z_a, t_v, t_a), model.eval()(z_v, z_a, t_v, t_a)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="names no base model"):
        lora.load_with_adapters(lora.save_adapter(model, tmp_path / "orphan", None))


def test_jointdit_sample_loads_base_plus_scaled_adapters_or_merges(tmp_path):
    """load_session(base, adapters=[…:0.5]) and its merged twin sample the same latents; the adapter
    folder itself (exported with jointdit.json) is a checkpoint= of its own (scale 1)."""
    import importlib.util
    from pathlib import Path

    from jointdit.checkpoints import export_model
    from jointdit.sample import SampleRequest, generate, load_session

    spec = importlib.util.spec_from_file_location("fx", Path(__file__).parent / "diffusion" / "conftest.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    torch.manual_seed(0)
    model = fx.tiny_model()
    fx._train(model, steps=10)  # adaLN gates leave zero, so the attention adapters matter
    meta = {"step": 10, "stage": "a", "codec": fx.CODEC,
            "latent": {"video_shape": list(fx.VIDEO_SHAPE), "audio_shape": list(fx.AUDIO_SHAPE)},
            "data": {"fps": fx.FPS, "size": fx.SIZE, "seconds": fx.SECONDS, "sample_rate": fx.SR}}
    base = export_model(model.eval(), tmp_path / "base", meta)
    tuned = copy.deepcopy(model)
    lora.add_lora(tuned, lora.groups_from_config({"rank": 2, "targets": ["video_attn", "audio_attn", "video_ff"]}))
    randomise_adapters(tuned, std=1.0)
    adapter = lora.export_adapter(tuned, None, tmp_path / "adapter", base, meta)

    def latents(checkpoint, **kw):
        session = load_session(checkpoint, device="cpu", **kw)
        sample = generate(session, SampleRequest(task="joint", steps=2, seeds=[0], guidance="none")).samples[0]
        return sample.z_video, sample.z_audio

    plain = latents(base)
    half = latents(base, adapters=[f"{adapter}:0.5"])
    half_merged = latents(base, adapters=[{"path": str(adapter), "scale": 0.5}], merge_adapters=True)
    full = latents(adapter)
    full_on_base = latents(base, adapters=[str(adapter)])
    for a, b in zip(half, half_merged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(full, full_on_base):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    change = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    assert change(plain[0], half[0]) > 1e-3 and change(half[0], full[0]) > 1e-3


# --------------------------------------------------------------------------------------------------
# End to end through python -m jointdit.train
# --------------------------------------------------------------------------------------------------
SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=1",
         "optim.schedule=constant", "log_every=1", "sample_every=-1"]


def _train(tmp_path, run_dir, *overrides):
    from helpers import run_module

    result = run_module("jointdit.train", *SMALL, f"hydra.run.dir={run_dir}", *overrides,
                        env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_lora_run_trains_adapters_only_resumes_exactly_and_exports_peft(tmp_path):
    from peft import PeftModel

    from jointdit import checkpoints

    base_run = _train(tmp_path, tmp_path / "a", "max_steps=3", "logger=none", "ema.enabled=false")
    base = base_run / "export" / "last"
    common = ["stage=lora", f"stage.init_from={base}", "stage.lora.rank=4", "stage.lora.targets=[video_attn,audio_ff]",
              "checkpoint.every=3", "logger=none", "vram.optimizer=adafactor"]
    straight = _train(tmp_path, tmp_path / "straight", *common, "max_steps=6")
    # the export is a PEFT adapter naming the base; base weights in the last checkpoint are bit-identical
    export = straight / "export" / "last"
    assert lora.is_adapter_folder(export) and lora.base_reference(export) == base.resolve()
    base_weights = load_file(str(base / "diffusion_pytorch_model.safetensors"))
    state = load_file(str(straight / "checkpoints" / "step_000006" / "model.safetensors"))
    for key, value in base_weights.items():
        stored = state.get(key, state.get(key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")))
        assert torch.equal(stored, value), key
    assert any(".lora_B." in k and state[k].abs().sum() > 0 for k in state)  # the adapters did train
    # resume: 3 steps, then 3 more from the checkpoint, replay the straight run's losses
    resumed = _train(tmp_path, tmp_path / "resumed", *common, "max_steps=3")
    _train(tmp_path, resumed, *common, "max_steps=6", "checkpoint.resume=auto")
    losses = lambda d: [h["loss"] for h in json.loads((d / "metrics.json").read_text())["history"]]  # noqa: E731
    assert len(losses(resumed)) == 6 and losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    # peft's own PeftModel on the base gives the sampler's (merged) model
    merged = checkpoints.load_model(export).eval()
    peft_model = PeftModel.from_pretrained(checkpoints.load_model(base), str(export)).eval()
    spec = json.loads((export / "jointdit.json").read_text())["spec"]
    z_v, z_a = torch.randn(1, *spec["video_shape"]), torch.randn(1, *spec["audio_shape"])
    with torch.no_grad():
        for a, b in zip(merged(z_v, z_a, torch.tensor([0.5]), torch.tensor([0.5])),
                        peft_model(z_v, z_a, torch.tensor([0.5]), torch.tensor([0.5]))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_lora_base_export_carries_what_a_normal_export_carries(compose_cfg, tmp_path):
    """stage.lora.rank on stage=a without init_from exports the base once (export/base): its jointdit.json is
    built by the same function as every export, so it carries the objective (iso_prob, tasks, timestep_shift)
    and everything else the adapter's own export carries — only the step differs."""
    from jointdit.training import train

    out = tmp_path / "run"
    train(compose_cfg("train", [*SMALL, "max_steps=1", "logger=none", "checkpoint.every=100", "checkpoint.export=true",
                                "stage.lora.rank=2", "objective.iso_prob=0.3", f"paths.output_dir={out}"]))
    base = json.loads((out / "export" / "base" / "jointdit.json").read_text())
    adapter = json.loads((out / "export" / "last" / "jointdit.json").read_text())
    assert base["iso_prob"] == 0.3 and base["tasks"] == {"joint": 0.55, "a2v": 0.15, "v2a": 0.15, "i2sv": 0.15}
    assert base["timestep_shift"]["rule"]["method"] == "sd3" and base["timestep_shift"]["video_tokens"] == 32
    assert (base["step"], adapter["step"]) == (0, 1)
    assert {k: v for k, v in base.items() if k != "step"} == {k: v for k, v in adapter.items() if k != "step"}
