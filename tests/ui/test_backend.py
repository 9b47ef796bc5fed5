"""The UI's backend and catalogue on the tiny model trained in this session (no browser)."""

from __future__ import annotations

import json
import sys
import threading
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import RUN, free_port, square_and_tone  # noqa: E402


@pytest.fixture(scope="module")
def backend(ui_root, model_folder, tmp_path_factory):
    from jointdit.ui.backend import Backend

    b = Backend(out_dir=tmp_path_factory.mktemp("backend_out"), cache_dir=ui_root / "data" / "cache", device="cpu")
    b.load(model_folder)
    yield b
    b.unload()


GUIDANCE = {"name": "jointcfg", "w_v": 1.2, "w_a": 1.2, "w_txt": 1.5, "w_neg": 0.0, "w_img": 1.0}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path]:
    """The condition of the edit tasks at the model's geometry: an MP4 with sound and its sound as a WAV."""
    from jointdit.data.media import write_mp4, write_wav

    root = tmp_path_factory.mktemp("conditions")
    frames, wave = square_and_tone()
    return {"mp4": write_mp4(root / "clip.mp4", frames, 8, wave, 16000),
            "wav": write_wav(root / "tone.wav", wave, 16000)}


def _frames(path: Path):
    """Every frame of an MP4 as RGB ``[T, H, W, 3]`` floats in 0..255, read with PyAV."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24").astype(float)
                         for f in container.decode(container.streams.video[0])])


def _log_mel(path: Path):
    """The log-mel ``[64, frames at 100 Hz]`` of a WAV, read with soundfile, by librosa (not the mel codec)."""
    import librosa
    import numpy as np
    import soundfile as sf

    wave, rate = sf.read(str(path), dtype="float32")
    return np.log(librosa.feature.melspectrogram(y=wave, sr=rate, n_fft=1024, hop_length=160, n_mels=64, power=1.0)
                  + 1e-5)


def _round_trip_error(backend, wav: Path, tmp_path: Path):
    """Per-frame mel error of the condition through the model's audio codec alone (encode, decode, write)."""
    import numpy as np
    import soundfile as sf
    import torch

    wave, rate = sf.read(str(wav), dtype="float32")
    codec = backend.session.audio_codec
    back = codec.decode(codec.encode(torch.from_numpy(wave)[None]))[0, : wave.shape[0]].numpy()
    sf.write(tmp_path / "round_trip.wav", back, rate)
    return np.abs(_log_mel(tmp_path / "round_trip.wav") - _log_mel(wav)).mean(axis=0)


def test_same_request_twice_never_overwrites(backend):
    from jointdit.ui.backend import GenerateRequest

    req = GenerateRequest(task="joint", seeds=[5], steps=2, guidance=GUIDANCE)
    a, = backend.generate(req)
    first = a.wav.read_bytes()
    b, = backend.generate(req)
    assert a.folder != b.folder and a.folder.parent == b.folder.parent == backend.out_dir
    assert a.wav.read_bytes() == first                       # untouched
    assert b.wav.read_bytes() == first                       # same seed, same sample
    record = json.loads((b.folder / "request.json").read_text())
    assert record["request"]["seeds"] == [5] and record["request"]["steps"] == 2
    assert record["checkpoint"] == str(backend.folder)
    assert b.sync_png == b.folder / "sync.png" and b.sync_png.is_file() and 0.0 <= b.sync <= 1.0


def test_progress_reports_every_step_and_cancel_stops_before_the_next(backend):
    from jointdit.ui.backend import Cancelled, GenerateRequest

    seen, cancel = [], threading.Event()

    def on_step(k, n, done, total):
        seen.append((k, n, done, total))
        if k == 1 and done == 3:
            cancel.set()

    before = set(backend.out_dir.iterdir())
    with pytest.raises(Cancelled) as err:
        backend.generate(GenerateRequest(task="joint", seeds=[0, 1, 2], steps=5, guidance=GUIDANCE),
                         on_step=on_step, cancel=cancel)
    assert seen == [(0, 3, i, 5) for i in range(1, 6)] + [(1, 3, i, 5) for i in range(1, 4)]
    assert (err.value.sample, err.value.step) == (1, 3) and "stopped before step 4 of 5" in str(err.value)
    assert [o.seed for o in err.value.outputs] == [0]        # the finished sample is kept …
    assert set(backend.out_dir.iterdir()) - before == {err.value.outputs[0].folder}   # … and nothing else written


def test_max_t_shortens_the_clip_to_whole_patches(backend):
    import soundfile as sf

    from jointdit.ui.backend import GenerateRequest

    out, = backend.generate(GenerateRequest(task="joint", seeds=[0], steps=1, guidance=GUIDANCE, knobs={"max_t": 4}))
    info = sf.info(str(out.wav))
    assert info.frames == 8000                               # 4 latent frames at 8 fps = 0.5 s at 16 kHz


