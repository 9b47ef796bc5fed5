"""Upload checks: every refusal names the file and the problem; good files pass."""

from __future__ import annotations

import math

import pytest
import torch

from jointdit.data.media import write_mp4, write_wav
from jointdit.ui.uploads import UploadError, UploadLimits, check_audio, check_image, check_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("uploads")
    frames = torch.zeros(16, 3, 32, 32)
    wave = 0.3 * torch.sin(2 * math.pi * 220 * torch.arange(32000) / 16000)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "frame.png")
    (root / "notes.mp4").write_text("not a video\n" * 50)
    (root / "notes.png").write_text("not an image\n")
    (root / "notes.wav").write_text("not a sound\n")
    (root / "empty.mp4").write_bytes(b"")
    return {"mp4": write_mp4(root / "clip.mp4", frames, 8, wave, 16000),        # 2 s, with sound
            "silent": write_mp4(root / "silent.mp4", frames, 8),                # 2 s, no sound track
            "wav": write_wav(root / "tone.wav", wave, 16000), "png": root / "frame.png", "root": root}


def test_good_files_pass(files):
    assert check_video(files["mp4"]) == files["mp4"]
    assert check_audio(files["wav"]) == files["wav"]
    assert check_audio(files["mp4"]) == files["mp4"]      # a clip's sound track
    assert check_image(files["png"]) == files["png"]


@pytest.mark.parametrize("check,name,expected", [
    (check_video, "notes.mp4", "notes.mp4: not a readable media file"),
    (check_video, "empty.mp4", "empty.mp4: the file is empty"),
    (check_image, "notes.png", "notes.png: not a readable image"),
    (check_audio, "notes.wav", "notes.wav: not a readable WAV sound"),
    (check_audio, "silent.mp4", "silent.mp4: the file has no audio track"),
    (check_video, "tone.wav", "tone.wav: a .wav file is not accepted as a video"),
    (check_image, "clip.mp4", "clip.mp4: a .mp4 file is not accepted as an image"),
])
def test_bad_files_are_refused_with_the_reason(files, check, name, expected):
    with pytest.raises(UploadError) as err:
        check(files["root"] / name)
    assert str(err.value).startswith(expected), str(err.value)
    assert str(files["root"]) not in str(err.value)  # the page never shows server paths


def test_limits_on_size_duration_and_pixels(files):
    with pytest.raises(UploadError, match=r"clip.mp4: 2.0 s is over the 1.5 s duration limit"):
        check_video(files["mp4"], UploadLimits(max_seconds=1.5))
    with pytest.raises(UploadError, match=r"tone.wav: 2.0 s is over the 1 s duration limit"):
        check_audio(files["wav"], UploadLimits(max_seconds=1))
    with pytest.raises(UploadError, match=r"tone.wav: 0.1 MB is over the 0.01 MB upload limit"):
        check_audio(files["wav"], UploadLimits(max_mb=0.01))
    with pytest.raises(UploadError, match=r"frame.png: 40×30 pixels is over the 1,000 pixel limit"):
        check_image(files["png"], UploadLimits(max_pixels=1000))
    # a clip the sampler reads whole (v2a, extend_v, inpaint_v): at least the clip the model samples
    assert check_video(files["mp4"], min_seconds=2.0) == files["mp4"]
    with pytest.raises(UploadError, match=r"clip.mp4: 2.00 s is shorter than the 3 s clip the model samples"):
        check_video(files["mp4"], min_seconds=3.0)


def test_limits_come_from_the_ui_config(compose_cfg):
    cfg = compose_cfg("ui", ["uploads.max_mb=3", "uploads.max_seconds=7"])
    limits = UploadLimits.from_cfg(cfg.uploads)
    assert (limits.max_mb, limits.max_seconds, limits.max_pixels) == (3.0, 7.0, 4096 * 4096)
