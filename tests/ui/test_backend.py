"""The UI's backend and catalogue on the tiny model trained in this session (no browser)."""

from __future__ import annotations

import json
import sys
import threading
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import RUN, free_port  # noqa: E402


@pytest.fixture(scope="module")
def backend(ui_root, model_folder, tmp_path_factory):
    from jointdit.ui.backend import Backend

    b = Backend(out_dir=tmp_path_factory.mktemp("backend_out"), cache_dir=ui_root / "data" / "cache", device="cpu")
    b.load(model_folder)
    yield b
    b.unload()


GUIDANCE = {"name": "jointcfg", "w_v": 1.2, "w_a": 1.2, "w_txt": 1.5, "w_neg": 0.0, "w_img": 1.0}


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
    assert est["branches"] == 2 and est["forward"] == want.activations + want.attention + want.overhead
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
