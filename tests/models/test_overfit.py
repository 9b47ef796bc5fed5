"""The tiny preset learns the real objective: trained through ``make_flow_batch`` + ``flow_loss`` on one fixed
batch it overfits on CPU (loss falls at least 10x within a minute), and what it predicts is the velocity
ε − x0 computed here by hand, with ε recovered from x_t by the path formula x_t = (1 − t)·x0 + t·ε."""

import time

import jointdit  # noqa: F401
import pytest
import torch

from jointdit.diffusion.flow import flow_loss, make_flow_batch
from jointdit.models import Condition, build_model


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second OpenMP thread, and on a busy 2-core machine its
    spin-waits make a 2-thread run several times slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    model = build_model("tiny", video_in_channels=12, audio_in_channels=1, video_patch_size=(1, 2, 2),
                        audio_patch_size=(4, 8), video_latent_fps=4.0, audio_latent_fps=16.0,
                        text_token_dim=16, text_pooled_dim=16, image_embed_dim=16, text_len=4)
    b = 4
    x0_v, x0_a = torch.randn(b, 4, 12, 8, 8), torch.randn(b, 1, 32, 16)      # 64 video + 16 audio tokens
    flow = make_flow_batch(x0_v, x0_a, torch.zeros(b, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    cond = Condition(text_tokens=torch.randn(b, 4, 16), text_pooled=torch.randn(b, 16), image=torch.randn(b, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    start = time.perf_counter()
    losses = []
    for step in range(300):
        v, a = model(flow.video, flow.audio, flow.t_video, flow.t_audio, cond, "full")
        loss = flow_loss(v, a, flow)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:
            break
    elapsed = time.perf_counter() - start
    assert losses[-1] <= losses[0] / 10, (losses[0], losses[-1], step)
    assert elapsed < 60, f"overfitting took {elapsed:.1f} s"

    # independent of the target the objective wrote: ε from the path, velocity ε − x0 by hand
    tv, ta = flow.t_video[:, :, None, None, None], flow.t_audio[:, None, None, None]
    eps_v, eps_a = (flow.video - (1 - tv) * x0_v) / tv, (flow.audio - (1 - ta) * x0_a) / ta
    with torch.no_grad():
        v, a = model(flow.video, flow.audio, flow.t_video, flow.t_audio, cond, "full")
    for pred, want in ((v, eps_v - x0_v), (a, eps_a - x0_a)):
        rel = float((pred - want).square().mean() / want.square().mean())
        assert rel < 0.1, rel
