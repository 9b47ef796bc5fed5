"""The Dataset over the latent cache: aligned crops, collate, memory-mapped reads, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from jointdit.config import compose
from jointdit.data import dataset as dataset_module
from jointdit.data.cache import CacheMissingError, build_cache, read_index
from jointdit.data.dataset import LatentDataset, aligned_lengths, collate_latents

FV, FA = 8.0, 100.0  # pixel_mel latent rates for the synthetic 8 fps clips


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_root) -> Path:
    root = tmp_path_factory.mktemp("dataset_cache")
    cfg = compose("cache", [f"paths.root_dir={root}", f"data.root={synthetic_root}", "data.num_clips=8"])
    out = Path(cfg.out_dir)
    for split in ("train", "val"):
        build_cache(cfg.data, cfg.codec, out, split, shard_size=4, progress=False)
    return out


def _full(cache: Path, row: dict, what: str) -> torch.Tensor:
    with safe_open(str(cache / row["shard"]), framework="pt") as handle:
        return handle.get_tensor(row["tensors"][what])


def test_max_t_crops_video_and_audio_to_the_same_seconds(cache):
    data = LatentDataset(cache, "train", max_t=4, seed=1)
    assert (data.video_fps, data.audio_fps, len(data)) == (FV, FA, 7)
    starts = set()
    for index in range(len(data)):
        full_video, full_audio = _full(cache, data.rows[index], "video"), _full(cache, data.rows[index], "audio")
        for epoch in range(4):
            item = data[(index, epoch)]
            v0, a0 = item["video_start"], item["audio_start"]
            assert item["video"].shape == (4, 192, 8, 8) and item["audio"].shape == (1, 50, 64)  # 0.5 s each
            assert a0 * FV == v0 * FA, "the audio crop must start on the same second as the video crop"
            assert item["start_seconds"] == v0 / FV
            assert torch.equal(item["video"], full_video[v0 : v0 + 4])
            assert torch.equal(item["audio"], full_audio[:, a0 : a0 + 50])
            starts.add(v0)
    assert len(starts) > 3 and all(s % 2 == 0 for s in starts)  # exact alignment: every 2nd frame (100/8 = 12.5)
    # Deterministic from (seed, index, epoch); another seed crops elsewhere.
    again, other = LatentDataset(cache, "train", max_t=4, seed=1), LatentDataset(cache, "train", max_t=4, seed=2)
    windows = [data.crop_window(i, e) for i in range(7) for e in range(4)]
    assert windows == [again.crop_window(i, e) for i in range(7) for e in range(4)]
    assert windows != [other.crop_window(i, e) for i in range(7) for e in range(4)]
    # val crops start at 0; without max_t the whole clip comes back.
    assert LatentDataset(cache, "val", max_t=4).crop_window(0, 3) == (0, 4, 0, 50)
    assert LatentDataset(cache, "train").crop_window(0) == (0, 16, 0, 200)
    # Any start when exact alignment is not asked for, the audio start off by at most half a step.
    loose = LatentDataset(cache, "train", max_t=5, seed=0, exact_align=False)
    windows = [loose.crop_window(i, e) for i in range(7) for e in range(8)]
    assert any(v0 % 2 for v0, *_ in windows)
    assert all(abs(a0 / FA - v0 / FV) <= 0.5 / FA + 1e-9 and la == 62 for v0, _, a0, la in windows)


def test_aligned_lengths_keep_one_time_span():
    assert aligned_lengths(16, 200, FV, FA) == (16, 200)
    assert aligned_lengths(16, 120, FV, FA) == (9, 112)  # audio 1.2 s -> 9 frames (1.125 s) -> 112.5 -> 112
    assert aligned_lengths(5, 200, FV, FA) == (5, 62)
    assert aligned_lengths(12, 53, 6.0, 25.0) == (12, 50)  # SVD-like 6 fps vs 25 steps/s


def test_collate_crops_clips_of_different_lengths_to_the_common_aligned_span(cache):
    data = LatentDataset(cache, "train")
    full = [data[i] for i in range(3)]

    def cut(item: dict, v0: int, tv: int) -> dict:
        a0, la = int(v0 * FA / FV), int(round(tv * FA / FV))
        return {**item, "video": item["video"][v0 : v0 + tv], "audio": item["audio"][:, a0 : a0 + la],
                "video_start": v0, "audio_start": a0, "start_seconds": v0 / FV}

    items = [full[0], cut(full[1], 2, 6), cut(full[2], 4, 5)]  # 2 s, 0.75 s, 0.625 s (62 audio steps)
    batch = collate_latents(items)
    tv, la = aligned_lengths(5, 62, FV, FA)
    assert (tv, la) == (4, 50)
    assert batch["video"].shape == (3, tv, 192, 8, 8) and batch["audio"].shape == (3, 1, la, 64)
    for b, item in enumerate(items):
        assert torch.equal(batch["video"][b], item["video"][:tv]) and torch.equal(batch["audio"][b], item["audio"][:, :la])
    assert batch["video_start"].tolist() == [0, 2, 4] and batch["audio_start"].tolist() == [0, 25, 50]
    assert batch["caption"] == [i["caption"] for i in items] and batch["id"] == [i["id"] for i in items]
    assert batch["first_frame"].shape == (3, 3, 64, 64) and batch["first_frame"].abs().max() <= 1.0
    assert (batch["video_latent_fps"], batch["audio_latent_fps"]) == (FV, FA)
    with pytest.raises(ValueError, match="only some items"):
        collate_latents([full[0], {k: v for k, v in full[1].items() if k != "first_frame"}])


def test_dataloader_with_workers_batches_every_clip_once_per_epoch_and_recrops_each_epoch(cache):
    from torch.utils.data import DataLoader

    from jointdit.training import EpochBatchSampler

    data = LatentDataset(cache, "train", max_t=4, seed=0)
    sampler = EpochBatchSampler(len(data), 3, seed=0)  # the trainer's batch order: 7 clips -> 2 whole batches
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, collate_fn=collate_latents)
    epochs = []
    for epoch in range(2):
        sampler.start(epoch)
        batches = list(loader)
        assert [b["video"].shape[0] for b in batches] == [3, 3]
        assert all(b["video"].shape[1:] == (4, 192, 8, 8) and b["audio"].shape[1:] == (1, 50, 64) for b in batches)
        ids = [i for b in batches for i in b["id"]]
        assert len(set(ids)) == 6 and set(ids) <= {r["id"] for r in read_index(cache, "train")}
        epochs.append({i: int(s) for b in batches for i, s in zip(b["id"], b["video_start"])})
    common = set(epochs[0]) & set(epochs[1])
    assert any(epochs[0][i] != epochs[1][i] for i in common), "crops should change from one epoch to the next"
    plain = DataLoader(LatentDataset(cache, "val"), batch_size=8, collate_fn=collate_latents)
    (batch,) = list(plain)
    assert batch["video"].shape == (1, 16, 192, 8, 8) and batch["audio"].shape == (1, 1, 200, 64)


def test_reads_are_memory_mapped_and_only_the_crop_is_sliced(cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("whole-file load")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    opened, sliced, whole = [], [], []

    class Recorder:
        def __init__(self, handle):
            self.handle = handle

        def get_slice(self, name):
            piece = self.handle.get_slice(name)

            class Slice:
                def __getitem__(self, key):
                    sliced.append((name, key))
                    return piece[key]
            return Slice()

        def get_tensor(self, name):
            whole.append(name)
            return self.handle.get_tensor(name)

    def recording_safe_open(path, framework, device="cpu"):
        opened.append(Path(path).name)
        return Recorder(safe_open(path, framework=framework, device=device))

    monkeypatch.setattr(dataset_module, "safe_open", recording_safe_open)
    data = LatentDataset(cache, "train", max_t=4, seed=0)
    assert opened == [], "shards open lazily, on first use"
    for index in range(len(data)):
        data[index]
    shards = sorted({r["shard"] for r in data.rows})
    assert sorted(opened) == shards, "each shard is opened once per process"
    assert not [n for n in whole if n.endswith((".video", ".audio"))], "latents are read with get_slice"
    video_slices = [key for name, key in sliced if name.endswith(".video")]
    assert len(video_slices) == len(data) and all(k.stop - k.start == 4 for k in video_slices)
    # safe_open maps the file: it shows in this process's memory map while a handle is open.
    maps = Path("/proc/self/maps")
    if maps.exists():
        real = LatentDataset(cache, "train")
        real[0]
        assert str((cache / real.rows[0]["shard"]).resolve()) in maps.read_text()
        clone = pickle.loads(pickle.dumps(real))  # what a DataLoader worker gets: no open handles
        assert clone._handles == {} and torch.equal(clone[0]["video"], real[0]["video"])


def test_missing_cache_or_split_says_how_to_build_it(cache, tmp_path):
    with pytest.raises(CacheMissingError, match=r"no latent cache at .*python -m jointdit\.cache"):
        LatentDataset(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheMissingError, match=r"holds no cache index.*python -m jointdit\.cache"):
        LatentDataset(tmp_path / "empty", "train")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    shutil.copy(cache / "meta.json", only_train / "meta.json")
    rows = read_index(cache, "train")
    (only_train / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CacheMissingError, match=r"no clips of split 'val'.*"
                                                 r"`python -m jointdit\.cache data=synthetic codec=pixel_mel split=val`"):
        LatentDataset(only_train, "val")
    (only_train / "meta.json").unlink()
    with pytest.raises(CacheMissingError, match=r"an index but no meta\.json.*python -m jointdit\.cache"):
        LatentDataset(only_train, "train")
