"""Real synthetic clips for the evaluation tests: written as MP4 (H.264 + AAC) by the shared fixture,
read back through PyAV once per session."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def real_clips(synthetic_root):
    """(clips, {id: event times}) for the 8 clips of the shared synthetic set, read from their MP4s."""
    from jointdit.evaluate.folder import read_video_file

    rows = [json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()]
    clips = []
    for row in rows:
        clip = read_video_file(synthetic_root / "videos" / row["path"], sample_rate=16000)
        clip.meta["id"] = row["id"]
        clips.append(clip)
    return clips, {row["id"]: row["events"] for row in rows}
