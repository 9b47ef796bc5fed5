"""``python -m jointdit.sample [overrides]`` — sample sounding video from an exported model folder.

    python -m jointdit.sample checkpoint=<model folder> task=joint steps=30 seeds=[0,1]
    python -m jointdit.sample checkpoint=<model folder> task=i2sv image=frame.png prompt="a red ball bouncing"
    python -m jointdit.sample checkpoint=<model folder> task=a2v audio=drums.wav guidance=cfg
    python -m jointdit.sample checkpoint=<model folder> task=v2a video=clip.mp4 guidance=none
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")
def main(cfg: DictConfig) -> None:
    from jointdit.errors import run_cli

    run_cli(lambda: _sample(cfg))


def _sample(cfg: DictConfig) -> None:
    import jointdit  # noqa: F401  (torchvision fix)
    from jointdit.diffusion.sampler import sample_to_files
    from jointdit.schema import validate

    validate(cfg)
    for result in sample_to_files(cfg):
        for path in result.files.values():
            print(path)


if __name__ == "__main__":
    main()