def test_estimate_is_the_sampling_plan_for_the_branches_and_knobs_that_run(backend):
    from jointdit.memory import Knobs, estimate_peak

    est = backend.estimate("joint", GUIDANCE, {"max_t": 4, "kv_downsample": 2, "kv_pool_space": 2})
    spec, model = backend.session.spec, backend.session.model
    want = estimate_peak(dict(model.config), spec.video_shape, spec.audio_shape,
                         Knobs(max_t=4, kv_downsample=2, kv_pool_space=2), micro_batch=2, training=False, device="cpu")
    (_, cv, hv, wv), (ca, _, fa) = spec.video_shape, spec.audio_shape
    latents = 4 * (4 * cv * hv * wv + ca * want.info["La"] * fa)   # one seed's fp32 latents, 4 video frames
    solver = (4 + 2 * 2) * latents          # noise, state, update, guided sum + input and prediction of 2 rows
    assert est["branches"] == 2 and est["forward"] == want.activations + want.attention + want.overhead + solver
    assert (est["max_t"], est["kv_downsample"], est["kv_pool_space"]) == (4, 2, 2)
    assert est["weights"] == 4 * sum(p.numel() for p in model.parameters())       # fp32, counted from the files
    assert est["clip_weights"] == 0                                                # the test model has no CLIP
    none = backend.estimate("joint", {"name": "none"}, {})
    assert none["branches"] == 1 and none["forward"] < backend.estimate("joint", GUIDANCE, {})["forward"]
    # on CPU the loaded session is already out of the available RAM: only the working memory is judged
    assert none["needed"] < none["planned"] and none["fits"] == (none["needed"] <= none["budget"])


def test_inputs_missing_or_unknown_give_clear_errors(backend):
    from jointdit.ui.backend import GenerateRequest, NoModel

    with pytest.raises(ValueError, match="needs a first frame"):
        backend.generate(GenerateRequest(task="i2sv", seeds=[0], steps=1, guidance=GUIDANCE))
    with pytest.raises(ValueError, match="neither a file nor a clip id"):  # the sampler's ConfigError
        backend.generate(GenerateRequest(task="i2sv", seeds=[0], steps=1, guidance=GUIDANCE, reference="nope"))
    from jointdit.ui.backend import Backend

    with pytest.raises(NoModel, match="pick one in the model list"):
        Backend(out_dir=backend.out_dir, cache_dir=backend.cache_dir).generate(
            GenerateRequest(task="joint", seeds=[0], steps=1, guidance=GUIDANCE))


def _generate_one(backend, task: str, **fields):
    from jointdit.ui.backend import GenerateRequest

    out, = backend.generate(GenerateRequest(task=task, seeds=[0], steps=2, guidance=GUIDANCE, **fields))
    return out


def test_extend_a_keeps_the_first_seconds_of_the_sound(backend, clip, tmp_path):
    """The written WAV's first 0.4 s (of 0.5 s given; the STFT window reaches 32 ms past a frame) are the
    condition's, as close as the codec's own round trip of it; the rest is the model's."""
    out = _generate_one(backend, "extend_a", audio=str(clip["wav"]), seconds_given=0.5)
    error = abs(_log_mel(out.wav) - _log_mel(clip["wav"])).mean(axis=0)             # per 10 ms frame
    codec_error = _round_trip_error(backend, clip["wav"], tmp_path)
    assert error[:40].mean() <= 1.25 * codec_error[:40].mean() + 0.1, (error[:40].mean(), codec_error[:40].mean())
    assert error[60:].mean() > 5 * codec_error[60:].mean()                            # generated, not the tone
    assert out.mp4 is not None and out.sync_png is not None                           # the video is generated too
    assert any("not trained on task extend_a" in w for w in out.warnings)             # the export's tasks lack it


def test_inpaint_a_keeps_the_sound_outside_the_span(backend, clip, tmp_path):
    out = _generate_one(backend, "inpaint_a", audio=str(clip["wav"]), span=(0.3, 0.7))
    error = abs(_log_mel(out.wav) - _log_mel(clip["wav"])).mean(axis=0)
    codec_error = _round_trip_error(backend, clip["wav"], tmp_path)
    kept = list(range(0, 20)) + list(range(80, 100))                                  # 0.1 s clear of the span
    assert error[kept].mean() <= 1.25 * codec_error[kept].mean() + 0.15, (error[kept].mean(), codec_error[kept].mean())
    assert error[35:65].mean() > 5 * codec_error[35:65].mean()


