"""``python -m jointdit.train [overrides]`` (or the ``jointdit-train`` script) — compose the ``train`` config
and run one training job.

    python -m jointdit.train stage=b vram=48gb        # starts from the newest matching Stage A export
    python -m jointdit.train stage=b vram=48gb stage.init_from=<stage A model folder or MLflow run id>
    python -m jointdit.train -m model=tiny,small optim.lr=1e-4,3e-4
    python -m jointdit.train --cfg job stage=b vram=48gb      # print the composed config

A bad config value, a missing folder or a Stage B run without a Stage A model is refused before any
work, as one ``error:`` line plus a hint (exit code 2); ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from jointdit.errors import run_cli

    return run_cli(lambda: _train(cfg))


def _train(cfg: DictConfig) -> float | None:
    from jointdit.schema import validate

    validate(cfg)  # before the heavy imports; train() validates again and resolves stage.init_from
    from jointdit.launch import export_submitit_env, share_output_dir
    from jointdit.training import train

    export_submitit_env()  # a multi-task SLURM job: its tasks become one Accelerate process group
    share_output_dir(cfg)  # several processes: rank 0's folder is the run's folder

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "train/loss"))


def main() -> None:
    """The one command-line entry, for ``python -m jointdit.train`` and the ``jointdit-train`` script alike:
    the command line is checked and completed by :func:`jointdit.launch.prepare_argv` before Hydra reads it."""
    from jointdit.launch import prepare_argv

    sys.argv[1:] = prepare_argv(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
