"""FSDP (conf/accelerate/fsdp.yaml) over gloo: two real CPU processes started by `accelerate launch`, a tiny
JointDiT trained by tests/fsdp_worker.py through jointdit.checkpoints' sharding-aware helpers.

Oracle: the same steps in ONE process on the whole batch (the mean of two equal halves' losses is the whole
batch's loss, so sharded training must land on the same weights up to float rounding); measured on the 2-core
CPU: max |FSDP export − oracle| = 5.3e-6 while training moved weights by up to 1.9e-2 (tolerance 5e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import fsdp_worker as worker
from helpers import PYTHON, REPO

ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
HALF = 2  # steps before the checkpoint; the export is taken after 2 * HALF
ATOL = 5e-5


def _launch(recipe: str, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOINTDIT_", "ACCELERATE_", "FSDP_", "RANK",
                                                                    "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "conf" / "accelerate" / f"{recipe}.yaml"),
           "--num_processes", "2", str(REPO / "tests" / "fsdp_worker.py"), str(out), "--steps", str(HALF)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def oracle() -> dict:
    """Single-process training on the whole batch: raw weights and EMA shadow at HALF, EMA export at 2 * HALF,
    the loss of every step."""
    model = worker.build_model()
    optimizer, scheduler = worker.make_optimizer(model, 2 * HALF)
    ema = worker.make_ema(model)
    snapshots = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "losses": [], "grad_norms": []}
    for step in range(2 * HALF):
        loss = worker.loss_of(model, worker.batch(step))
        loss.backward()
        snapshots["losses"].append(float(loss.detach()))
        snapshots["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), worker.CLIP)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step([p for p in model.parameters() if p.requires_grad])
        if step + 1 == HALF:
            snapshots["raw_half"] = {k: v.clone() for k, v in model.state_dict().items()}
            snapshots["ema_half"] = {f"shadow.{i}": p.clone() for i, p in enumerate(ema.shadow_params)}
    ema.copy_to([p for p in model.parameters() if p.requires_grad])
    snapshots["export"] = {k: v.clone() for k, v in model.state_dict().items()}
    return snapshots


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, _launch("fsdp", out)


def test_fsdp_really_shards_over_two_cpu_processes(fsdp_run):
    _, reports = fsdp_run
    assert [r["distributed_type"] for r in reports] == ["DistributedType.FSDP"] * 2 and reports[0]["world"] == 2
    assert reports[0]["model_class"] == "FSDPJointDiT"  # fully_shard, not DDP
    full = reports[0]["full_numel"]
    assert all(r["dtensor_params"] > 0 for r in reports)
    assert sum(r["local_numel"] for r in reports) == full and max(r["local_numel"] for r in reports) < 0.6 * full


def test_an_fsdp_export_loads_as_a_plain_model_with_the_single_process_weights(fsdp_run, oracle):
    from jointdit.checkpoints import load_model
    from jointdit.safeload import verify_model_folder

    out, reports = fsdp_run
    halves = [(a + b) / 2 for a, b in zip(reports[0]["losses"], reports[1]["losses"])]
    assert halves == pytest.approx(oracle["losses"], rel=1e-5)  # each rank trained on its half of the batch
    for report in reports:  # the whole model's gradient norm on every rank (what the non-finite guard reads)
        assert report["grad_norms"] == pytest.approx(oracle["grad_norms"], rel=1e-4)
    export = load_model(verify_model_folder(out / "export")).state_dict()  # no FSDP involved in loading
    fresh = worker.build_model().state_dict()
    assert {k: v.shape for k, v in export.items()} == {k: v.shape for k, v in fresh.items()}  # full, not shards
    assert json.loads((out / "export" / "config.json").read_text())["_class_name"] == "JointDiT"  # not FSDPJointDiT
    moved = _max_diff(oracle["export"], oracle["init"])
    assert moved > 100 * ATOL  # the oracle is not trivially the initial weights
    assert _max_diff(export, oracle["export"]) < ATOL  # the EMA weights, gathered from both ranks' shards
    frozen = [k for k in export if k.startswith(worker.FROZEN_PREFIXES)]
    assert frozen and all(torch.equal(export[k], oracle["init"][k]) for k in frozen)


def test_an_fsdp_checkpoint_verifies_loads_and_resumes_exactly(fsdp_run, oracle):
    from safetensors.torch import load_file

    from jointdit.checkpoints import load_model
    from jointdit.safeload import verify_checkpoint_folder

    out, reports = fsdp_run
    folder = out / "checkpoints" / f"step_{HALF:06d}"
    assert verify_checkpoint_folder(folder)["step"] == HALF  # safetensors weights, only weights-only pickles
    assert _max_diff(load_model(folder).state_dict(), oracle["raw_half"]) < ATOL  # the full raw weights
    assert _max_diff(load_file(str(folder / "ema.safetensors")), oracle["ema_half"]) < ATOL  # full EMA shadow
    for report in reports:  # model, optimizer, LR schedule and EMA restored: the second half replays exactly
        assert report["resumed_losses"] == report["losses"][HALF:]
    straight = load_model(out / "export").state_dict()
    resumed = load_model(out / "export_resumed").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow  # a second 2-process launch: about 40 s on a quiet 2-core machine
def test_fsdp_and_ddp_exports_load_the_same(fsdp_run, tmp_path):
    from jointdit.checkpoints import load_model

    out, _ = fsdp_run
    ddp_reports = _launch("ddp", tmp_path / "ddp")
    assert [r["distributed_type"] for r in ddp_reports] == ["DistributedType.MULTI_CPU"] * 2
    fsdp_model, ddp_model = load_model(out / "export"), load_model(tmp_path / "ddp" / "export")
    configs = [json.loads((folder / "config.json").read_text()) for folder in (out / "export", tmp_path / "ddp" / "export")]
    assert type(fsdp_model) is type(ddp_model) and configs[0] == configs[1]
    assert _max_diff(fsdp_model.state_dict(), ddp_model.state_dict()) < ATOL


TINY_TRAIN = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
              "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=4", "sample_every=-1",
              "checkpoint.every=2", "logger=none"]


def _train(recipe: str, run_dir: Path, *overrides: str) -> dict:
    """`accelerate launch --config_file conf/accelerate/<recipe>.yaml -m jointdit.train` on 2 CPU processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "WORLD_SIZE",
                                                                    "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", JOINTDIT_ROOT=str(run_dir.parent / "root"))
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "conf" / "accelerate" / f"{recipe}.yaml"),
           "--num_processes", "2", "-m", "jointdit.train", *TINY_TRAIN, f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # four 2-process trainer launches: about 3 min on a quiet 2-core machine
