"""The sync study: a joint and an iso model trained alike on the synthetic set, then evaluated alike.

    python experiments/eval_sync_study.py                          # experiment=synthetic_cpu budget, both models
    python experiments/eval_sync_study.py --max-steps 300 --clips 16 --only joint   # synthetic_cpu figures only

Each model is `python -m jointdit.train experiment=synthetic_cpu ++objective.iso_prob=<0 | 1>` (joint:
every sample in full attention; iso: every sample in iso attention, no cross-modal attention), then
`python -m jointdit.evaluate checkpoint=<run>/export/last` samples `--clips` clips per task on held-out
conditions (the iso model in iso mode, `sampling.attention=auto`) and scores them beside the same real
clips. Writes experiments/results/sync_study.md (the README table) and .json, with wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
MODELS = {"joint": 0.0, "iso": 1.0}


def _run(args: list[str], env: dict[str, str]) -> float:
    print("$", " ".join(shlex.quote(a) for a in args), flush=True)
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "sync_study", help="JOINTDIT_ROOT of the runs")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--clips", type=int, default=32, help="sampled clips per task (held-out conditions)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--only", choices=sorted(MODELS), default=None)
    parser.add_argument("--name", default="sync_study", help="results file stem")
    args = parser.parse_args()
    env = {**os.environ, "JOINTDIT_ROOT": str(args.root)}
    root = args.root
    rows, times = {}, {}
    for name, iso in MODELS.items():
        if args.only and name != args.only:
            continue
        run_dir = root / "runs" / name
        train = [sys.executable, "-m", "jointdit.train", "experiment=synthetic_cpu", f"++objective.iso_prob={iso}",
                 "eval.every=0", "sample_every=-1", f"hydra.run.dir={run_dir}"]
        if args.max_steps:
            train += [f"max_steps={args.max_steps}", f"checkpoint.every={args.max_steps}"]
        times[f"{name}_train_s"] = _run(train, env)
        out = root / "evaluate" / name
        evaluate = [sys.executable, "-m", "jointdit.evaluate", f"checkpoint={run_dir / 'export' / 'last'}",
                    f"sampling.num_clips={args.clips}", f"sampling.steps={args.sample_steps}", "data=synthetic",
                    "data.size=32", "data.num_clips=128", f"out_dir={out}", "plots=2", "logger=mlflow",
                    f"hydra.run.dir={out}/.hydra_run"]
        times[f"{name}_evaluate_s"] = _run(evaluate, env)
        rows[name] = json.loads((out / "evaluate.json").read_text())["summary"]

    cell = lambda s, k: f"{s[k]:.3f}" if k in s and s[k] is not None else "–"  # noqa: E731
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [f"# Sync study ({args.name})", "", f"`{command}`", "",
             "| | sync | sync (gated) | floor | ceiling | v2a F1 | a2v F1 | i2sv sync | joint gate pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {cell(s, 'joint/sync')} | {cell(s, 'joint/sync_gated')} | {cell(s, 'floor')} | "
                     f"{cell(s, 'ceiling')} | {cell(s, 'v2a/v2a_f1')} | {cell(s, 'a2v/a2v_f1')} | "
                     f"{cell(s, 'i2sv/sync')} | {cell(s, 'joint/gate_pass_rate')} |")
    lines += ["", "Wall times (2 shared CPU cores): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"summary": rows, "times_s": times}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