def test_extend_v_keeps_the_first_frames_and_inpaint_v_the_frame_outside_the_region(backend, clip):
    given = _frames(clip["mp4"])                                                      # 8 frames at 8 fps
    extended = _frames(_generate_one(backend, "extend_v", video=str(clip["mp4"]), seconds_given=0.5).mp4)
    diff = abs(extended - given).mean(axis=(1, 2, 3))                                 # per frame, of 255
    assert (diff[:4] < 2).all() and (diff[4:] > 20).all(), diff                       # H.264 error only / generated
    inpainted = _frames(_generate_one(backend, "inpaint_v", video=str(clip["mp4"]), region=(0, 0, 0.5, 0.5)).mp4)
    diff = abs(inpainted - given)
    inside = diff[:, :16, :16]                                                        # the top-left quarter
    outside = (diff.sum() - inside.sum()) / (diff.size - inside.size)
    assert outside < 2 and inside.mean() > 20, (outside, inside.mean())


def test_t2v_writes_a_video_without_sound_and_t2a_a_sound_without_video(backend):
    import av
    import soundfile as sf

    video = _generate_one(backend, "t2v")
    with av.open(str(video.mp4)) as container:
        assert len(container.streams.audio) == 0 and len(container.streams.video) == 1
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 8
    assert video.wav is None and video.video_mp4 is None and video.sync_png is None and video.png.is_file()
    assert {p.suffix for p in video.folder.iterdir()} == {".mp4", ".png", ".json"}
    assert any("not trained on task t2v" in w for w in video.warnings)
    sound = _generate_one(backend, "t2a")
    assert sound.mp4 is None and sound.sync_png is None and sf.info(str(sound.wav)).frames == 16000
    assert {p.suffix for p in sound.folder.iterdir()} == {".wav", ".png", ".json"}


def test_guidance_rows_are_those_the_sampler_runs(backend):
    """t2v / t2a drop the iso branch (their stream is already isolated): rows seen by the model per step."""
    rows: list[int] = []
    hook = backend.session.model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        for task in ("joint", "t2v", "t2a"):
            rows.clear()
            _generate_one(backend, task)
            assert set(rows) == {backend.branches(task, GUIDANCE)}, (task, rows)
    finally:
        hook.remove()
    assert (backend.branches("joint", GUIDANCE), backend.branches("t2v", GUIDANCE)) == (2, 1)
    joint, t2v = backend.estimate("joint", GUIDANCE, {}), backend.estimate("t2v", GUIDANCE, {})
    assert t2v["branches"] == 1 and t2v["forward"] < joint["forward"]


@pytest.mark.parametrize("task,fields,message", [
    ("extend_v", {"seconds_given": 1.5}, "seconds given = 1.5 is out of range for the 1 s clip the model samples: "
                                         "give 0.125 to 0.875 s"),
    ("extend_a", {"seconds_given": 0.01}, "seconds given = 0.01 is out of range for the 1 s clip the model samples: "
                                          "give 0.04 to 0.96 s"),
    ("extend_a", {"seconds_given": 0.49, "knobs": {"max_t": 4}}, "out of range for the 0.5 s clip max_t=4 samples: "
                                                                 "give 0.04 to 0.44 s"),   # 48 audio latents
    ("inpaint_a", {"span": (0.5, 1.4)}, "span 0.5–1.4 s is out of range for the 1 s clip the model samples: "
                                        "give 0 ≤ start < end ≤ 1 s"),
    ("inpaint_v", {"span": (0.6, 0.2)}, "span 0.6–0.2 s is out of range"),
    ("inpaint_v", {"region": (0.5, 0.2, 0.4, 0.9)}, "region top 0.5, left 0.2, bottom 0.4, right 0.9 is out of range: "
                                                    "give fractions of the frame with 0 ≤ top < bottom ≤ 1"),
    ("inpaint_v", {}, "inpaint_v regenerates a time span or a region of every frame: give exactly one"),
    ("extend_v", {}, "extend_v needs seconds given"),
])
def test_edit_parameters_out_of_range_are_refused_naming_the_range(backend, clip, task, fields, message):
    from jointdit.ui.backend import GenerateRequest

    source = {"video": str(clip["mp4"])} if task.endswith("_v") else {"audio": str(clip["wav"])}
    before = set(backend.out_dir.iterdir())
    with pytest.raises(ValueError) as err:
        backend.generate(GenerateRequest(task=task, seeds=[0], steps=1, guidance=GUIDANCE, **source, **fields))
    assert message in str(err.value), str(err.value)
    assert set(backend.out_dir.iterdir()) == before                                  # nothing sampled


