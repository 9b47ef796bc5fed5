"""Launching beyond one process: Hydra plugins, Accelerate recipes, SLURM tasks, one folder per run.

- :func:`require_plugins` / :func:`check_overrides` — a sweep or launcher whose Hydra plugin is not
  installed stops with a hint naming the extra (``pip install -e ".[sweep]"``), before Hydra's own
  "Could not find 'hydra/sweeper/optuna'".
- :func:`recipes` — the Accelerate config files under ``conf/accelerate/``.
- :func:`mixed_precision` — the one place a config value becomes Accelerate's ``mixed_precision``.
- :func:`prepare_argv` — what every train process does to its command line before Hydra reads it.
- :func:`export_submitit_env` — inside a SLURM job started by Hydra's submitit launcher with several
  tasks, turn SLURM's variables into the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` Accelerate reads.

``python -m jointdit.launch install-hook`` writes the torchvision start-up hook (``make`` runs it);
``python -m jointdit.launch recipes`` lists the recipes with their commands.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from jointdit.config import CONFIG_DIR

ACCELERATE_DIR = CONFIG_DIR / "accelerate"
SWEEP_EXTRA_HINT = 'pip install -e ".[sweep]"   (or: make sweep-setup)'


@dataclass(frozen=True)
class Plugin:
    """A Hydra plugin: the module it installs under ``hydra_plugins`` and how to get it."""

    title: str
    module: str
    install: str


PLUGINS: dict[str, Plugin] = {
    "optuna": Plugin("the Optuna sweeper", "hydra_plugins.hydra_optuna_sweeper", SWEEP_EXTRA_HINT),
    "joblib": Plugin("the joblib launcher", "hydra_plugins.hydra_joblib_launcher", SWEEP_EXTRA_HINT),
    "submitit_local": Plugin("the submitit launcher", "hydra_plugins.hydra_submitit_launcher", SWEEP_EXTRA_HINT),
    "submitit_slurm": Plugin("the submitit launcher", "hydra_plugins.hydra_submitit_launcher", SWEEP_EXTRA_HINT),
    "nevergrad": Plugin("the Nevergrad sweeper", "hydra_plugins.hydra_nevergrad_sweeper", "pip install hydra-nevergrad-sweeper"),
    "ax": Plugin("the Ax sweeper", "hydra_plugins.hydra_ax_sweeper", "pip install hydra-ax-sweeper"),
    "ray": Plugin("the Ray launcher", "hydra_plugins.hydra_ray_launcher", "pip install hydra-ray-launcher"),
    "rq": Plugin("the RQ launcher", "hydra_plugins.hydra_rq_launcher", "pip install hydra-rq-launcher"),
}


class MissingPluginError(ImportError):
    """A Hydra sweeper/launcher the command asks for is not installed."""


def plugin_installed(name: str) -> bool:
    plugin = PLUGINS[name]
    try:
        return importlib.util.find_spec(plugin.module) is not None
    except (ModuleNotFoundError, ValueError):  # hydra_plugins itself absent, or the module blocked
        return False


def require_plugins(*names: str) -> None:
    """Raise :class:`MissingPluginError` naming what to install for each plugin in ``names`` that is missing."""
    missing = [name for name in dict.fromkeys(names) if name in PLUGINS and not plugin_installed(name)]
    if missing:
        lines = [f"{PLUGINS[n].title} ({n}) is not installed; install it with: {PLUGINS[n].install}" for n in missing]
        raise MissingPluginError("\n".join(lines))


_GROUP_LINE = re.compile(r"^\s*-\s*(?:override\s+)?/?(hydra/(?:sweeper|launcher)|[\w/]+)\s*:\s*([\w.-]+)\s*$")


def _choices_in_file(path: Path, seen: set[Path]) -> list[str]:
    """Plugin names chosen by a config file's defaults list (following our own group files)."""
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    found: list[str] = []
    in_defaults = False
    for line in path.read_text().splitlines():
        if re.match(r"^defaults\s*:", line):
            in_defaults = True
            continue
        if in_defaults and re.match(r"^\S", line):
            in_defaults = False
        match = _GROUP_LINE.match(line) if in_defaults else None
        if match is None:
            continue
        group, choice = match.groups()
        if group.startswith("hydra/") and choice in PLUGINS:
            found.append(choice)
        else:  # one of our own group files (experiment/, hparams_search/, hydra/launcher/slurm.yaml)
            found += _choices_in_file(CONFIG_DIR / group / f"{choice}.yaml", seen)
    # A bare "- name" entry in a group file (conf/hydra/launcher/slurm.yaml: "- submitit_slurm").
    if path.parent.name in ("sweeper", "launcher"):
        found += [m for m in re.findall(r"^\s*-\s*([\w.-]+)\s*$", path.read_text(), re.M) if m in PLUGINS]
    return found


