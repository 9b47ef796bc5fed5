"""A small evaluation inside a training run (``eval.every`` in conf/train.yaml).

Every ``eval.every`` optimizer steps and at the last step, the trainer exports the current weights and
calls :meth:`TrainingEvaluator.__call__`: ``eval.num_clips`` clips per task in ``eval.tasks`` (any
sampler task: joint, i2sv, a2v, v2a, extend_v, extend_a, inpaint_v, inpaint_a, t2v, t2a; the mask modes
take ``eval.given_fraction`` / ``eval.span_fraction`` of each held-out clip) are sampled with
``eval.steps`` ODE steps on held-out conditions (fixed seeds, so steps compare like with like), scored
beside the same held-out real clips (:mod:`jointdit.evaluate.sampling`), and logged to the run:

- metrics ``eval/<task>/<figure>`` and the references ``eval/ceiling``, ``eval/floor`` at that step;
- per task, its first sample and a PNG under ``eval/step_NNNNNN/``: the MP4 with sound and the sync
  figure (frames + spectrogram with onsets and video events); t2v an MP4 without sound and its frame
  strip, t2a a WAV and its spectrogram.

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
        plan = {"tasks": ev.get("tasks") or ["joint"], "num_clips": int(ev.get("num_clips", 4)),
                "seed": int(ev.get("seed", 0)), "steps": int(ev.get("steps", 10))}
        plan.update({k: ev[k] for k in ("given_fraction", "span_fraction") if ev.get(k) is not None})
        # the same checks as the evaluate CLI's
        self.plan = SamplingPlan.from_config(plan, guidance=ev.get("guidance") or to_plain(cfg.get("guidance"))
                                             or "jointcfg")
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

        # no sampling-plan check here: the training run's plan holds it, and the memory training itself uses
        # would count as unavailable
        session = load_session(model_folder, device=device, check_memory=False)
        real, events, captions = self._real_clips(session.spec)
        out_dir = Path(out_dir)
        with torch.random.fork_rng(devices=[session.device] if session.device.type == "cuda" else []):
            reports, generated = evaluate_session(session, real, events, captions, self.plan, self.settings, out_dir,
                                                  with_distances=min(len(real), self.plan.num_clips) >= 2)
        summary = combined_summary(reports)
        tracker.log_metrics({f"eval/{k}": v for k, v in summary.items()}, step)
        folder = f"eval/step_{step:06d}"
        for task in self.plan.tasks:
            clip, analysis = generated[task][0], reports[task].generated[0]
            tracker.log_artifact(clip.path, folder)
            tracker.log_artifact(self._figure(clip, analysis, out_dir, step, task), folder)
        log.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in summary.items()
                                                         if k.endswith(("/sync", "/sync_gated", "_f1"))))
        return summary

    def _figure(self, clip, analysis, out_dir: Path, step: int, task: str) -> Path:
        """The sync PNG of a two-stream clip; a single-stream clip's own panel (frames or spectrogram)."""
        title = f"step {step}, {task}"
        if clip.meta.get("absent"):
            from jointdit.io.outputs import write_preview

            video_only = "audio" in clip.meta["absent"]
            return write_preview(out_dir / f"{analysis.name}.png", clip.frames if video_only else None,
                                 None if video_only else clip.wave, clip.sample_rate, title=title)
        return plot_sync(clip.frames, clip.wave, clip.sample_rate, clip.fps, analysis.onsets, analysis.events,
                         out_dir / f"{analysis.name}.png", self.settings,
                         title=f"{title}: onsets (solid), video events (dashed)")
