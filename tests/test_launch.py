"""Beyond one process: config types that reach Accelerate, Accelerate recipes, plugin hints, and a real
`accelerate launch` of two CPU processes (gloo) running the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import PYTHON, REPO

VRAM_PROFILES = sorted(p.stem for p in (REPO / "conf" / "vram").glob("*.yaml"))
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
TINY = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
        "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "sample_every=-1"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOINTDIT_", "ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env.update(JOINTDIT_ROOT=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


# ----------------------------------------------------------------------------------------------
# 7. Config types
# ----------------------------------------------------------------------------------------------


def test_unquoted_no_is_false_in_yaml_which_is_why_profiles_quote_it():
    assert OmegaConf.create("mixed_precision: no").mixed_precision is False
    assert OmegaConf.create('mixed_precision: "no"').mixed_precision == "no"
    for path in (REPO / "conf").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "mixed_precision":
                assert value.split("#")[0].strip().startswith('"'), f"{path}: {line!r} must be quoted"


@pytest.mark.parametrize("profile", VRAM_PROFILES)
def test_every_vram_profile_reaches_accelerate_with_the_right_types(profile, compose_cfg):
    from accelerate import Accelerator

    from jointdit.launch import PRECISIONS, mixed_precision
    from jointdit.training import reset_accelerate

    vram = compose_cfg("train", [f"vram={profile}"]).vram
    assert isinstance(vram.mixed_precision, str) and vram.mixed_precision in PRECISIONS
    for key in ("max_t", "q_chunk_v", "q_chunk_a", "kv_downsample", "vid_decode_chunk", "micro_batch_size"):
        assert type(vram[key]) is int, (profile, key, vram[key])
    assert type(vram.gradient_checkpointing) is bool
    expected = vram.mixed_precision if vram.mixed_precision != "fp8" else "no"
    try:  # bf16/fp16 autocast exist on the CPU too, so Accelerate's own check runs here
        accelerator = Accelerator(mixed_precision=mixed_precision(expected), cpu=True)
        assert accelerator.mixed_precision == expected
    finally:
        reset_accelerate()


def test_command_line_no_stays_a_string_and_false_maps_to_no(compose_cfg):
    from jointdit.launch import mixed_precision

    assert compose_cfg("train", ["vram=48gb", "vram.mixed_precision=no"]).vram.mixed_precision == "no"
    assert mixed_precision(False) == "no" and mixed_precision(None) == "no" and mixed_precision("BF16") == "bf16"
    with pytest.raises(ValueError, match="expected one of no, fp16, bf16, fp8"):
        mixed_precision("fp32")


# ----------------------------------------------------------------------------------------------
# 3. Recipes; 4. plugins
# ----------------------------------------------------------------------------------------------


def test_accelerate_recipes_load_as_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    from jointdit.launch import recipes

    found = recipes()
    assert set(found) >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multinode"}
    configs = {name: ClusterConfig.from_yaml_file(str(path)) for name, path in found.items()}
    assert all(c.mixed_precision == "no" for c in configs.values())
    fsdp = configs["fsdp"].fsdp_config
    assert configs["fsdp"].distributed_type == "FSDP" and fsdp["fsdp_version"] == 2  # per-parameter shards (EMA)
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    from jointdit.models import jointdit as model_module

    assert hasattr(model_module, fsdp["fsdp_transformer_layer_cls_to_wrap"])  # the block class exists
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert configs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert configs["multinode"].num_machines == 2
    readme = (REPO / "README.md").read_text()
    for name in found:
        assert f"--config_file conf/accelerate/{name}.yaml" in readme, f"README documents no command for {name}"


def test_plugins_are_found_through_group_files():
    from jointdit.launch import plugins_for

    assert plugins_for(["hparams_search=lr_optuna"]) == ["optuna"]
    assert plugins_for(["hydra/launcher=slurm"]) == ["submitit_slurm"]
    assert plugins_for(["hydra/launcher=local", "model=tiny,small"]) == ["submitit_local"]
    assert plugins_for(["hydra/launcher=joblib", "hydra/sweeper=optuna"]) == ["joblib", "optuna"]
    assert plugins_for(["model=tiny", "optim.lr=1e-4,3e-4", "experiment=demo"]) == []


BLOCKED = """
import runpy, sys
sys.modules["hydra_plugins.hydra_optuna_sweeper"] = None   # as if the sweep extra were not installed
sys.argv = ["jointdit.train", "-m", "hparams_search=lr_optuna"]
runpy.run_module("jointdit.train", run_name="__main__")
"""


def test_a_missing_sweeper_names_the_extra_to_install():
    result = subprocess.run([PYTHON, "-c", BLOCKED], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the Optuna sweeper (optuna) is not installed" in result.stderr
    assert 'pip install -e ".[sweep]"' in result.stderr and "make sweep-setup" in result.stderr


def test_tab_completion_offers_config_groups_and_presets(tmp_path):
    """Hydra's shell completion through the installed `jointdit-train` script (README: Tab completion)."""
    script = str(Path(PYTHON).with_name("jointdit-train"))
    install = subprocess.run([script, "--shell-completion", "install=bash"], capture_output=True, text=True,
                             timeout=120, env=_env(tmp_path))
    assert install.returncode == 0 and "complete -o nospace -o default -F hydra_bash_completion jointdit-train" in install.stdout
    line = "jointdit-train experiment="
    query = subprocess.run([script, "-sc", "query=bash"], capture_output=True, text=True, timeout=120,
                           env=_env(tmp_path, COMP_LINE=line, COMP_POINT=str(len(line))))
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert query.stdout.split() == [f"experiment={name}" for name in presets]


