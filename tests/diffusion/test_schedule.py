"""Resolution-aware timestep shift: the rules' values by hand, the shift/logit identity that ties training to
sampling, the export entry and the sampler's override warning."""

import math

import pytest
import torch

from jointdit.diffusion.sampler import make_scheduler
from jointdit.diffusion.schedule import (
    EXPORT_KEY,
    ShiftRule,
    export_entry,
    logit_normal_means,
    sampling_shifts,
    shifts,
    token_counts,
)


def test_rules_by_hand():
    assert ShiftRule()(256) == 1.0 and ShiftRule()(1024) == 2.0 and ShiftRule()(64) == 0.5  # sqrt(n / 256)
    lin = ShiftRule(method="linear")                                                       # LTX-2's constants
    assert lin(1024) == pytest.approx(math.exp(0.95)) and lin(4096) == pytest.approx(math.exp(2.05))
    assert lin(2560) == pytest.approx(math.exp(1.5))
    assert ShiftRule(method="constant", shift=3.0)(10) == 3.0 and ShiftRule(method="none")(99999) == 1.0
    floored = ShiftRule(min_shift=1.0)                        # the shipped default (conf/train.yaml)
    assert floored(200) == 1.0 and floored(64) == 1.0 and floored(1024) == 2.0
    assert ShiftRule(method="linear", min_shift=5.0)(1024) == 5.0           # exp(0.95) ≈ 2.59 floored
    assert ShiftRule(method="constant", shift=0.5, min_shift=1.0)(10) == 0.5  # a constant is what it says
    with pytest.raises(ValueError, match="min_shift"):
        ShiftRule(min_shift=-1.0)
    with pytest.raises(ValueError, match="unknown timestep shift method"):
        ShiftRule(method="cosine")
    with pytest.raises(ValueError, match="unknown timestep shift field"):
        ShiftRule.from_config({"methd": "sd3"})


def test_more_tokens_more_noise():
    for rule in (ShiftRule(), ShiftRule(method="linear")):
        values = [rule(n) for n in (64, 256, 1024, 4096)]
        assert values == sorted(values) and values[0] < values[-1]


def test_shift_is_a_logit_offset_so_training_and_sampling_agree():
    """The sampler's shifted sigmas s·σ/(1+(s−1)σ) are exactly sigmoid(logit σ + ln s): the warp training
    applies by moving the logit-normal mean by ln s."""
    s = 2.7
    sigmas = make_scheduler(10, shift=s).sigmas[1:-1].double()
    plain = make_scheduler(10).sigmas[1:-1].double()
    torch.testing.assert_close(sigmas, torch.sigmoid(torch.logit(plain) + math.log(s)), atol=1e-6, rtol=0)
    mv, ma = logit_normal_means(0.1, s, 1.0)
    assert mv == pytest.approx(0.1 + math.log(s)) and ma == pytest.approx(0.1)


def test_token_counts_and_export_entry():
    cfg = {"video_patch_size": (1, 2, 2), "audio_patch_size": (4, 16)}
    assert token_counts(cfg, (16, 192, 8, 8), (1, 200, 64)) == (16 * 4 * 4, 50 * 4)
    entry = export_entry({"method": "sd3", "reference_tokens": 256}, 256, 1024)
    assert entry["shift_video"] == 1.0 and entry["shift_audio"] == 2.0
    assert entry["rule"]["method"] == "sd3" and entry["video_tokens"] == 256
    assert shifts(entry["rule"], 1024, 256) == (2.0, 1.0)


def test_sampling_shifts_follow_the_export_and_warn_on_override():
    meta = {EXPORT_KEY: export_entry(ShiftRule(), 256, 1024)}
    assert sampling_shifts(meta, 256, 1024) == (1.0, 2.0)
    assert sampling_shifts(meta, 1024, 1024) == (2.0, 2.0)                 # a longer clip: recomputed
    assert sampling_shifts({}, 256, 1024) == (1.0, 1.0)                    # trained before the shift existed
    assert sampling_shifts(meta, 256, 1024, {"shift_video": None, "shift_audio": 2.0}) == (1.0, 2.0)  # same: silent
    with pytest.warns(UserWarning, match="shift_video=3.0 overrides the model's timestep shift 1"):
        assert sampling_shifts(meta, 256, 1024, {"shift_video": 3.0}) == (3.0, 2.0)
