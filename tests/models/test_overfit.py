"""The tiny preset learns: it overfits one fixed batch on CPU (loss falls at least 10x) within a minute."""

import time

import jointdit  # noqa: F401
import pytest
import torch

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
    eps_v, eps_a = torch.randn_like(x0_v), torch.randn_like(x0_a)
    t_v, t_a = torch.rand(b), torch.rand(b)
    x_v = (1 - t_v.view(b, 1, 1, 1, 1)) * x0_v + t_v.view(b, 1, 1, 1, 1) * eps_v   # rectified-flow path
    x_a = (1 - t_a.view(b, 1, 1, 1)) * x0_a + t_a.view(b, 1, 1, 1) * eps_a
    target_v, target_a = eps_v - x0_v, eps_a - x0_a
    cond = Condition(text_tokens=torch.randn(b, 4, 16), text_pooled=torch.randn(b, 16), image=torch.randn(b, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)

    start = time.perf_counter()
    losses = []
    for step in range(300):
        v, a = model(x_v, x_a, t_v, t_a, cond, "full")
        loss = (v - target_v).square().mean() + (a - target_a).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:
            break
    elapsed = time.perf_counter() - start
    assert losses[-1] <= losses[0] / 10, (losses[0], losses[-1], step)
    assert elapsed < 60, f"overfitting took {elapsed:.1f} s"
