"""``python -m jointdit.evaluate``: score generated clips beside the real clips of ``data``.

    python -m jointdit.evaluate samples_dir=outputs/samples task=joint logger=mlflow     # a folder of MP4s
    python -m jointdit.evaluate samples_dir=gen/v2a task=v2a detector.tolerance_frames=2
    python -m jointdit.evaluate checkpoint=outputs/.../export/last sampling.num_clips=8 guidance=cfg  # a model

Folder mode writes ``evaluate.json``, ``evaluate_summary.csv``, ``evaluate_clips.csv`` and sync PNGs
to ``out_dir``. Model mode samples every task of ``sampling.tasks`` (``evaluate.sampling``), writes the
samples under ``samples/<task>/``, one report per task under ``<task>/`` and the combined
``evaluate.json`` / ``evaluate_summary.csv`` (keys ``<task>/<figure>``). Both print the table and log
metrics and files to one MLflow run when a logger is set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from jointdit.data.media import Clip, read_clip
from jointdit.evaluate.evaluation import EvalReport, evaluate_clips
from jointdit.evaluate.folder import read_folder
from jointdit.evaluate.plot import plot_sync
from jointdit.evaluate.report import format_table, log_report, write_report
from jointdit.evaluate.settings import DetectorSettings

log = logging.getLogger(__name__)


def real_refs(cfg: DictConfig) -> list:
    """``ClipRef``s of ``cfg.data``'s held-out split (``real.split``), at most ``real.limit``."""
    from jointdit.data.sources import build_source

    refs = build_source(cfg.data).clips(str(cfg.real.split))
    limit = cfg.real.get("limit")
    return refs[: int(limit)] if limit else refs


def load_real(cfg: DictConfig) -> tuple[list[Clip], dict[str, list[float]], dict[str, str]]:
    """The real clips of ``cfg.data``'s held-out split (at the data's fps, size, length, ``cfg.sample_rate``),
    their known event times (clips without any are left out of the event figures) and captions."""
    clips, events, captions = [], {}, {}
    for ref in real_refs(cfg):
        clip = read_clip(ref.path, fps=float(cfg.data.fps), size=int(cfg.data.size), seconds=float(cfg.data.seconds),
                         sample_rate=int(cfg.sample_rate), allow_missing_audio=bool(cfg.data.get("allow_missing_audio", False)))
        clip.meta["id"] = ref.id
        clips.append(clip)
        captions[ref.id] = ref.caption
        if ref.events is not None:
            events[ref.id] = list(ref.events)
    return clips, events, captions


def write_plots(report: EvalReport, clips: list[Clip], kind: str, out_dir: Path, count: int,
                settings: DetectorSettings) -> dict[str, Path]:
    analyses = report.generated if kind == "generated" else report.real
    files = {}
    for clip, analysis in list(zip(clips, analyses))[: max(count, 0)]:
        path = out_dir / "plots" / f"{analysis.name}.png"
        files[f"plot_{analysis.name}"] = plot_sync(clip.frames, clip.wave, clip.sample_rate, clip.fps, analysis.onsets,
                                                   analysis.events, path, settings, title=f"{kind}: {analysis.name}")
    return files


def run_model(cfg: DictConfig, settings: DetectorSettings) -> tuple[dict[str, EvalReport], dict[str, float],
                                                                   dict[str, Path]]:
    """Model mode: sample each task from ``cfg.checkpoint`` and score it; returns (reports, combined summary, files)."""
    from jointdit.evaluate.sampling import SamplingPlan, combined_summary, evaluate_session, read_real_at
    from jointdit.evaluate.report import write_summary
    from jointdit.sample import load_session

    plan = SamplingPlan.from_config(cfg.sampling, guidance=cfg.get("guidance"))
    session = load_session(cfg.checkpoint, device=cfg.get("device"))
    g = session.spec
    real, events, captions = read_real_at(real_refs(cfg), g.fps, g.size, g.seconds, g.sample_rate)
    out_dir = Path(cfg.out_dir)
    reports, generated = evaluate_session(session, real, events, captions, plan, settings, out_dir,
                                          with_distances=bool(cfg.distances))
    files: dict[str, Path] = {}
    for task, report in reports.items():
        if cfg.get("pretrained"):
            _add_pretrained(cfg, report, generated[task], real, captions)
        files.update({f"{task}_{k}": v for k, v in write_report(report, out_dir / task).items()})
        files.update(write_plots(report, generated[task], "generated", out_dir / task, int(cfg.plots), settings))
        files.update({f"{task}_sample_{c.meta['id']}": Path(c.path) for c in generated[task][: int(cfg.plots)]})
    summary = combined_summary(reports)
    files.update(write_summary(summary, out_dir, {"checkpoint": str(cfg.checkpoint), "plan": plan.__dict__,
                                                  "tasks": {t: r.to_dict() for t, r in reports.items()}}))
    return reports, summary, files


def _add_pretrained(cfg: DictConfig, report: EvalReport, generated: list[Clip], real: list[Clip],
                    captions: dict[str, str]) -> None:
    from jointdit.evaluate.pretrained import pretrained_metrics

    figures, notes = pretrained_metrics(generated, real, cfg.pretrained.models_dir, captions,
                                        [a.name for a in report.generated], str(cfg.pretrained.device))
    report.summary.update(figures)
    report.notes.extend(notes)


def run(cfg: DictConfig, tracker=None) -> EvalReport | dict[str, EvalReport]:
    """Everything ``python -m jointdit.evaluate`` does, given a composed config (and optionally a tracker).

    Returns the report (folder mode) or {task: report} (model mode, ``checkpoint`` set).
    """
    from jointdit.tracking import Tracker, flatten

    settings = DetectorSettings.from_config(cfg.get("detector"))
    if cfg.get("checkpoint"):
        if cfg.get("samples_dir"):
            from jointdit.errors import ConfigError

            raise ConfigError("give either checkpoint= (sample, then score) or samples_dir= (score a folder), not both")
        reports, summary, files = run_model(cfg, settings)
        _log(cfg, tracker, summary, files, Tracker, flatten)
        print(format_table(reports))
        return reports
    real, events, captions = load_real(cfg)
    generated = read_folder(cfg.samples_dir, int(cfg.sample_rate)) if cfg.get("samples_dir") else []
    report = evaluate_clips(generated, real, events, str(cfg.task), settings, with_distances=bool(cfg.distances))
    if cfg.get("pretrained"):
        _add_pretrained(cfg, report, generated, real, captions)
    out_dir = Path(cfg.out_dir)
    files = write_report(report, out_dir)
    kind, clips = ("generated", generated) if generated else ("real", real)
    files.update(write_plots(report, clips, kind, out_dir, int(cfg.plots), settings))
    _log(cfg, tracker, report.summary, files, Tracker, flatten)
    print(format_table(report))
    return report


def _log(cfg: DictConfig, tracker, summary: dict[str, float], files: dict[str, Path], tracker_cls, flatten) -> None:
    own = tracker is None
    mode = "model" if cfg.get("checkpoint") else str(cfg.task)
    tracker = tracker_cls(cfg.get("logger"), run_name=f"evaluate-{mode}") if own else tracker
    try:
        if own:
            tracker.log_params(flatten(cfg))
        log_report(summary, tracker, files=files, root=cfg.out_dir)
    finally:
        if own:
            tracker.end()
    for path in files.values():
        log.info("wrote %s", path)
