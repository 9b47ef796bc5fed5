"""The real app in a real Chromium: each task end to end, webcam and microphone, progress + cancel per page,
bad uploads on every input, seeds and samples, the model picker; extend_a, t2v (no sound track) and t2a (a
sound player) end to end, an edit parameter out of range, the memory estimate following the tab.

The model is a tiny one trained in this session (conftest.ui_root); the page is driven only through what
a user sees and clicks (tabs, uploads, Chromium's fake camera and microphone, buttons); results are
checked in the page (the <video> element plays and decodes sound) and on disk (one new folder per output
with MP4, WAV and PNG). The app runs with small upload limits (uihelpers.UPLOAD_LIMITS).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import RUN, UPLOAD_LIMITS, open_page, square_and_tone  # noqa: E402

GROUPS = {"video + sound": ("joint", "i2sv", "a2v", "v2a"),
          "extend / inpaint": ("extend_v", "extend_a", "inpaint_v", "inpaint_a"),
          "video or sound alone": ("t2v", "t2a")}
TAB = {"joint": "text → video + sound", "i2sv": "image → sounding video", "a2v": "audio → video",
       "v2a": "video → audio", "extend_v": "extend a video", "extend_a": "extend a sound",
       "inpaint_v": "inpaint a video", "inpaint_a": "inpaint a sound", "t2v": "text → video only",
       "t2a": "text → sound only"}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 1 s clip (moving square + 440 Hz tone) as MP4, its sound as WAV, a PNG frame; and for each input
    a text file renamed to its type, one over the duration (or pixel) limit and one over the size limit."""
    import soundfile as sf
    import torch
    from PIL import Image

    from jointdit.data.media import write_mp4, write_wav

    root = tmp_path_factory.mktemp("media")
    frames, wave = square_and_tone()
    Image.fromarray(((frames[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(root / "frame.png")
    for name in ("notes.mp4", "notes.wav", "notes.png"):
        (root / name).write_text("these are my notes, not a video, a sound or a picture\n" * 20)
    seconds, limit = UPLOAD_LIMITS["max_seconds"] + 1, UPLOAD_LIMITS["max_mb"] * 2**20
    gen = torch.Generator().manual_seed(0)
    files = {"mp4": write_mp4(root / "clip.mp4", frames, 8, wave, 16000), "wav": write_wav(root / "tone.wav", wave, 16000),
             "png": root / "frame.png",
             "long.mp4": write_mp4(root / "long.mp4", frames.repeat(seconds, 1, 1, 1), 8, wave.repeat(seconds), 16000),
             "long.wav": write_wav(root / "long.wav", wave.repeat(seconds), 16000),
             # lossless noise: about 1.3 MB in 3 s
             "big.mp4": write_mp4(root / "big.mp4", torch.rand(24, 3, 192, 192, generator=gen) * 2 - 1, 8, crf=0)}
    Image.new("RGB", (2100, 2100), (20, 160, 40)).save(root / "wide.png")              # 4.4 M pixels, a few kB
    Image.fromarray((torch.rand(700, 700, 3, generator=gen) * 255).byte().numpy()).save(root / "big.png")
    sf.write(root / "big.wav", (torch.rand(48000 * 3, 2, generator=gen) - 0.5).numpy(), 48000, subtype="FLOAT")
    files.update({name: root / name for name in ("notes.mp4", "notes.wav", "notes.png", "wide.png", "big.png", "big.wav")})
    assert all(files[f"big.{ext}"].stat().st_size > limit for ext in ("mp4", "png", "wav"))
    assert all(files[n].stat().st_size < limit for n in ("long.mp4", "long.wav", "wide.png"))
    return files


def _folders(studio) -> set[Path]:
    out = studio.backend.out_dir
    return {p for p in out.iterdir() if p.is_dir()} if out.is_dir() else set()


def _open_tab(page, task: str) -> None:
    """Click the task's group in the top row of tabs, then the task's tab in the row below."""
    group, = (title for title, tasks in GROUPS.items() if task in tasks)
    page.get_by_role("tab", name=group, exact=True).click()
    page.get_by_role("tab", name=TAB[task], exact=True).click()
    page.locator(f"#generate-{task}").wait_for(state="visible")


def _set_number(page, elem_id: str, value) -> None:
    """Type into a Number (or a Slider's number box) and wait until the page has taken the value."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")
    range_ = page.locator(f"#{elem_id} input[type=range]")
    if range_.count():
        page.wait_for_function(f"() => document.querySelector('#{elem_id} input[type=range]').value == '{value}'")


def _play(page, task: str, kind: str = "video") -> dict:
    """Play the result (``kind``: its <video>, or for t2a the <audio> behind its waveform, which sits beside a
    hidden standard player) muted until its clock moves (at most 30 s) and report what Chromium decoded."""
    player = page.locator(f"#video-{task} video" if kind == "video" else f"#audio-{task} [data-testid^=waveform] audio")
    player.wait_for(state="attached", timeout=120_000)
    return player.evaluate("""async v => {
        v.muted = true;
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        await v.play();
        // a loaded CI machine can take seconds to start the media clock: poll instead of one fixed sleep
        const deadline = Date.now() + 30000;
        while ((v.currentTime === 0 || v.webkitAudioDecodedByteCount + v.webkitVideoDecodedByteCount === 0)
               && !v.ended && Date.now() < deadline)
            await new Promise(r => setTimeout(r, 100));
        v.pause();
        return {duration: v.duration, time: v.ended ? v.duration : v.currentTime, ended: v.ended,
                audioBytes: v.webkitAudioDecodedByteCount, videoBytes: v.webkitVideoDecodedByteCount,
                src: v.currentSrc};
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


def test_extend_a_keeps_the_uploaded_sound_and_plays_with_it(page, app, media):
    """extend_a end to end: the first half second of the uploaded tone is kept (the backend tests compare the
    files), a video and the rest of the sound are generated; the export did not train extend_a, so the
    status line carries the sampler's warning."""
    studio, _, _ = app
    before = _folders(studio)
    _set_number(page, "steps", 2)
    _open_tab(page, "extend_a")
    page.locator("#extend_a-audio input[type=file]").set_input_files(str(media["wav"]))
    page.locator("#extend_a-audio [data-testid=download-link]").wait_for(state="attached")
    _set_number(page, "extend_a-seconds", 0.5)
    page.locator("#generate-extend_a").click()
    status = page.locator("#status-extend_a")
    status.get_by_text("Done: 1 sample(s)").wait_for(timeout=120_000)
    assert "Sampler warning: the model was not trained on task extend_a" in status.inner_text()
    played = _play(page, "extend_a")
    assert played["duration"] > 0.9 and played["time"] > 0 and played["audioBytes"] > 0 and played["videoBytes"] > 0
    folder, = _folders(studio) - before
    request = json.loads((folder / "request.json").read_text())["request"]
    assert (request["task"], request["seconds_given"], request["both"]) == ("extend_a", 0.5, False)


def test_t2v_plays_without_a_sound_track_and_t2a_as_a_sound(page, app):
    import av

    studio, _, _ = app
    _set_number(page, "steps", 2)
    _open_tab(page, "t2v")
    text, (folder,) = _generate(page, studio, "t2v", 1)
    assert "its MP4 has no sound track" in text and "not trained on task t2v" in text
    played = _play(page, "t2v")
    assert played["duration"] > 0.9 and played["time"] > 0 and played["videoBytes"] > 0
    assert played["audioBytes"] == 0, played           # nothing to decode: no audio track
    mp4, = folder.glob("*.mp4")
    with av.open(str(mp4)) as container:
        assert not container.streams.audio and len(container.streams.video) == 1
    assert page.locator("#files-t2v a[download$='.mp4']").count() == 1
    assert page.locator("#files-t2v a[download$='.wav']").count() == 0

    _open_tab(page, "t2a")
    text, (folder,) = _generate(page, studio, "t2a", 1)
    assert "a WAV and its spectrogram, no MP4" in text
    played = _play(page, "t2a", "audio")
    assert played["duration"] > 0.9 and played["time"] > 0 and played["audioBytes"] > 0, played
    assert not list(folder.glob("*.mp4")) and len(list(folder.glob("*.wav"))) == 1
    assert page.locator("#preview-t2a img").count() >= 1   # its spectrogram


def test_an_edit_parameter_out_of_range_is_named_in_the_page(page, app, media):
    """inpaint_v with a region past the frame's bottom: the status line (and a toast) give the allowed range;
    nothing is sampled."""
    studio, _, _ = app
    before = _folders(studio)
    _open_tab(page, "inpaint_v")
    page.locator("#inpaint_v-video input[type=file]").set_input_files(str(media["mp4"]))
    page.locator("#inpaint_v-preview video").wait_for(state="attached")
    page.locator("#inpaint_v-target").get_by_text("a region of every frame").click()
    page.locator("#inpaint_v-bottom").wait_for(state="visible")
    assert not page.locator("#inpaint_v-span-start").is_visible()
    _set_number(page, "inpaint_v-bottom", 1.5)
    page.locator("#generate-inpaint_v").click()
    message = ("region top 0.25, left 0.25, bottom 1.5, right 0.75 is out of range: give fractions of the frame "
               "with 0 ≤ top < bottom ≤ 1 and 0 ≤ left < right ≤ 1")
    page.locator(".toast-body").get_by_text(f"Cannot sample: {message}").wait_for()
    assert f"Cannot sample: {message}" in page.locator("#status-inpaint_v").inner_text()
    assert "Traceback" not in page.content()
    assert _folders(studio) == before


INPUT = {"i2sv": "#i2sv-image", "a2v": "#a2v-audio", "v2a": "#v2a-video"}


@pytest.mark.parametrize("task,bad,message", [
    ("i2sv", "notes.png", "notes.png: not a readable image"),
    ("i2sv", "wide.png", "wide.png: 2100×2100 pixels is over the 4,000,000 pixel limit"),
    ("a2v", "notes.wav", "notes.wav: not a readable WAV sound"),
    ("a2v", "long.wav", "long.wav: 5.0 s is over the 4 s duration limit"),
    ("v2a", "notes.mp4", "notes.mp4: not a readable media file"),
    ("v2a", "long.mp4", "long.mp4: 5.0 s is over the 4 s duration limit"),
])
def test_a_bad_upload_gets_the_pages_error_on_every_input(page, app, media, task, bad, message):
    """The file reaches the server's check (not dropped by Gradio's image/audio/video handling) and the
    tab's status line names it and the problem, at upload and again on Generate; nothing is sampled."""
    studio, _, _ = app
    before = _folders(studio)
    _open_tab(page, task)
    page.locator(f"{INPUT[task]} input[type=file]").set_input_files(str(media[bad]))
    status = page.locator(f"#status-{task}")
    status.get_by_text("Upload refused").wait_for()
    assert message in status.inner_text()
    page.locator(f"#generate-{task}").click()   # Generate checks it again: its warning toast says the same
    page.locator(".toast-body").get_by_text(f"Upload refused: {message}").wait_for()
    assert message in status.inner_text()
    assert "Traceback" not in page.content()
    assert _folders(studio) == before


@pytest.mark.parametrize("task,big", [("i2sv", "big.png"), ("a2v", "big.wav"), ("v2a", "big.mp4")])
def test_a_file_over_the_size_limit_is_stopped_in_the_page_before_it_is_sent(page, app, media, task, big):
    """Gradio's max_file_size gate (set from uploads.max_mb): a toast naming the file and the limit, and not
    one byte of it is sent to the server."""
    uploads = []
    page.on("request", lambda r: uploads.append(r.url) if r.method == "POST" and "/gradio_api/upload?" in r.url else None)
    _open_tab(page, task)
    page.locator(f"{INPUT[task]} input[type=file]").set_input_files(str(media[big]))
    toast = page.get_by_text(f'maximum allowed size of {UPLOAD_LIMITS["max_mb"]:.1f} Mb: "{big}"')
    toast.wait_for()
    page.locator(f"#generate-{task}").click()   # no file arrived: Generate asks for one
    page.locator(f"#status-{task}").get_by_text("Cannot sample").wait_for()
    assert uploads == []


def test_the_server_refuses_an_upload_over_the_size_limit(page, app):
    """A client that skips the page's check gets HTTP 413 from the server itself."""
    url = app[2]
    payload = {"name": "big.wav", "mimeType": "audio/wav", "buffer": b"\0" * (UPLOAD_LIMITS["max_mb"] * 2**20 + 1024)}
    over = page.request.post(f"{url}gradio_api/upload", multipart={"files": payload})
    assert over.status == 413, over.status
    small = page.request.post(f"{url}gradio_api/upload", multipart={"files": {**payload, "buffer": b"\0" * 1024}})
    assert small.ok


def test_webcam_photo_and_microphone_recording_are_sampled(page, app):
    """A real capture through the page: Chromium's fake camera → the webcam photo → i2sv; its fake
    microphone → a recording → a2v. Each is checked like an upload, then sampled."""
    import soundfile as sf
    from PIL import Image

    studio, _, _ = app
    _open_tab(page, "i2sv")
    page.locator("#i2sv-image button[aria-label='Capture from camera']").click()
    page.get_by_text("Click to Access Webcam").click()
    page.wait_for_function("() => { const v = document.querySelector('#i2sv-image video');"
                           " return v && v.readyState >= 2 && v.videoWidth > 0 }")
    page.locator("#i2sv-image button[aria-label='capture photo']").click()
    page.locator("#i2sv-image img").wait_for()
    before = _folders(studio)
    page.locator("#generate-i2sv").click()
    page.locator("#status-i2sv").get_by_text("Done: 1 sample(s)").wait_for(timeout=120_000)
    folder, = _folders(studio) - before
    photo = json.loads((folder / "request.json").read_text())["request"]["image"]
    with Image.open(photo) as im:                               # the frame the camera gave, as sent
        assert im.size == (1920, 1440) and im.format == "PNG"

    _open_tab(page, "a2v")
    page.locator("#a2v-audio button[aria-label='Record audio']").click()
    page.locator("#a2v-audio button", has_text="Record").first.click()
    page.wait_for_timeout(1500)
    page.locator("#a2v-audio button", has_text="Stop").first.click()
    page.locator("#a2v-audio [data-testid=download-link]").wait_for(state="attached")
    before = _folders(studio)
    page.locator("#generate-a2v").click()
    page.locator("#status-a2v").get_by_text("Done: 1 sample(s)").wait_for(timeout=120_000)
    folder, = _folders(studio) - before
    recording = json.loads((folder / "request.json").read_text())["request"]["audio"]
    info = sf.info(recording)
    assert 1.0 <= info.frames / info.samplerate <= 4.0, info     # about the 1.5 s recorded


def _generate(page, studio, task: str, n: int) -> tuple[str, set[Path]]:
    """Click Generate and wait until ``n`` new output folders exist and the status line lists them all
    (while the job runs, the status still shows the last run's text): (status text, new folders)."""
    before = _folders(studio)
    page.locator(f"#generate-{task}").click()
    status, deadline = page.locator(f"#status-{task}"), time.time() + 120
    while True:
        new, text = _folders(studio) - before, status.inner_text()
        if len(new) == n and f"Done: {n} sample(s)" in text and all(str(f) in text for f in new):
            return text, new
        assert time.time() < deadline, (text, new)
        time.sleep(0.2)


def _seed_box(page) -> int:
    return int(page.locator("#seed input[type=number]").input_value())


def test_random_seed_and_several_samples(page, app):
    """Random on: each run draws a new seed, shown in the seed box, the status and the folder names, and
    n samples are seed…seed+n-1 in n folders; random off: the typed seed."""
    import random
    import re

    studio, _, _ = app
    _set_number(page, "steps", 1)
    _set_number(page, "samples", 2)
    page.locator("#random-seed input[type=checkbox]").check()
    drawn = []
    for run in range(2):
        random.seed(0)   # as any library may (accelerate's set_seed does): the draw must not follow it
        text, new = _generate(page, studio, "joint", 2)
        seeds = [int(x) for x in re.search(r"seeds (\d+), (\d+),", text).groups()]
        assert seeds[1] == seeds[0] + 1 and _seed_box(page) == seeds[0]
        assert sorted(p.name.split("_seed")[1] for p in new) == sorted(str(x) for x in seeds)
        assert page.locator("#files-joint a[download$='.wav']").count() == 2      # both samples downloadable
        drawn.append(seeds[0])
    assert drawn[0] != drawn[1]
    page.locator("#random-seed input[type=checkbox]").uncheck()
    _set_number(page, "seed", 7)
    _set_number(page, "samples", 1)
    text, (folder,) = _generate(page, studio, "joint", 1)
    assert "seeds 7," in text and folder.name.endswith("_joint_seed7") and _seed_box(page) == 7


def _step_shown(page) -> int | None:
    """The step in the progress bar ("sample 1/1 · step i/N"), None while it shows none."""
    text = page.evaluate("() => [...document.querySelectorAll('[role=progressbar]')]"
                         ".map(e => e.getAttribute('aria-valuetext') || '').find(t => t.includes('step ')) || ''")
    return int(text.split("step ")[1].split("/")[0]) if "step " in text else None


def _steps_until(page, at_least: int, seen: list[int], timeout: float = 60) -> list[int]:
    """Watch the progress bar until it shows a step >= ``at_least``; appends each new step to ``seen``."""
    deadline = time.time() + timeout
    while not seen or seen[-1] < at_least:
        assert time.time() < deadline, (seen, page.locator("#status-joint").inner_text())
        step = _step_shown(page)
        if step is not None and (not seen or step != seen[-1]):
            seen.append(step)
        time.sleep(0.05)
    return seen


def test_progress_advances_per_step_and_cancel_stops_only_the_jobs_of_its_own_page(page, browser, app):
    """Page A runs a 1000-step job. Page B (another browser context, another Gradio session) presses
    Cancel: nothing of B's runs, A goes on. B queues a job behind A's and cancels it while it waits: A
    still goes on. A's Cancel stops A between two steps; B's job then starts and stops before its first
    step. Neither writes anything."""
    studio, _, url = app
    before = _folders(studio)
    _set_number(page, "steps", 1000)
    page.locator("#generate-joint").click()
    page.locator("[role=progressbar]").first.wait_for(timeout=60_000)
    seen = _steps_until(page, 1, [])               # the bar moves step by step: "sample 1/1 · step i/1000"
    _steps_until(page, seen[-1] + 1, seen)         # and on: the first step shown may be any (sent at 4 Hz)
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] < 1000

    context_b, page_b = open_page(browser, url)
    try:
        page_b.locator("#cancel-joint").click()
        page_b.get_by_text("Nothing to cancel: no job of this page is running or waiting").wait_for()
        _steps_until(page, seen[-1] + 2, seen)      # A was not stopped
        page_b.locator("#generate-joint").click()
        page_b.locator("#video-joint").get_by_text("queue").wait_for()   # B's job waits behind A's
        page_b.locator("#cancel-joint").click()
        page_b.get_by_text("Cancelling: 1 waiting job(s) will not run.").wait_for()
        _steps_until(page, seen[-1] + 2, seen)      # A still was not stopped

        page.locator("#cancel-joint").click()
        page.get_by_text("Cancelling: 1 running job stops before its next step.").wait_for()
        page.locator("#status-joint").get_by_text("Cancelled").wait_for(timeout=60_000)
        text = page.locator("#status-joint").inner_text()
        stopped = int(text.split("stopped before step ")[1].split(" ")[0])
        assert seen[-1] < stopped < 1000 and "of 1000" in text, text
        page_b.locator("#status-joint").get_by_text("Cancelled").wait_for(timeout=60_000)
        assert "stopped before step 1 of 4" in page_b.locator("#status-joint").inner_text()
    finally:
        context_b.close()
    assert _folders(studio) == before  # nothing half-done was written


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


def test_memory_estimate_follows_the_tab_and_the_knobs(page, app):
    estimate = page.locator("#memory-estimate")
    estimate.get_by_text("Estimated peak").wait_for()
    before = estimate.inner_text()
    assert "for sampling joint" in before and "2 guidance branches" in before   # pos + iso (no CLIP: no text)
    _open_tab(page, "t2v")                             # its video is isolated already: no iso branch
    estimate.get_by_text("for sampling t2v").wait_for()
    assert "1 guidance branch in" in estimate.inner_text()
    _open_tab(page, "joint")
    estimate.get_by_text("for sampling joint").wait_for()
    assert "2 guidance branches" in estimate.inner_text()
    _set_number(page, "w_v", 0)
    _set_number(page, "w_a", 0)
    page.locator("#memory-estimate").get_by_text("1 guidance branch in").wait_for()
    time.sleep(0.2)
    assert estimate.inner_text() != before
