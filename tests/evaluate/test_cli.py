"""Folder mode: ``jointdit.evaluate`` on a folder of MP4s writes JSON/CSV tables, PNGs and an MLflow run."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import run_module

from jointdit.data.media import write_mp4


def _write_generated(folder: Path, clips, delay: float = 0.0) -> None:
    """Write the real clips as 'generated' MP4s named <id>_sample.mp4, the audio delayed by ``delay`` s."""
    for clip in clips:
        wave = clip.wave
        if delay:
            shift = int(round(delay * clip.sample_rate))
            wave = torch.cat([torch.zeros(shift), clip.wave[:-shift]])
        write_mp4(folder / f"{clip.meta['id']}_sample.mp4", clip.frames, clip.fps, wave, clip.sample_rate)


def test_folder_mode_writes_tables_plots_and_an_mlflow_run(compose_cfg, tmp_path, synthetic_root, real_clips):
    from mlflow.tracking import MlflowClient

    from jointdit.evaluate.cli import run

    clips, _ = real_clips
    samples = tmp_path / "samples"
    _write_generated(samples, clips[:4], delay=0.25)
    out = tmp_path / "eval_out"
    cfg = compose_cfg("evaluate", [f"samples_dir={samples}", f"data.root={synthetic_root}", "data.num_clips=8",
                                   "real.split=train", f"out_dir={out}", "logger=mlflow", "task=v2a", "plots=2"])
    report = run(cfg)

    summary = json.loads((out / "evaluate.json").read_text())["summary"]
    assert summary["n_generated"] == 4 and summary["n_real"] == 7
    # Delayed audio: onsets a quarter second late miss the events (±1 frame = 125 ms).
    assert summary["sync"] < summary["ceiling"] - 0.3
    assert summary["v2a_recall"] < 0.5 and summary["real_onset_f1"] >= 0.9
    rows = list(csv.DictReader((out / "evaluate_clips.csv").open()))
    assert [r["set"] for r in rows].count("generated") == 4 and {"sync", "sync_gated", "onsets"} <= set(rows[0])
    metrics = {r["metric"]: float(r["value"]) for r in csv.DictReader((out / "evaluate_summary.csv").open())}
    assert metrics["sync"] == pytest.approx(report.summary["sync"])
    assert len(list((out / "plots").glob("*.png"))) == 2
    notes = json.loads((out / "evaluate.json").read_text())["notes"]
    assert any(n.startswith("clip_score: skipped, no open_clip folder at") for n in notes)  # no assets/models here

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("evaluate")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.data.metrics["eval/sync"] == pytest.approx(report.summary["sync"])
    assert logged.data.metrics["eval/ceiling"] == pytest.approx(report.summary["ceiling"])
    assert logged.data.params["task"] == "v2a"
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "evaluate")}
    assert {"evaluate/evaluate.json", "evaluate/evaluate_clips.csv"} <= artifacts
    plots = [a.path for a in client.list_artifacts(logged.info.run_id, "evaluate/plots")]
    assert len(plots) == 2 and all(p.endswith(".png") for p in plots)


def test_an_empty_folder_is_an_error_naming_it(compose_cfg, tmp_path, synthetic_root):
    from jointdit.errors import DataError
    from jointdit.evaluate.cli import run

    (tmp_path / "empty").mkdir()
    cfg = compose_cfg("evaluate", [f"samples_dir={tmp_path / 'empty'}", f"data.root={synthetic_root}",
                                   "data.num_clips=8", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(DataError, match="empty.*holds no video files"):
        run(cfg)


@pytest.mark.slow
def test_python_dash_m_jointdit_evaluate(tmp_path, synthetic_root, real_clips):
    samples = tmp_path / "samples"
    _write_generated(samples, real_clips[0][:3])
    result = run_module("jointdit.evaluate", f"paths.root_dir={tmp_path}", f"samples_dir={samples}",
                        f"data.root={synthetic_root}", "data.num_clips=8", "real.split=train", "logger=mlflow")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| joint |" in result.stdout
    (written,) = list((tmp_path / "outputs" / "evaluate").glob("*/*/evaluate.json"))
    assert json.loads(written.read_text())["summary"]["sync"] > 0.5
