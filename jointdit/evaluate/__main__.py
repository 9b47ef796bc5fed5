"""``python -m jointdit.evaluate [overrides]`` — see jointdit/evaluate/cli.py and conf/evaluate.yaml."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from jointdit.errors import run_cli

    run_cli(lambda: _evaluate(cfg))


def _evaluate(cfg: DictConfig) -> None:
    import jointdit  # noqa: F401  (torchvision fix)
    from jointdit.evaluate.cli import run

    run(cfg)


if __name__ == "__main__":
    main()