@pytest.mark.parametrize("task,fields,message", [
    ("extend_v", {"seconds_given": 0.5}, "extend_v needs the clip to extend"),
    ("extend_a", {"seconds_given": 0.5}, "extend_a needs the sound to extend"),
    ("inpaint_v", {"span": (0.2, 0.4)}, "inpaint_v needs the clip to inpaint"),
    ("inpaint_a", {"span": (0.2, 0.4)}, "inpaint_a needs the sound to inpaint"),
])
def test_edit_tasks_without_their_input_say_what_to_upload(backend, task, fields, message):
    from jointdit.ui.backend import GenerateRequest

    with pytest.raises(ValueError, match=message):
        backend.generate(GenerateRequest(task=task, seeds=[0], steps=1, guidance=GUIDANCE, **fields))


def test_held_out_clips_come_from_the_models_cache(backend):
    held = backend.held_out()
    assert len(held) == 2 and all(cid in label for label, cid in held)
    assert backend.held_out_frame(held[0][1]).suffix == ".png"


def test_catalog_lists_exports_with_step_and_val_loss_and_the_mlflow_model(ui_root, model_folder, tmp_path):
    from jointdit.ui import catalog

    metrics = json.loads((ui_root / RUN / "metrics.json").read_text())
    val = [h["val_loss"] for h in metrics["history"] if "val_loss" in h][-1]
    uri = f"sqlite:///{ui_root}/mlflow.db"
    entries = catalog.catalog(ui_root, uri, [str(model_folder)])
    by_export = {(e.source, e.export): e for e in entries}
    assert set(by_export) == {("given", "last"), ("outputs", "best"), ("mlflow", "model")}
    given = by_export[("given", "last")]
    assert given.run_name == RUN and given.step == 2 and given.val_loss == pytest.approx(val)
    logged = by_export[("mlflow", "model")]
    assert logged.step == 2 and logged.val_loss == pytest.approx(val) and logged.path is None
    folder = catalog.materialize(logged, uri, tmp_path / "models")
    assert folder == tmp_path / "models" / logged.run_id and catalog.is_model_folder(folder)
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (model_folder / "diffusion_pytorch_model.safetensors").read_bytes()
    # no MLflow store: nothing listed, and no database file created by asking
    assert catalog.scan_mlflow(f"sqlite:///{tmp_path}/none.db") == [] and not (tmp_path / "none.db").exists()


def test_every_sampler_task_has_one_tab_in_the_page():
    from jointdit.diffusion.masks import MODES, present_streams
    from jointdit.ui.app import TAB_GROUPS, TASK_NOTES, TASK_TITLES
    from jointdit.ui.backend import ONE_STREAM, TASKS

    assert set(TASKS) == set(MODES) and set(TASK_TITLES) == set(TASK_NOTES) == set(TASKS)
    assert [task for _, tasks in TAB_GROUPS.values() for task in tasks] == list(TASKS)   # TASKS[0]: the first tab
    assert ONE_STREAM == {task: present_streams(task)[0] for task in MODES if len(present_streams(task)) == 1}


def test_host_other_than_loopback_warns():
    from jointdit.ui.app import check_host

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_host("127.0.0.1") == "127.0.0.1"
    with pytest.warns(UserWarning, match="binding 0.0.0.0, so anyone who can reach this machine"):
        check_host("0.0.0.0")


def _non_loopback_ip() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))   # no packet is sent; this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_the_app_binds_only_loopback_and_serves_no_file_outside_its_folders(app, ui_root):
    import socket
    import urllib.error
    import urllib.request

    _, demo, url = app
    assert url.startswith("http://127.0.0.1:") and demo.server_name == "127.0.0.1" and not demo.share
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    ip = _non_loopback_ip()
    if ip:
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(3)
            s.connect((ip, demo.server_port))
    secret = ui_root / RUN / "config_resolved.yaml"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}gradio_api/file={secret}", timeout=10)
    assert err.value.code in (403, 404)


def test_free_port_helper_gives_a_bindable_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


@pytest.mark.slow
def test_entry_point_serves_on_loopback_and_prints_the_url(ui_root, model_folder):
    """``python -m jointdit.ui checkpoint=…`` as a user runs it: prints the URL, serves the page, stops on Ctrl-C."""
    import os
    import signal
    import subprocess
    import urllib.request

    from helpers import PYTHON, REPO

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")} | {"GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([PYTHON, "-m", "jointdit.ui", f"paths.root_dir={ui_root}", f"checkpoint={model_folder}",
                             f"port={port}", f"out_dir={ui_root / 'ui_entry'}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("jointdit ui: serving"):
                url = line.rsplit(" at ", 1)[1].strip()
                break
        assert url == f"http://127.0.0.1:{port}/", "".join(lines[-30:])
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"jointdit studio" in r.read()
        assert "WARNING" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
