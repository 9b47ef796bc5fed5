"""Conditional event accuracy against known event times (the synthetic set's ``metadata.jsonl``).

    v2a: onsets detected in the generated AUDIO vs the given video's true event times
    a2v: events detected in the generated VIDEO vs the given audio's true event times
    real clips: both, which measures how well the detectors recover known events

Counts and offsets are pooled over clips (micro-averaged): precision, recall, F1 and mean offset in
ms from ``matching.accuracy_from_counts``, at ±tolerance_frames / fps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jointdit.errors import DataError
from jointdit.evaluate.matching import Accuracy, accuracy_from_counts, match_events
from jointdit.evaluate.settings import DetectorSettings
from jointdit.evaluate.sync import ClipAnalysis


def load_event_times(metadata: str | os.PathLike) -> dict[str, list[float]]:
    """``metadata.jsonl`` (or the folder holding it) → {clip id: event times in seconds}."""
    path = Path(metadata)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no metadata.jsonl with event times (the synthetic set writes one)")
    out: dict[str, list[float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "id" not in row or "events" not in row:
            raise DataError(f"{path}:{number}: a row needs 'id' and 'events', got keys {sorted(row)}")
        out[str(row["id"])] = [float(t) for t in row["events"]]
    return out


def reference_id(name: str, ids: Iterable[str]) -> str | None:
    """The id a clip name refers to: the name itself, or the longest id it starts with followed by
    a separator (``<id>_v2a_seed0`` → ``<id>``)."""
    ids = set(ids)
    if name in ids:
        return name
    candidates = [i for i in ids if name.startswith(i) and name[len(i) : len(i) + 1] in {"_", "-", ".", "/"}]
    return max(candidates, key=len) if candidates else None


def event_accuracy(analyses: Sequence[ClipAnalysis], references: Mapping[str, Sequence[float]], modality: str,
                   settings: DetectorSettings = DetectorSettings()) -> tuple[Accuracy, list[dict]]:
    """Pooled accuracy of ``modality`` ("audio": onsets, "video": events) against the references.

    Returns the pooled figures and one row per clip that has a reference; clips without one are
    skipped (a clip name that matches no id is an error only when none match).
    """
    if modality not in ("audio", "video"):
        raise ValueError(f"modality must be 'audio' or 'video', got {modality!r}")
    matched = num_pred = num_ref = 0
    offsets: list[np.ndarray] = []
    rows = []
    for analysis in analyses:
        key = reference_id(analysis.name, references)
        if key is None:
            continue
        pred = analysis.onsets if modality == "audio" else analysis.events
        ref = np.asarray(references[key], dtype=np.float64)
        ref = ref[ref < analysis.seconds]
        match = match_events(ref, pred, analysis.tolerance(settings))
        matched, num_pred, num_ref = matched + match.matched, num_pred + len(pred), num_ref + len(ref)
        offsets.append(match.offsets)
        clip = accuracy_from_counts(match.matched, len(pred), len(ref), match.offsets)
        rows.append({"name": analysis.name, "reference": key, **clip.to_dict()})
    if analyses and not rows:
        raise DataError(f"none of the clip names ({analyses[0].name!r}, ...) matches an id in the event metadata "
                         f"(ids look like {next(iter(references), '<none>')!r}); name clips <id>.mp4 or <id>_<anything>.mp4")
    pooled = accuracy_from_counts(matched, num_pred, num_ref, np.concatenate(offsets) if offsets else np.zeros(0))
    return pooled, rows
