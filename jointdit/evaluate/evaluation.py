"""``evaluate_clips``: every weight-free figure for a set of generated clips, beside the real-clip
ceiling and the shuffled-pairs floor computed on the same settings.

Summary keys (flat, so they log as MLflow metrics; absent when their inputs are):

    sync, sync_gated, gate_pass_rate, shuffled, shuffled_gated      generated clips
    ceiling, ceiling_gated, floor, floor_gated                      real clips (matched / shuffled pairs)
    v2a_{precision,recall,f1,offset_ms,abs_offset_ms}               task v2a: generated audio vs known events
    a2v_{precision,recall,f1,offset_ms,abs_offset_ms}               task a2v: generated video vs known events
    real_onset_*, real_event_*                                      real clips: detectors vs known events
    fd_video, kid_video, fd_audio, kid_audio                        generated vs real (distances.py)
    n_generated, n_real
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jointdit.data.media import Clip
from jointdit.errors import DataError
from jointdit.evaluate.distances import distances as distance_figures
from jointdit.evaluate.events import event_accuracy
from jointdit.evaluate.settings import DetectorSettings
from jointdit.evaluate.sync import ClipAnalysis, SyncSummary, analyse_clip, clip_name, shuffled_pairs, sync_score

TASKS = ("joint", "i2sv", "a2v", "v2a")


@dataclass
class EvalReport:
    task: str
    settings: dict[str, Any]
    summary: dict[str, float]
    clips: list[dict[str, Any]]                  # one row per clip, ``set`` = generated | real
    notes: list[str] = field(default_factory=list)  # skipped figures and why
    generated: list[ClipAnalysis] = field(default_factory=list, repr=False)
    real: list[ClipAnalysis] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "summary": self.summary, "settings": self.settings, "notes": self.notes,
                "clips": self.clips}


def _row(kind: str, analysis: ClipAnalysis, settings: DetectorSettings) -> dict[str, Any]:
    score = sync_score(analysis, settings)
    gate = analysis.gate
    return {"set": kind, "name": analysis.name, "sync": score, "sync_gated": score if gate.passed else 0.0,
            "passed": gate.passed, "failures": ";".join(gate.failures), "rms_db": gate.rms_db,
            "brightness": gate.brightness, "object_frames": gate.object_frames, "travel": gate.travel,
            "num_onsets": len(analysis.onsets), "num_events": len(analysis.events),
            "onsets": " ".join(f"{t:.3f}" for t in analysis.onsets),
            "events": " ".join(f"{t:.3f}" for t in analysis.events)}


def _sync_figures(rows: list[dict], analyses: list[ClipAnalysis], settings: DetectorSettings, matched: str,
                  shuffled: str) -> dict[str, float]:
    out: dict[str, float] = {}
    summary = SyncSummary.of([r["sync"] for r in rows], [r["passed"] for r in rows])
    out[matched], out[f"{matched}_gated"] = summary.mean, summary.gated
    pairs = shuffled_pairs(analyses, settings)
    if pairs:
        summary = SyncSummary.of([s for s, _ in pairs], [p for _, p in pairs])
        out[shuffled], out[f"{shuffled}_gated"] = summary.mean, summary.gated
    return out


def _rates(figures: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in figures.items() if not k.endswith(("matched", "num_pred", "num_ref"))}


def evaluate_clips(
    generated: Sequence[Clip] | None,
    real: Sequence[Clip] | None = None,
    events: Mapping[str, Sequence[float]] | None = None,
    task: str = "joint",
    settings: DetectorSettings = DetectorSettings(),
    *,
    with_distances: bool = True,
    real_analyses: Sequence[ClipAnalysis] | None = None,
) -> EvalReport:
    """Score ``generated`` clips beside ``real`` ones (same settings), optionally against known ``events``.

    ``events`` maps clip ids to event times (``events.load_event_times``); a generated clip refers to
    id ``x`` when it is named ``x`` or ``x_<anything>`` (``Clip.meta["id"]``, else the file stem).
    ``task`` selects the conditional event accuracy: ``v2a`` scores the generated audio's onsets,
    ``a2v`` the generated video's events, against the known times of the condition.
    ``real_analyses``: the real clips' analyses under the same settings, when already computed.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    generated, real = list(generated or []), list(real or [])
    if not generated and not real:
        raise ValueError("nothing to evaluate: no generated and no real clips")
    notes: list[str] = []
    gen = [analyse_clip(c, settings, clip_name(c, f"generated_{i:04d}")) for i, c in enumerate(generated)]
    if real_analyses is not None and len(real_analyses) != len(real):
        raise ValueError(f"{len(real_analyses)} real analyses for {len(real)} real clips")
    ref = list(real_analyses) if real_analyses is not None else [
        analyse_clip(c, settings, clip_name(c, f"real_{i:04d}")) for i, c in enumerate(real)]
    gen_rows, real_rows = [_row("generated", a, settings) for a in gen], [_row("real", a, settings) for a in ref]

    summary: dict[str, float] = {"n_generated": float(len(gen)), "n_real": float(len(ref))}
    if gen:
        summary.update(_sync_figures(gen_rows, gen, settings, "sync", "shuffled"))
        summary["gate_pass_rate"] = sum(r["passed"] for r in gen_rows) / len(gen_rows)
    if ref:
        summary.update(_sync_figures(real_rows, ref, settings, "ceiling", "floor"))
    if len(ref) < 2:
        notes.append("floor: needs at least 2 real clips")

    if events:
        if gen and task in ("v2a", "a2v"):
            modality = "audio" if task == "v2a" else "video"
            pooled, per_clip = event_accuracy(gen, events, modality, settings)
            summary.update(_rates(pooled.to_dict(f"{task}_")))
            for row in gen_rows:
                row.update({f"{task}_{k}": v for r in per_clip if r["name"] == row["name"]
                            for k, v in r.items() if k in ("precision", "recall", "f1", "offset_ms")})
        if ref:
            for modality, prefix in (("audio", "real_onset_"), ("video", "real_event_")):
                try:
                    pooled, _ = event_accuracy(ref, events, modality, settings)
                except DataError as err:
                    notes.append(f"{prefix.rstrip('_')}: {err}")
                    break
                summary.update(_rates(pooled.to_dict(prefix)))
    elif task in ("v2a", "a2v"):
        notes.append(f"{task} event accuracy: no event metadata given")

    if with_distances and gen and ref:
        if len(gen) >= 2 and len(ref) >= 2:
            summary.update(distance_figures(generated, gen, real, ref, settings))
        else:
            notes.append("distances: need at least 2 generated and 2 real clips")

    return EvalReport(task=task, settings=settings.to_dict(), summary=summary, clips=gen_rows + real_rows,
                      notes=notes, generated=gen, real=ref)
