"""The planner's one estimate (jointdit.memory.estimate_peak) against measured peaks on this machine, on two
separate sets of set-ups: CALIBRATION rows (the only ones the fitted constants memory_terms.BACKWARD_WORKING
and RUNTIME were read from) and HELD-OUT rows (never used to fit anything: other presets, lengths, batch sizes,
knob mixes, foreach on/off, Adafactor / 8-bit AdamW, Stage B, LoRA, per-block checkpointing, int8 frozen
weights, mixed attention modes, the preview sample).

    .venv/bin/python experiments/bench_memory_terms.py            # measure (one subprocess per set-up) + table
    .venv/bin/python experiments/bench_memory_terms.py --cached   # re-estimate against stored measurements
    .venv/bin/python experiments/bench_memory_terms.py --only LoRA

Each row runs in a fresh child (jointdit.memory.measure_peak): the trainer's imports and a warm-up, baseline
VmRSS, VmHWM reset (/proc/self/clear_refs), then the real pieces — lora.add_lora / checkpoints.select_parameters,
blockwise.apply_block_memory, quantize.quantize_frozen, optimizers.build_optimizer, diffusers EMAModel over the
trainable tensors, gradient clipping — 2 training steps, and for "preview" an exported copy sampled over 3
batched rows with everything still held. Measured = VmHWM − baseline (MALLOC_MMAP_THRESHOLD_=65536 so freed
tensors leave RSS). Error = (estimate − measured) / measured; "fits" = measured <= estimate · (1 + margin).
Writes experiments/results/bench_memory_terms.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import jointdit  # noqa: F401
import torch

from jointdit.memory import DEFAULT_MARGIN, Knobs, crop_shapes, estimate_peak, measure_peak

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2 ** 20
VS, AS = [16, 192, 8, 8], [1, 200, 64]      # pixel_mel 64x64 @ 8 fps, 2 s
VS3, AS3 = [24, 192, 8, 8], [1, 300, 64]    # 3 s
VS4, AS4 = [32, 192, 8, 8], [1, 400, 64]    # 4 s
STAGE_B = {"trainable": {"experts": {"patterns": ["blocks.*.video.*", "blocks.*.audio.*"]},
                         "in_out": {"patterns": ["video_in.*", "audio_in.*", "video_out.*", "audio_out.*"]}}}
LORA = {"lora": {"rank": 16}}
MIXED = ["full", "iso_v", "iso_a", "iso"]

# (set, name, preset, video, audio, knobs, options): options are estimate_peak / measure_peak keywords
SETUPS = [
    ("calibration", "tiny T16 B1", "tiny", VS, AS, Knobs(micro_batch_size=1), {}),
    ("calibration", "tiny T16 B4", "tiny", VS, AS, Knobs(micro_batch_size=4), {}),
    ("calibration", "tiny T16 B8", "tiny", VS, AS, Knobs(micro_batch_size=8), {}),
    ("held-out", "tiny T16 B4 adamw foreach", "tiny", VS, AS, Knobs(micro_batch_size=4), {"foreach": True}),
    ("held-out", "small T16 B2 adamw foreach", "small", VS, AS, Knobs(micro_batch_size=2), {"foreach": True}),
    ("held-out", "small T24 B3 ckpt kv4 foreach", "small", VS3, AS3,
     Knobs(micro_batch_size=3, gradient_checkpointing=True, kv_downsample=4), {"foreach": True}),
    ("held-out", "small T16 B1 ckpt single-tensor", "small", VS, AS,
     Knobs(micro_batch_size=1, gradient_checkpointing=True), {"foreach": False}),
    ("held-out", "small T32 B2 checkpoint_blocks=4", "small", VS4, AS4, Knobs(micro_batch_size=2, checkpoint_blocks=4),
     {}),
    ("held-out", "small T16 B2 adafactor", "small", VS, AS, Knobs(micro_batch_size=2), {"optimizer": "adafactor"}),
    ("held-out", "small T16 B2 stage B foreach", "small", VS, AS, Knobs(micro_batch_size=2),
     {"stage": STAGE_B, "foreach": True}),
    ("held-out", "small T16 B2 LoRA r16", "small", VS, AS, Knobs(micro_batch_size=2), {"stage": LORA}),
    ("held-out", "small T16 B2 LoRA r16 int8 frozen", "small", VS, AS, Knobs(micro_batch_size=2),
     {"stage": LORA, "quantize_frozen": "int8"}),
    ("held-out", "tiny T24 B2 max_t=8 q64", "tiny", VS3, AS3, Knobs(micro_batch_size=2, max_t=8, q_chunk_v=64), {}),
    ("held-out", "tiny T16 B4 mixed modes", "tiny", VS, AS, Knobs(micro_batch_size=4), {"modes": MIXED}),
    ("held-out", "small T16 B1 + preview", "small", VS, AS, Knobs(micro_batch_size=1),
     {"foreach": True, "preview_branches": 3}),
    ("held-out", "small T16 B2 adamw8bit", "small", VS, AS, Knobs(micro_batch_size=2), {"optimizer": "adamw8bit"}),
]


def model_cfg(preset: str, vs, as_) -> dict:
    return dict(preset=preset, video_in_channels=vs[1], audio_in_channels=as_[0], video_latent_fps=8.0,
                audio_latent_fps=100.0)


def estimate(mc: dict, vs, as_, kn: Knobs, options: dict):
    """The planner's estimate for a row: measure_peak's options mapped onto estimate_peak's."""
    from jointdit.memory import PreviewTerms

    opts = dict(options)
    modes = opts.pop("modes", "full")
    branches = opts.pop("preview_branches", 0)
    return estimate_peak(mc, vs, as_, kn, mixed_modes=not isinstance(modes, str),
                         preview=PreviewTerms(branches=branches, media=0) if branches else None, **opts)