# ----------------------------------------------------------------------------------------------
# 1. `accelerate launch` exactly as documented, two real CPU processes
# ----------------------------------------------------------------------------------------------


def test_accelerate_launch_runs_two_cpu_processes_into_one_run_folder(tmp_path):
    """The README's command with the ddp recipe: two processes over gloo, one folder, weights in sync.

    Each rank is given a different Hydra folder on purpose (``rank${oc.env:RANK}``), as two ranks whose
    ``${now:}`` fell on different seconds would get: rank 0's folder must win everywhere."""
    outputs = tmp_path / "outputs"
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "conf/accelerate/ddp.yaml"), "--num_processes", "2",
           "-m", "jointdit.train", *TINY, "batch_size=4", "max_steps=2", "checkpoint.every=2", "log_every=1",
           "logger.system_metrics=false", f"hydra.run.dir={outputs}/rank${{oc.env:RANK,0}}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in outputs.iterdir()) == ["rank0"]  # rank 1's folder was empty and is gone
    run_dir = outputs / "rank0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final"]["ranks_in_sync"] == 1.0
    assert len(set(metrics["rank_checksums"])) == 1
    checkpoint = run_dir / "checkpoints" / "step_000002"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (run_dir / "export" / "last" / "config.json").exists()
    # Only rank 0 writes .hydra/ and train.log, and tracks: one MLflow run, one log line per step.
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["paths.output_dir"] == str(run_dir)
    log_lines = [line for line in (run_dir / "train.log").read_text().splitlines() if "| loss " in line]
    assert [line.split(" | ")[0].split()[-2:] for line in log_lines] == [["step", "1/2"], ["step", "2/2"]]


def _launch(tmp_path: Path, run_dir: Path, *overrides: str) -> dict:
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "conf/accelerate/ddp.yaml"), "--num_processes", "2",
           "-m", "jointdit.train", *TINY, "batch_size=4", "checkpoint.every=2", "logger=none", *overrides,
           f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # three 2-process launches: about 2 minutes on a quiet 2-core machine
def test_a_resumed_two_process_run_continues_exactly(tmp_path):
    straight = _launch(tmp_path, tmp_path / "straight", "max_steps=4")
    first = _launch(tmp_path, tmp_path / "resumed", "max_steps=2")
    assert {p.name for p in (tmp_path / "resumed/checkpoints/step_000002").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    resumed = _launch(tmp_path, tmp_path / "resumed", "max_steps=4", "checkpoint.resume=auto")
    assert len(first["history"]) == 2 and len(resumed["history"]) == 4
    losses = lambda m: [h["loss"] for h in m["history"]]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    # Same weights at the end, on both ranks, as the uninterrupted run.
    assert resumed["rank_checksums"] == pytest.approx(straight["rank_checksums"], rel=1e-9)
    assert resumed["final"]["ranks_in_sync"] == 1.0


# ----------------------------------------------------------------------------------------------
# Both ways to start a training process behave the same
# ----------------------------------------------------------------------------------------------

LAUNCH_PATHS = {"python -m jointdit.train": [PYTHON, "-m", "jointdit.train"],
                "jointdit-train script": [str(Path(PYTHON).with_name("jointdit-train"))]}


@pytest.mark.parametrize("launcher", sorted(LAUNCH_PATHS))
def test_a_missing_launcher_is_named_whichever_way_training_starts(tmp_path, launcher):
    """hydra-ray-launcher is not part of any extra: both entry points stop before Hydra with the install hint."""
    result = subprocess.run([*LAUNCH_PATHS[launcher], "-m", "hydra/launcher=ray", "optim.lr=1e-3,3e-4"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the Ray launcher (ray) is not installed; install it with: pip install hydra-ray-launcher" in result.stderr
    assert "Could not find" not in result.stderr  # Hydra's own error never came


@pytest.mark.parametrize("launcher", sorted(LAUNCH_PATHS))
def test_a_rank_above_zero_writes_no_hydra_folder_whichever_way_training_starts(tmp_path, launcher):
    """What rank 1 of `accelerate launch` would compose: no .hydra/ of its own, console logging at WARNING."""
    result = subprocess.run([*LAUNCH_PATHS[launcher], "--cfg", "hydra"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=_env(tmp_path, RANK="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    hydra_cfg = OmegaConf.create(result.stdout).hydra
    assert hydra_cfg.output_subdir is None and hydra_cfg.job_logging.root.level == "WARNING"
    assert hydra_cfg.runtime.choices["hydra/job_logging"] == "stdout"
    rank0 = subprocess.run([*LAUNCH_PATHS[launcher], "--cfg", "hydra"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env=_env(tmp_path, RANK="0"))
    assert OmegaConf.create(rank0.stdout).hydra.output_subdir == ".hydra"  # rank 0 keeps everything
