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


# 8 clips of 1 s at 32 px, a 2-block model (tests/test_training.py's set-up), real MLflow store.
SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=2",
         "sample_every=-1", "checkpoint.every=100", "log_every=2"]


@pytest.mark.slow
def test_a_training_run_with_eval_every_logs_metrics_sample_and_png(compose_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from jointdit.training import train

    cfg = compose_cfg("train", [*SMALL, f"paths.output_dir={tmp_path / 'run'}", "max_steps=4", "eval.every=2",
                                "eval.tasks=[joint,v2a]", "eval.num_clips=2", "eval.steps=1", "eval.num_real=2",
                                "eval.split=train"])
    final = train(cfg)
    assert {"eval/joint/sync", "eval/joint/sync_gated", "eval/v2a/v2a_f1"} <= set(final)  # optimized_metric can name them

    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    for key in ("eval/joint/sync", "eval/joint/sync_gated", "eval/v2a/v2a_f1", "eval/ceiling"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    for step in (2, 4):
        files = sorted(a.path for a in client.list_artifacts(run.info.run_id, f"eval/step_{step:06d}"))
        assert [f.rsplit(".", 1)[1] for f in files] == ["mp4", "png"]
    assert (tmp_path / "run" / "eval" / "step_000004" / "samples" / "joint").is_dir()
