"""The sampling plan (``memory.sampling_plan`` / ``check_sampling_plan``): read from an export folder without
loading it, counted against models and guidance built here, refused with the knob to change, and never
below the peak a real ``load_session`` + ``generate`` needs (measured in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jointdit  # noqa: F401
from jointdit.memory import MEASURE_PRELUDE, MemoryPlanError, check_sampling_plan, guidance_branches, sampling_plan

FPS, SIZE, SECONDS, SR = 8, 64, 2.0, 16000
PIXEL_MEL = {"name": "pixel_mel"}


def _meta(video_shape, audio_shape, codec=None) -> dict:
    return {"step": 1, "stage": "a", "codec": codec or PIXEL_MEL,
            "latent": {"video_shape": list(video_shape), "audio_shape": list(audio_shape)},
            "data": {"fps": FPS, "size": SIZE, "seconds": SECONDS, "sample_rate": SR}}


def _export(folder: Path, video_shape=(16, 192, 8, 8), audio_shape=(1, 200, 64), codec=None, **model_kw) -> tuple[Path, int]:
    from jointdit.checkpoints import export_model
    from jointdit.models import build_model

    kw = dict(hidden_size=64, depth=2, num_heads=2, video_in_channels=video_shape[1], audio_in_channels=audio_shape[0],
              video_latent_fps=FPS, audio_latent_fps=100.0)
    kw.update(model_kw)
    torch.manual_seed(0)
    model = build_model("tiny", **kw)
    export_model(model, folder, _meta(video_shape, audio_shape, codec))
    return folder, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("plan") / "model")


def test_plan_reads_the_folder_counts_weights_and_rows(export):
    folder, n_params = export
    plan = sampling_plan(folder, device="cpu", branches=2, budget_bytes=64 * 2**30)
    assert plan.weights == 4 * n_params                      # the model as built, fp32
    assert plan.codec_weights == 0 and plan.clip_weights == 0  # pixel_mel, no CLIP in the export
    assert plan.info["frames"] == int(FPS * SECONDS)
    assert plan.fits and plan.planned == int(plan.total * (1 + plan.margin))
    wider = sampling_plan(folder, device="cpu", branches=4, budget_bytes=64 * 2**30)
    assert wider.forward > plan.forward and wider.weights == plan.weights
    batched = sampling_plan(folder, device="cpu", branches=2, batch_size=2, budget_bytes=64 * 2**30)
    # 2 seeds × 2 branches = 4 rows, the model's forward of wider; the second seed adds its own solver latents
    # (noise, state, update, guided sum: 4 fp32 copies of [16, 192, 8, 8] + [1, 200, 64])
    assert batched.forward - wider.forward == 4 * 4 * (16 * 192 * 8 * 8 + 200 * 64)
    short = sampling_plan(folder, device="cpu", branches=2, max_t=4, budget_bytes=64 * 2**30)
    assert short.forward < plan.forward and short.info["frames"] == 4


def test_a_one_stream_task_does_not_plan_the_absent_streams_decode(export):
    """t2v writes no sound and t2a no picture (sample._decode skips them), so neither decode nor media is held
    for the absent stream; load_session(plan_for=…) plans with the request's task."""
    from jointdit.sample import SampleRequest, load_session

    folder, _ = export
    both = sampling_plan(folder, device="cpu", branches=1, budget_bytes=2**40)
    assert sampling_plan(folder, device="cpu", branches=1, budget_bytes=2**40, task="joint").as_dict() == both.as_dict()
    t2v = sampling_plan(folder, device="cpu", branches=1, budget_bytes=2**40, task="t2v")
    t2a = sampling_plan(folder, device="cpu", branches=1, budget_bytes=2**40, task="t2a")
    assert (t2v.decode_audio, t2v.decode_video) == (0, both.decode_video) and both.decode_audio > 0
    assert (t2a.decode_video, t2a.decode_audio) == (0, both.decode_audio)  # (the pixel codec's decode is a reshape)
    frames, pixels, samples = both.info["frames"], SIZE * SIZE * 3, int(SECONDS * SR)
    assert both.media - t2v.media == 2 * 4 * samples                # the fp32 wave and its fitted copy
    assert both.media - t2a.media == 9 * frames * pixels             # fp32 frames ×2 and their uint8 copy
    assert t2v.forward == t2a.forward == both.forward                # the absent stream still rides the forward
    # between t2v's plan and the joint one: the sampler loads for t2v and refuses joint, before loading anything
    budget = (t2v.planned + both.planned) // 2
    assert t2v.planned < budget < both.planned
    knobs = {"budget_gb": budget / 2**30, "margin": both.margin}
    none = {"name": "none"}
    load_session(folder, device="cpu", vram=knobs, plan_for=SampleRequest(task="t2v", guidance=none))
    with pytest.raises(MemoryPlanError, match="codec.audio.decode_batch"):
        load_session(folder, device="cpu", vram=knobs, plan_for=SampleRequest(task="joint", guidance=none))


def test_branch_count_matches_the_guidance_forward():
    """Oracle: the branches JointCFG.branches really builds for a condition with text, negative text and image."""
    from jointdit.diffusion.guidance import build_guidance
    from jointdit.models.conditioning import Condition

    cond = Condition(text_tokens=torch.zeros(1, 4, 8), text_pooled=torch.zeros(1, 8), image=torch.zeros(1, 8))
    neg = Condition(text_tokens=torch.zeros(1, 4, 8), text_pooled=torch.zeros(1, 8))
    for g in ({"name": "none"}, {"name": "cfg", "w_txt": 3.0}, {"name": "cfg", "w_txt": 3.0, "w_img": 1.5, "w_neg": 1.0},
              {"name": "jointcfg", "w_v": 1.0, "w_a": 1.0, "w_txt": 2.0, "allow_untrained_iso": True},
              {"name": "stg", "w_stg": 1.0, "stg_blocks": [0]}):
        guidance = build_guidance(g)
        assert guidance_branches(guidance) == len(guidance.branches(cond, neg, 1)), g
    only_text = build_guidance({"name": "cfg", "w_txt": 3.0, "w_img": 1.5})
    assert guidance_branches(only_text, image=False) == 2 and guidance_branches(5) == 5


