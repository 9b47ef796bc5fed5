"""experiments/extend_rhythm.py's plumbing at tiny size: a 2-step training run with extend_a in the mix, the
continuations scored beside the floor and the real-clip ceiling, the tables written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_extend_rhythm_script_trains_scores_and_writes_its_table(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import extend_rhythm
    finally:
        sys.path.pop(0)
    result = extend_rhythm.main([
        "--root", str(tmp_path), "--max-steps", "2", "--clips", "2", "--sample-steps", "1", "--guidance", "none",
        "--results", str(tmp_path / "results"), "--name", "smoke", "data.num_clips=8", "data.val_fraction=0.25",
        "data.seconds=2.0", "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "batch_size=2",
        "vram.micro_batch_size=2", "logger=none"])
    assert set(result["figures"]) == {"model", "floor", "ceiling"} and result["settings"]["clips"] == 2
    assert result["seconds_given"] == pytest.approx(1.0)
    # the real clips' own onsets after k are found at their known events: the scoring path works
    ceiling = result["figures"]["ceiling"]
    assert ceiling["num_ref"] > 0 and ceiling["recall"] >= 0.5
    for row in result["clips"]:
        assert all(t >= 1.0 for t in row["events_after_k"] + row["model_onsets"] + row["floor_onsets"])
    table = (tmp_path / "results" / "smoke.md").read_text()
    assert "| extend_a continuation |" in table and "| ceiling: the real clip's audio |" in table
