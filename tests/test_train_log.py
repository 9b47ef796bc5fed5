"""LossMeter and the log line: means over the window, bias-corrected EMA, throughput, formatting."""

import math

import pytest

from jointdit.train_log import LossMeter, format_log_line


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_means_cover_every_step_since_the_last_log_not_just_the_last_one():
    clock = Clock()
    meter = LossMeter(ema_decay=0.5, clock=clock)
    meter.update({"loss": 1.0, "loss_video": 2.0, "loss_a2v": 4.0}, samples=8)
    meter.update({"loss": 3.0, "loss_video": 4.0}, samples=8)           # a2v not drawn this step
    meter.update({"loss": 5.0, "loss_video": float("nan")}, samples=8)  # non-finite: skipped
    clock.now += 4.0
    metrics = meter.pop()
    assert metrics["loss"] == pytest.approx(3.0)          # (1 + 3 + 5) / 3
    assert metrics["loss_video"] == pytest.approx(3.0)    # (2 + 4) / 2
    assert metrics["loss_a2v"] == pytest.approx(4.0)      # one step reported it
    assert metrics["samples_per_s"] == pytest.approx(24 / 4.0)
    # EMA with d = 0.5: e1 = 0.5, e2 = 0.25 + 1.5 = 1.75, e3 = 0.875 + 2.5 = 3.375; bias 1 - 0.125 = 0.875
    assert metrics["loss_ema"] == pytest.approx(3.375 / 0.875)
    meter.update({"loss": 7.0}, samples=2)
    clock.now += 1.0
    second = meter.pop()  # a new window: only the one step; the EMA carries on
    assert second["loss"] == pytest.approx(7.0) and "loss_video" not in second
    assert second["loss_ema"] == pytest.approx((0.5 * 3.375 + 0.5 * 7.0) / (1 - 0.5**4))
    assert second["samples_per_s"] == pytest.approx(2.0)


def test_merge_averages_over_ranks():
    rank0, rank1 = LossMeter(), LossMeter()
    rank0.update({"loss": 1.0}), rank0.update({"loss": 2.0})
    rank1.update({"loss": 6.0})
    rank0.merge(rank1.sums, rank1.counts)
    assert rank0.means()["loss"] == pytest.approx(3.0)


def test_log_line_has_the_step_and_the_losses_in_order():
    line = format_log_line(10, 150, {"loss_audio": 0.9, "loss": 0.81234, "loss_video": 0.7, "lr": 3e-4,
                                     "samples_per_s": 12.34, "loss_ema": math.nan, "loss_joint": 1.0})
    assert line == "step 10/150 | loss 0.8123 | loss_video 0.7000 | loss_audio 0.9000 | lr 3.000e-04 | samples_per_s 12.3"


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        LossMeter(ema_decay=1.0)
