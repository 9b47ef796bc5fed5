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
    files = sorted(a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "eval/step_000005"))
    # per task its first sample and its sync PNG
    assert [f.rsplit("_", 2)[1] + "." + f.rsplit(".", 1)[1] for f in files] == ["joint.mp4", "joint.png", "v2a.mp4",
                                                                                 "v2a.png"]


def test_training_evaluator_samples_the_mask_modes(compose_cfg, tmp_path, synthetic_root, model_folder):
    """eval.tasks with extension, inpainting and single-stream modes: held-out conditions sampled in each
    mode, scored (mask modes with their event figures, t2v/t2a with their stream's distances only), and
    each mode's first sample logged: MP4s with sound, t2v's MP4 without sound, t2a's WAV."""
    import av
    import numpy as np
    from mlflow.tracking import MlflowClient

    from jointdit.data.media import read_clip
    from jointdit.evaluate.in_training import TrainingEvaluator
    from jointdit.tracking import Tracker

    tasks = ["extend_v", "extend_a", "inpaint_a", "t2v", "t2a"]
    cfg = compose_cfg("train", [f"data.root={synthetic_root}", "data.num_clips=8", "eval.every=5",
                                f"eval.tasks=[{','.join(tasks)}]", "eval.num_clips=2", "eval.steps=1",
                                "eval.num_real=2", "eval.split=train", "eval.given_fraction=0.5"])
    tracker = Tracker(cfg.logger, run_name="eval-masks")
    summary = TrainingEvaluator(cfg)(model_folder, tmp_path / "eval", tracker, step=5, device="cpu")
    tracker.end()
    assert {"extend_v/sync", "extend_v/extend_v_f1", "extend_a/extend_a_f1", "inpaint_a/inpaint_a_f1",
            "t2v/fd_video", "t2a/fd_audio", "ceiling"} <= set(summary)
    assert not {"t2v/sync", "t2a/sync", "t2v/fd_audio", "t2a/fd_video", "extend_a/v2a_f1"} & set(summary)

    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    logged = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "eval/step_000005")}
    files = {next(t for t in tasks if f"_{t}_s" in f) + "." + f.rsplit(".", 1)[1] for f in logged}
    assert files == {f"{t}.{ext}" for t in tasks for ext in ("png", "wav" if t == "t2a" else "mp4")}
    samples = tmp_path / "eval" / "samples"
    for task in ("extend_v", "extend_a", "inpaint_a", "t2v"):
        (mp4,) = [samples / task / f for f in logged if f.endswith(".mp4") and f"_{task}_" in f]
        with av.open(str(mp4)) as container:
            assert bool(container.streams.audio) == (task != "t2v"), task
    # extend_v kept the held-out clip's first half (4 of 8 frames): the MP4's frames match the real clip's
    (mp4,) = [samples / "extend_v" / f for f in logged if f.endswith(".mp4") and "_extend_v_" in f]
    condition = mp4.name.split("_extend_v_")[0]
    real = read_clip(synthetic_root / "videos" / next(
        r for r in map(__import__("json").loads, (synthetic_root / "metadata.jsonl").read_text().splitlines())
        if r["id"] == condition)["path"], fps=8, size=32, seconds=1.0, sample_rate=16000)
    with av.open(str(mp4)) as container:
        got = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32) / 127.5 - 1
    want = real.frames.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got[:4].mean(axis=(1, 2)), want[:4].mean(axis=(1, 2)), atol=0.05)


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
        assert [f.rsplit(".", 1)[1] for f in files] == ["mp4", "png", "mp4", "png"]  # joint's, then v2a's
    assert (tmp_path / "run" / "eval" / "step_000004" / "samples" / "joint").is_dir()