def test_a_plan_that_does_not_fit_names_the_knob(export, tmp_path):
    folder, _ = export
    plan = sampling_plan(folder, device="cpu", branches=3, budget_bytes=64 * 2**30)
    assert plan.decode_audio > plan.forward  # on the CPU librosa's Griffin-Lim outweighs this tiny forward
    with pytest.raises(MemoryPlanError, match="codec.audio.decode_batch") as err:
        check_sampling_plan(folder, device="cpu", branches=3, budget_bytes=plan.weights + 1)
    assert "margin" in str(err.value)
    heavy = dict(device="cpu", branches=4, batch_size=32)
    assert sampling_plan(folder, **heavy, budget_bytes=1).forward > plan.decode
    with pytest.raises(MemoryPlanError, match=r"guidance branches in one batch \(now 4:.*batch_size=1 \(now 32\)"):
        check_sampling_plan(folder, **heavy, budget_bytes=plan.planned)
    assert check_sampling_plan(folder, device="cpu", branches=3, budget_bytes=plan.planned).fits
    # the margin is configurable and part of the check
    with pytest.raises(MemoryPlanError):
        check_sampling_plan(folder, device="cpu", branches=3, budget_bytes=plan.total + 1, vram={"margin": 0.5})
    assert check_sampling_plan(folder, device="cpu", branches=3, budget_bytes=plan.total, margin=0.0).fits
    # vram.budget_gb is the budget when no bytes are given
    with pytest.raises(MemoryPlanError):
        check_sampling_plan(folder, device="cpu", vram={"budget_gb": 1e-3})


def test_svd_decode_chunk_drives_the_decode_term(tmp_path):
    """A big clip through the SVD decoder: the decode term grows with vid_decode_chunk and the error names it."""
    sys.path.insert(0, str(Path(__file__).parent / "codecs"))
    from conftest import make_tiny_pretrained  # tests/codecs/conftest.py

    paths = make_tiny_pretrained(tmp_path / "models")
    codec = {"name": "svd_audioldm2", "device": "cpu", "dtype": "float32",
             "video": {"vae_path": str(paths["svd_vae"]), "decode_chunk": 8, "decode_overlap": 2},
             "audio": {"vae_path": str(paths["audio_vae"]), "vocoder_path": str(paths["vocoder"])}}
    folder, _ = _export(tmp_path / "svd_model", video_shape=(16, 4, 8, 8), audio_shape=(8, 50, 16), codec=codec,
                        video_patch_size=(1, 2, 2))
    files = sum(p.stat().st_size for k in ("svd_vae", "audio_vae", "vocoder") for p in Path(paths[k]).glob("*.safetensors"))
    small = sampling_plan(folder, device="cpu", vram={"vid_decode_chunk": 2}, branches=1, budget_bytes=2**40)
    large = sampling_plan(folder, device="cpu", vram={"vid_decode_chunk": 0}, branches=1, budget_bytes=2**40)
    assert small.codec_weights == large.codec_weights == files
    # frames per decoder call: 2 + 2·overlap = 6 vs all 16; the video decode term scales with them
    assert large.decode > small.decode
    budget = small.total + (large.total - small.total) // 2
    with pytest.raises(MemoryPlanError, match=r"vram\.vid_decode_chunk \(now 0\)"):
        check_sampling_plan(folder, device="cpu", vram={"vid_decode_chunk": 0}, branches=1, budget_bytes=budget, margin=0.0)
    assert check_sampling_plan(folder, device="cpu", vram={"vid_decode_chunk": 2}, branches=1, budget_bytes=budget,
                               margin=0.0).fits


_SAMPLE_CHILD = r"""
import json, sys
spec = json.loads(sys.argv[1])
import torch, jointdit
from jointdit.sample import SampleRequest, generate, load_session
""" + MEASURE_PRELUDE + r"""
base = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
session = load_session(spec["folder"], device="cpu")
generate(session, SampleRequest(task=spec["task"], steps=2, guidance=spec["guidance"], seeds=[0]))
print("MEASURE " + json.dumps({"peak": rss("VmHWM") - base}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("task", ["joint", "t2v", "t2a"])
def test_plan_is_never_below_a_measured_sampling_run(tmp_path, task):
    """Held-out oracle: peak RSS of a child that loads the export and samples it (pixel_mel, Griffin-Lim);
    the one-stream tasks, planned without their absent stream's decode, too."""
    folder, _ = _export(tmp_path / "model", hidden_size=128, depth=4, num_heads=4)
    guidance = {"name": "jointcfg", "w_v": 1.0, "w_a": 1.0, "allow_untrained_iso": True}
    guidance = guidance if task == "joint" else {"name": "none"}
    from jointdit.diffusion.guidance import build_guidance

    plan = sampling_plan(folder, device="cpu", branches=build_guidance(guidance), budget_bytes=2**40, task=task)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", _SAMPLE_CHILD, json.dumps({"folder": str(folder), "guidance": guidance, "task": task})],
                         capture_output=True, text=True, env=env, timeout=900)
    line = [x for x in res.stdout.splitlines() if x.startswith("MEASURE ")]
    assert line, res.stderr[-3000:]
    measured = json.loads(line[0][8:])["peak"]
    assert measured <= plan.planned, (measured / 2**20, plan.as_dict())
