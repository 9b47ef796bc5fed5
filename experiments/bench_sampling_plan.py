"""The sampling plan (``memory.sampling_plan``) against the measured peak of a real sampling run, per task.

Same export and measuring child as the slow test ``tests/test_memory_sampling.py::
test_plan_is_never_below_a_measured_sampling_run`` (a 3 M-parameter tiny model, pixel_mel codec, 2 s at 8 fps
and 64 px, 2 solver steps, CPU fp32): measured = VmHWM of a child above its baseline while it runs
``load_session`` + ``generate``. Writes experiments/results/bench_sampling_plan.md.

    .venv/bin/python experiments/bench_sampling_plan.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_memory_sampling import _SAMPLE_CHILD, _export  # noqa: E402

from jointdit.diffusion.guidance import build_guidance  # noqa: E402
from jointdit.memory import sampling_plan  # noqa: E402

MiB = 2**20
GUIDED = {"name": "jointcfg", "w_v": 1.0, "w_a": 1.0, "allow_untrained_iso": True}
RUNS = [("joint", GUIDED), ("joint", {"name": "none"}), ("t2v", {"name": "none"}), ("t2a", {"name": "none"})]


def main() -> None:
    folder, n_params = _export(Path(tempfile.mkdtemp()) / "model", hidden_size=128, depth=4, num_heads=4)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    rows = []
    for task, guidance in RUNS:
        plan = sampling_plan(folder, device="cpu", branches=build_guidance(guidance), budget_bytes=2**40, task=task)
        res = subprocess.run([sys.executable, "-c", _SAMPLE_CHILD,
                              json.dumps({"folder": str(folder), "guidance": guidance, "task": task})],
                             capture_output=True, text=True, env=env, timeout=900, check=True)
        measured = json.loads([x for x in res.stdout.splitlines() if x.startswith("MEASURE ")][0][8:])["peak"]
        rows.append((task, guidance["name"], plan, measured))
        print(task, guidance["name"], round(measured / MiB, 1), round(plan.planned / MiB, 1), file=sys.stderr)
    lines = ["# Sampling plan vs a measured sampling run", "",
             f"Command: `.venv/bin/python experiments/bench_sampling_plan.py` (host: {platform.machine()}, "
             f"{os.cpu_count()} cores, CPU fp32; model {n_params / 1e6:.1f} M parameters, pixel_mel, 2 s × 8 fps × 64 px, "
             "2 solver steps). Measured = VmHWM of the sampling child above its baseline.", "",
             "| task | guidance | rows | weights | forward + solver | decode (video / audio) | media | total | planned (+margin) "
             "| measured | measured / total |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, name, p, m in rows:
        lines.append(f"| {task} | {name} | {p.branches} | {p.weights / MiB:.1f} | {p.forward / MiB:.1f} | "
                     f"{p.decode_video / MiB:.1f} / {p.decode_audio / MiB:.1f} | {p.media / MiB:.1f} | {p.total / MiB:.1f} | "
                     f"{p.planned / MiB:.1f} | {m / MiB:.1f} | {m / p.total:.2f} |")
    out = ROOT / "experiments" / "results" / "bench_sampling_plan.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
