"""Keep torchvision importable when its compiled ops do not match the installed torch.

The registry's torchvision 0.28 is a CUDA build. Next to the CPU build of torch its C++ ops fail to
load, and its ``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` — operators that were never defined — so ``import torchvision`` raises. diffusers,
transformers, timm (and so the ``accelerate`` CLI) and open_clip import torchvision whenever it is
installed, so this breaks them too.

Defining the two operator schemas before torchvision is imported lets the fake registration succeed.
Where torchvision's ops load (a matching build), nothing is done.

Two ways in, both safe to combine and to repeat (whether a schema exists is read from torch's
dispatcher, never from this module's globals, so two copies of this file cannot define it twice):

- ``import jointdit`` calls :func:`ensure_torchvision_importable`;
- ``python -m jointdit._compat install-hook`` (run by ``make``) writes ``jointdit-torchvision.pth``
  into the environment's site-packages. At interpreter start it only adds an import hook (no torch
  import); the fix runs right before torchvision's own code executes, whichever program imports it
  first — ``accelerate launch``, ``mlflow``, a user's notebook.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SCHEMAS = {
    "torchvision::nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold, float scale, float zero_point) -> Tensor",
}
PTH_NAME = "jointdit-torchvision.pth"
_stub_libs: list = []  # Library objects must outlive the call, or their definitions are dropped


def _torchvision_ops_load() -> bool:
    """True when torchvision is absent or its compiled ops load into this torch."""
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


def _schema_defined(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
        return True
    except RuntimeError:
        return False


def torchvision_stubbed() -> bool:
    """True when ``torchvision::nms`` exists only as a schema (no CPU kernel): the fix is in place."""
    import torch

    return _schema_defined("torchvision::nms") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "torchvision::nms", "CPU")


def ensure_torchvision_importable() -> None:
    """Define the ``torchvision::nms``/``qnms`` schemas iff torchvision's own ops cannot load.

    Idempotent across calls, threads of import order and copies of this module: a schema that the
    dispatcher already knows (torchvision's real ops, or an earlier stub) is never defined again.
    """
    if "torchvision" in sys.modules:
        return  # imported already: too late to help, and nothing to do if it worked
    _define_missing_schemas()


def _define_missing_schemas() -> None:
    if all(_schema_defined(name) for name in SCHEMAS):
        return
    if _torchvision_ops_load():
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")  # FRAGMENT: may coexist with other definitions
    for name, schema in SCHEMAS.items():
        if not _schema_defined(name):
            lib.define(schema)
    _stub_libs.append(lib)


# ----------------------------------------------------------------------------------------------
# The start-up hook
# ----------------------------------------------------------------------------------------------


class _FixBeforeExec(importlib.abc.Loader):
    """Wraps torchvision's loader: apply the fix, then run torchvision's own ``exec_module``."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            _define_missing_schemas()  # torchvision is in sys.modules already, its code has not run yet
        except Exception:  # noqa: BLE001 - never make an import worse than it would be without the hook
            pass
        self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, … from the real loader
        return getattr(self.loader, name)


class TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for ``torchvision`` it returns the real spec with a wrapped loader.

    ``importlib.util.find_spec("torchvision")`` alone changes nothing: the fix runs only when the
    module is executed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, TorchvisionFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FixBeforeExec(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Put :class:`TorchvisionFinder` first on ``sys.meta_path`` (once)."""
    if not any(type(f).__name__ == "TorchvisionFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionFinder())


def pth_line() -> str:
    """The ``.pth`` line: find ``jointdit`` without importing it, load this file alone, install the hook.

    Any failure (jointdit uninstalled, an older copy without the hook) is silent, so it never breaks
    an interpreter's start.
    """
    code = ("try:\n"
            " import importlib.util as u, os\n"
            " s = u.find_spec('jointdit')\n"
            " f = os.path.join(os.path.dirname(s.origin), '_compat.py')\n"
            " s = u.spec_from_file_location('_jointdit_torchvision_hook', f)\n"
            " m = u.module_from_spec(s)\n"
            " s.loader.exec_module(m)\n"
            " m.install_import_hook()\n"
            "except Exception:\n"
            " pass\n")
    return f"import sys; exec({code!r})\n"


def write_hook(site_dir: str | Path | None = None) -> Path:
    """Write :data:`PTH_NAME` into ``site_dir`` (default: this interpreter's site-packages)."""
    import sysconfig

    folder = Path(site_dir or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    tmp = path.with_name(f".{PTH_NAME}.tmp")
    tmp.write_text(pth_line())
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jointdit._compat", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install-hook", "check"])
    parser.add_argument("--site-dir", default=None, help="where to write the .pth (default: site-packages)")
    args = parser.parse_args(argv)
    if args.command == "install-hook":
        print(f"wrote {write_hook(args.site_dir)}")
        return 0
    ensure_torchvision_importable()
    import torchvision

    print(f"torchvision {torchvision.__version__} imports; ops {'stubbed' if torchvision_stubbed() else 'native'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
