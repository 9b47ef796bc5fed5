"""Held-out check of the planner: base estimate (jointdit.memory.estimate_peak) and the full estimate with
the missing terms (jointdit.memory_terms.estimate_training) against measured peaks on CPU.

    .venv/bin/python experiments/bench_memory_terms.py            # measure (one subprocess per set-up) + table
    .venv/bin/python experiments/bench_memory_terms.py --cached   # re-estimate against stored measurements

None of these set-ups was used to calibrate the planner (experiments/bench_memory.py's rows were): they
vary the optimizer (AdamW foreach on/off, Adafactor, 8-bit AdamW where bitsandbytes is installed), the
stage (A, B, LoRA), checkpointing, kv_downsample, lengths, batch sizes and the preview sample. Each runs
in a fresh child with jointdit.memory.measure_peak's protocol (its calibration constant includes
importing diffusers' EMAModel after the baseline): imports + warm-up, baseline VmRSS, VmHWM reset (/proc/self/clear_refs), then the real
pieces — jointdit.lora.add_lora / checkpoints.select_parameters, jointdit.optimizers.build_optimizer,
diffusers EMAModel over the trainable tensors — 2 training steps, and, for "preview", zero_grad(set_to_none)
then a second model copy (what the sampler loads from the export) and a no-grad forward over 3 guidance
branches with the optimizer state and EMA still held. Measured = VmHWM − baseline
(MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS). Writes experiments/results/bench_memory_terms.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import jointdit  # noqa: F401
import torch

from jointdit.memory import MEASURE_PRELUDE, Knobs, crop_shapes, estimate_peak
from jointdit.memory_terms import estimate_training

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2 ** 20
VS, AS = [16, 192, 8, 8], [1, 200, 64]      # pixel_mel 64x64 @ 8 fps, 2 s
VS3, AS3 = [24, 192, 8, 8], [1, 300, 64]    # 3 s
STAGE_B = {"trainable": {"experts": {"patterns": ["blocks.*.video.*", "blocks.*.audio.*"]},
                         "in_out": {"patterns": ["video_in.*", "audio_in.*", "video_out.*", "audio_out.*"]}}}
LORA = {"lora": {"rank": 16}}
# name, preset, video, audio, knobs, stage, optimizer, foreach, preview
SETUPS = [
    ("tiny T16 B4 adamw foreach", "tiny", VS, AS, Knobs(micro_batch_size=4), None, "adamw", True, False),
    ("small T16 B2 adamw foreach", "small", VS, AS, Knobs(micro_batch_size=2), None, "adamw", True, False),
    ("small T24 B3 ckpt kv4 foreach", "small", VS3, AS3, Knobs(micro_batch_size=3, gradient_checkpointing=True,
                                                              kv_downsample=4), None, "adamw", True, False),
    ("small T16 B1 ckpt adamw single-tensor", "small", VS, AS, Knobs(micro_batch_size=1, gradient_checkpointing=True),
     None, "adamw", False, False),
    ("small T16 B2 adafactor", "small", VS, AS, Knobs(micro_batch_size=2), None, "adafactor", None, False),
    ("small T16 B2 stage B foreach", "small", VS, AS, Knobs(micro_batch_size=2), STAGE_B, "adamw", True, False),
    ("small T16 B2 LoRA r16", "small", VS, AS, Knobs(micro_batch_size=2), LORA, "adamw", True, False),
    ("tiny T24 B2 max_t=8 q64", "tiny", VS3, AS3, Knobs(micro_batch_size=2, max_t=8, q_chunk_v=64), None, "adamw", False, False),
    ("small T16 B1 + preview", "small", VS, AS, Knobs(micro_batch_size=1), None, "adamw", True, True),
    ("small T16 B2 adamw8bit", "small", VS, AS, Knobs(micro_batch_size=2), None, "adamw8bit", None, False),
]

CHILD = r"""
import json, sys
spec = json.loads(sys.argv[1])
import torch, jointdit, copy
from jointdit.models import build_model
from jointdit import lora, optimizers, checkpoints
torch.manual_seed(0)
""" + MEASURE_PRELUDE + r"""if spec["optimizer"] == "adafactor":
    import transformers.optimization
if spec["optimizer"] == "adamw8bit":
    import bitsandbytes
if spec["stage"] and spec["stage"].get("lora"):
    lora._peft()
base = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from diffusers.training_utils import EMAModel  # after the baseline, exactly as jointdit.memory.measure_peak
cfg = dict(spec["model"]); preset = cfg.pop("preset")
model = build_model(preset, **cfg)
k = spec["knobs"]
model.set_memory_knobs(q_chunk_v=k["q_chunk_v"], q_chunk_a=k["q_chunk_a"], kv_downsample=k["kv_downsample"],
                       gradient_checkpointing=k["gradient_checkpointing"])
stage = spec["stage"] or {}
if stage.get("lora"):
    lora.add_lora(model, lora.groups_from_config(stage["lora"]))
    groups = [{"params": [p for _, p in lora.lora_parameters(model)]}]
