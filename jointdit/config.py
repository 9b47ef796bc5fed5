"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

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


def to_plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain resolved containers (recursively for mappings); anything else unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    return cfg


def resolve_device(device: Any = None):
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device(device)``."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_fields(model_cfg: Any) -> dict[str, Any]:
    """A ``model/`` config as plain keyword arguments: Hydra keys (``_target_``, ...) dropped, ``preset`` kept."""
    return {k: v for k, v in dict(to_plain(model_cfg)).items() if not str(k).startswith("_")}


register_resolvers()
