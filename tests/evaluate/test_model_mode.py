"""Model mode: ``jointdit.evaluate checkpoint=<model folder>`` samples every task on held-out conditions
(fixed seeds, overridable guidance), scores them beside the real clips, writes tables and logs MLflow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

_spec = importlib.util.spec_from_file_location("diffusion_fixtures", Path(__file__).parents[1] / "diffusion" / "conftest.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        assert container.streams.audio, f"{path} has no audio track"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


@pytest.mark.slow
def test_model_folder_is_sampled_per_task_scored_and_logged(compose_cfg, tmp_path, synthetic_root, model_folder):
    from mlflow.tracking import MlflowClient

    from jointdit.evaluate.cli import run

    out = tmp_path / "eval"
    cfg = compose_cfg("evaluate", [f"checkpoint={model_folder}", f"data.root={synthetic_root}", "data.num_clips=8",
                                   "real.split=train", "real.limit=3", "sampling.num_clips=2", "sampling.steps=2",
                                   "guidance=cfg", "device=cpu", f"out_dir={out}", "logger=mlflow", "plots=1",
                                   "pretrained=null"])
    reports = run(cfg)
    assert set(reports) == {"joint", "i2sv", "a2v", "v2a"}

    combined = json.loads((out / "evaluate.json").read_text())
    summary = combined["summary"]
    for task in reports:
        assert summary[f"{task}/n_generated"] == 2 and f"{task}/sync" in summary
        assert (out / task / "evaluate_clips.csv").exists() and len(list((out / task / "plots").glob("*.png"))) == 1
        names = sorted(p.name for p in (out / "samples" / task).glob("*.mp4"))
        # Held-out conditions in order, seeds seed + i.
        ids = [json.loads(line)["id"] for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "train"][:2]
        assert names == sorted(f"{i}_{task}_s{k}.mp4" for k, i in enumerate(ids))
    assert summary["n_real"] == 3 and "ceiling" in summary and "floor" in summary
    assert {"v2a/v2a_f1", "a2v/a2v_f1"} <= set(summary)
    assert combined["plan"]["guidance"]["name"] == "cfg"  # guidance overridden from the command line

    # v2a keeps the given video: the sample's frames are its condition's frames (pixel codec is lossless).
    from jointdit.data.media import read_clip

    first_id = ids[0]
    row = next(json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()
               if json.loads(line)["id"] == first_id)
    condition = read_clip(synthetic_root / "videos" / row["path"], fps=fx.FPS, size=fx.SIZE, seconds=fx.SECONDS,
                          sample_rate=fx.SR)
    expected = condition.frames.add(1).mul(127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(_frames(out / "samples" / "v2a" / f"{first_id}_v2a_s0.mp4") - expected).mean() < 4.0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert logged.data.metrics["eval/joint/sync"] == pytest.approx(summary["joint/sync"])
    assert logged.data.metrics["eval/ceiling"] == pytest.approx(summary["ceiling"])
    samples = [a.path for a in client.list_artifacts(logged.info.run_id, "evaluate/samples/joint")]
    assert len(samples) == 1 and samples[0].endswith(".mp4")


def test_v2a_samples_keep_their_condition_video(compose_cfg, tmp_path, synthetic_root, model_folder):
    """One task, no MLflow: the fast version of the test above."""
    from jointdit.data.media import read_clip
    from jointdit.evaluate.cli import run

    out = tmp_path / "eval"
    cfg = compose_cfg("evaluate", [f"checkpoint={model_folder}", f"data.root={synthetic_root}", "data.num_clips=8",
                                   "real.split=train", "real.limit=2", "sampling.tasks=[v2a]", "sampling.num_clips=2",
                                   "sampling.steps=1", "sampling.seed=5", "device=cpu", f"out_dir={out}", "plots=0",
                                   "pretrained=null", "distances=false"])
    reports = run(cfg)
    summary = json.loads((out / "evaluate.json").read_text())["summary"]
    assert set(reports) == {"v2a"} and summary["v2a/n_generated"] == 2 and "v2a/v2a_f1" in summary
    rows = [json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][:2]
    for k, row in enumerate(train):
        sample = out / "samples" / "v2a" / f"{row['id']}_v2a_s{5 + k}.mp4"
        condition = read_clip(synthetic_root / "videos" / row["path"], fps=fx.FPS, size=fx.SIZE, seconds=fx.SECONDS,
                              sample_rate=fx.SR)
        expected = condition.frames.add(1).mul(127.5).permute(0, 2, 3, 1).numpy()
        assert np.abs(_frames(sample) - expected).mean() < 4.0  # H.264 round trip of the same frames


def test_sampling_plan_rejects_unknown_tasks_and_keys():
    from jointdit.errors import ConfigError
    from jointdit.evaluate.sampling import SamplingPlan

    with pytest.raises(ConfigError, match="t2x"):
        SamplingPlan.from_config({"tasks": ["joint", "t2x"]})
    assert SamplingPlan.from_config({"tasks": ["t2v", "extend_a"]}).tasks == ("t2v", "extend_a")  # every sampler task
    with pytest.raises(ConfigError, match="span_fraction"):
        SamplingPlan.from_config({"span_fraction": [0.6, 0.2]})
    with pytest.raises(ConfigError, match="num_clip"):
        SamplingPlan.from_config({"num_clip": 3})
    assert SamplingPlan.from_config({"tasks": "v2a"}).tasks == ("v2a",)


def test_an_iso_trained_model_is_sampled_blind_to_the_other_modality():
    from jointdit.evaluate.sampling import FixedAttention, SamplingPlan, attention_mode

    auto = SamplingPlan()
    assert attention_mode(auto, {"iso_prob": 1.0}) == "iso"
    assert attention_mode(auto, {"iso_prob": 0.2}) == "full" and attention_mode(auto, {}) == "full"
    assert attention_mode(SamplingPlan(attention="iso"), {}) == "iso"

    torch.manual_seed(0)
    model = fx.tiny_model().eval()
    with torch.no_grad():  # random weights everywhere: the zero-initialised adaLN gates would hide attention
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    video, t = torch.randn(1, *fx.VIDEO_SHAPE), torch.full((1,), 0.5)
    audio_a, audio_b = torch.randn(1, *fx.AUDIO_SHAPE), torch.randn(1, *fx.AUDIO_SHAPE)
    with torch.no_grad():
        full_a, _ = model(video, audio_a, t, t, None, "full")
        full_b, _ = model(video, audio_b, t, t, None, "full")
        wrapped = FixedAttention(model, "iso")
        iso_a, _ = wrapped(video, audio_a, t, t, None, "full")  # the sampler asks for full...
        iso_b, _ = wrapped(video, audio_b, t, t, None, "full")
    assert not torch.allclose(full_a, full_b)  # the joint model's video hears the audio
    torch.testing.assert_close(iso_a, iso_b)  # ...the wrapped one's does not
    assert wrapped.config is model.config
