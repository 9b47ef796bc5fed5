"""Memory planner: parameter count, knob choice vs budget, pre-flight failure, estimate vs measured peak."""
import jointdit  # noqa: F401
import pytest

from jointdit.memory import (GiB, Knobs, MemoryPlanError, check_plan, choose_knobs, count_params, estimate_peak,
                             measure_peak, quality_key, resolve_vram)

VS, AS = [16, 192, 8, 8], [1, 200, 64]  # pixel_mel latents of 2 s of 64x64 @ 8 fps video


def cfg(preset="tiny", **kw):
    return dict(preset=preset, video_in_channels=192, audio_in_channels=1, video_latent_fps=8.0,
                audio_latent_fps=100.0, **kw)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": False, "mlp_ratio": 2.0, "depth": 2, "video_patch_size": [2, 2, 2]}])
def test_param_count_matches_model(extra):
    from jointdit.models import build_model

    m = build_model(**cfg(**extra))
    assert count_params(cfg(**extra)) == sum(p.numel() for p in m.parameters())


def test_auto_picks_better_knobs_for_larger_budget():
    small = choose_knobs(cfg("small"), (VS, AS), int(1.3 * GiB), margin=0.1)
    large = choose_knobs(cfg("small"), (VS, AS), 8 * GiB, margin=0.1)
    assert quality_key(large, VS[0]) > quality_key(small, VS[0])
    for budget, k in ((1.3 * GiB, small), (8 * GiB, large)):
        assert estimate_peak(cfg("small"), VS, AS, k).total <= budget * 0.9
    # a long clip: a tight budget must give up quality (span, pooling, batch or checkpointing)
    big_t = [64, 192, 8, 8], [1, 800, 64]
    k1 = choose_knobs(cfg("small"), big_t, int(1.3 * GiB), margin=0.0)
    k2 = choose_knobs(cfg("small"), big_t, 16 * GiB, margin=0.0)
    assert quality_key(k2, 64) > quality_key(k1, 64) and k1.gradient_checkpointing and not k2.gradient_checkpointing


def test_plan_that_does_not_fit_names_the_knob():
    k = Knobs(max_t=12, kv_downsample=1, micro_batch_size=8)
    est = estimate_peak(cfg("small"), [32, 192, 8, 8], [1, 400, 64], k)
    with pytest.raises(MemoryPlanError, match=r"vram\.kv_downsample \(now 1\)") as e:
        check_plan(est, int(est.total * 0.5), k)
    assert "vram.gradient_checkpointing" in str(e.value) and "vram.max_t (now 12)" in str(e.value)
    check_plan(est, est.total + 1, k)  # fits: no error


def test_resolve_vram_fails_before_training_and_auto_keeps_user_knobs():
    from jointdit.config import compose

    c = compose("train", ["model=small", "vram=48gb", "data.seconds=4"])
    with pytest.raises(MemoryPlanError, match=r"vram\."):
        resolve_vram(c, device="cpu", budget_bytes=256 * 2**20)
    c = compose("train", ["model=small", "vram=auto", "vram.max_t=4"])
    v = resolve_vram(c, overrides=["vram.max_t=4"], device="cpu", budget_bytes=4 * GiB)
    assert v["max_t"] == 4 and v["estimate_bytes"] <= 4 * GiB * 0.9
    v_free = resolve_vram(compose("train", ["model=small", "vram=auto"]), device="cpu", budget_bytes=4 * GiB)
    assert v_free["max_t"] in (0, 16) or v_free["max_t"] > 4


def test_estimate_within_15_percent_of_measured_peak_rss():
    k = Knobs(micro_batch_size=4)
    measured = measure_peak(cfg(), VS, AS, k, steps=2)
    est = estimate_peak(cfg(), VS, AS, k).total
    assert abs(est - measured) / measured <= 0.15, (est / 2**20, measured / 2**20)
