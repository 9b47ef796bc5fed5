"""Embedded synthetic sounding-video data: objects that bounce and collide, with an impact sound at
exactly each bounce or collision.

Every motion is built from analytic pieces whose boundaries are the events: a bouncing object
follows parabolic arcs between floor impacts, a sliding object a triangle wave between walls.
So each event time is exact, the picture's motion reverses at it, and the sound's attack starts
on the sample ``round(t_event * sample_rate)``. The impact timbre depends on the class and the
pitch on the object's size. Generation is deterministic from ``(seed, index)``.

The set is written as real MP4 files (H.264 + AAC) in AVSync15's layout — ``videos/<class>/<id>.mp4``
plus ``train.txt`` / ``test.txt`` — with ``metadata.jsonl`` holding captions and event times, so
synthetic and real data go through one reading path.

    python -m jointdit.data.synthetic --out data/synthetic --num-clips 64
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from jointdit.data.media import write_mp4

CLASSES: dict[str, str] = {
    "bouncing_ball": "a red ball bouncing on the floor",
    "wall_ping": "a blue ball bouncing between two walls",
    "block_drop": "a green block dropping and bouncing",
    "colliding_balls": "two white balls colliding",
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Clip format. Defaults are sized to train on a laptop CPU."""

    size: int = 64
    fps: float = 8.0
    seconds: float = 2.0
    sample_rate: int = 16000


@dataclass
class SyntheticClip:
    id: str
    label: str
    caption: str
    frames: torch.Tensor  # [T, 3, H, W] in [-1, 1]
    wave: torch.Tensor  # [N] in [-1, 1]
    events: list[float] = field(default_factory=list)  # seconds


# ----------------------------------------------------------------------------------------------
# Motion: analytic pieces whose boundaries are the events
# ----------------------------------------------------------------------------------------------