else:
    trainable = stage.get("trainable") or {"all": {"patterns": ["*"]}}
    sel = checkpoints.select_parameters(model, {n: g["patterns"] for n, g in trainable.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for params in sel.values():
        for _, p in params:
            p.requires_grad_(True)
        groups.append({"params": [p for _, p in params]})
opt = optimizers.build_optimizer(spec["optimizer"], groups, lr=1e-4, foreach=spec["foreach"])
trainable = [p for p in model.parameters() if p.requires_grad]
ema = EMAModel(trainable, decay=0.999)
b = spec["batch"]
zv = torch.randn(b, *spec["video_shape"]); za = torch.randn(b, *spec["audio_shape"])
model.train()
for _ in range(2):
    nv, na = torch.randn_like(zv), torch.randn_like(za)
    t = torch.rand(b)
    xv = (1 - t.view(-1, 1, 1, 1, 1)) * zv + t.view(-1, 1, 1, 1, 1) * nv
    xa = (1 - t.view(-1, 1, 1, 1)) * za + t.view(-1, 1, 1, 1) * na
    ov, oa = model(xv, xa, t, t, None, "full")
    loss = ((ov - (nv - zv)) ** 2).mean() + ((oa - (na - za)) ** 2).mean()
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    ema.step(trainable)
    del ov, oa, loss, xv, xa
train_peak = rss("VmHWM") - base
if spec["preview"]:
    copy_model = copy.deepcopy(model).eval()     # the exported copy the sampler loads
    n = spec["branches"]
    with torch.no_grad():
        t = torch.rand(n)
        ov, oa = copy_model(zv[:1].repeat(n, 1, 1, 1, 1), za[:1].repeat(n, 1, 1, 1), t, t, None, "full")
    del ov, oa, copy_model
print("MEASURE " + json.dumps({"peak": rss("VmHWM") - base, "train_peak": train_peak}))
"""


def model_cfg(preset: str, vs, as_) -> dict:
    return dict(preset=preset, video_in_channels=vs[1], audio_in_channels=as_[0], video_latent_fps=8.0,
                audio_latent_fps=100.0)


def measure(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=1800)
    for line in res.stdout.splitlines():
        if line.startswith("MEASURE "):
            return json.loads(line[8:])
    raise RuntimeError(f"child failed (rc={res.returncode}):\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cached", action="store_true")
    ap.add_argument("--only", default=None, help="substring of set-up names to run")
    a = ap.parse_args()
    raw_path = RESULTS / "bench_memory_terms.json"
    cache = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    rows = []
    for name, preset, vs, as_, kn, stage, optimizer, foreach, preview in SETUPS:
        if a.only and a.only not in name:
            continue
        if optimizer == "adamw8bit" and not has_bnb and name not in cache:
            print(f"skip {name}: bitsandbytes not installed (pip install 'jointdit[lowmem]')", file=sys.stderr)
            continue
        mc = model_cfg(preset, vs, as_)
        cv, ca = crop_shapes(vs, as_, kn.max_t, 8.0, 100.0)
        if name not in cache or not a.cached:
            spec = {"model": mc, "video_shape": cv, "audio_shape": ca, "knobs": asdict(kn), "batch": kn.micro_batch_size,
                    "stage": stage, "optimizer": optimizer, "foreach": foreach, "preview": preview, "branches": 3}
            cache[name] = measure(spec)
            print(name, round(cache[name]["peak"] / MiB, 1), file=sys.stderr)
            RESULTS.mkdir(exist_ok=True)
            raw_path.write_text(json.dumps(cache, indent=1))
        meas = cache[name]["peak"]
        base = estimate_peak(mc, vs, as_, kn, training=True).total
        full = estimate_training(mc, vs, as_, kn, stage=stage, optimizer=optimizer, foreach=foreach, preview=preview,
                                 preview_branches=3)
        rows.append((name, full.info["trainable"] / 1e6, base / MiB, full.total / MiB, meas / MiB,
                     (base - meas) / meas, (full.total - meas) / meas))
    lines = [
        "# Memory planner on held-out set-ups: base estimate vs full estimate (memory_terms) vs measured",
        "",
        f"Command: `.venv/bin/python experiments/bench_memory_terms.py` (host: {platform.machine()}, torch "
        f"{torch.__version__}, CPU fp32, {os.cpu_count()} cores). Re-estimate only: `--cached`.",
        "",
        "Base = `jointdit.memory.estimate_peak` (full AdamW state for all parameters, max(grads, activations), no "
        "optimizer transient, no preview). Full = `jointdit.memory_terms.estimate_training` (optimizer state and "
        "step transient per optimizer and `foreach`, trainable set per stage, grads + activations under "
        "checkpointing, preview copy + sampling forward). None of these rows was used to fit any constant.",
        "",
        "| set-up | trainable (M) | base MiB | full MiB | measured MiB | base error | full error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tr, base, full, meas, eb, ef in rows:
        lines.append(f"| {name} | {tr:.2f} | {base:.1f} | {full:.1f} | {meas:.1f} | {eb:+.1%} | {ef:+.1%} |")
    if rows:
        errs = [r[6] for r in rows]
        lines += ["", f"Full estimate: worst under-estimate {min(errs):+.1%}, worst over-estimate {max(errs):+.1%}, "
                  f"mean |error| {sum(abs(e) for e in errs) / len(errs):.1%} over {len(rows)} set-ups; base estimate "
                  f"under-estimated {sum(r[5] < 0 for r in rows)} of {len(rows)}."]
    (RESULTS / "bench_memory_terms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
