"""jointdit: a Hydra-composed platform for joint video+audio latent diffusion transformers."""

from jointdit._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
