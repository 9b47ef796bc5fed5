"""The evaluation a training run does every ``eval.every`` steps: metrics, a sample MP4 and the sync PNG
logged to a real MLflow run."""

from __future__ import annotations

import pytest


def test_training_evaluator_logs_metrics_sample_and_png(compose_cfg, tmp_path, synthetic_root, model_folder):
    from mlflow.tracking import MlflowClient

    from jointdit.evaluate.in_training import TrainingEvaluator
    from jointdit.tracking import Tracker

    cfg = compose_cfg("train", [f"data.root={synthetic_root}", "data.num_clips=8", "eval.every=5",
                                "eval.tasks=[joint,v2a]", "eval.num_clips=2", "eval.steps=1", "eval.num_real=2",
                                "eval.split=train"])
    tracker = Tracker(cfg.logger, run_name="eval-test")
    evaluator = TrainingEvaluator(cfg)
    summary = evaluator(model_folder, tmp_path / "eval" / "step_000005", tracker, step=5, device="cpu")
    tracker.end()
    assert {"joint/sync", "joint/sync_gated", "v2a/v2a_f1", "ceiling", "floor"} <= set(summary)

    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/joint/sync")
    assert [(m.step, m.value) for m in history] == [(5, pytest.approx(summary["joint/sync"]))]
    files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "eval/step_000005"))
    assert [f.rsplit(".", 1)[1] for f in files] == ["mp4", "png"]