def _bounce_arcs(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, callable]:
    """Floor impacts at t_0 < t_1 < ...; height between impacts is a parabola peaking mid-arc.

    Arc durations shrink by a restitution factor, and the peak height goes with duration squared, as
    under constant gravity. Returns (impact times inside the clip, height(t) in [0, 1]).
    """
    first = rng.uniform(0.2, 0.45) * seconds
    restitution = rng.uniform(0.75, 0.9)
    duration = rng.uniform(0.3, 0.45) * seconds
    impacts = [first]
    while impacts[-1] < seconds + duration:
        impacts.append(impacts[-1] + duration)
        duration = max(duration * restitution, 0.12 * seconds)
    impacts = np.array(impacts)
    # Before the first impact the object falls from rest (a half arc of the first duration).
    fall = impacts[1] - impacts[0]

    def height(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        h = np.empty_like(t)
        before = t < impacts[0]
        # Released from rest half an arc before the first impact, held at the top until then.
        s = np.minimum((impacts[0] - t[before]) / (fall / 2), 1.0)  # 1 at the top, 0 at the impact
        h[before] = 1.0 - (1.0 - s) ** 2
        idx = np.clip(np.searchsorted(impacts, t[~before], side="right") - 1, 0, len(impacts) - 2)
        start, end = impacts[idx], impacts[idx + 1]
        u = (t[~before] - start) / (end - start)
        peak = ((end - start) / fall) ** 2
        h[~before] = 4 * u * (1 - u) * peak
        return h

    return impacts[impacts < seconds], height


def _triangle(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, callable]:
    """Position in [0, 1] moving at constant speed and reflecting at 0 and 1 (the walls)."""
    period = rng.uniform(0.35, 0.6) * seconds  # one wall-to-wall crossing
    phase = rng.uniform(0.15, 0.85)  # starting position, as a fraction of a crossing
    direction = rng.choice([-1, 1])
    # Reflections happen where (t / period + phase) crosses an integer.
    reflections = (np.arange(1, int(seconds / period) + 3) - phase) * period
    reflections = reflections[(reflections > 0) & (reflections < seconds)]

    def position(t: np.ndarray) -> np.ndarray:
        x = np.asarray(t, dtype=np.float64) / period + phase
        tri = np.abs(((x + 1) % 2) - 1)  # 0..1..0 triangle, reflecting at integers
        return tri if direction > 0 else 1 - tri

    return reflections, position


# ----------------------------------------------------------------------------------------------
# Pictures and sounds
# ----------------------------------------------------------------------------------------------


def _draw(canvas: np.ndarray, cy: float, cx: float, radius: float, color, square: bool) -> None:
    """Anti-aliased disc or square on an [H, W, 3] float canvas (pixel centres at +0.5)."""
    h, w, _ = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    if square:
        dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - radius
    else:
        dist = np.hypot(yy - cy, xx - cx) - radius
    alpha = np.clip(0.5 - dist, 0, 1)[..., None]
    canvas[:] = canvas * (1 - alpha) + np.asarray(color, dtype=np.float64) * alpha


def _impact_sound(rng: np.random.Generator, label: str, pitch: float, sample_rate: int) -> np.ndarray:
    """One impact: a sharp attack at sample 0 and a class-specific decay."""
    n = int(0.6 * sample_rate)
    t = np.arange(n) / sample_rate
    noise = rng.standard_normal(n)
    if label == "bouncing_ball":  # a low thud
        tone = np.sin(2 * np.pi * pitch * t * (1 + 0.5 * np.exp(-t * 40)))
        sound = 0.8 * tone * np.exp(-t * 22) + 0.3 * noise * np.exp(-t * 120)
    elif label == "wall_ping":  # a metallic ping: inharmonic partials, slow decay
        sound = sum(a * np.sin(2 * np.pi * pitch * r * t) for a, r in [(0.6, 1.0), (0.3, 2.76), (0.15, 5.4)])
        sound = sound * np.exp(-t * 9) + 0.1 * noise * np.exp(-t * 300)
    elif label == "block_drop":  # a wooden knock: short, band-limited
        sound = 0.7 * np.sin(2 * np.pi * pitch * t) * np.exp(-t * 45) + 0.35 * noise * np.exp(-t * 200)
    else:  # colliding_balls: a bright clack
        sound = 0.5 * np.sin(2 * np.pi * pitch * t) * np.exp(-t * 30) + 0.45 * noise * np.exp(-t * 80)
    fade = np.ones(n)
    fade[-n // 4 :] = np.hanning(2 * (n // 4))[n // 4 :]  # no abrupt end: a cut would read as an onset
    sound = sound * fade
    return (sound / (np.abs(sound).max() + 1e-9)).astype(np.float64)


_PITCH = {"bouncing_ball": (90.0, 240.0), "wall_ping": (900.0, 2000.0), "block_drop": (350.0, 800.0),
          "colliding_balls": (1500.0, 3000.0)}


def make_clip(index: int, seed: int = 0, spec: SyntheticSpec = SyntheticSpec(), label: str | None = None) -> SyntheticClip:
    """Generate clip ``index`` of the set with ``seed``; the class cycles through CLASSES."""
    rng = np.random.default_rng([seed, index])
    labels = list(CLASSES)
    label = label or labels[index % len(labels)]
    size, fps, seconds, sr = spec.size, spec.fps, spec.seconds, spec.sample_rate
    num_frames = int(round(seconds * fps))
    frame_times = np.arange(num_frames) / fps
    radius = rng.uniform(0.08, 0.14) * size
    floor = size * 0.9
    background = np.array([0.12, 0.12, 0.14]) + rng.uniform(-0.04, 0.04, 3)

    # Object centres per frame, as functions of time.
    if label in ("bouncing_ball", "block_drop"):
        events, height = _bounce_arcs(rng, seconds)
        cx = rng.uniform(0.3, 0.7) * size
        top = radius + 0.08 * size
        centres = [[(floor - radius - h * (floor - radius - top), cx)] for h in height(frame_times)]
    elif label == "wall_ping":
        events, position = _triangle(rng, seconds)
        cy = rng.uniform(0.35, 0.65) * size
        centres = [[(cy, radius + p * (size - 2 * radius))] for p in position(frame_times)]
    else:  # two balls mirrored about the centre: they meet (collide) and reach the walls
        events, position = _triangle(rng, seconds)
        cy = rng.uniform(0.35, 0.65) * size
        gap = lambda p: radius + p * (size / 2 - 2 * radius)  # noqa: E731 - centre-to-middle distance
        centres = [[(cy, size / 2 - gap(p)), (cy, size / 2 + gap(p))] for p in position(frame_times)]

    color = {"bouncing_ball": (0.9, 0.15, 0.1), "wall_ping": (0.15, 0.35, 0.95),
             "block_drop": (0.15, 0.8, 0.25), "colliding_balls": (0.95, 0.95, 0.9)}[label]
    frames = np.empty((num_frames, size, size, 3))
    for k, objects in enumerate(centres):
        canvas = np.broadcast_to(background, (size, size, 3)).copy()
        canvas[int(floor) :, :] = background * 0.5  # the floor
        for cy_k, cx_k in objects:
            _draw(canvas, cy_k, cx_k, radius, color, square=label == "block_drop")
        frames[k] = canvas

    # Bigger objects sound lower.
    lo, hi = _PITCH[label]
    pitch = hi - (hi - lo) * (radius / size - 0.08) / 0.06
    wave = np.zeros(int(round(seconds * sr)))
    for event in events:
        start = int(round(event * sr))
        sound = _impact_sound(rng, label, pitch, sr) * rng.uniform(0.5, 0.8)
        stop = min(start + sound.shape[0], wave.shape[0])
        wave[start:stop] += sound[: stop - start]
    wave += rng.standard_normal(wave.shape[0]) * 1e-3  # a faint room tone, so no sample is exactly silent
    peak = np.abs(wave).max()
    if peak > 0.95:
        wave *= 0.95 / peak

    return SyntheticClip(
        id=f"{label}_{seed:04d}_{index:05d}",
        label=label,
        caption=CLASSES[label],
        frames=torch.from_numpy(frames).float().permute(0, 3, 1, 2).mul(2).sub(1).clamp(-1, 1),
        wave=torch.from_numpy(wave).float(),
        events=[round(float(e), 6) for e in events],
    )


# ----------------------------------------------------------------------------------------------
# Writing the set
# ----------------------------------------------------------------------------------------------


def held_out_position(block: int, every: int) -> int:
    """Position inside block ``block`` (of ``every`` clips) of the one clip that is held out."""
    return (every - 1 - block) % every


def write_dataset(
    out: str | os.PathLike,
    num_clips: int = 64,
    seed: int = 0,
    spec: SyntheticSpec = SyntheticSpec(),
    val_fraction: float = 0.125,
    progress: bool = True,
) -> Path:
    """Write ``num_clips`` MP4s in AVSync15's layout plus ``metadata.jsonl``; existing clips are kept.

    The split is deterministic: one clip of each block of ``round(1/val_fraction)`` clips goes to
    ``test.txt``, at a position that moves back by one each block, so the held-out clips rotate
    through the classes (a fixed position would hold out one class only, since classes cycle).
    ``metadata.jsonl`` is written last (atomically), so a folder that has it is complete.
    """
    out = Path(out)
    every = max(int(round(1 / val_fraction)), 2) if val_fraction > 0 else 0
    rows, train, test = [], [], []
    for index in tqdm(range(num_clips), desc="synthetic clips", disable=not progress, unit="clip"):
        clip = make_clip(index, seed, spec)
        relative = f"{clip.label}/{clip.id}.mp4"
        target = out / "videos" / relative
        if not target.exists():
            write_mp4(target, clip.frames, spec.fps, clip.wave, spec.sample_rate)
        split = "test" if every and index % every == held_out_position(index // every, every) else "train"
        (test if split == "test" else train).append(relative)
        rows.append({"id": clip.id, "path": relative, "label": clip.label, "caption": clip.caption,
                     "events": clip.events, "split": split, "seed": seed, "index": index, **asdict(spec)})
    for name, lines in (("train.txt", train), ("test.txt", test)):
        _write_text_atomic(out / name, "".join(f"{line}\n" for line in lines))
    _write_text_atomic(out / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def dataset_is_complete(root: str | os.PathLike, num_clips: int, seed: int, spec: SyntheticSpec) -> bool:
    """True when ``root`` holds exactly the set these arguments would write."""
    index = Path(root) / "metadata.jsonl"
    if not index.exists():
        return False
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    want = asdict(spec)
    return len(rows) == num_clips and all(
        row.get("seed") == seed and all(row.get(k) == v for k, v in want.items()) for row in rows
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded synthetic sounding-video data set.")
    parser.add_argument("--out", default="data/synthetic", help="output folder (AVSync15 layout)")
    parser.add_argument("--num-clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SyntheticSpec.size)
    parser.add_argument("--fps", type=float, default=SyntheticSpec.fps)
    parser.add_argument("--seconds", type=float, default=SyntheticSpec.seconds)
    parser.add_argument("--sample-rate", type=int, default=SyntheticSpec.sample_rate)
    parser.add_argument("--val-fraction", type=float, default=0.125)
    args = parser.parse_args(argv)
    spec = SyntheticSpec(args.size, args.fps, args.seconds, args.sample_rate)
    out = write_dataset(args.out, args.num_clips, args.seed, spec, args.val_fraction)
    print(f"wrote {args.num_clips} clips to {out}")


if __name__ == "__main__":
    main()
