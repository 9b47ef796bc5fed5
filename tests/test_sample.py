"""Sampling as a library (``load_session`` / ``generate``) and through ``python -m jointdit.sample``.

A tiny trained checkpoint (tests/diffusion/conftest.py's model and training, pixel_mel codec, 32 px,
8 fps, 1 s) samples every task into real MP4/WAV/PNG files. Oracles are independent of the code under
test: files are probed with PyAV/soundfile/Pillow directly, conditioning inputs are compared with
what was written, and the video decoder's calls are observed with a forward hook on the real VAE.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import run_module

_spec = importlib.util.spec_from_file_location("diffusion_fixtures", Path(__file__).parent / "diffusion" / "conftest.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)
FPS, SIZE, SECONDS, SR = fx.FPS, fx.SIZE, fx.SECONDS, fx.SR
N_FRAMES, N_SAMPLES = int(FPS * SECONDS), int(SR * SECONDS)
STEPS = 2


def _meta(video_shape, codec=None) -> dict:
    return {"step": 30, "stage": "a", "codec": codec or fx.CODEC,
            "latent": {"video_shape": list(video_shape), "audio_shape": list(fx.AUDIO_SHAPE)},
            "data": {"fps": FPS, "size": SIZE, "seconds": SECONDS, "sample_rate": SR}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from jointdit.checkpoints import export_model

    torch.manual_seed(0)
    model = fx.tiny_model()
    fx._train(model, steps=10)   # enough to make adaLN and the outputs non-zero
    return export_model(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny", _meta(fx.VIDEO_SHAPE))


@pytest.fixture(scope="module")
def session(checkpoint):
    from jointdit.sample import load_session

    return load_session(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A moving square with a 440 Hz tone (MP4 + WAV) and a PNG image, written as users would have them."""
    from PIL import Image

    from jointdit.data.media import write_mp4

    root = tmp_path_factory.mktemp("inputs")
    frames = torch.full((N_FRAMES, 3, SIZE, SIZE), -0.6)
    for t in range(N_FRAMES):
        frames[t, :, 8:20, 2 + 3 * t: 14 + 3 * t] = torch.tensor([0.8, -0.2, 0.3])[:, None, None]
    wave = 0.4 * torch.sin(2 * math.pi * 440 * torch.arange(N_SAMPLES) / SR)
    sf.write(root / "tone.wav", wave.numpy(), SR, subtype="FLOAT")
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 16:48] = (200, 40, 90)
    Image.fromarray(image).save(root / "frame.png")
    return {"mp4": write_mp4(root / "ref.mp4", frames, FPS, wave, SR), "wav": root / "tone.wav",
            "png": root / "frame.png", "wave": wave}


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        out = {"audio": bool(c.streams.audio), "fps": float(c.streams.video[0].average_rate),
               "frames": [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]}
    if out["audio"]:
        with av.open(str(path)) as c:
            out["audio_seconds"] = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate
    return out


