"""Keep torchvision importable when its compiled ops do not match the installed torch.

The registry's torchvision 0.28 is a CUDA build. Next to the CPU build of torch its C++ ops fail to
load, and its ``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` — operators that were never defined — so ``import torchvision`` raises. diffusers,
transformers and open_clip import torchvision whenever it is installed, so this breaks them too.

Defining the two operator schemas before torchvision is imported lets the fake registration succeed.
Where torchvision's ops load (a matching build), nothing is done.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_done = False


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to fix
    import torch

    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas iff torchvision's own ops cannot load."""
    global _done
    if _done or "torchvision" in sys.modules:
        _done = True
        return
    _done = True
    if _torchvision_ops_load():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold, float scale, float zero_point) -> Tensor")
    # The Library object must outlive this call or the definitions are dropped.
    sys.modules[__name__].__dict__["_torchvision_stub_lib"] = lib
