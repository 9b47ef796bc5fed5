"""RoPE is a real rotation, relative in every axis, and measures time in seconds shared by both modalities."""

import json

import jointdit  # noqa: F401
import pytest
import torch

from jointdit.models.rope import JointRope, apply_rope, band_frequencies, rotation_table, split_planes

HEAD_DIM = 32


def rope(video_fps=4.0, audio_fps=16.0, pt_v=1, pt_a=4) -> JointRope:
    # video token = 1 frame at 4 fps = 0.25 s; audio token = 4 steps at 16 fps = 0.25 s
    return JointRope(HEAD_DIM, pt_v / video_fps, pt_a / audio_fps)


def rotate(r: JointRope, x: torch.Tensor, seconds, height=None, width=None, freq=None) -> torch.Tensor:
    """Rotate ``x [N, Dh]`` at the given per-token positions."""
    t = lambda v: None if v is None else torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    table = rotation_table(r.angles(t(seconds), t(height), t(width), t(freq)), dtype=torch.float64)
    return apply_rope(x[None, :, None, :], table)[0, :, 0]  # as [B=1, N, H=1, Dh]


def test_plane_split_covers_the_head():
    for d in (16, 32, 64, 128):
        p = split_planes(d)
        assert p.total == d // 2 and p.time == d // 4 and min(p.height, p.width, p.freq) >= 1


def test_rotation_preserves_norm():
    r = rope()
    x = torch.randn(50, HEAD_DIM, dtype=torch.float64)
    pos = torch.rand(50) * 20
    for kwargs in ({"height": pos * 3, "width": pos * 5}, {"freq": pos * 7}):
        y = rotate(r, x, pos, **kwargs)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
        assert not torch.allclose(y, x)  # and it actually rotates


@pytest.mark.parametrize("axis", ["seconds", "height", "width", "freq"])
def test_score_depends_only_on_offset(axis):
    r = rope()
    q, k = torch.randn(2, 1, HEAD_DIM, dtype=torch.float64)

    def score(pq, pk):
        def at(p):
            pos = {"seconds": [0.0], "height": None, "width": None, "freq": None}
            pos[axis] = [p]
            return pos
        return (rotate(r, q, **at(pq)) * rotate(r, k, **at(pk))).sum()

    base = score(1.25, 3.0)
    for shift in (0.5, 2.0, 7.75, 30.0):
        torch.testing.assert_close(score(1.25 + shift, 3.0 + shift), base)
    assert not torch.allclose(score(1.25, 4.0), base)  # a different offset gives a different score


def test_cooccurring_video_and_audio_tokens_share_time_phase():
    r = rope()
    # token centre times given explicitly (what the model derives from LatentSpec's latent times)
    times = torch.arange(8, dtype=torch.float64) * 0.25 + 0.1
    tv, hv, wv = r.video_positions(grid_t=8, grid_h=2, grid_w=3, times=times)
    ta, fa = r.audio_positions(grid_t=8, grid_f=4, times=times)
    assert torch.equal(tv.unique(), times) and torch.equal(ta.unique(), times)
    ang_v = r.angles(tv, height=hv, width=wv)
    ang_a = r.angles(ta, freq=fa)
    nt = r.planes.time
    for j in range(8):
        v_rows = ang_v[tv == times[j], :nt]
        a_rows = ang_a[ta == times[j], :nt]
        assert torch.equal(v_rows[:1].expand_as(v_rows), v_rows) and torch.equal(v_rows[:1], a_rows[:1])
        assert torch.equal(v_rows[0], times[j] * r.time_freqs)  # angle = seconds x band frequency


def test_default_token_times_are_means_of_latent_instants():
    # latent step i is an instant at i/rate (video frame shown at i/fps, centred STFT frame on i*hop);
    # a token is the mean of its patch: video patch 2 at 8 fps -> (2k + 0.5)/8; audio patch 4 at 100 fps -> (4j + 1.5)/100
    r = JointRope(HEAD_DIM, 2 / 8, 4 / 100, video_steps_per_token=2, audio_steps_per_token=4)
    tv, _, _ = r.video_positions(3, 1, 1)
    ta, _ = r.audio_positions(3, 1)
    torch.testing.assert_close(tv, torch.tensor([0.0625, 0.3125, 0.5625], dtype=torch.float64))
    torch.testing.assert_close(ta, torch.tensor([0.015, 0.055, 0.095], dtype=torch.float64))
    torch.testing.assert_close(JointRope.token_times(torch.tensor([0.0, 0.1, 0.2, 0.3]), 2),
                               torch.tensor([0.05, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="whole number of temporal patches"):
        JointRope.token_times(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="3 token times for a time grid of 4"):
        r.video_positions(4, 1, 1, times=torch.zeros(3))


def test_time_is_in_seconds_not_token_index():
    # Same seconds, different latent rates and patch sizes -> same time phase.
    a = JointRope(HEAD_DIM, 1 / 8, 4 / 100)   # 8 fps video, 100 fps mel with patch 4
    b = JointRope(HEAD_DIM, 2 / 16, 2 / 50, time_scale=a.time_freqs[0].item())
    ta, _, _ = a.video_positions(4, 1, 1)
    tb, _, _ = b.video_positions(4, 1, 1)
    torch.testing.assert_close(ta, tb)
    torch.testing.assert_close(a.angles(ta)[:, : a.planes.time], b.angles(tb)[:, : b.planes.time])


def _best_alias(rope: JointRope, positions: int) -> float:
    """Across offsets 2..positions-1 of the height axis, the highest score of a query with the same vector
    as key (all planes weighted alike), relative to offset 0: near 1.0 means a far offset looks like none."""
    q = torch.ones(1, positions, 1, 2 * rope.planes.total)
    table = rope.video(1, positions, 1)                                    # [N, 1, P]
    z = torch.view_as_complex(q.unflatten(-1, (-1, 2)))[0, :, 0]           # [N, P]
    rotated = z * table[:, 0]
    start = rope.planes.time                                               # the height planes
    hp = rotated[:, start:start + rope.planes.height]
    scores = (hp[:1].conj() * hp).real.sum(-1)                             # [N] vs position 0
    return float(scores[2:].max() / scores[0])


def test_space_bands_tell_every_position_of_a_latent_grid_apart():
    """With the legacy θ = 10000 a tiny head's three height planes alias: an offset of 6 rows scores ~97%
    of offset 0, so a model cannot tell where an object is. The new default (32) keeps every offset ≥ 2
    of an 8-, 16- or 32-row grid below 60%."""
    legacy = JointRope(32, 1 / 8, 4 / 100)
    new = JointRope(32, 1 / 8, 4 / 100, space_theta=32.0)
    assert legacy.planes.height == 3
    assert _best_alias(legacy, 8) > 0.95
    assert all(_best_alias(new, rows) < 0.6 for rows in (8, 16, 32))


def test_new_models_get_the_new_space_bands_and_old_configs_keep_theirs(tmp_path):
    from jointdit.models import JointDiT, build_model

    model = build_model("tiny", video_in_channels=4, audio_in_channels=1)
    assert model.config.rope_space_theta == 32.0
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_space_theta"]                                          # an export from before the field
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = JointDiT.from_pretrained(tmp_path)
    assert old.config.rope_space_theta == 10000.0
    torch.testing.assert_close(old.rope.height_freqs, band_frequencies(old.rope.planes.height, 10000.0))
