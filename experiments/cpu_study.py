"""The CPU study behind the README's evaluation tables: train named variants of ``experiment=synthetic_cpu``,
sample and score each with ``jointdit.evaluate`` under named guidances, and write the tables.

    python experiments/cpu_study.py                        # every variant and evaluation below (hours on 2 cores)
    python experiments/cpu_study.py --only default iso     # some variants
    python experiments/cpu_study.py --jobs 2               # two trainings at once (each on one thread)
    python experiments/cpu_study.py --tables-only          # re-write the tables from finished runs

Variants (``VARIANTS``) are training overrides on top of ``experiment=synthetic_cpu``; each evaluation
(``EVALUATIONS``) is a guidance preset plus overrides, sampled on ``--clips`` held-out conditions per task
with fixed seeds, so every row is scored on the same conditions, real clips and detector settings. Runs
and reports go under ``--root`` (default ``outputs/cpu_study``); a finished run or report is reused, so
the script resumes where it stopped. Writes ``experiments/results/cpu_study.md`` and ``.json``.

Tables:
  synthetic_cpu   the default recipe's figures per task (sync, its own shuffled chance, real floor and
                  ceiling, event F1, gates)
  sync_study      joint (cross-modal attention) vs iso (no cross-modal attention, iso_prob 1)
  method_changes  before (iso_prob 0, no shift) → + iso training → + sd3 timestep shift → the shipped
                  floor at 1, each under no guidance / CFG / JointCFG
  kv_pooling      attention K/V pooling, 4x fewer video keys either way: none vs time vs space
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"

# name -> (what it is, training overrides on top of experiment=synthetic_cpu)
UNFLOORED = "objective.timestep_shift.min_shift=0"  # the sd3 shift as first shipped: audio's 200 tokens gave s = 0.88
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("synthetic_cpu as shipped: iso_prob 0.2, sd3 shift floored at 1 (min_shift 1)", []),
    "sd3_unfloored": ("iso_prob 0.2, sd3 shift without a floor (audio s = 0.88)", [UNFLOORED]),
    "iso": ("iso model: every sample in iso attention (no cross-modal attention), sd3 without a floor",
            ["objective.iso_prob=1.0", UNFLOORED]),
    "before": ("before the method fixes: iso_prob 0, no timestep shift",
               ["objective.iso_prob=0.0", "objective.timestep_shift.method=none"]),
    "iso_train": ("+ iso training: iso_prob 0.2, no timestep shift",
                  ["objective.iso_prob=0.2", "objective.timestep_shift.method=none"]),
    "kv_time4": ("K/V averaged over 4 latent time steps (vram.kv_downsample=4, the old profiles' kind)",
                 ["vram.kv_downsample=4", UNFLOORED]),
    "kv_space2": ("K/V averaged over 2x2 video positions and 2 mel bands, time exact (vram.kv_pool_space=2)",
                  ["vram.kv_pool_space=2", UNFLOORED]),
}

# name -> (label, guidance overrides); the tasks each evaluation samples
EVALUATIONS: dict[str, tuple[str, list[str]]] = {
    "jointcfg": ("JointCFG (the default guidance)", ["guidance=jointcfg"]),
    "none": ("no guidance", ["guidance=none"]),
    "cfg": ("CFG (text/image)", ["guidance=cfg"]),
    "jointcfg_untrained": ("JointCFG with the iso branch kept although never trained",
                           ["guidance=jointcfg", "guidance.allow_untrained_iso=true"]),
}
ALL_TASKS = "[joint,i2sv,a2v,v2a]"
SYNC_TASKS = "[joint,a2v,v2a]"
PLAN: dict[str, list[tuple[str, str]]] = {  # variant -> [(evaluation, tasks)]
    "default": [("jointcfg", ALL_TASKS), ("none", SYNC_TASKS)],
    "sd3_unfloored": [("jointcfg", ALL_TASKS), ("none", SYNC_TASKS), ("cfg", SYNC_TASKS)],
    "iso": [("jointcfg", ALL_TASKS)],
    "before": [("none", SYNC_TASKS), ("cfg", SYNC_TASKS), ("jointcfg_untrained", SYNC_TASKS)],
    "iso_train": [("none", SYNC_TASKS), ("jointcfg", SYNC_TASKS)],
    "kv_time4": [("jointcfg", SYNC_TASKS)],
    "kv_space2": [("jointcfg", SYNC_TASKS)],
}


def _run(args: list[str], env: dict[str, str], log: Path) -> float:
    print("$", " ".join(shlex.quote(a) for a in args), f"> {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(args, cwd=REPO, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


class Study:
    def __init__(self, root: Path, clips: int, sample_steps: int, threads: int, max_steps: int | None) -> None:
        self.root, self.clips, self.sample_steps, self.max_steps = root, clips, sample_steps, max_steps
        self.env = {**os.environ, "JOINTDIT_ROOT": str(root), "OMP_NUM_THREADS": str(threads),
                    "PYTHONUNBUFFERED": "1"}
        self.times_path = root / "times.json"

    def _times(self) -> dict[str, float]:
        return json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def _record(self, key: str, seconds: float) -> None:
        times = self._times()
        times[key] = round(seconds, 1)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.times_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=2) + "\n")
        os.replace(tmp, self.times_path)

    def run_dir(self, variant: str) -> Path:
        return self.root / "runs" / variant

    def train(self, variant: str) -> None:
        run = self.run_dir(variant)
        if (run / "export" / "last" / "jointdit.json").exists():
            return
        args = [sys.executable, "-m", "jointdit.train", "experiment=synthetic_cpu", *VARIANTS[variant][1],
                "eval.every=0", "sample_every=-1", f"hydra.run.dir={run}", "checkpoint.resume=auto"]
        if self.max_steps:
            args += [f"max_steps={self.max_steps}"]
        self._record(f"train/{variant}", _run(args, self.env, self.root / "logs" / f"train_{variant}.log"))

    def eval_dir(self, variant: str, evaluation: str) -> Path:
        return self.root / "evaluate" / f"{variant}-{evaluation}"

    def evaluate(self, variant: str, evaluation: str, tasks: str) -> None:
        out = self.eval_dir(variant, evaluation)
        if (out / "evaluate.json").exists():
            return
        args = [sys.executable, "-m", "jointdit.evaluate", f"checkpoint={self.run_dir(variant) / 'export' / 'last'}",
                *EVALUATIONS[evaluation][1], f"sampling.tasks={tasks}", f"sampling.num_clips={self.clips}",
                f"sampling.steps={self.sample_steps}", *self.held_out(),
                f"real.limit={self.clips}", "plots=2", "logger=mlflow",
                f"out_dir={out}", f"hydra.run.dir={out}/.hydra_run"]
        self._record(f"evaluate/{variant}-{evaluation}",
                     _run(args, self.env, self.root / "logs" / f"evaluate_{variant}-{evaluation}.log"))

    def held_out(self) -> list[str]:
        """The evaluation's data: the synthetic set written with enough clips that its held-out split (one clip
        in 8) has ``clips`` conditions. Clips are a pure function of their index and the split of their block,
        so the first 16 are the training run's own held-out clips and the rest were never generated for it;
        a separate root keeps the training set (128 clips) and its latent cache untouched."""
        num_clips = max(128, 8 * self.clips)
        return ["data=synthetic", "data.size=32", f"data.num_clips={num_clips}",
                f"data.root={self.root / 'data' / f'synthetic_heldout{num_clips}'}"]

    def summary(self, variant: str, evaluation: str) -> dict[str, float] | None:
        path = self.eval_dir(variant, evaluation) / "evaluate.json"
        return json.loads(path.read_text())["summary"] if path.exists() else None

    def val_loss(self, variant: str) -> float | None:
        path = self.run_dir(variant) / "metrics.json"
        if not path.exists():
            return None
        metrics = json.loads(path.read_text())
        history = metrics.get("history", [])
        for key in ("val_loss_ema", "val_loss"):
            values = [h[key] for h in history if h.get(key) is not None]
            if values:
                return values[-1]
        return None


def _cell(summary: dict | None, key: str) -> str:
    value = (summary or {}).get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _minutes(times: dict[str, float], key: str) -> str:
    return f"{times[key] / 60:.1f}" if key in times else "–"


def tables(study: Study) -> str:
    times = study._times()
    ref = next((s for v in PLAN for e, _ in PLAN[v] if (s := study.summary(v, e))), {}) or {}
    lines = [f"Real held-out clips ({study.clips}): ceiling {_cell(ref, 'ceiling')}, shuffled-pairs floor "
             f"{_cell(ref, 'floor')}. 'shuffled (gen.)' is the generated clips' own chance level (video i with "
             "generated audio i+1): sync above it is sync the model made.", ""]

    s = study.summary("default", "jointcfg")
    lines += ["### synthetic_cpu (default recipe, JointCFG)", "",
              "| task | sync | shuffled (gen.) | floor (real) | ceiling (real) | event F1 | gate pass |",
              "|---|---|---|---|---|---|---|"]
    for task in ("joint", "i2sv", "a2v", "v2a"):
        f1 = {"a2v": "a2v/a2v_f1", "v2a": "v2a/v2a_f1"}.get(task, "")
        lines.append(f"| {task} | {_cell(s, f'{task}/sync_gated')} | {_cell(s, f'{task}/shuffled_gated')} | "
                     f"{_cell(s, 'floor')} | {_cell(s, 'ceiling')} | {_cell(s, f1)} | "
                     f"{_cell(s, f'{task}/gate_pass_rate')} |")
    lines += ["", f"Training {_minutes(times, 'train/default')} min wall, evaluation "
              f"{_minutes(times, 'evaluate/default-jointcfg')} min.", ""]

    lines += ["### Sync study (joint vs iso, same data, budget, seeds and shift rule: sd3 without a floor)", "",
              "| | sync | shuffled (gen.) | floor | ceiling | v2a F1 | a2v F1 |", "|---|---|---|---|---|---|---|"]
    for variant in ("sd3_unfloored", "iso"):
        s = study.summary(variant, "jointcfg")
        name = "joint" if variant == "sd3_unfloored" else "iso"
        lines.append(f"| {name} | {_cell(s, 'joint/sync_gated')} | {_cell(s, 'joint/shuffled_gated')} | "
                     f"{_cell(s, 'floor')} | {_cell(s, 'ceiling')} | {_cell(s, 'v2a/v2a_f1')} | "
                     f"{_cell(s, 'a2v/a2v_f1')} |")
    lines.append("")

    lines += ["### What each method change did", "",
              "| training | guidance | val loss (EMA) | sync (joint) | shuffled (gen.) | v2a F1 | a2v F1 |",
              "|---|---|---|---|---|---|---|"]
    for variant in ("before", "iso_train", "sd3_unfloored", "default"):
        loss = study.val_loss(variant)
        for evaluation, _ in PLAN[variant]:
            s = study.summary(variant, evaluation)
            lines.append(f"| {VARIANTS[variant][0]} | {EVALUATIONS[evaluation][0]} | "
                         f"{'–' if loss is None else f'{loss:.3f}'} | {_cell(s, 'joint/sync_gated')} | "
                         f"{_cell(s, 'joint/shuffled_gated')} | {_cell(s, 'v2a/v2a_f1')} | {_cell(s, 'a2v/a2v_f1')} |")
    lines.append("")

    lines += ["### K/V pooling (vram.kv_downsample: time, vram.kv_pool_space: space)", "",
              "| K/V pooling | val loss (EMA) | sync (joint) | shuffled (gen.) | v2a F1 | a2v F1 |",
              "|---|---|---|---|---|---|"]
    for variant in ("sd3_unfloored", "kv_time4", "kv_space2"):  # all trained with the unfloored shift
        s = study.summary(variant, "jointcfg")
        loss = study.val_loss(variant)
        name = "none" if variant == "sd3_unfloored" else VARIANTS[variant][0]
        lines.append(f"| {name} | {'–' if loss is None else f'{loss:.3f}'} | {_cell(s, 'joint/sync_gated')} | "
                     f"{_cell(s, 'joint/shuffled_gated')} | {_cell(s, 'v2a/v2a_f1')} | {_cell(s, 'a2v/a2v_f1')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "cpu_study")
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--clips", type=int, default=32, help="held-out conditions per task")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: 2 / jobs)")
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    study = Study(args.root.resolve(), args.clips, args.sample_steps, threads, args.max_steps)
    variants = args.only or list(VARIANTS)
    if not args.tables_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(study.train, variants))
        for variant in variants:
            for evaluation, tasks in PLAN[variant]:
                study.evaluate(variant, evaluation, tasks)
    text = tables(study)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_study.md").write_text(f"# CPU study\n\n`{command}` (2-core x86-64 CPU)\n\n{text}")
    summaries = {f"{v}-{e}": study.summary(v, e) for v in PLAN for e, _ in PLAN[v]}
    (RESULTS / "cpu_study.json").write_text(json.dumps({"summaries": summaries, "times_s": study._times()},
                                                       indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
