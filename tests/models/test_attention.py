"""joint_attention: allowed key sets per mode, chunking, per-modality K/V pooling."""

import math

import jointdit  # noqa: F401
import pytest
import torch
import torch.nn.functional as F

from jointdit.models.attention import (
    AttentionKnobs,
    joint_attention,
    normalize_mode,
    pool_space,
    pool_time,
    pooled_grid,
    sdpa_chunked,
)

pytestmark = pytest.mark.usefixtures("one_thread")

H, DH = 2, 8
TV, SV = 6, 4    # video: 6 time steps x 4 tokens per step (a 2x2 grid)
TA, SA = 10, 2   # audio: 10 time steps x 2 tokens per step
NC = 3


def qkv(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(b, H, n, DH, generator=g)  # noqa: E731
    return dict(q_v=r(TV * SV), k_v=r(TV * SV), v_v=r(TV * SV), q_a=r(TA * SA), k_a=r(TA * SA), v_a=r(TA * SA),
                k_c=r(NC), v_c=r(NC))


def run(t, mode, **knobs):
    return joint_attention(**t, mode=mode, video_grid=(TV, 2, 2), audio_grid=(TA, SA), knobs=AttentionKnobs(**knobs))


def reference(t, mode):
    """Plain softmax attention over the allowed key set, written out."""
    def attend(q, ks, vs):
        k, v = torch.cat(ks, 2), torch.cat(vs, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / DH ** 0.5, dim=-1)
        return w @ v
    kv_v = [t["k_v"]] + ([t["k_a"]] if mode in ("full", "iso_a") else []) + [t["k_c"]]
    vv_v = [t["v_v"]] + ([t["v_a"]] if mode in ("full", "iso_a") else []) + [t["v_c"]]
    kv_a = [t["k_a"]] + ([t["k_v"]] if mode in ("full", "iso_v") else []) + [t["k_c"]]
    vv_a = [t["v_a"]] + ([t["v_v"]] if mode in ("full", "iso_v") else []) + [t["v_c"]]
    return attend(t["q_v"], kv_v, vv_v), attend(t["q_a"], kv_a, vv_a)


@pytest.mark.parametrize("mode", ["full", "iso_v", "iso_a", "iso"])
def test_matches_written_out_attention(mode):
    t = qkv()
    for got, ref in zip(run(t, mode), reference(t, mode)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_mixed_modes_match_per_mode_calls():
    t = qkv(b=4)
    modes = ["iso", "full", "iso_a", "iso"]
    o_v, o_a = run(t, modes)
    for i, m in enumerate(modes):
        ti = {k: v[i:i + 1] for k, v in t.items()}
        r_v, r_a = run(ti, m)
        torch.testing.assert_close(o_v[i:i + 1], r_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o_a[i:i + 1], r_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "iso_v", ["iso", "full", "iso_a"]])
@pytest.mark.parametrize("chunks", [(1, 1), (5, 7), (24, 0), (0, 3)])
def test_chunked_equals_unchunked(mode, chunks):
    t = qkv()
    for a, b in zip(run(t, mode), run(t, mode, q_chunk_v=chunks[0], q_chunk_a=chunks[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    q, k, v = torch.randn(3, 1, 2, 50, 8)
    torch.testing.assert_close(sdpa_chunked(q, k, v, 7), F.scaled_dot_product_attention(q, k, v))


def test_pool_time_averages_within_one_modality_grid():
    x = torch.arange(TV * SV, dtype=torch.float32).view(1, 1, TV * SV, 1)
    pooled = pool_time(x, TV, 4)  # groups of 4 steps, then a trailing group of 2
    grid = x.view(TV, SV)
    expected = torch.stack([grid[:4].mean(0), grid[4:].mean(0)]).reshape(1, 1, -1, 1)
    assert torch.equal(pooled, expected)
    assert torch.equal(pool_time(x, TV, 1), x)


def test_kv_downsample_never_mixes_modalities_or_context():
    t = qkv()
    # iso: video output must not depend on audio K/V even after pooling; context untouched by pooling
    base = run(t, "iso", kv_downsample=3)
    t2 = dict(t, k_a=t["k_a"] + 5, v_a=t["v_a"] - 3)
    assert torch.equal(run(t2, "iso", kv_downsample=3)[0], base[0])
    t3 = dict(t, k_v=t["k_v"] + 5, v_v=t["v_v"] - 3)
    assert torch.equal(run(t3, "iso", kv_downsample=3)[1], base[1])
    # pooled result equals attention over hand-pooled per-modality keys (context not pooled)
    hand = dict(t, k_v=pool_time(t["k_v"], TV, 3), v_v=pool_time(t["v_v"], TV, 3),
                k_a=pool_time(t["k_a"], TA, 3), v_a=pool_time(t["v_a"], TA, 3))
    for a, b in zip(run(t, "full", kv_downsample=3), reference(hand, "full")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _hand_pool_space(x, grid, s):
    """Space pooling written out: for each time step, the mean of each s-wide block of each spatial axis
    (a trailing block holds fewer members)."""
    t, *space = grid
    b, h, _, d = x.shape
    x = x.view(b, h, t, *space, d)
    out = []
    for k in range(t):
        if len(space) == 2:
            for i in range(0, space[0], s):
                for j in range(0, space[1], s):
                    out.append(x[:, :, k, i:i + s, j:j + s].reshape(b, h, -1, d).mean(2))
        else:
            for i in range(0, space[0], s):
                out.append(x[:, :, k, i:i + s].mean(2))
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("grid, s", [((3, 4, 6), 2), ((2, 5, 5), 2), ((2, 3, 4), 4), ((4, 6), 2), ((4, 5), 4)])
def test_pool_space_averages_blocks_within_each_time_step(grid, s):
    x = torch.randn(2, 3, math.prod(grid), 5, generator=torch.Generator().manual_seed(1))
    pooled = pool_space(x, grid, s)
    torch.testing.assert_close(pooled, _hand_pool_space(x, grid, s))
    assert pooled.shape[2] == math.prod(pooled_grid(grid, AttentionKnobs(kv_pool_space=s)))


def test_space_pooling_keeps_time_exact():
    """Changing the keys of one time step changes only that step's pooled keys (space pooling never
    blurs time); time pooling (kv_downsample) does blur it."""
    x = torch.randn(1, 2, TV * SV, DH, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[:, :, 2 * SV:3 * SV] += 1.0  # time step 2
    space = pool_space(y, (TV, 2, 2), 2) - pool_space(x, (TV, 2, 2), 2)
    changed = space.abs().sum(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [k == 2 for k in range(TV)]
    timed = pool_time(y, TV, 3) - pool_time(x, TV, 3)
    assert (timed.abs().sum(dim=(0, 1, 3)) > 0).sum() == SV  # one pooled group of 3 steps (steps 0-2) changed


def test_kv_pool_space_never_mixes_modalities_and_matches_hand_pooled_keys():
    t = qkv()
    base = run(t, "iso", kv_pool_space=2)
    t2 = dict(t, k_a=t["k_a"] + 1, v_a=t["v_a"] * 2)
    assert torch.equal(run(t2, "iso", kv_pool_space=2)[0], base[0])
    hand = dict(t, k_v=_hand_pool_space(t["k_v"], (TV, 2, 2), 2), v_v=_hand_pool_space(t["v_v"], (TV, 2, 2), 2),
                k_a=_hand_pool_space(t["k_a"], (TA, SA), 2), v_a=_hand_pool_space(t["v_a"], (TA, SA), 2))
    for a, b in zip(run(t, "full", kv_pool_space=2), reference(hand, "full")):
        torch.testing.assert_close(a, b)
    both = run(t, "full", kv_pool_space=2, kv_downsample=3)
    hand_both = dict(t, **{k: pool_time(v, TV if k.endswith("_v") else TA, 3) for k, v in hand.items()
                           if k in ("k_v", "v_v", "k_a", "v_a")})
    for a, b in zip(both, reference(hand_both, "full")):
        torch.testing.assert_close(a, b)


def test_mode_validation():
    assert normalize_mode(["iso", "iso"], 2) == "iso"
    assert normalize_mode(["iso", "full"], 2) == ["iso", "full"]
    with pytest.raises(ValueError):
        normalize_mode("both", 1)
    with pytest.raises(ValueError):
        AttentionKnobs(q_chunk_v=-1)
