"""Per-block checkpointing from outside the model (jointdit.blockwise): the same gradients as no checkpointing,
the model's own all-blocks switch reproduced, weights and names untouched, and the measured peak drops as
the planner says."""

from __future__ import annotations

import copy

import pytest
import torch

import jointdit  # noqa: F401
from jointdit.blockwise import apply_block_memory
from jointdit.models import build_model

KW = dict(hidden_size=32, depth=4, num_heads=2, video_in_channels=12, audio_in_channels=1, text_len=4,
          text_token_dim=8, text_pooled_dim=8, image_embed_dim=8)


def _grads(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    zv, za = torch.randn(2, 8, 12, 4, 4), torch.randn(2, 1, 100, 64)
    t = torch.tensor([0.3, 0.7])
    model.zero_grad(set_to_none=True)
    ov, oa = model(zv, za, t, t, None, ["full", "iso"])
    ((ov - zv) ** 2).mean().add(((oa - za) ** 2).mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_gradients():
    torch.manual_seed(0)
    model = build_model("tiny", **KW)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every block a non-trivial function
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    names = [n for n, _ in model.named_parameters()]
    reference = _grads(model)
    for k in (1, 2, 4):
        info = apply_block_memory(model, checkpoint_blocks=k)
        assert (info.checkpointed, info.depth) == (k, 4) and not model.gradient_checkpointing
        got = _grads(model)
        assert got.keys() == reference.keys()
        # recomputation replays the same kernels on the same inputs: bit-identical on the CPU
        assert all(torch.equal(got[n], reference[n]) for n in reference), k
    assert [n for n, _ in model.named_parameters()] == names and "forward" in vars(model.blocks[0])
    twin = copy.deepcopy(model)                      # the bound wrapper follows the copy
    assert vars(twin.blocks[0])["forward"].__self__ is twin.blocks[0]
    apply_block_memory(model, checkpoint_blocks=0)    # back to plain blocks
    assert not any("forward" in vars(b) for b in model.blocks)
    model.set_memory_knobs(gradient_checkpointing=True)
    assert apply_block_memory(model, None).checkpointed == 4   # None keeps the model's all-blocks switch
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        apply_block_memory(model, -1)


def test_offload_is_skipped_on_the_cpu_with_a_warning():
    model = build_model("tiny", **KW)
    with pytest.warns(UserWarning, match="no effect on the CPU"):
        info = apply_block_memory(model, checkpoint_blocks=1, offload_activations=True)
    assert info.offloaded == 0 and "forward" not in vars(model.blocks[1])


@pytest.mark.slow
def test_measured_peak_drops_as_planned():
    """Measured (child process, real training steps) against the one estimate, for 0, half and all blocks."""
    from jointdit.memory import DEFAULT_MARGIN, Knobs, estimate_peak, measure_peak

    mc = dict(preset="small", video_in_channels=192, audio_in_channels=1, video_latent_fps=8.0, audio_latent_fps=100.0)
    vs, as_ = [16, 192, 8, 8], [1, 200, 64]
    measured, planned = [], []
    for k in (0, 4, 8):
        kn = Knobs(micro_batch_size=2, checkpoint_blocks=k)
        measured.append(measure_peak(mc, vs, as_, kn))
        planned.append(estimate_peak(mc, vs, as_, kn))
    assert measured[0] > measured[1] > measured[2]
    for m, est in zip(measured, planned):
        assert m <= est.planned(DEFAULT_MARGIN) and abs(est.total - m) / m <= 0.1, (m / 2**20, est.total / 2**20)
    drop_measured, drop_planned = measured[0] - measured[2], planned[0].total - planned[2].total
    assert abs(drop_measured - drop_planned) <= 0.25 * drop_planned