def test_the_trainer_under_the_fsdp_recipe_shards_resumes_and_exports_like_ddp(tmp_path):
    """The real trainer, not the worker: FSDP really on (not Accelerate's silent DDP fallback on CPUs),
    a run stopped at step 2 and resumed to 4 has the straight run's losses, and the FSDP export (gathered
    EMA weights, one safetensors file) loads as a plain model equal to the DDP run's export."""
    from jointdit.checkpoints import load_model

    straight = _train("fsdp", tmp_path / "fsdp", "max_steps=4")
    assert straight["distributed_type"] == "FSDP" and straight["world_size"] == 2
    assert straight["final"]["ranks_in_sync"] == 1.0
    _train("fsdp", tmp_path / "resumed", "max_steps=2")
    resumed = _train("fsdp", tmp_path / "resumed", "max_steps=4", "checkpoint.resume=auto")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    ddp = _train("ddp", tmp_path / "ddp", "max_steps=4")
    assert ddp["distributed_type"] == "MULTI_CPU"
    fsdp_model, ddp_model = (load_model(tmp_path / name / "export" / "last") for name in ("fsdp", "ddp"))
    config = json.loads((tmp_path / "fsdp" / "export" / "last" / "config.json").read_text())
    assert config["_class_name"] == "JointDiT" and type(fsdp_model) is type(ddp_model)
    assert _max_diff(fsdp_model.state_dict(), ddp_model.state_dict()) < ATOL
    assert _max_diff(fsdp_model.state_dict(), load_model(tmp_path / "resumed" / "export" / "last").state_dict()) < ATOL


def test_fsdp_refuses_lora_and_int8_frozen_weights_with_a_hint():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from omegaconf import OmegaConf

    from jointdit.errors import ConfigError
    from jointdit.training import require_shardable

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)  # what an FSDP2 launch reports
    for stage, vram in (({"lora": {"rank": 4}}, {}), ({}, {"quantize_frozen": "int8"})):
        cfg = OmegaConf.create({"stage": stage, "vram": vram})
        with pytest.raises(ConfigError, match="ddp.yaml"):
            require_shardable(cfg, fsdp2)
    require_shardable(OmegaConf.create({"stage": {}, "vram": {}}), fsdp2)  # plain full fine-tuning is fine
