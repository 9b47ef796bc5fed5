"""The Hydra config tree: every group option composes, the CLI prints it, bad input fails clearly."""

import subprocess
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from helpers import REPO, run_module
from jointdit.config import CONFIG_DIR

GROUPS = ["model", "data", "codec", "stage", "vram", "guidance", "logger", "experiment"]
REQUIRED = {"data": {"synthetic", "folder", "avsync15"}, "stage": {"a", "b"},
            "vram": {"cpu", "24gb", "48gb", "80gb", "auto"}, "guidance": {"jointcfg", "cfg", "none"},
            "codec": {"pixel_mel", "svd_audioldm2"}, "model": {"tiny", "small", "base"}, "logger": {"mlflow", "none"}}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(REQUIRED))
def test_required_group_options_exist(group):
    assert REQUIRED[group] <= set(_options(group))


@pytest.mark.parametrize("name", ["train", "sample", "cache", "evaluate", "ui"])
def test_primary_configs_compose(compose_cfg, name, tmp_path):
    cfg = compose_cfg(name)
    assert cfg.task_name == name and cfg.paths.root_dir == str(tmp_path)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_resolves(compose_cfg, group, option):
    overrides = [f"{group}={option}"]
    if group == "stage" and option == "b":
        overrides.append("stage.init_from=/some/stage_a")
    if group == "data" and option == "folder":
        overrides.append("data.root=/some/folder")
    cfg = compose_cfg("train", overrides)
    cfg.paths.output_dir = "/tmp/out"  # set by Hydra at run time only
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved[group if group != "experiment" else "tags"] is not None


def test_defaults_and_absolute_paths(compose_cfg, tmp_path):
    cfg = compose_cfg("train")
    assert (cfg.model.preset if "preset" in cfg.model else None) in (None, "tiny")
    assert (cfg.data.name, cfg.codec.name, cfg.stage.name, cfg.vram.name, cfg.logger.name) == (
        "synthetic", "pixel_mel", "a", "cpu", "mlflow")
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert Path(cfg.data.root).is_absolute() and cfg.data.root.startswith(str(tmp_path))


def test_cli_prints_composed_job_config():
    result = run_module("jointdit.train", "--cfg", "job", "stage=b", "vram=48gb")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.stage.name == "b" and cfg.vram.name == "48gb"
    assert "blocks.*.video.*" in cfg.stage.trainable.experts.patterns
    assert cfg.vram.mixed_precision == "bf16" and cfg.model is not None


def test_run_and_sweep_outputs_go_to_ignored_folders(tmp_path):
    result = run_module("jointdit.train", "--cfg", "hydra", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    hydra_cfg = OmegaConf.to_container(OmegaConf.create(result.stdout), resolve=False)["hydra"]
    assert hydra_cfg["run"]["dir"].startswith("${paths.root_dir}/outputs/")
    assert hydra_cfg["sweep"]["dir"].startswith("${paths.root_dir}/multirun/")
    ignored = subprocess.run(["git", "check-ignore", "outputs/x/y", "multirun/x/y", "mlflow.db"], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["outputs/x/y", "multirun/x/y", "mlflow.db"]


def test_unknown_option_and_key_fail_with_hydras_error(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/huge'"):
        compose_cfg("train", ["model=huge"])
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'optim.lrr'.\nTo append to your config use \+optim.lrr=1"):
        compose_cfg("train", ["optim.lrr=1"])
    result = run_module("jointdit.train", "--cfg", "job", "vram=12gb")
    assert result.returncode != 0 and "Could not find 'vram/12gb'" in result.stderr
    assert "Available options" in result.stderr


def test_vram_knob_precedence_cli_over_env_over_profile(compose_cfg, monkeypatch):
    assert compose_cfg("train", ["vram=48gb"]).vram.q_chunk_v == 64  # profile
    monkeypatch.setenv("JOINTDIT_Q_CHUNK_V", "32")
    monkeypatch.setenv("JOINTDIT_MAX_T", "5")
    env = compose_cfg("train", ["vram=48gb"]).vram
    assert (env.q_chunk_v, env.max_t, env.kv_downsample) == (32, 5, 1)  # environment beats profile (kv unset: profile)
    monkeypatch.setenv("JOINTDIT_KV_POOL_SPACE", "2")
    assert compose_cfg("train", ["vram=48gb"]).vram.kv_pool_space == 2
    cli = compose_cfg("train", ["vram=48gb", "vram.q_chunk_v=16"]).vram
    assert (cli.q_chunk_v, cli.max_t) == (16, 5)  # command line beats environment