def plugins_for(overrides: Iterable[str]) -> list[str]:
    """The Hydra plugins a command line needs: ``hydra/launcher=…``, ``hydra/sweeper=…`` directly, or
    through a group file such as ``hparams_search=lr_optuna`` or ``hydra/launcher=slurm``."""
    needed: list[str] = []
    seen: set[Path] = set()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or value.startswith(("[", "{")):
            continue
        group = key.lstrip("+~")
        for choice in value.split(","):
            choice = choice.strip()
            if group in ("hydra/sweeper", "hydra/launcher") and choice in PLUGINS:
                needed.append(choice)
            elif "." not in group:
                needed += _choices_in_file(CONFIG_DIR / group / f"{choice}.yaml", seen)
    return list(dict.fromkeys(needed))


def check_overrides(argv: list[str]) -> None:
    """Exit with status 2 and the install hint when the command line needs a plugin that is missing."""
    try:
        require_plugins(*plugins_for(a for a in argv if not a.startswith("-")))
    except MissingPluginError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Accelerate
# ----------------------------------------------------------------------------------------------


def recipes() -> dict[str, Path]:
    """``{name: path}`` of the Accelerate config files in ``conf/accelerate/``."""
    return {path.stem: path for path in sorted(ACCELERATE_DIR.glob("*.yaml"))}


PRECISIONS = ("no", "fp16", "bf16", "fp8")


def mixed_precision(value: object) -> str:
    """A config value as Accelerate's ``mixed_precision`` string.

    YAML 1.1 reads an unquoted ``no`` as ``False``; that and ``None`` mean ``"no"``. Anything else must
    be one of :data:`PRECISIONS`.
    """
    if value is None or value is False:
        return "no"
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"vram.mixed_precision={value!r}: expected one of {', '.join(PRECISIONS)}")
    return text


def export_submitit_env() -> bool:
    """In a multi-task SLURM job (Hydra's submitit launcher, ``tasks_per_node`` > 1) and not already
    inside ``accelerate launch``/``torchrun``: export ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` from SLURM's variables so Accelerate forms one process group of
    the job's tasks. Returns whether it did."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SUBMITIT_FOLDER" not in os.environ:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # pragma: no cover - submitit comes with the sweep extra
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


# ----------------------------------------------------------------------------------------------
# One run, one folder
# ----------------------------------------------------------------------------------------------


def launched_rank(env: dict[str, str] | None = None) -> int:
    """This process's global rank as set by ``accelerate launch``/``torchrun`` (0 when not launched)."""
    return int((env if env is not None else os.environ).get("RANK", "0") or 0)


def rank_overrides(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Hydra overrides for a process of rank > 0: it writes no ``.hydra/`` and no ``train.log`` of its own
    (rank 0 does), and logs only warnings to the console. Rank 0 and single processes get none."""
    if launched_rank(env) == 0:
        return []
    extra = ["hydra.output_subdir=null"]
    if not any(a.lstrip("+~").startswith("hydra/job_logging=") for a in argv):
        extra += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return extra


def prepare_argv(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The command line of a train process as Hydra must see it, whichever way it was started
    (``python -m jointdit.train``, the ``jointdit-train`` script, ``accelerate launch`` of either):
    a missing sweeper/launcher plugin stops here with the extra to install (:func:`check_overrides`),
    and a rank > 0 process gets :func:`rank_overrides` appended."""
    check_overrides(argv)
    return [*argv, *rank_overrides(argv, env)]


def share_output_dir(cfg) -> Path:
    """Rank 0 decides the run folder and every rank adopts it.

    Each process resolves Hydra's ``${now:...}`` on its own, so ranks started a second apart would get two
    folders. Here rank 0's ``paths.output_dir`` is broadcast and set on every rank (checkpoints, RNG states
    and exports then land in one folder); a folder Hydra made for another rank is removed if it is empty.
    """
    from omegaconf import open_dict

    mine = str(cfg.paths.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Path(mine)
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=not torch.cuda.is_available())  # the process group (same arguments as the trainer's)
    chosen = str(broadcast_object_list([mine], from_process=0)[0])
    with open_dict(cfg):
        cfg.paths.output_dir = chosen
    if Path(mine).resolve() != Path(chosen).resolve():
        try:
            Path(mine).rmdir()  # only ever an empty folder: rank > 0 writes nothing of its own there
        except OSError:
            pass
    return Path(chosen)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jointdit.launch", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install-hook", "recipes", "check"])
    parser.add_argument("overrides", nargs="*", help="check: the overrides of a train command")
    args = parser.parse_args(argv)
    if args.command == "install-hook":
        from jointdit._compat import write_hook

        print(f"wrote {write_hook()}")
    elif args.command == "recipes":
        for name, path in recipes().items():
            print(f"{name:18s} accelerate launch --config_file {path.relative_to(CONFIG_DIR.parent)} -m jointdit.train")
    else:
        check_overrides(args.overrides)
        print("plugins:", ", ".join(plugins_for(args.overrides)) or "none needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
