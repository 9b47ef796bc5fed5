"""UI fixtures: one tiny model trained in-process (Hydra compose + the real trainer, 2 steps, MLflow
logging the exported model), the real Gradio app on a free loopback port, and Debian's Chromium
driven by Playwright (never Playwright's own browser download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import jointdit  # noqa: F401  (torchvision fix)

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import CHROMIUM, CHROMIUM_ARGS, FAKE_MEDIA_ARGS, RUN, TINY, UPLOAD_LIMITS, free_port, open_page  # noqa: E402


@pytest.fixture(scope="session")
def ui_root(tmp_path_factory) -> Path:
    """A project root holding a trained tiny run: ``outputs/<run>/export/{last,best}``, its latent cache
    (with held-out clips) and an MLflow run that logged the exported model."""
    from omegaconf import OmegaConf

    from jointdit.config import compose
    from jointdit.training import train

    root = tmp_path_factory.mktemp("ui_root")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("JOINTDIT_")]:
            mp.delenv(key)
        mp.chdir(root)  # MLflow puts a sqlite store's artifacts under ./mlruns
        cfg = compose("train", [f"paths.root_dir={root}", *TINY])
        OmegaConf.set_struct(cfg, False)
        cfg.paths.output_dir = str(root / RUN)  # Hydra sets it at run time; compose() does not
        train(cfg)
    assert (root / RUN / "export" / "last" / "jointdit.json").is_file()
    return root


@pytest.fixture(scope="session")
def model_folder(ui_root) -> Path:
    return ui_root / RUN / "export" / "last"


@pytest.fixture(scope="session")
def app(ui_root, model_folder, tmp_path_factory):
    """The real app, launched in-process on a free loopback port: ``(studio, demo, url)``."""
    from jointdit.config import compose
    from jointdit.ui.app import launch

    out_dir = tmp_path_factory.mktemp("ui_out")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("JOINTDIT_")]:
            mp.delenv(key)
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        cfg = compose("ui", [f"paths.root_dir={ui_root}", f"checkpoint={model_folder}", f"port={free_port()}",
                             "block=false", "steps=4", f"out_dir={out_dir}",
                             *(f"uploads.{k}={v}" for k, v in UPLOAD_LIMITS.items())])
        studio, demo, url = launch(cfg)
    try:
        yield studio, demo, url
    finally:
        demo.close()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium through Playwright; skips (with the reason) only where it is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed: run `make browser` (apt-get install -y chromium, as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_MEDIA_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app):
    context, pg = open_page(browser, app[2])
    try:
        yield pg
    finally:
        context.close()
