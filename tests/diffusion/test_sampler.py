"""The sampler end to end: every task through ``python -m jointdit.sample`` on a tiny trained checkpoint."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import av
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import AUDIO_SHAPE, CODEC, FPS, SECONDS, SIZE, SR, VIDEO_SHAPE  # noqa: E402

from helpers import run_module  # noqa: E402

STEPS = 4
N_FRAMES, N_SAMPLES = int(FPS * SECONDS), int(SR * SECONDS)


def _clip(seed: int = 0):
    """A moving colour square (frames [T,3,32,32]) with a 440 Hz tone."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.full((N_FRAMES, 3, SIZE, SIZE), -0.6)
    for t in range(N_FRAMES):
        frames[t, :, 8:20, 2 + 3 * t: 14 + 3 * t] = torch.tensor([0.8, -0.2, 0.3])[:, None, None]
    frames += 0.05 * torch.randn(frames.shape, generator=g)
    wave = 0.4 * torch.sin(2 * math.pi * 440 * torch.arange(N_SAMPLES) / SR)
    return frames.clamp(-1, 1), wave


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from jointdit.data.media import write_mp4, write_wav

    root = tmp_path_factory.mktemp("inputs")
    frames, wave = _clip()
    return {"mp4": write_mp4(root / "ref.mp4", frames, FPS, wave, SR), "wav": write_wav(root / "tone.wav", wave, SR)}


TASK_ARGS = {"joint": [], "i2sv": ["reference={mp4}"], "a2v": ["audio={wav}"], "v2a": ["video={mp4}"]}


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        out = {"audio": bool(c.streams.audio)}
        v = c.streams.video[0]
        out["fps"] = float(v.average_rate)
        out["frames"] = sum(1 for _ in c.decode(video=0))
    if out["audio"]:
        with av.open(str(path)) as c:
            out["audio_seconds"] = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate
    return out


@pytest.mark.parametrize("task", ["joint", "i2sv", "a2v", "v2a"])
def test_entry_point_writes_files(task, tiny_checkpoint, inputs, tmp_path):
    from jointdit.data.media import read_wav

    args = [a.format(**inputs) for a in TASK_ARGS[task]]
    proc = run_module("jointdit.sample", f"checkpoint={tiny_checkpoint}", f"task={task}", f"steps={STEPS}",
                      "seeds=[3]", f"paths.root_dir={tmp_path}", f"out_dir={tmp_path / 'out'}", "progress=false",
                      *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = tmp_path / "out" / f"{task}_seed003_steps{STEPS}"
    files = {"mp4": base.with_suffix(".mp4"), "video": base.with_name(base.name + "_video.mp4"),
             "wav": base.with_suffix(".wav"), "png": base.with_suffix(".png")}
    for name, path in files.items():
        assert path.is_file() and path.stat().st_size > 0, f"missing {name}: {path}\n{proc.stderr[-2000:]}"
    muxed, video_only = _probe(files["mp4"]), _probe(files["video"])
    assert muxed["frames"] == N_FRAMES and video_only["frames"] == N_FRAMES
    assert muxed["fps"] == pytest.approx(FPS) and video_only["fps"] == pytest.approx(FPS)
    assert muxed["audio"] and not video_only["audio"]
    assert muxed["audio_seconds"] == pytest.approx(SECONDS, abs=0.07)  # AAC frames of 1024 samples
    wave, sr = read_wav(files["wav"])
    assert sr == SR and wave.shape[0] == N_SAMPLES
    from PIL import Image

    with Image.open(files["png"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def _sample(compose_cfg, tiny_checkpoint, tmp_path, *overrides):
    from jointdit.diffusion.sampler import sample_to_files

    cfg = compose_cfg("sample", [f"checkpoint={tiny_checkpoint}", f"steps={STEPS}", "seeds=[0]", "progress=false",
                                 f"out_dir={tmp_path / 'out'}", *overrides])
    return sample_to_files(cfg)


def test_a2v_keeps_the_input_audio(compose_cfg, tiny_checkpoint, inputs, tmp_path):
    from jointdit.codecs import build_codecs
    from jointdit.data.media import read_wav

    (res,) = _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=a2v", f"audio={inputs['wav']}")
    _, audio_codec = build_codecs(CODEC)
    wave, _ = read_wav(inputs["wav"], SR)
    z = audio_codec.encode(wave[None])
    assert tuple(z.shape[1:]) == AUDIO_SHAPE
    expected = audio_codec.decode(z)[0, :N_SAMPLES].clamp(-1, 1)
    torch.testing.assert_close(res.wave, expected, atol=1e-5, rtol=0)
    written, _ = read_wav(res.files["wav"])
    torch.testing.assert_close(written, expected, atol=2 / 32768, rtol=0)  # 16-bit PCM


def test_v2a_keeps_the_input_video(compose_cfg, tiny_checkpoint, inputs, tmp_path):
    from jointdit.codecs import build_codecs
    from jointdit.data.media import read_clip

    (res,) = _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=v2a", f"video={inputs['mp4']}")
    video_codec, _ = build_codecs(CODEC)
    frames = read_clip(inputs["mp4"], fps=FPS, size=SIZE, seconds=SECONDS, sample_rate=SR).frames
    z = video_codec.encode(frames[None])
    assert tuple(z.shape[1:]) == VIDEO_SHAPE
    torch.testing.assert_close(res.frames, video_codec.decode(z)[0].clamp(-1, 1), atol=1e-6, rtol=0)


def test_i2sv_keeps_the_first_frame(compose_cfg, tiny_checkpoint, inputs, tmp_path):
    from jointdit.data.media import read_clip

    (res,) = _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=i2sv", f"reference={inputs['mp4']}")
    first = read_clip(inputs["mp4"], fps=FPS, size=SIZE, seconds=1 / FPS, sample_rate=SR).frames[0]
    torch.testing.assert_close(res.frames[0], first, atol=1e-6, rtol=0)
    assert (res.frames[1:] - first).abs().mean() > 1e-3  # the rest is generated


@torch.inference_mode()
def test_same_seed_same_output(tiny_loaded):
    from jointdit.diffusion.guidance import JointCFG
    from jointdit.diffusion.sampler import sample_latents

    g = JointCFG(w_v=1.0, w_a=1.0)
    a = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=11, guidance=g)
    b = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=11, guidance=g)
    c = sample_latents(tiny_loaded, VIDEO_SHAPE, AUDIO_SHAPE, steps=3, seed=12, guidance=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0] - c[0]).abs().max() > 1e-2 and (a[1] - c[1]).abs().max() > 1e-2


