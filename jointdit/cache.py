"""``python -m jointdit.cache [overrides]`` — encode a data split into the latent cache.

    python -m jointdit.cache                                        # synthetic, pixel_mel, train
    python -m jointdit.cache data=avsync15 codec=svd_audioldm2 split=val
    python -m jointdit.cache data=folder data.root=/data/mine split=all clip.enabled=true clip.threshold=0.2

Resumable (a re-run skips cached clips); bad files are skipped and listed in ``<out_dir>/report.json``.
The exit code is non-zero only when nothing of a requested split could be cached.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="cache")
def main(cfg: DictConfig) -> None:
    from jointdit.errors import run_cli

    run_cli(lambda: _cache(cfg))


def _cache(cfg: DictConfig) -> None:
    import jointdit  # noqa: F401  (torchvision fix before any codec/CLIP import)
    from jointdit.data.cache import run_cache
    from jointdit.errors import DataError
    from jointdit.schema import validate

    validate(cfg)
    try:
        reports = run_cache(cfg)
    except FileNotFoundError as err:  # a missing list file or data folder
        raise DataError(str(err)) from err
    if not all(report.ok for report in reports):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
