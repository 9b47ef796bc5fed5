"""Mutation check: re-apply realistic bugs to the method code, one at a time, and show a test catches each.

    .venv/bin/python experiments/mutations.py [--only NAME ...] [--list]

Each mutation is an exact text replacement in one source file. For every mutation the repository's
``jointdit/``, ``tests/``, ``conf/`` and ``pyproject.toml`` are copied to a temporary folder, the
replacement is applied there (it must match exactly once, so a stale mutation fails loudly instead of
silently testing nothing), and the listed test files run against the copy with ``pytest -x``. A mutation
is CAUGHT when pytest fails. The working tree is never modified.

Writes experiments/results/mutations.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOW, GUIDE, MODEL, ROPE = ("jointdit/diffusion/flow.py", "jointdit/diffusion/guidance.py",
                            "jointdit/models/jointdit.py", "jointdit/models/rope.py")
SCHED, MASKS = "jointdit/diffusion/schedule.py", "jointdit/diffusion/masks.py"
T_OBJ = "tests/diffusion/test_objective.py"
T_FLOW, T_GUIDE, T_SCHED = "tests/diffusion/test_flow.py", "tests/diffusion/test_guidance.py", "tests/diffusion/test_schedule.py"
T_TIMES, T_ROPE = "tests/models/test_times_and_skip.py", "tests/models/test_rope.py"


@dataclass
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # the list
    Mutation("velocity_sign", "target x0 − ε instead of ε − x0", FLOW,
             "target_video=noise_video - video,\n        target_audio=noise_audio - audio,",
             "target_video=video - noise_video,\n        target_audio=audio - noise_audio,", (T_FLOW,)),
    Mutation("drop_w_a", "audio iso term dropped", GUIDE,
             '                if branch == "iso":\n',
             '                if branch == "iso" and m == 1:\n                    continue\n                if branch == "iso":\n',
             (T_GUIDE,)),
    Mutation("swap_iso_weights", "w_v used for audio and w_a for video", GUIDE,
             'self.weights: dict[str, tuple[float, float]] = {"iso": (float(w_v), float(w_a))}',
             'self.weights: dict[str, tuple[float, float]] = {"iso": (float(w_a), float(w_v))}', (T_GUIDE,)),
    Mutation("flip_text_sign", "+w_txt·(no_text − pos)", GUIDE,
             "                g = g + w * (pos[m] - other)\n",
             "                g = g + (-w if branch == 'no_text' else w) * (pos[m] - other)\n", (T_GUIDE,)),
    Mutation("flip_neg_sign", "+w_neg·(neg − pos)", GUIDE,
             "                g = g + w * (pos[m] - other)\n",
             "                g = g + (-w if branch == 'neg_text' else w) * (pos[m] - other)\n", (T_GUIDE,)),
    Mutation("flip_image_sign", "+w_img·(no_image − pos)", GUIDE,
             "                g = g + w * (pos[m] - other)\n",
             "                g = g + (-w if branch == 'no_image' else w) * (pos[m] - other)\n", (T_GUIDE,)),
    # this issue's own changes
    Mutation("neg_alone_null", "negative prompt without a prompt gets the null condition (the old bug)", GUIDE,
             "        if all(c is None for c in conds):",
             "        if conds[0] is None:", (T_GUIDE,)),
    Mutation("iso_not_zeroed", "build_guidance keeps w_v/w_a for a model never trained with iso", GUIDE,
             '    if guidance.active("iso") and not bool(get("allow_untrained_iso", False)):',
             '    if False:', (T_GUIDE,)),
    Mutation("per_modality_ignored", "w_txt_a ignored (shared w_txt used)", GUIDE,
             "            return (float(shared if v is None else v), float(shared if a is None else a))",
             "            return (float(shared if v is None else v), float(shared if v is None else v))", (T_GUIDE,)),
    Mutation("rescale_wrong_reference", "CFG rescale towards the guided std instead of pos's", GUIDE,
             "g = rescale_noise_cfg(g, pos[m], self.rescale[m])",
             "g = rescale_noise_cfg(g, g, self.rescale[m])", (T_GUIDE,)),
    Mutation("stg_skip_ignored", "skip_attention_blocks has no effect", MODEL,
             "            gv1, ga1 = gv1 * keep, ga1 * keep\n", "            pass\n", (T_TIMES,)),
    Mutation("stg_skips_mlp", "STG drops the MLP residual instead of attention", MODEL,
             "            gv1, ga1 = gv1 * keep, ga1 * keep\n", "            gv2, ga2 = gv2 * keep, ga2 * keep\n",
             (T_TIMES,)),
    Mutation("times_ignored", "the model ignores video_times/audio_times", MODEL,
             "        if times is None:\n            return self._rope(kind, grid, device, dtype)",
             "        if True:\n            return self._rope(kind, grid, device, dtype)", (T_TIMES,)),
    Mutation("half_frame_offset", "video latent k placed at (k + 1/2)/fps (the old origin)", ROPE,
             "        t = self._default_times(grid_t, self.video_dt, self.video_steps) if times is None",
             "        t = 0.5 * self.video_dt + self._default_times(grid_t, self.video_dt, self.video_steps) if times is None",
             (T_TIMES,)),
    Mutation("i2sv_frame_counted", "given latents (i2sv's clean first frame) still carry loss", MASKS,
             "        w_v = (~self.video & self.video_present[:, None, None, None]).float()",
             "        w_v = (self.video_present[:, None, None, None].expand_as(self.video)).float()", (T_FLOW,)),
    Mutation("a2v_audio_noised", "given audio (a2v) not held clean at t = 0", MASKS,
             "        t_a[self.audio] = 0.0\n", "        pass\n", (T_FLOW,)),
    Mutation("shared_t", "video and audio share one t", FLOW,
             "    t_audio = sample_t(b, mean + math.log(shift_audio), std, generator)  # [B]",
             "    t_audio = t_video.clone()  # [B]", (T_FLOW,)),
    Mutation("modes_never_drawn", "iso_prob ignored: every sample full", FLOW,
             "    modes = mask.attention_modes(sample_modes(iso_prob, b, generator))",
             "    modes = mask.attention_modes(['full'] * b)", (T_FLOW,)),
    Mutation("shift_sign", "timestep shift applied as −ln s", FLOW,
             "t_video = sample_t(b, mean + math.log(shift_video), std, generator)",
             "t_video = sample_t(b, mean - math.log(shift_video), std, generator)", (T_FLOW,)),
    Mutation("t2v_not_isolated", "t2v's video still sees the absent audio", MASKS,
             '_SEES = {"t2v": (False, True), "t2a": (True, False)}', "_SEES = {}", (T_OBJ,)),
    Mutation("absent_stream_noised", "t2v's absent audio gets the sampled t instead of t = 1", MASKS,
             "        t_a[~self.audio_present] = 1.0\n", "        pass\n", (T_OBJ,)),
    Mutation("sd3_rule_inverted", "shift sqrt(reference / n) instead of sqrt(n / reference)", SCHED,
             "math.sqrt(n / self.reference_tokens))", "math.sqrt(self.reference_tokens / n))", (T_SCHED,)),
    Mutation("min_shift_ignored", "the sd3 floor min_shift ignored (audio shifted to 0.88 again)", SCHED,
             "return max(self.min_shift, math.sqrt(n / self.reference_tokens))",
             "return math.sqrt(n / self.reference_tokens)", (T_SCHED,)),
]


def run(mutation: Mutation, python: str) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mut_{mutation.name}_") as tmp:
        root = Path(tmp)
        for item in ("jointdit", "tests", "conf"):
            shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
        path = root / mutation.file
        text = path.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"mutation {mutation.name}: the text to replace occurs {text.count(mutation.old)} times "
                             f"in {mutation.file}; update the mutation")
        path.write_text(text.replace(mutation.old, mutation.new))
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=root, env=env, capture_output=True, text=True)
        failed = [line.split(" - ")[0].replace("FAILED ", "") for line in proc.stdout.splitlines()
                  if line.startswith(("FAILED", "ERROR"))]
        return proc.returncode != 0, time.perf_counter() - start, (failed[0] if failed else proc.stdout[-300:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "mutations.md")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:26s} {m.file:34s} {m.what}")
        return
    rows = []
    for m in chosen:
        caught, seconds, by = run(m, sys.executable)
        rows.append((m, caught, by))
        print(f"{m.name:26s} {'CAUGHT' if caught else 'SURVIVED'} in {seconds:.0f} s  {by}", flush=True)
    lines = ["# Mutation check", "", "`.venv/bin/python experiments/mutations.py` — each bug applied alone to a copy of "
             "the code; CAUGHT = the listed tests fail (first failing test shown).", "",
             "| mutation | file | bug | result | caught by |", "|---|---|---|---|---|"]
    for m, caught, by in rows:
        lines.append(f"| {m.name} | {m.file} | {m.what} | {'CAUGHT' if caught else '**SURVIVED**'} | `{by}` |")
    if args.only is None:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(caught for _, caught, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