def test_same_seed_same_files(compose_cfg, tiny_checkpoint, tmp_path):
    r1 = _sample(compose_cfg, tiny_checkpoint, tmp_path / "a", "task=joint", "guidance=cfg")[0]
    r2 = _sample(compose_cfg, tiny_checkpoint, tmp_path / "b", "task=joint", "guidance=cfg")[0]
    assert torch.equal(r1.frames, r2.frames) and torch.equal(r1.wave, r2.wave)
    assert r1.files["wav"].read_bytes() == r2.files["wav"].read_bytes()


def test_missing_conditioning_input_is_named(compose_cfg, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="a2v needs `audio="):
        _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=a2v")


def test_prompt_without_clip_warns(compose_cfg, tiny_checkpoint, tmp_path):
    with pytest.warns(UserWarning, match="prompt and negative prompt are ignored"):
        _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=joint", "prompt=a dog barking", "steps=1")


def test_outputs_are_logged_to_mlflow_when_a_logger_is_given(compose_cfg, tiny_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    results = _sample(compose_cfg, tiny_checkpoint, tmp_path, "task=joint", "logger=mlflow", "seeds=[0,1]")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sample").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "samples")}
    expected = {f"samples/{path.name}" for result in results for path in result.files.values()}
    assert len(expected) == 8 and logged == expected  # 2 seeds x (MP4, video MP4, WAV, PNG)
    assert runs[0].data.params["steps"] == str(STEPS)


def test_reference_can_be_a_cached_clip_id(compose_cfg, tiny_checkpoint, tmp_path):
    """i2sv from a clip of the latent cache: its shapes and stored first frame are used."""
    from jointdit.checkpoints import export_model, load_export_meta, load_model
    from jointdit.data.cache import build_cache, cache_dir_for, read_index
    from jointdit.diffusion.sampler import load_image
    from omegaconf import OmegaConf

    meta = load_export_meta(tiny_checkpoint)
    data = {"name": "synthetic", "root": str(tmp_path / "synthetic"), "num_clips": 4, "seed": 0, "val_fraction": 0.5,
            "allow_missing_audio": False, **meta["data"]}
    meta["data"] = data
    checkpoint = export_model(load_model(tiny_checkpoint), tmp_path / "model", meta)
    cache_dir = cache_dir_for(data, meta["codec"], tmp_path / "data" / "cache")  # paths.cache_dir under root_dir
    build_cache(OmegaConf.create(data), OmegaConf.create(meta["codec"]), cache_dir, split="val", progress=False,
                log=lambda *_: None)
    row = read_index(cache_dir)[0]
    (res,) = _sample(compose_cfg, checkpoint, tmp_path, "task=i2sv", f"reference={row['id']}")
    assert res.frames.shape[0] == row["num_frames"]
    expected = load_image(cache_dir / row["first_frame"], tuple(row["size"]))
    torch.testing.assert_close(res.frames[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"reference='nope' is neither a file nor a clip id in the latent cache"):
        _sample(compose_cfg, checkpoint, tmp_path, "task=i2sv", "reference=nope")
