import json

from helpers import run_module

import librosa
import numpy as np
import torch

from jointdit.data.media import read_clip
from jointdit.data.synthetic import CLASSES, SyntheticSpec, make_clip

SPEC = SyntheticSpec()
FRAME = 1 / SPEC.fps


def test_generation_is_deterministic_and_seeded():
    a, b, c = make_clip(3, seed=1), make_clip(3, seed=1), make_clip(3, seed=2)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.wave, b.wave) and a.events == b.events
    assert not torch.equal(a.wave, c.wave)
    assert a.frames.shape == (16, 3, 64, 64) and a.wave.shape == (32000,)
    assert -1 <= a.frames.min() and a.frames.max() <= 1 and a.wave.abs().max() <= 1


def test_classes_have_captions_and_distinct_looks():
    clips = [make_clip(i) for i in range(len(CLASSES))]
    assert [c.label for c in clips] == list(CLASSES)
    assert all(c.caption == CLASSES[c.label] for c in clips)
    colours = [c.frames.amax(dim=(0, 2, 3)) for c in clips]  # the brightest colour per channel
    assert len({tuple(col.round(decimals=1).tolist()) for col in colours}) == len(CLASSES)


def _motion_signal(frames: torch.Tensor, label: str) -> np.ndarray:
    """One number per frame whose direction reverses at each event."""
    background = frames.flatten(2).median(dim=2).values[:, :, None, None]  # objects are small: the median pixel
    mask = (frames - background).abs().sum(dim=1) > 0.5  # [T, H, W] object pixels
    ys, xs = torch.meshgrid(torch.arange(frames.shape[2]) + 0.5, torch.arange(frames.shape[3]) + 0.5, indexing="ij")
    out = []
    for m in mask:
        w = m.float()
        if label in ("bouncing_ball", "block_drop"):
            out.append((ys * w).sum() / w.sum())
        elif label == "wall_ping":
            out.append((xs * w).sum() / w.sum())
        else:  # two objects mirrored about the centre: their distance from it
            out.append(((xs - frames.shape[3] / 2).abs() * w).sum() / w.sum())
    return np.array(out)


def _reversal_times(signal: np.ndarray, label: str) -> list[float]:
    """Frames where the motion reverses; for a bounce only the lowest points (the apex is no event)."""
    step = np.diff(signal)
    lowest_only = label in ("bouncing_ball", "block_drop")  # image y grows downwards
    return [k * FRAME for k in range(1, len(signal) - 1)
            if step[k - 1] * step[k] < 0 and abs(step[k - 1] - step[k]) > 0.5 and (not lowest_only or step[k - 1] > 0)]


def test_every_event_is_visible_and_audible_within_one_frame(synthetic_root):
    rows = [json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()]
    checked = 0
    for row in rows:
        clip = read_clip(synthetic_root / "videos" / row["path"], fps=SPEC.fps, size=SPEC.size,
                         seconds=SPEC.seconds, sample_rate=SPEC.sample_rate)
        signal = _motion_signal(clip.frames, row["label"])
        reversals = _reversal_times(signal, row["label"])
        onsets = librosa.onset.onset_detect(y=clip.wave.numpy(), sr=SPEC.sample_rate, units="time", hop_length=128)
        for event in row["events"]:
            assert any(abs(o - event) <= FRAME for o in onsets), (row["id"], event, onsets)
            # Visible: the velocity over the frame pair just before the event and the pair just after
            # it point in opposite directions (needs two frames on each side).
            before = int(np.floor(event * SPEC.fps))
            if before >= 1 and before + 2 < len(signal):
                v_before, v_after = signal[before] - signal[before - 1], signal[before + 2] - signal[before + 1]
                assert v_before * v_after < 0, (row["id"], event, signal.round(1))
                checked += 1
        # And nothing moves or sounds without an event (librosa pads the start: skip its first 0.1 s).
        for onset in onsets[onsets > 0.1]:
            assert any(abs(onset - e) <= FRAME for e in row["events"]), (row["id"], onset, row["events"])
        for reversal in reversals:
            assert any(abs(reversal - e) <= FRAME for e in row["events"]), (row["id"], reversal, row["events"])
    assert checked >= len(rows)  # every clip has at least one fully visible event


def test_cli_writes_mp4s_and_index(tmp_path):
    result = run_module("jointdit.data.synthetic", "--out", str(tmp_path), "--num-clips", "4", "--size", "32",
                        "--fps", "10", "--seconds", "1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((tmp_path / "videos" / r["path"]).stat().st_size > 0 for r in rows)
    listed = (tmp_path / "train.txt").read_text().split() + (tmp_path / "test.txt").read_text().split()
    assert sorted(listed) == sorted(r["path"] for r in rows)
    clip = read_clip(tmp_path / "videos" / rows[0]["path"], fps=10, size=32, seconds=1.0, sample_rate=16000)
    assert clip.frames.shape == (10, 3, 32, 32)


def test_held_out_split_covers_every_class(tmp_path):
    from jointdit.data.synthetic import write_dataset

    write_dataset(tmp_path, num_clips=32, spec=SyntheticSpec(fps=8, size=16, seconds=0.5), val_fraction=0.125,
                  progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    held_out = [r for r in rows if r["split"] == "test"]
    assert len(held_out) == 4  # one per block of 8, as before
    assert sorted(r["label"] for r in held_out) == sorted(CLASSES)
    assert sorted((tmp_path / "test.txt").read_text().split()) == sorted(r["path"] for r in held_out)
