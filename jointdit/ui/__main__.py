"""``python -m jointdit.ui checkpoint=<model folder>`` — the Gradio studio on http://127.0.0.1:7860.

    python -m jointdit.ui checkpoint=outputs/demo/export/last
    python -m jointdit.ui checkpoint=outputs/demo/export/last port=7861 vram=24gb guidance=cfg
    python -m jointdit.ui host=0.0.0.0          # reachable from the network: warns; the default is loopback only

It binds 127.0.0.1 and never creates a share link; the model picker also lists every exported model
under outputs/ and multirun/ and every MLflow run that logged one (logger.log_model=true).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="ui")
def main(cfg: DictConfig) -> None:
    import jointdit  # noqa: F401  (torchvision fix)
    from jointdit.ui.app import launch

    launch(cfg)


if __name__ == "__main__":
    main()
