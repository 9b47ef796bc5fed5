"""`python -m jointdit.assets`: fails fast and clearly without a hub; `check` validates hand-placed folders."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_assets(args, env_update=None, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"), timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jointdit.assets", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def assert_clear_offline_message(proc, dest):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert "unreachable" in err
    for folder in ("svd/vae", "audioldm2/vae", "audioldm2/vocoder"):
        assert str(dest / folder) in err
    assert "diffusion_pytorch_model.safetensors" in err and "model.safetensors" in err
    assert "codec=pixel_mel" in err
    assert not any(dest.rglob("*.safetensors"))


def test_fetch_without_hub_fails_fast(tmp_path):
    """HF_HUB_OFFLINE unset, the real endpoint: on a machine without hub access this must fail in seconds."""
    from jointdit.assets import HubUnreachable, probe_hub

    try:
        probe_hub("cvssp/audioldm2", timeout=5)
    except HubUnreachable:
        pass
    else:
        pytest.skip("the hub is reachable here; this test is about machines without it")
    dest = tmp_path / "models"
    proc, elapsed = run_assets(["fetch", "--dest", str(dest)])
    print(f"\nassets fetch offline: exit {proc.returncode} after {elapsed:.1f}s")
    assert elapsed < 15, elapsed
    assert_clear_offline_message(proc, dest)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "refused"])
def test_fetch_unreachable_endpoints_fail_fast(tmp_path, env):
    dest = tmp_path / "models"
    proc, elapsed = run_assets(["fetch", "--dest", str(dest)], env)
    assert elapsed < 15, elapsed
    assert_clear_offline_message(proc, dest)


def test_check_reports_missing_and_accepts_real_layout(tmp_path, tiny_pretrained):
    proc, _ = run_assets(["check", "--dest", str(tmp_path / "empty")])
    assert proc.returncode == 2 and proc.stdout.count("MISSING") == 3
    proc, _ = run_assets(["check", "--dest", str(tiny_pretrained["root"])])
    assert proc.returncode == 0 and proc.stdout.count("ok") == 3, proc.stdout + proc.stderr
