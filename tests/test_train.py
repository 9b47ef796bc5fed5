"""Training end to end: MLflow records, sweeps, Stage B freezing, exact resume, 2-process DDP.

Subprocess tests are kept where only a process can show the behaviour (the entry point's MLflow/.hydra
records, a Hydra multirun, a kill, an accelerate launch); the rest train in-process through Hydra
``compose()`` with every path under ``tmp_path``."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from helpers import PYTHON, REPO, run_module
from jointdit.latents import LatentSpec

# A small, fast set-up: 8 clips of 1 s at 32 px, a 2-block model.
SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25",
         "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2",
         "optim.warmup_steps=2", "log_every=5"]


def _train(tmp_path: Path, *overrides: str, run_dir: Path | None = None, env: dict | None = None):
    run_dir = run_dir or tmp_path / "run"
    result = run_module("jointdit.train", *SMALL, f"hydra.run.dir={run_dir}", *overrides,
                        env={"JOINTDIT_ROOT": str(tmp_path), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _train_here(compose_cfg, tmp_path: Path, *overrides: str, run_dir: Path | None = None) -> Path:
    """``train(cfg)`` in this process; the composed config's paths are under ``tmp_path``."""
    from jointdit.training import train

    run_dir = run_dir or tmp_path / "run"
    train(compose_cfg("train", [*SMALL, f"paths.output_dir={run_dir}", *overrides]))
    return run_dir


def _runs(tmp_path: Path, experiment: str = "train"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_a_run_logs_metrics_params_and_artifacts_to_mlflow(tmp_path):
    run_dir = _train(tmp_path, "max_steps=20", "checkpoint.every=10")
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    for key in ("loss", "loss_video", "loss_audio", "loss_joint", "lr", "grad_norm", "samples_per_s",
                "peak_memory_mb", "val_loss", "memory_estimated_peak_mb", "memory_budget_mb"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20]
    assert run.data.params["optim.lr"] == "0.0003" and run.data.params["model.preset"] == "tiny"
    assert run.data.params["stage.name"] == "a" and int(run.data.params["trainable.all"]) > 0
    assert run.data.params["memory.chosen.micro_batch_size"] == "2"
    assert run.data.params["data.root"] == str(tmp_path / "data" / "synthetic")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config_resolved.yaml", "loss_curve.png", "hydra"} <= artifacts
    assert "config.yaml" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "hydra")}
    # The end-of-run preview sample: MP4 with sound, video-only MP4, WAV and PNG.
    previews = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "samples/step_000020")}
    assert {"joint_seed000_steps20.mp4", "joint_seed000_steps20.wav", "joint_seed000_steps20.png"} <= previews
    assert any(name.endswith("_video.mp4") for name in previews)
    # Checkpoints every 10 steps, and an exported model folder to sample from.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    assert (run_dir / "export" / "last" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((run_dir / "export" / "last" / "jointdit.json").read_text())["codec"]["name"] == "pixel_mel"


def test_multirun_gives_one_parent_and_a_child_per_job(tmp_path):
    result = run_module("jointdit.train", "-m", *SMALL, "max_steps=2", "checkpoint.every=100", "optim.lr=1e-3,3e-4",
                        env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = _runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_name for c in children) == ["optim.lr=0.0003", "optim.lr=0.001"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.data.params["optim.lr"] for c in children) == ["0.0003", "0.001"]
    assert len(list((tmp_path / "multirun").glob("*/*/[01]/.hydra"))) == 2


def test_stage_b_trains_only_the_selected_parameters(compose_cfg, tmp_path):
    stage_a = _train_here(compose_cfg, tmp_path, "max_steps=3", "ema.enabled=false", "logger=none", "sample_every=-1",
                          run_dir=tmp_path / "a")
    stage_b = _train_here(compose_cfg, tmp_path, "stage=b", f"stage.init_from={stage_a / 'export' / 'last'}",
                          "max_steps=3", "ema.enabled=false", "logger=none", "sample_every=-1", run_dir=tmp_path / "b")
    before = load_file(stage_a / "export" / "last" / "diffusion_pytorch_model.safetensors")
    after = load_file(stage_b / "export" / "last" / "diffusion_pytorch_model.safetensors")
    selected = ("blocks.0.video.", "blocks.1.video.", "blocks.0.audio.", "blocks.1.audio.", "video_in.", "audio_in.",
                "video_out.", "audio_out.")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(selected) for name in changed)
    frozen = [name for name in before if not name.startswith(selected)]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(n.startswith("blocks.0.video.") for n in changed) and any(n.startswith("video_in.") for n in changed)


