"""What a log step reports: losses averaged over the steps since the last log, an EMA-smoothed loss,
throughput — and the one line per log step that goes to the console and ``train.log``.

    meter = LossMeter(ema_decay=0.9)
    for step ...:
        meter.update({"loss": 0.8, "loss_video": 0.7, "loss_audio": 0.9}, samples=8)
        if step % log_every == 0:
            metrics = meter.pop()        # {"loss": mean since last pop, ..., "loss_ema": ..., "samples_per_s": ...}
            log.info(format_log_line(step, max_steps, {**metrics, "lr": lr}))
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping

#: Keys of a log line, in order; any other metric is left to MLflow.
LINE_KEYS = ("loss", "loss_ema", "loss_video", "loss_audio", "val_loss", "grad_norm", "lr", "samples_per_s")


class LossMeter:
    """Running sums of each loss since the last :meth:`pop`, plus an EMA of ``loss`` across pops.

    ``mean_k = (Σ_steps value_k) / (number of steps that reported k)`` — a loss a step did not report (a task
    that was not drawn) is not averaged as zero. ``ema_t = d·ema_{t-1} + (1−d)·loss_t`` per update, reported
    bias-corrected, ``ema_t / (1 − d^t)``, so the first steps are not pulled toward zero.
    """

    def __init__(self, ema_decay: float = 0.9, clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        self.ema_decay, self.clock = float(ema_decay), clock
        self._ema, self._ema_steps = 0.0, 0
        self.reset()

    def reset(self) -> None:
        """Start a new window (the EMA carries on)."""
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.start = self.clock()

    def update(self, losses: Mapping[str, float], samples: int = 0) -> None:
        """One optimizer step's losses (non-finite values are skipped) and the samples it consumed."""
        for key, value in losses.items():
            value = float(value)
            if math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        loss = float(losses.get("loss", math.nan))
        if math.isfinite(loss):
            self._ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * loss
            self._ema_steps += 1
        self.samples += int(samples)

    def merge(self, sums: Mapping[str, float], counts: Mapping[str, int]) -> None:
        """Add another process's window (from its :attr:`sums`/:attr:`counts`), so the means cover all ranks."""
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + int(counts[key])

    @property
    def ema(self) -> float:
        return self._ema / (1.0 - self.ema_decay**self._ema_steps) if self._ema_steps else math.nan

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums if self.counts[key]}

    def pop(self) -> dict[str, float]:
        """The window's means, ``loss_ema`` and ``samples_per_s``; then a new window starts."""
        elapsed = max(self.clock() - self.start, 1e-9)
        metrics = self.means()
        if self._ema_steps:
            metrics["loss_ema"] = self.ema
        metrics["samples_per_s"] = self.samples / elapsed
        self.reset()
        return metrics


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"{value:.3e}"
    if key == "samples_per_s":
        return f"{value:.1f}"
    return f"{value:.4f}"


def format_log_line(step: int, max_steps: int, metrics: Mapping[str, float]) -> str:
    """``step 10/150 | loss 0.8123 | loss_ema 0.8300 | loss_video 0.7000 | loss_audio 0.9000 | lr 3.000e-04 | samples_per_s 12.3``

    Keys follow :data:`LINE_KEYS`; missing or non-finite ones are left out.
    """
    parts = [f"step {step}/{max_steps}"]
    for key in LINE_KEYS:
        value = metrics.get(key)
        if value is not None and math.isfinite(float(value)):
            parts.append(f"{key} {_fmt(key, float(value))}")
    return " | ".join(parts)