def needs(options: dict) -> str | None:
    """The missing library a row needs, or None."""
    if options.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes (pip install 'jointdit[lowmem]')"
    if options.get("quantize_frozen") and importlib.util.find_spec("optimum") is None:
        return "optimum-quanto (pip install 'jointdit[quant]')"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cached", action="store_true")
    ap.add_argument("--only", default=None, help="substring of set-up names to run")
    a = ap.parse_args()
    raw_path = RESULTS / "bench_memory_terms.json"
    cache = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    rows = []
    for group, name, preset, vs, as_, kn, options in SETUPS:
        if a.only and a.only not in name:
            continue
        missing = needs(options)
        if missing and name not in cache:
            print(f"skip {name}: needs {missing}", file=sys.stderr)
            continue
        mc = model_cfg(preset, vs, as_)
        if name not in cache or not a.cached:
            cv, ca = crop_shapes(vs, as_, kn.max_t, 8.0, 100.0)
            cache[name] = measure_peak(mc, cv, ca, kn, **options)
            print(name, round(cache[name] / MiB, 1), file=sys.stderr, flush=True)
            RESULTS.mkdir(exist_ok=True)
            tmp = raw_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(raw_path)
        est = estimate(mc, vs, as_, kn, options)
        meas = cache[name]
        rows.append((group, name, est.info.get("trainable", 0) / 1e6, est.total / MiB, meas / MiB,
                     (est.total - meas) / meas, meas <= est.planned(DEFAULT_MARGIN)))
    lines = [
        "# Memory planner: the one estimate against measured peaks (calibration and held-out set-ups)",
        "",
        f"Command: `.venv/bin/python experiments/bench_memory_terms.py` (host: {platform.machine()}, torch "
        f"{torch.__version__}, CPU fp32, {os.cpu_count()} cores, shared). Re-estimate only: `--cached`.",
        "",
        "Estimate = `jointdit.memory.estimate_peak` (saved activations per block as autograd keeps them, the backward "
        "simulated block by block, optimizer state and step transient per optimizer and `foreach`, EMA, the stage's "
        "trainable set, int8 frozen weights, the preview copy). Measured = `jointdit.memory.measure_peak` (child "
        "process, VmHWM above the baseline taken after the trainer's imports). The fitted constants "
        "(`memory_terms.BACKWARD_WORKING`, `RUNTIME`) were read from the **calibration** rows only; the **held-out** "
        f"rows fitted nothing. fits = measured <= estimate x (1 + {DEFAULT_MARGIN}) (`vram.margin`).",
        "",
        "| set | set-up | trainable (M) | estimate MiB | measured MiB | error | fits with margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, name, tr, est, meas, err, fits in rows:
        lines.append(f"| {group} | {name} | {tr:.2f} | {est:.1f} | {meas:.1f} | {err:+.1%} | {'yes' if fits else 'NO'} |")
    held = [r for r in rows if r[0] == "held-out"]
    if held:
        errs = [r[5] for r in held]
        lines += ["", f"Held-out ({len(held)} set-ups): worst under-estimate {min(errs):+.1%}, worst over-estimate "
                  f"{max(errs):+.1%}, mean |error| {sum(abs(e) for e in errs) / len(errs):.1%}; within ±10%: "
                  f"{sum(abs(e) <= 0.10 for e in errs)} of {len(held)}; fits with the margin: "
                  f"{sum(r[6] for r in held)} of {len(held)}."]
    (RESULTS / "bench_memory_terms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