def test_stage_b_refuses_a_missing_or_mismatched_checkpoint(compose_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an exported model folder"):
        _train_here(compose_cfg, tmp_path, "stage=b", f"stage.init_from={tmp_path / 'nope'}", "max_steps=1",
                    "logger=none", run_dir=tmp_path / "x")
    stage_a = _train_here(compose_cfg, tmp_path, "max_steps=1", "logger=none", "sample_every=-1", run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit this model"):
        _train_here(compose_cfg, tmp_path, "model.hidden_size=32", "stage=b", f"stage.init_from={stage_a / 'export' / 'last'}",
                    "max_steps=1", "logger=none", run_dir=tmp_path / "y")


def _losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["history"]]


# batch_size=4 over micro-batches of 2 accumulates 2 micro-batches per step while an epoch has 3, so
# accumulation windows span epoch boundaries — and the resume point falls mid-epoch.
# (tests/test_training.py resumes in-process without accumulation.)
def test_resume_after_a_kill_replays_the_uninterrupted_loss_sequence(tmp_path):
    common = ["max_steps=10", "checkpoint.every=2", "checkpoint.keep=2", "logger=none", "batch_size=4"]
    straight = _train(tmp_path, *common, run_dir=tmp_path / "straight")
    # Kill a second run once its step-4 checkpoint is on disk.
    run_dir = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")} | {"JOINTDIT_ROOT": str(tmp_path)}
    proc = subprocess.Popen([PYTHON, "-m", "jointdit.train", *SMALL, *common, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_000004" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "export" / "last").exists() and not (run_dir / "metrics.json").exists()  # died mid-run
    _train(tmp_path, *common, "checkpoint.resume=auto", run_dir=run_dir)
    assert len(_losses(run_dir)) == 10
    assert _losses(run_dir) == pytest.approx(_losses(straight), rel=1e-6, abs=1e-7)


def test_two_process_ddp_ends_with_identical_weights_on_both_ranks(tmp_path):
    run_dir = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")}
    env |= {"JOINTDIT_ROOT": str(tmp_path), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jointdit.train", *SMALL, "batch_size=4",
         "max_steps=4", "checkpoint.every=100", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["rank_checksums"]) == 2
    assert metrics["rank_checksums"][0] == metrics["rank_checksums"][1]
    assert metrics["final"]["ranks_in_sync"] == 1.0 and metrics["final"]["step"] == 4.0


def test_cached_clip_embeddings_train_the_condition_projections(compose_cfg, tmp_path):
    """A cache with CLIP features (tiny random open_clip model) sizes the model's projections to them."""
    config = tmp_path / "jd-tiny-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))
    clip = (f"+cache={{clip:{{enabled:true,model:{config.stem},pretrained:null,model_config:'{config}',"
            f"threshold:null,store_embeddings:true}}}}")
    run_dir = _train_here(compose_cfg, tmp_path, clip, "max_steps=8", "checkpoint.every=4", "ema.enabled=false",
                          "logger=none")
    exported = json.loads((run_dir / "export" / "last" / "config.json").read_text())
    spec = LatentSpec.from_export_meta(json.loads((run_dir / "export" / "last" / "jointdit.json").read_text()))
    assert spec.clip_widths == {"text_len": 77, "text_token_dim": 64, "text_pooled_dim": 32, "image_embed_dim": 32}
    assert all(exported[key] == value for key, value in spec.clip_widths.items())
    # The export names the encoder, so sampling (here the end-of-run preview) encodes prompts the same way.
    clip_meta = json.loads((run_dir / "export" / "last" / "jointdit.json").read_text())["clip"]
    assert clip_meta == {"model": config.stem, "pretrained": None, "model_config": str(config)}
    assert (run_dir / "samples" / "step_000008" / "joint_seed000_steps20.mp4").exists()
    # The projections of the cached features learn. adaLN-Zero gates keep the context out of the output
    # (so out of the gradient) for the first steps, so compare steps 4 and 8.
    before = load_file(run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    after = load_file(run_dir / "checkpoints" / "step_000008" / "model.safetensors")
    for name in ("cond_embed.text_tokens", "cond_embed.text_pooled", "cond_embed.image_token"):
        weights = [k for k in after if k.startswith(name) and k.endswith("weight")]
        assert weights and any(not torch.equal(before[k], after[k]) for k in weights), name


def test_a_plan_that_cannot_fit_stops_before_anything_is_built(compose_cfg, tmp_path):
    from jointdit.memory import MemoryPlanError

    with pytest.raises(MemoryPlanError, match=r"budget.*vram\.micro_batch_size \(now 64\)"):
        _train_here(compose_cfg, tmp_path, "model=base", "data.seconds=600", "vram.micro_batch_size=64", "logger=none")
    assert not (tmp_path / "data").exists()  # failed before the data set or cache was written


def test_max_t_crops_both_streams_to_the_same_span_in_whole_patches(compose_cfg, tmp_path):
    # 6 latent frames at 8 fps = 0.75 s = 75 mel steps, which the audio patch (4) does not divide.
    # (The same run checks that vram.kv_pool_space reaches the export, which the sampler then follows.)
    run_dir = _train_here(compose_cfg, tmp_path, "vram.max_t=6", "vram.kv_pool_space=2", "max_steps=2", "logger=none",
                          "sample_every=-1")
    meta = json.loads((run_dir / "export" / "last" / "jointdit.json").read_text())
    assert meta["attention"] == {"kv_downsample": 1, "kv_pool_space": 2}
    spec = LatentSpec.from_export_meta(meta)
    assert spec.video_shape[0] == 6 and spec.audio_shape[1] == 72 and spec.seconds == 0.75
    video_seconds = spec.video_shape[0] / spec.video_latent_fps
    audio_seconds = spec.audio_shape[1] / spec.audio_latent_fps
    assert 0 <= video_seconds - audio_seconds < 4 / spec.audio_latent_fps  # within one audio patch


def test_vram_auto_picks_knobs_that_fit_and_trains(compose_cfg, tmp_path):
    run_dir = _train_here(compose_cfg, tmp_path, "vram=auto", "max_steps=2", "checkpoint.every=100", "sample_every=-1")
    _, runs = _runs(tmp_path)
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert int(params["memory.chosen.micro_batch_size"]) <= 2  # never above batch_size
    assert 0 < metrics["memory_estimated_peak_mb"] < metrics["memory_budget_mb"]
    assert (run_dir / "export" / "last").exists()
