"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_resolvers() -> None:
    """``${jd.abspath:p}`` makes a path absolute; ``${mul:a,b}`` multiplies numbers."""
    if not OmegaConf.has_resolver("jd.abspath"):
        OmegaConf.register_new_resolver("jd.abspath", lambda p: str(Path(p).expanduser().resolve()))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a primary config outside a Hydra app (tests, notebooks, the UI)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


register_resolvers()
