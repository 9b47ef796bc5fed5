"""Collect experiments/method_changes.sh's runs into the README table (markdown on stdout and in
experiments/results/method_changes.md)."""

import json
import sys
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/method_changes")
RUNS = {"A": "before: iso_prob 0, no timestep shift", "B": "+ iso training (iso_prob 0.2)",
        "C": "+ timestep shift (sd3, 256 tokens)"}


def val_loss(run: str) -> str:
    path = ROOT / "runs" / run / "metrics.json"
    if not path.exists():
        return "–"
    history = json.loads(path.read_text())["history"]
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    return f"{vals[-1]:.3f}" if vals else "–"


def fig(summary: dict, *keys: str) -> str:
    for key in keys:
        if key in summary and summary[key] is not None:
            return f"{summary[key]:.3f}"
    return "–"


rows = ["| training | guidance | val loss (raw, last) | sync (joint) | sync gated (joint) | event F1 (v2a) |",
        "|---|---|---|---|---|---|"]
ceiling = floor = None
for folder in sorted((ROOT / "eval").glob("*-*")):
    run, label = folder.name.split("-", 1)
    path = folder / "evaluate.json"
    if not path.exists():
        continue
    summary = json.loads(path.read_text())["summary"]
    ceiling = summary.get("joint/sync_ceiling", ceiling)
    floor = summary.get("joint/sync_floor", floor)
    rows.append(f"| {run}: {RUNS.get(run, run)} | {label} | {val_loss(run)} | {fig(summary, 'joint/sync')} | "
                f"{fig(summary, 'joint/sync_gated')} | {fig(summary, 'v2a/event_f1', 'v2a/f1')} |")
text = "\n".join(rows)
if ceiling is not None:
    text += f"\n\nReal clips: sync ceiling {ceiling:.3f}, shuffled floor {floor:.3f}."
print(text)
(Path(__file__).parent / "results" / "method_changes.md").write_text(
    "# What each method change did\n\n`bash experiments/method_changes.sh` (then `python experiments/method_changes_table.py`)\n\n"
    + text + "\n")
