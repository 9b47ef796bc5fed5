"""Write an ``EvalReport`` as JSON + CSV tables, print it, and log it to an MLflow run.

Files (atomic: a temp file renamed into place):

    <stem>.json           summary, settings, notes, per-clip rows
    <stem>_summary.csv    metric,value
    <stem>_clips.csv      one row per clip (set, name, sync, sync_gated, gate figures, detections)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from jointdit.evaluate.evaluation import EvalReport


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(report: EvalReport, out_dir: str | os.PathLike, stem: str = "evaluate") -> dict[str, Path]:
    """Write the JSON and the two CSV tables into ``out_dir``; returns {kind: path}."""
    out = Path(out_dir)
    return {
        "json": _write_atomic(out / f"{stem}.json", json.dumps(_json_safe(report.to_dict()), indent=2) + "\n"),
        "summary_csv": _write_atomic(out / f"{stem}_summary.csv",
                                     _csv([{"metric": k, "value": v} for k, v in report.summary.items()])),
        "clips_csv": _write_atomic(out / f"{stem}_clips.csv", _csv(report.clips)),
    }


# ``shuffled`` is the generated clips' own chance level (video i with generated audio i+1): sync means
# something only above it, since a clip with many random events matches many by chance.
HEADLINE = ("sync", "sync_gated", "shuffled", "floor", "ceiling", "v2a_f1", "a2v_f1")


def _cell(summary: dict[str, float], key: str) -> str:
    value = summary.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def format_table(reports: EvalReport | dict[str, EvalReport]) -> str:
    """The headline figures as a Markdown table, one row per task, then every other figure (what the CLI prints)."""
    reports = {reports.task: reports} if isinstance(reports, EvalReport) else dict(reports)
    lines = ["| | sync | sync (gated) | shuffled (generated) | floor (real) | ceiling (real) | v2a F1 | a2v F1 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {task} | " + " | ".join(_cell(r.summary, k) for k in HEADLINE) + " |" for task, r in reports.items()]
    many = len(reports) > 1
    rows = [(f"{task}/{k}" if many else k, r.summary, k) for task, r in reports.items()
            for k in r.summary if k not in HEADLINE]
    lines += ["", "| metric | value |", "|---|---|"] + [f"| {name} | {_cell(s, k)} |" for name, s, k in rows]
    notes = dict.fromkeys(n for r in reports.values() for n in r.notes)
    lines += [f"\nnote: {note}" for note in notes]
    return "\n".join(lines)


def write_summary(summary: dict[str, float], out_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
                  stem: str = "evaluate") -> dict[str, Path]:
    """A combined summary (several tasks): ``<stem>.json`` (summary + ``extra``) and ``<stem>_summary.csv``."""
    out = Path(out_dir)
    return {
        "json": _write_atomic(out / f"{stem}.json", json.dumps(_json_safe({"summary": summary, **(extra or {})}),
                                                                  indent=2) + "\n"),
        "summary_csv": _write_atomic(out / f"{stem}_summary.csv",
                                     _csv([{"metric": k, "value": v} for k, v in summary.items()])),
    }


def log_report(report: EvalReport | dict[str, float], tracker, step: int = 0, prefix: str = "eval/",
               files: dict[str, Path] | None = None, artifact_path: str = "evaluate",
               root: str | os.PathLike | None = None) -> None:
    """Log the summary (a report's, or a combined one) as metrics ``<prefix><key>`` at ``step`` and the
    written files as artifacts under ``artifact_path`` (keeping their folders relative to ``root``).

    ``tracker`` is a ``jointdit.tracking.Tracker`` (anything with ``log_metrics(dict, step)`` and
    ``log_artifact(path, artifact_path)``); an inactive tracker logs nothing.
    """
    summary = report.summary if isinstance(report, EvalReport) else report
    tracker.log_metrics({f"{prefix}{k}": v for k, v in summary.items()}, step=step)
    for path in (files or {}).values():
        path = Path(path)
        folder = artifact_path
        if root is not None and path.resolve().is_relative_to(Path(root).resolve()):
            relative = path.resolve().parent.relative_to(Path(root).resolve()).as_posix()
            folder = artifact_path if relative == "." else f"{artifact_path}/{relative}"
        tracker.log_artifact(path, folder)
