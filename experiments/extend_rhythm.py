"""Does ``extend_a`` continue a synthetic clip's rhythm? Train with extend_a in the task mix, then score the
generated continuations' onsets against the clip's known events.

    python experiments/extend_rhythm.py                                   # experiment=synthetic_cpu budget
    python experiments/extend_rhythm.py --max-steps 300 --clips 16        # a shorter run
    python experiments/extend_rhythm.py --score-only <run>/export/last    # score an existing model

1. Train: ``python -m jointdit.train experiment=synthetic_cpu`` with ``objective.tasks`` = ``--tasks`` (default
   joint 0.3, a2v/v2a/i2sv 0.1 each, extend_a 0.4), so the model learns to continue given audio.
2. Score (in-process, ``jointdit.sample``): for each of ``--clips`` held-out clips (the val split, with
   their event times from the synthetic set's ``metadata.jsonl``) the first ``--given`` share of the audio
   is given (``task=extend_a seconds_given=<given · seconds>``) and the rest generated. Onsets of the
   generated audio after ``k = given · seconds`` (``jointdit.evaluate.onsets.detect_onsets``) are matched
   one-to-one to the clip's events after ``k`` within ±tolerance_frames / fps
   (``jointdit.evaluate.matching``); counts pooled over clips give precision / recall / F1 / offset:

   - ``model``     continuation of clip i  vs  clip i's events;
   - ``floor``     continuation of clip j ≠ i (the next clip)  vs  clip i's events: the chance level of
                   onsets with the right density but no knowledge of clip i's rhythm;
   - ``ceiling``   the real clip i's audio after k  vs  its events: what the detector recovers at best.

Writes ``experiments/results/<name>.md`` and ``.json`` (figures, settings, wall times, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
TASKS = "{joint: 0.3, a2v: 0.1, v2a: 0.1, i2sv: 0.1, extend_a: 0.4}"


def train(run_dir: Path, max_steps: int | None, tasks: str, overrides: Sequence[str], env: dict[str, str]) -> float:
    """The training run (a subprocess, as users run it); returns its wall time in seconds."""
    args = [sys.executable, "-m", "jointdit.train", "experiment=synthetic_cpu", "~objective.tasks",
            f"+objective.tasks={tasks}", "eval.every=0", "sample_every=-1", f"hydra.run.dir={run_dir}"]
    if max_steps:
        args += [f"max_steps={max_steps}", f"checkpoint.every={max_steps}"]
    args += list(overrides)
    print("$", " ".join(shlex.quote(a) for a in args), flush=True)
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True)
    return time.perf_counter() - started


def score(model_folder: Path, clips: int, given: float, steps: int, guidance: str, seed: int = 0,
          device: str = "cpu") -> dict:
    """Sample extend_a continuations of ``clips`` held-out clips and score them (module docstring)."""
    import numpy as np
    from omegaconf import OmegaConf

    from jointdit.data.sources import build_source
    from jointdit.evaluate.matching import accuracy_from_counts, match_events
    from jointdit.evaluate.onsets import detect_onsets
    from jointdit.evaluate.sampling import read_real_at
    from jointdit.evaluate.settings import DetectorSettings
    from jointdit.sample import SampleRequest, generate, load_session

    session = load_session(model_folder, device=device)
    spec, settings = session.spec, DetectorSettings()
    refs = build_source(OmegaConf.create(session.meta["data"])).clips("val")[:clips]
    real, events, _ = read_real_at(refs, spec.fps, spec.size, spec.seconds, spec.sample_rate)
    if len(real) < 2:
        raise SystemExit(f"need at least 2 held-out clips with events for the floor; the val split has {len(real)}")
    k = given * spec.seconds
    tolerance = settings.tolerance_frames / spec.fps
    continuations, rows = [], []
    for i, clip in enumerate(real):
        result = generate(session, SampleRequest(task="extend_a", audio=clip.wave, seconds_given=k, seeds=[seed + i],
                                                 steps=steps, guidance=guidance))
        continuations.append(result.wave)

    def after(times) -> np.ndarray:
        times = np.asarray(times, dtype=np.float64)
        return times[(times >= k) & (times < spec.seconds)]

    pooled: dict[str, list] = {"model": [], "floor": [], "ceiling": []}
    for i, clip in enumerate(real):
        ref = after(events[clip.meta["id"]])
        candidates = {"model": continuations[i], "floor": continuations[(i + 1) % len(real)], "ceiling": clip.wave}
        row = {"id": clip.meta["id"], "events_after_k": ref.round(3).tolist()}
        for name, wave in candidates.items():
            onsets = after(detect_onsets(wave, spec.sample_rate, settings))
            match = match_events(ref, onsets, tolerance)
            pooled[name].append((match.matched, len(onsets), len(ref), match.offsets))
            row[f"{name}_onsets"] = onsets.round(3).tolist()
            row[f"{name}_matched"] = match.matched
        rows.append(row)
    figures = {}
    for name, parts in pooled.items():
        acc = accuracy_from_counts(sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts),
                                   np.concatenate([p[3] for p in parts]))
        figures[name] = acc.to_dict()
    return {"figures": figures, "clips": rows, "seconds_given": k, "tolerance_s": tolerance,
            "settings": {"clips": len(real), "given": given, "steps": steps, "guidance": guidance, "seed": seed,
                         "model": str(model_folder)}}


def write_results(result: dict, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# extend_a rhythm continuation ({result['settings']['clips']} held-out synthetic clips)", "",
             f"Given: the first {result['seconds_given']:.2f} s of audio; scored: onsets after it vs known events "
             f"(±{1000 * result['tolerance_s']:.0f} ms, pooled over clips).", "",
             "| | precision | recall | F1 | mean offset (ms) |", "|---|---|---|---|---|"]
    for key, label in (("model", "extend_a continuation"), ("floor", "floor: another clip's continuation"),
                       ("ceiling", "ceiling: the real clip's audio")):
        f = result["figures"][key]
        lines.append(f"| {label} | {f['precision']:.3f} | {f['recall']:.3f} | {f['f1']:.3f} | {f['offset_ms']:.1f} |")
    lines += ["", f"Command: `{result.get('command', '')}`", f"Machine: {result.get('machine', '')}",
              f"Wall times (s): {json.dumps(result.get('times', {}))}", ""]
    path = folder / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "extend_rhythm", help="JOINTDIT_ROOT of the run")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--tasks", default=TASKS, help="objective.tasks of the training run")
    parser.add_argument("--clips", type=int, default=16, help="held-out clips continued")
    parser.add_argument("--given", type=float, default=0.5, help="share of each clip's audio that is given")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", default="cfg", help="a conf/guidance name")
    parser.add_argument("--score-only", type=Path, default=None, help="score this model folder, no training")
    parser.add_argument("--name", default="extend_rhythm", help="results file stem")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for <name>.md / .json")
    parser.add_argument("overrides", nargs="*", help="extra training overrides (key=value)")
    args = parser.parse_args(argv)
    times = {}
    model = args.score_only
    if model is None:
        run_dir = args.root / "runs" / "extend_a"
        times["train_s"] = train(run_dir, args.max_steps, args.tasks, args.overrides,
                                 {**os.environ, "JOINTDIT_ROOT": str(args.root)})
        model = run_dir / "export" / "last"
    started = time.perf_counter()
    result = score(model, args.clips, args.given, args.sample_steps, args.guidance)
    times["score_s"] = time.perf_counter() - started
    result.update(times=times, command="python experiments/extend_rhythm.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}")
    print(write_results(result, args.results, args.name).read_text())
    return result


if __name__ == "__main__":
    main()
