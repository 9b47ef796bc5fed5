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


def format_table(report: EvalReport) -> str:
    """The headline figures as a Markdown table (what the CLI prints)."""
    s = report.summary
    cell = lambda key: f"{s[key]:.3f}" if key in s and math.isfinite(s[key]) else "–"  # noqa: E731
    lines = ["| | sync | sync (gated) | floor | ceiling | v2a F1 | a2v F1 |", "|---|---|---|---|---|---|---|",
             f"| {report.task} | {cell('sync')} | {cell('sync_gated')} | {cell('floor')} | {cell('ceiling')} | "
             f"{cell('v2a_f1')} | {cell('a2v_f1')} |"]
    rest = [k for k in s if k not in {"sync", "sync_gated", "floor", "ceiling", "v2a_f1", "a2v_f1"}]
    lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {cell(k)} |" for k in rest]
    lines += [f"\nnote: {note}" for note in report.notes]
    return "\n".join(lines)


def log_report(report: EvalReport, tracker, step: int = 0, prefix: str = "eval/",
               files: dict[str, Path] | None = None, artifact_path: str = "evaluate") -> None:
    """Log the summary as metrics ``<prefix><key>`` at ``step`` and the written files as artifacts.

    ``tracker`` is a ``jointdit.tracking.Tracker`` (anything with ``log_metrics(dict, step)`` and
    ``log_artifact(path, artifact_path)``); an inactive tracker logs nothing.
    """
    tracker.log_metrics({f"{prefix}{k}": v for k, v in report.summary.items()}, step=step)
    for path in (files or {}).values():
        tracker.log_artifact(path, artifact_path)
