"""Constants and helpers of the UI tests (conftest.py is not importable under --import-mode=importlib)."""

from __future__ import annotations

import socket
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
# Chromium's own fake camera (a moving test pattern) and microphone (beeps), granted without a prompt
FAKE_MEDIA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
# 8 synthetic clips of 1 s at 32 px (6 train, 2 held out), a 2-block width-64 model, 2 optimizer steps.
TINY = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
        "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=1",
        "max_steps=2", "checkpoint.every=2", "sample_every=-1", "log_every=1", "logger.log_model=true"]
RUN = "outputs/2026-01-01/00-00-00"
# The app's upload limits in the browser tests: small, so over-limit files stay small too.
UPLOAD_LIMITS = {"max_mb": 1, "max_seconds": 4, "max_pixels": 4_000_000}   # a webcam photo is 1920×1440


def square_and_tone():
    """The tiny model's clip (1 s, 8 fps, 32 px, 16 kHz): a bright square moving right over grey, and a 440 Hz
    tone; ``(frames [8, 3, 32, 32], wave [16000])`` in [-1, 1]."""
    import math

    import torch

    frames = torch.full((8, 3, 32, 32), -0.6)
    for t in range(8):
        frames[t, :, 8:20, 2 + 3 * t: 14 + 3 * t] = 0.8
    return frames, 0.4 * torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)


def open_page(browser, url: str):
    """A fresh browser context (its own Gradio session) on the studio: ``(context, page)``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#generate-joint")
    return context, page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
