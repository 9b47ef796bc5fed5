"""A small evaluation inside a training run (``eval.every`` in conf/train.yaml).

Every ``eval.every`` optimizer steps and at the last step, the trainer exports the current weights and
calls :meth:`TrainingEvaluator.__call__`: ``eval.num_clips`` clips per task in ``eval.tasks`` are
sampled with ``eval.steps`` ODE steps on held-out conditions (fixed seeds, so steps compare like with
like), scored beside the same held-out real clips, and logged to the run:

- metrics ``eval/<task>/<figure>`` and the references ``eval/ceiling``, ``eval/floor`` at that step;
- the first sample (MP4 with sound) and its frame-strip + spectrogram PNG under ``eval/step_NNNNNN/``.

The real clips are read once (at the model's geometry) and analysed once per evaluator.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from jointdit.evaluate.plot import plot_sync
from jointdit.evaluate.sampling import SamplingPlan, combined_summary, evaluate_session, read_real_at
from jointdit.evaluate.settings import DetectorSettings

log = logging.getLogger(__name__)


class TrainingEvaluator:
    def __init__(self, cfg: DictConfig):
        from jointdit.config import to_plain

        self.cfg = cfg
        ev = to_plain(cfg.eval)
        self.plan = SamplingPlan(tasks=tuple(ev.get("tasks") or ("joint",)), num_clips=int(ev.get("num_clips", 4)),
                                 seed=int(ev.get("seed", 0)), steps=int(ev.get("steps", 10)),
                                 guidance=ev.get("guidance") or to_plain(cfg.get("guidance")) or "jointcfg")
        SamplingPlan.from_config(self.plan.__dict__)  # the same checks as the evaluate CLI's
        self.settings = DetectorSettings.from_config(ev.get("detector"))
        self.num_real = int(ev.get("num_real", 8))
        self._real: tuple[Any, ...] | None = None  # (geometry key, clips, events, captions)

    def _real_clips(self, spec) -> tuple[list, dict, dict]:
        from jointdit.data.sources import build_source

        key = (spec.fps, tuple(spec.size) if not isinstance(spec.size, int) else spec.size, spec.seconds, spec.sample_rate)
        if self._real is None or self._real[0] != key:
            refs = build_source(self.cfg.data).clips(str(self.cfg.eval.get("split", "val")))[: self.num_real]
            self._real = (key, *read_real_at(refs, spec.fps, spec.size, spec.seconds, spec.sample_rate))
        return self._real[1], self._real[2], self._real[3]

    def __call__(self, model_folder: str | Path, out_dir: str | Path, tracker, step: int,
                 device: Any = None) -> dict[str, float]:
        """Sample, score and log; returns the combined summary (``<task>/<figure>`` keys).

        Sampling runs under fixed seeds, so the caller's RNG state is saved and restored: evaluating
        does not change what training draws next (resume stays exact).
        """
        from jointdit.sample import load_session

        import torch

        session = load_session(model_folder, device=device)
        real, events, captions = self._real_clips(session.spec)
        out_dir = Path(out_dir)
        with torch.random.fork_rng(devices=[session.device] if session.device.type == "cuda" else []):
            reports, generated = evaluate_session(session, real, events, captions, self.plan, self.settings, out_dir,
                                                  with_distances=min(len(real), self.plan.num_clips) >= 2)
        summary = combined_summary(reports)
        tracker.log_metrics({f"eval/{k}": v for k, v in summary.items()}, step)
        task = self.plan.tasks[0]
        clip, analysis = generated[task][0], reports[task].generated[0]
        png = plot_sync(clip.frames, clip.wave, clip.sample_rate, clip.fps, analysis.onsets, analysis.events,
                        out_dir / f"{analysis.name}.png", self.settings,
                        title=f"step {step}, {task}: onsets (solid), video events (dashed)")
        folder = f"eval/step_{step:06d}"
        tracker.log_artifact(clip.path, folder)
        tracker.log_artifact(png, folder)
        log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in summary.items()
                                                         if k.endswith(("/sync", "/sync_gated", "_f1"))))
        return summary
