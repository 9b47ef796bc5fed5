"""Fine-tuning recipes compared: LoRA vs Stage B vs full fine-tuning of one base model.

    .venv/bin/python experiments/bench_finetune.py                 # base + 3 fine-tunes (CPU, ~15 min on 2 cores)
    .venv/bin/python experiments/bench_finetune.py --steps 40 --base-steps 150

1. Base: ``experiment=demo`` (tiny model, synthetic clips at 32 px) trained with ``objective.tasks={joint: 1}``.
2. From its export, three fine-tunes on a new task — video-to-audio (Foley: ``objective.tasks={v2a: 1}``) —
   with the same steps, batch, lr and seed:
   - full:   ``stage=a stage.init_from=<base>`` (every parameter trains);
   - stage B: ``stage=b stage.init_from=<base>`` (experts + in/out projections);
   - LoRA:   ``stage=lora stage.init_from=<base> stage.lora.rank=8`` (adapters only, base frozen).
Each run is a real ``python -m jointdit.train`` process (MLflow in a temporary sqlite store). Reported:
trainable parameters and the export's size on disk (the adapter alone for LoRA), peak memory (the trainer's
``peak_memory_mb``: process peak RSS on CPU, ``max_memory_allocated`` on GPU) and the planner's full
estimate (``jointdit.memory_terms``), step time (the trainer's ``samples_per_s``), and the v2a training
loss averaged over the last 10 steps. Writes experiments/results/bench_finetune.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"


# --preset small: the test suite's fast set-up (8 clips of 1 s at 32 px, a 2-block width-64 model, batch 4)
SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=4", "batch_size=4"]
PRESET: list[str] = ["experiment=demo"]


def train(root: Path, name: str, *overrides: str) -> tuple[Path, float]:
    run_dir = root / name
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")} | {"JOINTDIT_ROOT": str(root)}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "jointdit.train", *PRESET, f"hydra.run.dir={run_dir}",
                          f"task_name={name}", "sample_every=-1", *overrides], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-4000:]}")
    return run_dir, time.perf_counter() - start


def mlflow_metrics(root: Path, name: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("mlflow.runName", "").startswith(name) or r.data.params.get("task_name") == name]
    run = max(runs, key=lambda r: r.info.start_time)
    out = {}
    for key in ("peak_memory_mb", "samples_per_s", "trainable_params", "export_size_mb", "memory_planned_peak_mb"):
        history = client.get_metric_history(run.info.run_id, key)
        if history:
            out[key] = [m.value for m in sorted(history, key=lambda m: m.step)]
    return out


def export_bytes(folder: Path) -> int:
    lora_file = folder / "adapter_model.safetensors"
    if lora_file.exists():
        return lora_file.stat().st_size
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--preset", choices=("demo", "small"), default="demo")
    a = ap.parse_args()
    global PRESET
    PRESET = ["experiment=demo"] if a.preset == "demo" else SMALL
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    common = [f"max_steps={a.steps}", "checkpoint.every=1000", "log_every=5", "optim.warmup_steps=2", "optim.lr=1e-3",
              "~objective.tasks", "+objective.tasks={v2a: 1.0}"]
    base_dir, _ = train(root, "base", f"max_steps={a.base_steps}", "~objective.tasks", "+objective.tasks={joint: 1.0}")
    base = base_dir / "export" / "last"
    recipes = {
        "full": ["stage=a", f"stage.init_from={base}"],
        "stage B": ["stage=b", f"stage.init_from={base}"],
        f"LoRA r{a.rank}": ["stage=lora", f"stage.init_from={base}", f"stage.lora.rank={a.rank}"],
    }
    rows = {}
    for label, overrides in recipes.items():
        name = "ft_" + label.split()[0].lower()
        run_dir, wall = train(root, name, *common, *overrides)
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        metrics = mlflow_metrics(root, name)
        rows[label] = {
            "trainable_params": metrics.get("trainable_params", [float("nan")])[-1],
            "export_bytes": export_bytes(run_dir / "export" / "last"),
            "peak_memory_mb": max(metrics.get("peak_memory_mb", [float("nan")])),
            "planned_peak_mb": metrics.get("memory_planned_peak_mb", [float("nan")])[-1],
            "samples_per_s": sum(metrics.get("samples_per_s", [float("nan")])[1:] or [float("nan")])
            / max(1, len(metrics.get("samples_per_s", [])[1:])),
            "loss_last10": sum(h["loss"] for h in history[-10:]) / len(history[-10:]),
            "loss_first": history[0]["loss"],
            "wall_s": wall,
        }
        print(label, rows[label], file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_finetune.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Fine-tuning recipes: LoRA vs Stage B vs full",
        "",
        f"Command: `.venv/bin/python experiments/bench_finetune.py --preset {a.preset} --base-steps {a.base_steps} "
        f"--steps {a.steps} --rank {a.rank}` (host: {platform.machine()}, {os.cpu_count()} cores, CPU fp32, "
        + ("tiny model of `experiment=demo`, batch 8" if a.preset == "demo" else
           "`--preset small`: a 2-block width-64 model, 8 clips of 1 s at 32 px, batch 4") + "). Base: "
        f"{a.base_steps} steps of joint generation; each recipe then fine-tunes it for {a.steps} steps on v2a "
        "(video → audio, `objective.tasks={v2a: 1.0}`), same lr 1e-3 and seed.",
        "",
        "| recipe | trainable params | export on disk | peak memory (measured) | planned peak | samples/s | "
        f"v2a loss, step 1 | v2a loss, last 10 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['trainable_params'] / 1e6:.3f} M | {r['export_bytes'] / 2**20:.2f} MiB | "
                     f"{r['peak_memory_mb']:.0f} MiB | {r['planned_peak_mb']:.0f} MiB | {r['samples_per_s']:.1f} | "
                     f"{r['loss_first']:.4f} | {r['loss_last10']:.4f} |")
    lines += ["", "Peak memory on CPU is the whole process's peak RSS (Python, torch and the libraries included, "
              "~0.5 GiB of it the same for every recipe), so the differences are what the recipes change: "
              "optimizer state, gradients and EMA of the trainable set."]
    (RESULTS / "bench_finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
