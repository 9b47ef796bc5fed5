"""Memory planner: parameter count, knob choice vs budget with the margin, pre-flight failure naming the knob,
ONE estimate deciding resolve_vram, and the estimate against a measured peak (never under by more than the margin)."""
import jointdit  # noqa: F401
import pytest

from jointdit.memory import (DEFAULT_MARGIN, GiB, Knobs, MemoryPlanError, check_plan, choose_knobs, count_params,
                             estimate_peak, measure_peak, plan_arguments, quality_key, resolve_vram, shapes_from_cfg)

VS, AS = [16, 192, 8, 8], [1, 200, 64]  # pixel_mel latents of 2 s of 64x64 @ 8 fps video


def cfg(preset="tiny", **kw):
    return dict(preset=preset, video_in_channels=192, audio_in_channels=1, video_latent_fps=8.0,
                audio_latent_fps=100.0, **kw)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": False, "mlp_ratio": 2.0, "depth": 2, "video_patch_size": [2, 2, 2]}])
def test_param_count_matches_model(extra):
    from jointdit.models import build_model

    m = build_model(**cfg(**extra))
    assert count_params(cfg(**extra)) == sum(p.numel() for p in m.parameters())


def test_auto_picks_better_knobs_for_larger_budget_and_keeps_the_margin():
    small = choose_knobs(cfg("small"), (VS, AS), int(1.3 * GiB), margin=0.1)
    large = choose_knobs(cfg("small"), (VS, AS), 8 * GiB, margin=0.1)
    assert quality_key(large, VS[0], 8) > quality_key(small, VS[0], 8)
    for budget, k in ((1.3 * GiB, small), (8 * GiB, large)):
        assert estimate_peak(cfg("small"), VS, AS, k).total * 1.1 <= budget
    # a long clip: a tight budget must give up quality (span, pooling, batch or recomputed blocks)
    big_t = [64, 192, 8, 8], [1, 800, 64]
    k1 = choose_knobs(cfg("small"), big_t, int(1.3 * GiB), margin=0.0)
    k2 = choose_knobs(cfg("small"), big_t, 16 * GiB, margin=0.0)
    assert quality_key(k2, 64, 8) > quality_key(k1, 64, 8) and k1.checkpointed(8) > 0 and k2.checkpointed(8) == 0


def test_auto_checkpoints_the_fewest_blocks_that_fit():
    """Per-block checkpointing: between "none fits" and "all fit" the search stops at the first k that fits."""
    vs, as_ = [32, 192, 8, 8], [1, 400, 64]
    kn = lambda k: Knobs(micro_batch_size=4, checkpoint_blocks=k)  # noqa: E731
    totals = [estimate_peak(cfg("small"), vs, as_, kn(k)).total for k in range(9)]
    # each recomputed block saves memory, down to the floor where the first block's recompute beside every
    # weight gradient is the peak
    assert all(a > b for a, b in zip(totals[:6], totals[1:7])) and all(a >= b for a, b in zip(totals, totals[1:]))
    budget = int((totals[3] + totals[2]) / 2)                      # k = 3 fits, k = 2 does not (margin 0)
    chosen = choose_knobs(cfg("small"), (vs, as_), budget, margin=0.0,
                          fixed={"max_t": 0, "kv_downsample": 1, "micro_batch_size": 4})
    assert chosen.checkpoint_blocks == 3 and chosen.gradient_checkpointing


def test_plan_that_does_not_fit_names_the_knob_and_keeps_the_margin():
    k = Knobs(max_t=12, kv_downsample=1, micro_batch_size=8)
    est = estimate_peak(cfg("small"), [32, 192, 8, 8], [1, 400, 64], k)
    with pytest.raises(MemoryPlanError, match=r"vram\.kv_pool_space \(now 1; keeps time exact\) before "
                                              r"vram\.kv_downsample \(now 1; blurs timing\)") as e:
        check_plan(est, int(est.total * 0.5), k)
    assert "vram.checkpoint_blocks (now 0)" in str(e.value) and "vram.max_t (now 12)" in str(e.value)
    assert f"+{DEFAULT_MARGIN:.0%} margin" in str(e.value)
    with pytest.raises(MemoryPlanError):
        check_plan(est, est.total + 1, k)               # fits the estimate, not the estimate + margin
    check_plan(est, est.planned(DEFAULT_MARGIN), k)     # fits with the margin: no error
    check_plan(est, est.total, k, margin=0.0)


def test_resolve_vram_decides_with_the_one_estimate_and_auto_keeps_user_knobs():
    from jointdit.config import compose

    c = compose("train", ["model=small", "vram=48gb", "data.seconds=4"])
    with pytest.raises(MemoryPlanError, match=r"vram\."):
        resolve_vram(c, device="cpu", budget_bytes=256 * 2**20)
    c = compose("train", ["model=small", "vram=cpu", "vram.micro_batch_size=2", "vram.margin=0.2"])
    vs, as_, fv, fa = shapes_from_cfg(c)
    from jointdit.memory import _model_config_for

    full = estimate_peak(_model_config_for(c, vs, as_, fv, fa), vs, as_, Knobs.from_mapping(c.vram),
                         **plan_arguments(c, "cpu"))
    v = resolve_vram(c, device="cpu", budget_bytes=int(full.total * 1.2) + 1)   # exactly fits with margin 0.2
    assert v["estimate_bytes"] == full.total and v["margin"] == 0.2 and v["planned_bytes"] == full.planned(0.2)
    assert full.preview > 0 and full.info["mixed_modes"] and full.info["time_groups"] == "frame"  # from the config
    with pytest.raises(MemoryPlanError):
        resolve_vram(c, device="cpu", budget_bytes=int(full.total * 1.2) - 2**20)
    c = compose("train", ["model=small", "vram=auto", "vram.max_t=4"])
    v = resolve_vram(c, overrides=["vram.max_t=4"], device="cpu", budget_bytes=4 * GiB)
    assert v["max_t"] == 4 and v["planned_bytes"] <= 4 * GiB and v["margin"] == 0.1
    v_free = resolve_vram(compose("train", ["model=small", "vram=auto"]), device="cpu", budget_bytes=4 * GiB)
    assert v_free["max_t"] in (0, 16) or v_free["max_t"] > 4


def test_estimate_is_never_under_the_measured_peak_by_more_than_the_margin():
    k = Knobs(micro_batch_size=4)
    measured = measure_peak(cfg(), VS, AS, k, steps=2)
    est = estimate_peak(cfg(), VS, AS, k)
    assert measured <= est.planned(DEFAULT_MARGIN), (est.total / 2**20, measured / 2**20)
    assert abs(est.total - measured) / measured <= 0.15, (est.total / 2**20, measured / 2**20)
