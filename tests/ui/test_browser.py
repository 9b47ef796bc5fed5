"""The real app in a real Chromium: each task end to end, progress + cancel, a bad upload, the model picker.

The model is a tiny one trained in this session (conftest.ui_root); the page is driven only through what
a user sees and clicks (tabs, uploads, buttons); results are checked in the page (the <video> element
plays and decodes sound) and on disk (one new folder per output with MP4, WAV and PNG).
"""

from __future__ import annotations

import gc
import sys
import math
import time
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import RUN  # noqa: E402

TAB = {"joint": "text → video + sound", "i2sv": "image → sounding video", "a2v": "audio → video",
       "v2a": "video → audio"}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 1 s clip (moving square + 440 Hz tone) as MP4, its sound as WAV, a PNG frame, and a text file
    renamed ``.mp4``."""
    import torch
    from PIL import Image

    from jointdit.data.media import write_mp4, write_wav

    root = tmp_path_factory.mktemp("media")
    frames = torch.full((8, 3, 32, 32), -0.6)
    for t in range(8):
        frames[t, :, 8:20, 2 + 3 * t: 14 + 3 * t] = 0.8
    wave = 0.4 * torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    Image.fromarray(((frames[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(root / "frame.png")
    (root / "notes.mp4").write_text("these are my notes, not a video\n" * 20)
    return {"mp4": write_mp4(root / "clip.mp4", frames, 8, wave, 16000), "wav": write_wav(root / "tone.wav", wave, 16000),
            "png": root / "frame.png", "bad": root / "notes.mp4"}


def _folders(studio) -> set[Path]:
    out = studio.backend.out_dir
    return {p for p in out.iterdir() if p.is_dir()} if out.is_dir() else set()


def _open_tab(page, task: str) -> None:
    page.get_by_role("tab", name=TAB[task]).click()
    page.locator(f"#generate-{task}").wait_for(state="visible")


def _set_number(page, elem_id: str, value) -> None:
    """Type into a Number (or a Slider's number box) and wait until the page has taken the value."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")
    range_ = page.locator(f"#{elem_id} input[type=range]")
    if range_.count():
        page.wait_for_function(f"() => document.querySelector('#{elem_id} input[type=range]').value == '{value}'")


def _play(page, task: str) -> dict:
    """Play the result muted and report what Chromium decoded."""
    video = page.locator(f"#video-{task} video")
    video.wait_for(state="attached", timeout=120_000)
    return video.evaluate("""async v => {
        v.muted = true;
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        await v.play();
        await new Promise(r => setTimeout(r, 1500));
        return {duration: v.duration, time: v.currentTime, audioBytes: v.webkitAudioDecodedByteCount,
                videoBytes: v.webkitVideoDecodedByteCount, src: v.currentSrc};
    }""")


def _fill_inputs(page, task: str, media: dict[str, Path]) -> None:
    if task == "i2sv":
        page.locator("#i2sv-image input[type=file]").set_input_files(str(media["png"]))
        page.locator("#i2sv-image img").wait_for()
    elif task == "a2v":
        page.locator("#a2v-audio input[type=file]").set_input_files(str(media["wav"]))
        page.locator("#a2v-audio [data-testid=download-link]").wait_for(state="attached")
    elif task == "v2a":
        page.locator("#v2a-video input[type=file]").set_input_files(str(media["mp4"]))
        page.locator("#v2a-preview video").wait_for(state="attached")


@pytest.mark.parametrize("task", ["joint", "i2sv", "a2v", "v2a"])
def test_each_task_generates_a_sounding_video_in_the_page(page, app, media, task):
    studio, _, _ = app
    before = _folders(studio)
    _open_tab(page, task)
    _fill_inputs(page, task, media)
    page.locator(f"#generate-{task}").click()
    page.get_by_text("Done: 1 sample(s)").wait_for(timeout=120_000)
    played = _play(page, task)
    assert played["duration"] > 0.9, played            # a 1 s clip
    assert played["time"] > 0, played                  # it plays
    assert played["audioBytes"] > 0, played            # and Chromium decodes its sound track
    assert played["videoBytes"] > 0, played
    new = _folders(studio) - before
    assert len(new) == 1, new
    folder = new.pop()
    assert folder.name.endswith(f"_{task}_seed0")
    base = f"{task}_seed000_steps4"
    assert {f"{base}.mp4", f"{base}_video.mp4", f"{base}.wav", f"{base}.png", "sync.png", "request.json"} <= \
        {p.name for p in folder.iterdir()}
    assert str(folder) in page.locator(f"#status-{task}").inner_text()
    # the preview PNG and the WAV download are in the page
    assert page.locator(f"#preview-{task} img").count() >= 1
    wav = page.locator(f'#files-{task} a[download="{base}.wav"]')
    assert wav.count() == 1
    download = page.request.get(wav.get_attribute("href"))
    assert download.ok and download.body()[:4] == b"RIFF" and download.body() == (folder / f"{base}.wav").read_bytes()


def test_a_text_file_renamed_mp4_gets_a_clear_error_in_the_page(page, app, media):
    studio, _, _ = app
    before = _folders(studio)
    _open_tab(page, "v2a")
    page.locator("#v2a-video input[type=file]").set_input_files(str(media["bad"]))
    status = page.locator("#status-v2a")
    status.get_by_text("Upload refused").wait_for()
    assert "notes.mp4: not a readable media file" in status.inner_text()
    page.locator("#generate-v2a").click()  # pressing Generate anyway gives the same message, not a traceback
    page.get_by_text("Upload refused: notes.mp4").first.wait_for()
    assert "Traceback" not in page.content()
    assert _folders(studio) == before


def test_progress_bar_advances_per_step_and_cancel_stops_between_steps(page, app):
    studio, _, _ = app
    before = _folders(studio)
    _set_number(page, "steps", 1000)
    page.locator("#generate-joint").click()
    page.locator("[role=progressbar]").first.wait_for(timeout=60_000)
    seen, deadline = [], time.time() + 60
    while len(seen) < 2 or seen[-1] < 3:          # the bar moves step by step: "sample 1/1 · step i/1000"
        assert time.time() < deadline, (seen, page.locator("#status-joint").inner_text())
        text = page.evaluate("() => [...document.querySelectorAll('[role=progressbar]')]"
                             ".map(e => e.getAttribute('aria-valuetext') || '').find(t => t.includes('step ')) || ''")
        if "step " in text:
            step = int(text.split("step ")[1].split("/")[0])
            if not seen or step != seen[-1]:
                seen.append(step)
        time.sleep(0.05)
    assert seen == sorted(seen) and seen[-1] < 1000
    page.locator("#cancel-joint").click()
    page.locator("#status-joint").get_by_text("Cancelled").wait_for(timeout=60_000)
    text = page.locator("#status-joint").inner_text()
    stopped = int(text.split("stopped before step ")[1].split(" ")[0])
    assert seen[-1] < stopped < 1000 and "of 1000" in text, text
    assert _folders(studio) == before  # nothing half-done was written
    _set_number(page, "steps", 4)


def test_model_picker_lists_runs_and_mlflow_models_and_switches(page, app, ui_root):
    studio, _, _ = app
    picker = page.locator("#model-picker input")
    picker.click()
    options = [o.inner_text() for o in page.locator("#model-picker [data-testid=dropdown-option]").all()]
    options = [o.lstrip("✓").strip() for o in options]   # the selected one carries a check mark
    assert any(o.startswith("[given]") and "· last · step 2 · val loss" in o for o in options), options
    assert any(o.startswith("[outputs]") and RUN.split("/", 1)[1] in o and "· best ·" in o for o in options), options
    mlflow = [o for o in options if o.startswith("[mlflow]")]
    assert len(mlflow) == 1 and "· model · step 2 · val loss" in mlflow[0], options
    old = weakref.ref(studio.backend.session.model)
    page.locator("#model-picker [data-testid=dropdown-option]", has_text="[mlflow]").click()
    line = page.locator("#model-line")
    line.get_by_text(".models").wait_for(timeout=60_000)
    assert studio.backend.folder.parent.name == ".models" and (studio.backend.folder / "jointdit.json").is_file()
    gc.collect()
    assert old() is None  # the previous model was freed
    # back to the given folder, and the held-out list still works
    picker.click()
    page.locator("#model-picker [data-testid=dropdown-option]", has_text="[given]").click()
    line.get_by_text(str(ui_root / RUN / "export" / "last")).wait_for(timeout=60_000)
    _open_tab(page, "i2sv")
    page.locator("#i2sv-reference input").click()
    assert page.locator("#i2sv-reference [data-testid=dropdown-option]").count() == 2  # the 2 held-out clips
    page.locator("#i2sv-reference [data-testid=dropdown-option]").first.click()
    page.locator("#i2sv-preview img").wait_for()                                      # its first frame


def test_memory_estimate_follows_the_knobs(page, app):
    estimate = page.locator("#memory-estimate")
    estimate.get_by_text("Estimated peak").wait_for()
    before = estimate.inner_text()
    assert "2 guidance branches" in before            # pos + iso (w_v, w_a ≠ 0; no CLIP: no text branches)
    _set_number(page, "w_v", 0)
    _set_number(page, "w_a", 0)
    page.locator("#memory-estimate").get_by_text("1 guidance branch in").wait_for()
    time.sleep(0.2)
    assert estimate.inner_text() != before
