"""The torchvision fix: torchvision's dependents import, the fix is a no-op where the ops load, it is
idempotent across copies of the module, and the start-up hook (.pth) applies it before any import path."""

import subprocess
import sys

from helpers import PYTHON, REPO

CHECK = """
import jointdit
from jointdit import _compat
import torchvision, open_clip, transformers
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
print("ops_load", _compat._torchvision_ops_load(), "stubbed", _compat.torchvision_stubbed())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_torchvision_dependents_import_and_fix_only_applies_when_ops_fail():
    result = _run(CHECK)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    ops_load, stubbed = words[1] == "True", words[3] == "True"
    assert stubbed == (not ops_load)  # a no-op wherever torchvision's own ops load


IDEMPOTENT = """
import importlib.util, sys
import jointdit
from jointdit import _compat
_compat.ensure_torchvision_importable()
_compat.ensure_torchvision_importable()
# A second, independent copy of the module (what the .pth hook loads) must not define the ops again.
spec = importlib.util.spec_from_file_location("other_copy", _compat.__file__)
other = importlib.util.module_from_spec(spec); spec.loader.exec_module(other)
other.ensure_torchvision_importable()
import torchvision, timm
print("ok", _compat.torchvision_stubbed() == (not _compat._torchvision_ops_load()))
"""


def test_fix_is_idempotent_across_calls_and_module_copies():
    result = _run(IDEMPOTENT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "True"]


HOOK = """
import site, sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "TorchvisionFinder"]
site.addsitedir(sys.argv[1])                      # processes jointdit-torchvision.pth as site-packages would
assert [type(f).__name__ for f in sys.meta_path].count("TorchvisionFinder") == 1
assert "torch" not in sys.modules                 # the hook costs nothing at start-up
import importlib.util
importlib.util.find_spec("torchvision")           # looking it up alone defines nothing
import torch
import timm                                        # what `accelerate launch` imports, long before jointdit
import accelerate.commands.launch
import torchvision
import jointdit                                    # jointdit's own fix afterwards is a no-op
print("ok", "jointdit" in sys.modules)
"""


def test_pth_hook_fixes_torchvision_before_any_jointdit_import(tmp_path):
    from jointdit._compat import PTH_NAME, write_hook

    path = write_hook(tmp_path)
    assert path.name == PTH_NAME and path.read_text().startswith("import ")
    result = subprocess.run([PYTHON, "-c", HOOK, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)  # not the repo: jointdit is found through the installed package
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "True"]


def test_pth_line_is_silent_when_jointdit_is_missing(tmp_path):
    from jointdit._compat import write_hook

    write_hook(tmp_path)
    code = "import site, sys; sys.modules['jointdit'] = None; site.addsitedir(sys.argv[1]); print('started')"
    result = subprocess.run([PYTHON, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "started" and result.stderr == "", result.stderr