def _check_files(sample) -> None:
    assert set(sample.files) == {"mp4", "video_mp4", "wav", "png"}
    muxed, video_only = _probe(sample.mp4), _probe(sample.video_mp4)
    assert len(muxed["frames"]) == N_FRAMES == len(video_only["frames"])
    assert muxed["fps"] == pytest.approx(FPS) and video_only["fps"] == pytest.approx(FPS)
    assert muxed["audio"] and not video_only["audio"]
    assert muxed["audio_seconds"] == pytest.approx(SECONDS, abs=0.07)   # AAC frames of 1024 samples
    # the MP4's pictures are the returned frames (H.264 loses fine noise at 32 px; colours per frame stay)
    decoded = torch.from_numpy(np.stack(video_only["frames"])).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(decoded.mean(dim=(2, 3)), sample.frames.mean(dim=(2, 3)), atol=0.05, rtol=0)
    wave, sr = sf.read(sample.wav, dtype="float32")
    assert sr == SR and wave.shape == (N_SAMPLES,)
    np.testing.assert_allclose(wave, sample.wave.numpy(), atol=2 / 32768)     # 16-bit PCM
    from PIL import Image

    with Image.open(sample.png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# --------------------------------------------------------------------------------------------------
# every task, in-process
# --------------------------------------------------------------------------------------------------
def _request(task: str, inputs: dict, out_dir: Path, **kw):
    from jointdit.sample import SampleRequest

    given = {"joint": {}, "i2sv": {"image": str(inputs["png"])}, "a2v": {"audio": str(inputs["wav"])},
             "v2a": {"video": str(inputs["mp4"])}}.get(task, {})
    return SampleRequest(**{"task": task, "steps": STEPS, "seeds": [3], "out_dir": out_dir, "guidance": "none",
                            **given, **kw})


@pytest.mark.parametrize("task", ["joint", "i2sv", "a2v", "v2a"])
def test_every_task_writes_real_files(task, session, inputs, tmp_path):
    from PIL import Image

    from jointdit.sample import generate

    result = generate(session, _request(task, inputs, tmp_path))
    assert result.folder.parent == tmp_path and f"_{task}_seed3" in result.folder.name
    (sample,) = result.samples
    assert sample.seed == 3 and result.mp4 == sample.mp4 and result.folder == sample.mp4.parent
    assert sample.frames.shape == (N_FRAMES, 3, SIZE, SIZE) and sample.wave.shape == (N_SAMPLES,)
    assert sample.z_video.shape == fx.VIDEO_SHAPE and sample.z_audio.shape == fx.AUDIO_SHAPE
    _check_files(sample)
    if task == "i2sv":   # frame 0 is the image: 64x48 scaled to cover 32x32 (43x32), centre-cropped
        with Image.open(inputs["png"]) as im:
            expected = np.asarray(im.convert("RGB").resize((43, 32), Image.BILINEAR))[:, 5:37]
        got = ((sample.frames[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        assert np.abs(got - expected).mean() < 3.0
        assert (sample.frames[1:] - sample.frames[0]).abs().mean() > 1e-3        # the rest is generated
    if task == "a2v":    # the audio is the input sound through the mel codec (Griffin-Lim), not generated
        from jointdit.codecs import build_codecs

        _, mel = build_codecs(fx.CODEC)
        z = mel.encode(inputs["wave"][None])
        torch.testing.assert_close(sample.z_audio, z[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(sample.wave, mel.decode(z)[0, :N_SAMPLES].clamp(-1, 1), atol=1e-5, rtol=0)
    if task == "v2a":    # the video is the input video (the pixel codec is lossless)
        with av.open(str(inputs["mp4"])) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(sample.frames, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("task, params", [("extend_v", {"seconds_given": 0.5, "both": True}),
                                          ("inpaint_v", {"region": (0.0, 0.0, 0.5, 0.5)}),
                                          ("inpaint_a", {"span": (0.2, 0.6)})])
def test_extend_and_inpaint_keep_what_they_are_given(task, params, session, inputs, tmp_path):
    """The kept part of the input comes back exactly (pixel codec: lossless; audio: in latent space)."""
    from jointdit.codecs import build_codecs
    from jointdit.sample import generate

    source = {"video": str(inputs["mp4"])} if task != "inpaint_a" else {"audio": str(inputs["wav"])}
    result = generate(session, _request(task, inputs, tmp_path, **source, **params))
    (sample,) = result.samples
    _check_files(sample)
    with av.open(str(inputs["mp4"])) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1                 # [8, 3, 32, 32]
    _, mel = build_codecs(fx.CODEC)
    if task == "extend_v":          # first 0.5 s = 4 latent frames of video, and 50 mel steps (whole patches: 48)
        torch.testing.assert_close(sample.frames[:4], video[:4], atol=1e-6, rtol=0)
        assert (sample.frames[4:] - video[4:]).abs().mean() > 1e-2
        with av.open(str(inputs["mp4"])) as c:
            sound = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])[:N_SAMPLES]
        z = mel.encode(torch.from_numpy(sound.astype(np.float32))[None])
        torch.testing.assert_close(sample.z_audio[:, :48], z[0, :, :48], atol=1e-5, rtol=0)
    elif task == "inpaint_v":       # the top-left quarter (2x2 latent pixels of 8 px) is regenerated
        keep = torch.ones(SIZE, SIZE, dtype=torch.bool)
        keep[:16, :16] = False
        torch.testing.assert_close(sample.frames[:, :, keep], video[:, :, keep], atol=1e-6, rtol=0)
        assert (sample.frames[:, :, ~keep] - video[:, :, ~keep]).abs().mean() > 1e-2
    else:   # audio steps meeting 0.2-0.6 s (step j covers j/100 ± 5 ms: 20..60) widened to patches of 4: 20..64
        z = mel.encode(inputs["wave"][None])[0]
        torch.testing.assert_close(sample.z_audio[:, :20], z[:, :20], atol=1e-5, rtol=0)
        torch.testing.assert_close(sample.z_audio[:, 64:], z[:, 64:], atol=1e-5, rtol=0)
        assert (sample.z_audio[:, 20:64] - z[:, 20:64]).abs().mean() > 1e-2


def test_same_seed_same_output_and_cached_reference_frame(session, inputs, tmp_path):
    """i2sv from an MP4 reference: its first frame is kept; the same request twice gives identical bytes."""
    from jointdit.sample import generate

    req = _request("i2sv", inputs, tmp_path, image=None, reference=str(inputs["mp4"]), guidance="jointcfg")
    r1, r2 = generate(session, req), generate(session, req)
    assert r1.folder != r2.folder                               # never the same folder twice
    assert torch.equal(r1.frames, r2.frames) and torch.equal(r1.wave, r2.wave)
    assert r1.wav.read_bytes() == r2.wav.read_bytes()
    with av.open(str(inputs["mp4"])) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    expected = torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(r1.frames[0], expected, atol=1e-6, rtol=0)


def test_inputs_may_be_in_memory(session, inputs):
    """UI-style inputs: a uint8 image array, a (rate, int16) sound, a frames tensor; nothing written."""
    from jointdit.sample import SampleRequest, generate

    from_file = generate(session, SampleRequest(task="a2v", audio=str(inputs["wav"]), steps=1, guidance="none"))
    res = generate(session, SampleRequest(task="a2v", audio=(SR, inputs["wave"].numpy()), steps=1, guidance="none"))
    assert res.folder is None and res.files == [] and res.mp4 is None
    torch.testing.assert_close(res.samples[0].z_audio, from_file.samples[0].z_audio, atol=1e-6, rtol=0)
    pcm = (inputs["wave"].numpy() * 32767).astype(np.int16)     # Gradio's numpy audio: int16 at its own rate
    res = generate(session, SampleRequest(task="a2v", audio=(SR, pcm), steps=1, guidance="none"))
    assert (res.samples[0].z_audio - from_file.samples[0].z_audio).abs().mean() < 0.05
    image = np.full((32, 32, 3), 255, np.uint8)
    res = generate(session, SampleRequest(task="i2sv", image=image, steps=1, guidance="none"))
    assert torch.equal(res.frames[0], torch.ones(3, SIZE, SIZE))


def test_max_t_samples_a_shorter_clip_with_equal_durations(session, inputs):
    from jointdit.sample import SampleRequest, generate

    res = generate(session, SampleRequest(task="v2a", video=str(inputs["mp4"]), max_t=4, steps=1, guidance="none"))
    assert res.frames.shape[0] == 4 and res.samples[0].z_video.shape[0] == 4
    assert res.wave.shape[0] == SR // 2                     # 4 frames at 8 fps = 0.5 s of sound
    assert res.samples[0].z_audio.shape[1] == 48            # 50 mel steps trimmed to whole audio patches (4)


def test_a_manual_clip_geometry(checkpoint):
    """spec={seconds, fps, size}: shapes through the codecs, trimmed to the model's whole temporal patches."""
    from jointdit.sample import SampleRequest, generate, load_session

    session = load_session(checkpoint, device="cpu", spec={"seconds": 0.625, "fps": 8, "size": 16})
    assert session.spec.video_shape == (5, 192, 2, 2) and session.spec.audio_shape[1] == 60   # whole audio patches of 4
    res = generate(session, SampleRequest(steps=1, guidance="none"))
    assert res.frames.shape == (5, 3, 16, 16) and res.wave.shape == (10000,)


def test_timestep_shift_and_iso_weights_follow_the_export(session, monkeypatch):
    """No shift given: the export's rule at this token count; no iso_prob in the export: iso weights off."""
    from jointdit.diffusion.guidance import JointCFG
    from jointdit.diffusion.sampler import sample_latents
    from jointdit.diffusion.schedule import ShiftRule, export_entry
    from jointdit.sample import SampleRequest, generate

    monkeypatch.setitem(session.meta, "timestep_shift", export_entry(ShiftRule(method="constant", shift=3.0), 1, 1))
    res = generate(session, SampleRequest(steps=2, seeds=[1], guidance="none"))
    z_v, z_a = sample_latents(session.model, fx.VIDEO_SHAPE, fx.AUDIO_SHAPE, steps=2, seed=1, guidance=JointCFG(),
                              shift_video=3.0, shift_audio=3.0)
    torch.testing.assert_close(res.samples[0].z_video, z_v[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.samples[0].z_audio, z_a[0], atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="overrides the model's timestep shift"):
        generate(session, SampleRequest(steps=1, guidance="none", shift_video=1.0))
    with pytest.warns(UserWarning, match="not trained with an iso mode"):
        generate(session, SampleRequest(steps=1, guidance="jointcfg"))


# --------------------------------------------------------------------------------------------------
# nothing is overwritten
# --------------------------------------------------------------------------------------------------
def test_no_call_overwrites_an_earlier_one(session, inputs, tmp_path):
    from jointdit.io.outputs import OutputExistsError
    from jointdit.sample import generate

    first = generate(session, _request("joint", inputs, tmp_path, name="take1"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.files}
    other = generate(session, _request("joint", inputs, tmp_path, seeds=[4]))         # default name: a new folder
    assert other.folder != first.folder and other.folder.parent == tmp_path
    with pytest.raises(OutputExistsError, match="take1 already holds samples(.|\n)*overwrite=true"):
        generate(session, _request("joint", inputs, tmp_path, seeds=[4], name="take1"))
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.files} == before   # untouched
    assert sorted(p.name for p in first.folder.iterdir()) == sorted([*(p.name for p in first.files), "request.json"])
    record = json.loads((first.folder / "request.json").read_text())
    assert record["request"]["seeds"] == [3] and record["request"]["task"] == "joint"
    assert record["checkpoint"] == str(session.checkpoint) and record["spec"]["video_shape"] == list(fx.VIDEO_SHAPE)
    again = generate(session, _request("joint", inputs, tmp_path, seeds=[4], name="take1", overwrite=True))
    assert again.folder == first.folder and all(p.exists() for p in again.files)
    assert sorted(os.listdir(tmp_path)) == sorted([first.folder.name, other.folder.name])
    with pytest.raises(ValueError, match="plain folder name"):
        generate(session, _request("joint", inputs, tmp_path, name="../escape"))


def test_cancel_stops_between_steps_and_leaves_nothing(session, inputs, tmp_path):
    from jointdit.sample import SamplingCancelled, generate

    seen = []

    def progress(done, total):
        seen.append((done, total))
        return done == 3

    with pytest.raises(SamplingCancelled):
        generate(session, _request("joint", inputs, tmp_path, seeds=[0, 1], steps=2), progress=progress)
    assert seen == [(1, 4), (2, 4), (3, 4)]     # steps x seeds, counted across seeds
    assert list(tmp_path.iterdir()) == []       # the claimed folder is gone again


# --------------------------------------------------------------------------------------------------
# vid_decode_chunk reaches the video decoder
# --------------------------------------------------------------------------------------------------
def test_vid_decode_chunk_reaches_the_svd_decoder(tmp_path, compose_cfg, monkeypatch, inputs):
    """JOINTDIT_VID_DECODE_CHUNK → vram.vid_decode_chunk → session → SVD temporal decoder (num_frames)."""
    from jointdit.checkpoints import export_model
    from jointdit.codecs import build_codecs
    from jointdit.codecs.svd import SVDVideoCodec
    from jointdit.models import build_model
    from jointdit.sample import SampleRequest, generate, load_session

    spec = importlib.util.spec_from_file_location("codec_fixtures", Path(__file__).parent / "codecs" / "conftest.py")
    codec_fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codec_fx)
    paths = codec_fx.make_tiny_pretrained(tmp_path / "models")
    svd = SVDVideoCodec(paths["svd_vae"], decode_chunk=8, decode_overlap=0, device="cpu")
    video_shape = svd.latent_shape(N_FRAMES, SIZE, SIZE)                               # (8, 4, 16, 16)
    model = build_model("tiny", hidden_size=32, depth=1, num_heads=2, video_in_channels=4, audio_in_channels=1,
                        video_patch_size=(1, 4, 4), video_latent_fps=FPS, audio_latent_fps=100)
    ckpt = export_model(model, tmp_path / "svd_model", _meta(video_shape))
    calls = []
    svd.vae.decoder.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["num_frames"]), with_kwargs=True)

    monkeypatch.setenv("JOINTDIT_VID_DECODE_CHUNK", "3")
    cfg = compose_cfg("sample", [f"checkpoint={ckpt}"])
    assert cfg.vram.vid_decode_chunk == 3
    session = load_session(ckpt, device="cpu", vram=cfg.vram, codec=(svd, build_codecs(fx.CODEC)[1]))
    result = generate(session, SampleRequest(task="joint", steps=1, guidance="none"))
    assert calls == [3, 3, 2]                       # 8 latent frames in nearly equal chunks of at most 3
    assert result.frames.shape == (N_FRAMES, 3, SIZE, SIZE)
    calls.clear()
    session.vid_decode_chunk = 0                    # <= 0: all frames in one decoder call
    generate(session, SampleRequest(task="joint", steps=1, guidance="none"))
    assert calls == [8]


def test_pixel_codec_decodes_in_time_chunks():
    """A codec without its own decode_chunk is split along time; per-frame decoding makes that exact."""
    from jointdit.codecs import PixelVideoCodec
    from jointdit.sample import decode_video

    seen = []

    class Recording(PixelVideoCodec):
        def decode(self, z):
            seen.append(z.shape[1])
            return super().decode(z)

    codec = Recording(factor=8)
    z = torch.randn(2, 7, 192, 4, 4)
    out = decode_video(codec, z, 3)
    assert seen == [3, 3, 1]
    torch.testing.assert_close(out, torch.nn.functional.pixel_shuffle(z.reshape(14, 192, 4, 4), 8).reshape(2, 7, 3, 32, 32))


# --------------------------------------------------------------------------------------------------
# the composed-config path and the entry point
# --------------------------------------------------------------------------------------------------
def test_bad_requests_fail_before_loading(compose_cfg, tmp_path):
    from jointdit.data.media import MediaError
    from jointdit.sample import sample_to_files

    nowhere = tmp_path / "no_model"   # never loaded: the request is checked first
    with pytest.raises(ValueError, match="task=a2v needs `audio=<file>`"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", "task=a2v"]))
    with pytest.raises(MediaError, match="missing.wav: no such file"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", "task=a2v", f"audio={tmp_path}/missing.wav"]))
    with pytest.raises(ValueError, match="task='x2y'; choose one of"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", "task=x2y"]))
    with pytest.raises(ValueError, match="task=extend_v needs seconds_given"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", "task=extend_v", f"video={tmp_path}"]))
    with pytest.raises(ValueError, match="task=inpaint_v needs exactly one of region"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", "task=inpaint_v", f"video={tmp_path}"]))
    (tmp_path / "out" / "take").mkdir(parents=True)
    (tmp_path / "out" / "take" / "old.wav").write_bytes(b"keep")
    with pytest.raises(ValueError, match="take already holds samples"):
        sample_to_files(compose_cfg("sample", [f"checkpoint={nowhere}", f"out_dir={tmp_path / 'out'}", "name=take"]))
    assert (tmp_path / "out" / "take" / "old.wav").read_bytes() == b"keep"


def test_prompt_without_clip_warns(session):
    from jointdit.sample import SampleRequest, generate

    with pytest.warns(UserWarning, match="prompt and negative prompt are ignored"):
        generate(session, SampleRequest(prompt="a dog barking", steps=1, guidance="none"))


def test_outputs_are_logged_to_mlflow(compose_cfg, checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    from jointdit.sample import sample_to_files

    result = sample_to_files(compose_cfg("sample", [f"checkpoint={checkpoint}", f"steps={STEPS}", "seeds=[0,1]",
                                                    "progress=false", "logger=mlflow", "guidance=none"]))
    assert result.folder.parent == tmp_path / "outputs" / "samples"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sample").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "samples")}
    assert len(result.files) == 8 and logged == {f"samples/{p.name}" for p in result.files}  # 2 seeds x 4 files
    assert runs[0].data.params["steps"] == str(STEPS)


def test_reference_can_be_a_cached_clip_id(compose_cfg, checkpoint, tmp_path):
    """i2sv from a clip of the latent cache: its geometry and stored first frame are used."""
    from omegaconf import OmegaConf

    from jointdit.checkpoints import export_model, load_export_meta, load_model
    from jointdit.data.cache import build_cache, cache_dir_for, read_index
    from jointdit.io.conditions import load_image
    from jointdit.sample import SampleRequest, generate, load_session

    meta = load_export_meta(checkpoint)
    data = {"name": "synthetic", "root": str(tmp_path / "synthetic"), "num_clips": 4, "seed": 0, "val_fraction": 0.5,
            "allow_missing_audio": False, **meta["data"]}
    meta["data"] = data
    model_dir = export_model(load_model(checkpoint), tmp_path / "model", meta)
    cache_dir = cache_dir_for(data, meta["codec"], tmp_path / "cache")
    build_cache(OmegaConf.create(data), OmegaConf.create(meta["codec"]), cache_dir, split="val", progress=False,
                log=lambda *_: None)
    row = read_index(cache_dir)[0]
    session = load_session(model_dir, device="cpu", cache_dir=tmp_path / "cache")
    res = generate(session, SampleRequest(task="i2sv", reference=row["id"], steps=1, guidance="none"))
    assert res.frames.shape[0] == row["num_frames"]
    torch.testing.assert_close(res.frames[0], load_image(cache_dir / row["first_frame"], tuple(row["size"])),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"reference='nope' is neither a file nor a clip id in the latent cache"):
        generate(session, SampleRequest(task="i2sv", reference="nope", steps=1))


def test_entry_point_writes_files(checkpoint, tmp_path):
    proc = run_module("jointdit.sample", f"checkpoint={checkpoint}", "task=joint", f"steps={STEPS}", "seeds=[3]",
                      f"paths.root_dir={tmp_path}", f"out_dir={tmp_path / 'out'}", "progress=false", "name=run1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [Path(line) for line in proc.stdout.splitlines() if line.startswith("/")]
    assert printed[0] == tmp_path / "out" / "run1"
    names = sorted(p.name for p in printed[1:])
    assert names == sorted(f"joint_seed003_steps{STEPS}{s}" for s in (".mp4", "_video.mp4", ".wav", ".png"))
    assert all(p.is_file() and p.stat().st_size > 0 for p in printed[1:])
    again = run_module("jointdit.sample", f"checkpoint={checkpoint}", f"steps={STEPS}", f"paths.root_dir={tmp_path}",
                       f"out_dir={tmp_path / 'out'}", "progress=false", "name=run1")
    assert again.returncode == 2 and "already holds samples" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("task", ["t2v", "t2a"])
def test_single_stream_tasks_through_the_entry_point(task, checkpoint, tmp_path):
    """``python -m jointdit.sample task=t2v``: an MP4 with no audio track (and the frames PNG), no WAV;
    ``task=t2a``: a WAV of the clip's length (and the spectrogram PNG), no MP4."""
    from PIL import Image

    proc = run_module("jointdit.sample", f"checkpoint={checkpoint}", f"task={task}", f"steps={STEPS}", "seeds=[2]",
                      f"paths.root_dir={tmp_path}", f"out_dir={tmp_path / 'out'}", "progress=false", "name=one",
                      "guidance=cfg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [Path(line) for line in proc.stdout.splitlines() if line.startswith("/")]
    assert printed[0] == tmp_path / "out" / "one"
    stem = f"{task}_seed002_steps{STEPS}"
    want = {"t2v": [f"{stem}.mp4", f"{stem}.png"], "t2a": [f"{stem}.png", f"{stem}.wav"]}[task]
    assert sorted(p.name for p in printed[1:]) == want
    assert sorted(p.name for p in printed[0].iterdir()) == sorted(want + ["request.json"])
    if task == "t2v":
        probed = _probe(printed[0] / f"{stem}.mp4")
        assert not probed["audio"] and len(probed["frames"]) == N_FRAMES and probed["fps"] == pytest.approx(FPS)
    else:
        wave, sr = sf.read(printed[0] / f"{stem}.wav", dtype="float32")
        assert sr == SR and wave.shape == (N_SAMPLES,) and np.abs(wave).max() > 1e-4
    with Image.open(printed[0] / f"{stem}.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_single_stream_tasks_leave_the_absent_stream_out(session):
    from jointdit.sample import SampleRequest, generate

    video = generate(session, SampleRequest(task="t2v", steps=1, seeds=[4], guidance="none")).samples[0]
    audio = generate(session, SampleRequest(task="t2a", steps=1, seeds=[4], guidance="none")).samples[0]
    assert video.frames.shape == (N_FRAMES, 3, SIZE, SIZE) and video.z_video.shape == fx.VIDEO_SHAPE
    assert video.wave is None and video.z_audio is None and video.files == {}
    assert audio.wave.shape == (N_SAMPLES,) and audio.z_audio.shape == fx.AUDIO_SHAPE
    assert audio.frames is None and audio.z_video is None


def test_an_impossible_memory_budget_is_refused_before_loading(checkpoint, monkeypatch, tmp_path):
    """load_session checks the sampling plan before it loads anything (so jointdit.sample and the UI both do);
    a budget nothing fits in is refused with the planner's message naming what to change."""
    from jointdit import checkpoints
    from jointdit.memory import MemoryPlanError
    from jointdit.sample import load_session

    loaded = []
    real_load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    with pytest.raises(MemoryPlanError, match=r"sampling .* needs an estimated .* available .*vram\.budget_gb"):
        load_session(checkpoint, device="cpu", vram={"budget_gb": 0.001})
    assert loaded == []                                  # refused before the model was read
    load_session(checkpoint, device="cpu", vram={"budget_gb": 8})
    assert len(loaded) == 1
    proc = run_module("jointdit.sample", f"checkpoint={checkpoint}", "vram.budget_gb=0.001", "steps=1",
                      f"paths.root_dir={tmp_path}", f"out_dir={tmp_path / 'out'}", "progress=false")
    assert proc.returncode != 0 and "error: sampling" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_kv_pooling_travels_with_the_export_and_an_override_warns(checkpoint, tmp_path):
    """The K/V pooling knobs change the function the model computes: the sampler uses the export's values
    (jointdit.json attention) over vram's, and an explicit value that differs warns."""
    import json
    import shutil
    import warnings

    from jointdit.sample import load_session

    folder = shutil.copytree(checkpoint, tmp_path / "pooled")
    meta = json.loads((folder / "jointdit.json").read_text())
    meta["attention"] = {"kv_downsample": 2, "kv_pool_space": 2}
    (folder / "jointdit.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following the export never warns
        knobs = load_session(folder, device="cpu", vram={"kv_downsample": 1, "kv_pool_space": 1}).model.knobs
    assert (knobs.kv_downsample, knobs.kv_pool_space) == (2, 2)
    with pytest.warns(UserWarning, match=r"kv_pool_space=1 overrides the kv_pool_space=2 the model was trained with"):
        knobs = load_session(folder, device="cpu", kv_pool_space=1).model.knobs
    assert (knobs.kv_downsample, knobs.kv_pool_space) == (2, 1)
    # an export from before the knobs: the vram values, else 1
    del meta["attention"]
    (folder / "jointdit.json").write_text(json.dumps(meta))
    knobs = load_session(folder, device="cpu", vram={"kv_pool_space": 2}).model.knobs
    assert (knobs.kv_downsample, knobs.kv_pool_space) == (1, 2)
