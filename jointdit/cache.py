"""``python -m jointdit.cache [overrides]`` — encode a data split into the latent cache.

    python -m jointdit.cache                                        # synthetic, pixel_mel, train
    python -m jointdit.cache data=avsync15 codec=svd_audioldm2 split=val
    python -m jointdit.cache data=folder data.root=/data/mine split=all clip.enabled=true clip.threshold=0.2

Resumable (a re-run skips cached clips); bad files are skipped and listed in ``<out_dir>/report.json``.
The exit code is non-zero only when nothing of a requested split could be cached.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="cache")
def main(cfg: DictConfig) -> None:
    import jointdit  # noqa: F401  (torchvision fix before any codec/CLIP import)
    from jointdit.data.cache import CacheError, run_cache

    try:
        reports = run_cache(cfg)
    except (CacheError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not all(report.ok for report in reports):
        sys.exit(1)


if __name__ == "__main__":
    main()
