"""The planner's added terms: trainable set per stage / LoRA, optimizer state and step transient, gradients
live under checkpointing, preview sampling. Counts are checked against models built here."""

from __future__ import annotations

import pytest
import torch

from jointdit import memory_terms as T
from jointdit.memory import Knobs, count_params, estimate_peak
from jointdit.models import build_model

MC = dict(preset="tiny", hidden_size=32, depth=2, num_heads=2, video_in_channels=12, audio_in_channels=1,
          text_len=4, text_token_dim=8, text_pooled_dim=8, image_embed_dim=8)
VS, AS = [8, 12, 4, 4], [1, 100, 64]


def built():
    cfg = dict(MC)
    return build_model(cfg.pop("preset"), **cfg)


def test_trainable_sets_per_stage():
    model = built()
    assert T.trainable_of(MC, None).numel == count_params(MC) == sum(p.numel() for p in model.parameters())
    stage_b = {"trainable": {"experts": {"patterns": ["blocks.*.video.*"]}, "io": {"patterns": ["video_in.*"]}}}
    tr = T.trainable_of(MC, stage_b)
    assert len(tr.groups) == 2 and tr.numel == sum(p.numel() for n, p in model.named_parameters()
                                                    if n.startswith("video_in.") or ".video." in n)
    tr = T.trainable_of(MC, {"lora": {"rank": 4, "targets": ["joint_attn", "audio_ff"]}})
    d = 32
    by_hand = 2 * (4 * (d + 2 * d)) + 2 * (4 * (d + 4 * d) + 4 * (4 * d + d))  # context.kv; fc1, fc2 per block
    assert tr.numel == tr.added_params == by_hand


def test_optimizer_transient_and_state():
    tr = T.Trainable([[(10, 20), (5,)], [(300,)]])
    assert T.step_transient("adamw", tr, foreach=True) == 4 * 300          # the largest param group at once
    assert T.step_transient("adamw", tr, foreach=False) == 8 * 300         # one tensor at a time
    assert T.step_transient("adamw", tr, foreach=None, device="cuda") == 4 * 300  # torch's CUDA default
    assert T.step_transient("adamw", tr, foreach=None, device="cpu") == 8 * 300
    with pytest.raises(ValueError, match="unknown optimizer"):
        T.step_transient("lion", tr, None)


def test_full_estimate_never_below_the_base_and_sums_under_checkpointing():
    for knobs in (Knobs(micro_batch_size=2), Knobs(micro_batch_size=2, gradient_checkpointing=True)):
        base = estimate_peak(MC, VS, AS, knobs)
        full = T.estimate_training(MC, VS, AS, knobs, foreach=True)
        assert full.total >= base.total
        act = base.activations + base.attention
        assert full.backward == (full.grads + act if knobs.gradient_checkpointing else max(full.grads, act))
    lora = T.estimate_training(MC, VS, AS, Knobs(micro_batch_size=2), stage={"lora": {"rank": 2}})
    assert lora.optimizer_state < full.optimizer_state / 10 and lora.params > full.params
    preview = T.estimate_training(MC, VS, AS, Knobs(micro_batch_size=2), preview=True, codec_bytes=10 ** 6)
    assert preview.preview > preview.train - preview.grads and preview.total >= preview.train


def test_weights_bytes_of_a_folder(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(100, 10)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert 4000 <= T.weights_bytes(tmp_path) < 4200 and T.weights_bytes(None) == 0
