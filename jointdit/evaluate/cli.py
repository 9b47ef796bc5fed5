"""``python -m jointdit.evaluate``: score a folder of generated MP4s beside the real clips of ``data``.

    python -m jointdit.evaluate samples_dir=outputs/samples task=joint logger=mlflow
    python -m jointdit.evaluate samples_dir=gen/v2a task=v2a detector.tolerance_frames=2

Writes ``evaluate.json``, ``evaluate_summary.csv``, ``evaluate_clips.csv`` and sync PNGs to
``out_dir``, prints the table, and logs metrics and files to one MLflow run when a logger is set.
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


def load_real(cfg: DictConfig) -> tuple[list[Clip], dict[str, list[float]], dict[str, str]]:
    """The real clips of ``cfg.data``'s held-out split (at the data's fps, size, length, ``cfg.sample_rate``),
    their known event times (clips without any are left out of the event figures) and captions."""
    from jointdit.data.sources import build_source

    refs = build_source(cfg.data).clips(str(cfg.real.split))
    limit = cfg.real.get("limit")
    refs = refs[: int(limit)] if limit else refs
    clips, events, captions = [], {}, {}
    for ref in refs:
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


def run(cfg: DictConfig, tracker=None) -> EvalReport:
    """Everything ``python -m jointdit.evaluate`` does, given a composed config (and optionally a tracker)."""
    from jointdit.tracking import Tracker, flatten

    settings = DetectorSettings.from_config(cfg.get("detector"))
    real, events, captions = load_real(cfg)
    generated = read_folder(cfg.samples_dir, int(cfg.sample_rate)) if cfg.get("samples_dir") else []
    report = evaluate_clips(generated, real, events, str(cfg.task), settings, with_distances=bool(cfg.distances))
    if cfg.get("pretrained"):
        from jointdit.evaluate.pretrained import pretrained_metrics

        figures, notes = pretrained_metrics(generated, real, cfg.pretrained.models_dir, captions,
                                            [a.name for a in report.generated], str(cfg.pretrained.device))
        report.summary.update(figures)
        report.notes.extend(notes)
    out_dir = Path(cfg.out_dir)
    files = write_report(report, out_dir)
    kind, clips = ("generated", generated) if generated else ("real", real)
    files.update(write_plots(report, clips, kind, out_dir, int(cfg.plots), settings))
    own = tracker is None
    tracker = Tracker(cfg.get("logger"), run_name=f"evaluate-{cfg.task}") if own else tracker
    try:
        if own:
            tracker.log_params(flatten(cfg))
        log_report(report, tracker, files=files)
    finally:
        if own:
            tracker.end()
    print(format_table(report))
    for path in files.values():
        log.info("wrote %s", path)
    return report
