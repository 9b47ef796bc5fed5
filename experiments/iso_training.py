"""Does training with iso modes give JointCFG a usable iso branch, and what does it cost the full model?

    PYTHONPATH=. .venv/bin/python experiments/iso_training.py [--steps 400] [--iso-probs 0 0.1 0.2 0.4]
                                                             [--pairing independent synced] [--seed 0]

A tiny JointDiT (width 64, depth 2) is trained from scratch on toy latents with ``make_flow_batch`` (joint
task, flow loss, AdamW 1e-3) once per ``iso_prob``; everything else is equal (seed, data order, noise).
Each model is then scored on a fixed held-out draw (64 samples, fixed t and noise, joint task):

  full   velocity loss in mode ``full``
  iso    velocity loss in mode ``iso`` (each modality alone)
  guided velocity loss of JointCFG's iso guidance alone: pos + w·(pos − iso), w = 1.2 (the default w_v = w_a)

Toy latents: video [8, 12, 4, 4] (8 frames, 12 channels), audio [1, 32, 16] (32 steps, 16 bands), one event
per clip: a bright blob in frame k and a band burst at audio step 4k, plus clip-specific texture.
  independent  video and audio of a training pair are drawn independently, so the true iso velocity EQUALS
               the full one: a trained iso branch should score like full, and guidance should cost nothing.
  synced       each video comes with its own audio (event at the same time), so full can use the other
               modality and iso cannot; the gap full < iso is what guidance extrapolates along.

Writes experiments/results/iso_training.md (table) and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import jointdit  # noqa: F401
from jointdit.diffusion.flow import flow_loss, make_flow_batch
from jointdit.diffusion.guidance import JointCFG
from jointdit.models import build_model

VIDEO, AUDIO = (8, 12, 4, 4), (1, 32, 16)
CLIPS, BATCH, EVAL = 32, 8, 64
W = 1.2


def toy_clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips with one audio-visual event each (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    video = 0.3 * torch.randn(n, *VIDEO, generator=g)
    audio = 0.3 * torch.randn(n, *AUDIO, generator=g)
    frames = torch.randint(0, VIDEO[0], (n,), generator=g)
    for i, k in enumerate(frames.tolist()):
        video[i, k] += 1.5                       # the flash: every channel and pixel of frame k
        audio[i, 0, 4 * k:4 * k + 4] += 1.5      # the sound: 4 audio steps from step 4k
    return video, audio


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return build_model("tiny", hidden_size=64, depth=2, num_heads=4, video_in_channels=VIDEO[1],
                       audio_in_channels=AUDIO[0], video_patch_size=(1, 2, 2), audio_patch_size=(4, 16),
                       video_latent_fps=8.0, audio_latent_fps=32.0)


def train(iso_prob: float, pairing: str, steps: int, seed: int, clips) -> torch.nn.Module:
    video, audio = clips
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        vi = torch.randint(0, CLIPS, (BATCH,), generator=g)
        ai = torch.randint(0, CLIPS, (BATCH,), generator=g) if pairing == "independent" else vi
        flow = make_flow_batch(video[vi], audio[ai], torch.zeros(BATCH, dtype=torch.long), generator=g,
                               iso_prob=iso_prob)
        pv, pa = model(flow.video, flow.audio, flow.t_video, flow.t_audio, None, flow.modes)
        loss = flow_loss(pv, pa, flow)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def score(model, pairing: str, seed: int, clips) -> dict[str, float]:
    video, audio = clips
    g = torch.Generator().manual_seed(seed + 99)
    vi = torch.randint(0, CLIPS, (EVAL,), generator=g)
    ai = torch.randint(0, CLIPS, (EVAL,), generator=g) if pairing == "independent" else vi
    flow = make_flow_batch(video[vi], audio[ai], torch.zeros(EVAL, dtype=torch.long), generator=g)
    full = model(flow.video, flow.audio, flow.t_video, flow.t_audio, None, "full")
    iso = model(flow.video, flow.audio, flow.t_video, flow.t_audio, None, "iso")
    guided = JointCFG(w_v=W, w_a=W)(model, flow.video, flow.audio, flow.t_video, flow.t_audio, None)
    out = {}
    for name, (pv, pa) in (("full", full), ("iso", iso), ("guided", guided)):
        losses = flow_loss(pv, pa, flow)
        out[f"{name}_video"], out[f"{name}_audio"] = float(losses["loss_video"]), float(losses["loss_audio"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--iso-probs", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--pairing", nargs="+", default=["independent", "synced"], choices=["independent", "synced"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "iso_training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clips = toy_clips(CLIPS, args.seed)
    rows = []
    for pairing in args.pairing:
        for p in args.iso_probs:
            start = time.perf_counter()
            model = train(p, pairing, args.steps, args.seed, clips)
            row = {"pairing": pairing, "iso_prob": p, **score(model, pairing, args.seed, clips),
                   "train_s": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "rows": rows}, indent=1))
    lines = [f"# iso-mode training: full / iso / guided (w = {W}) velocity loss, video · audio",
             "", f"`PYTHONPATH=. .venv/bin/python experiments/iso_training.py --steps {args.steps} "
             f"--iso-probs {' '.join(str(p) for p in args.iso_probs)} --seed {args.seed}` "
             f"(tiny JointDiT width 64 depth 2, {CLIPS} toy clips, batch {BATCH}, AdamW 1e-3; "
             f"held-out draw of {EVAL} joint samples with fixed t and noise).", "",
             "| pairing | iso_prob | full video | full audio | iso video | iso audio | guided video | guided audio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pairing']} | {r['iso_prob']} | {r['full_video']:.3f} | {r['full_audio']:.3f} | "
                     f"{r['iso_video']:.3f} | {r['iso_audio']:.3f} | {r['guided_video']:.3f} | {r['guided_audio']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
