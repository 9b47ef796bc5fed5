"""The latent cache: ``python -m jointdit.cache`` and ``jointdit.data.cache``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers import REPO, run_module
from jointdit.codecs import build_codecs
from jointdit.config import compose
from jointdit.data.cache import (
    CRASH_ENV,
    CacheError,
    CacheMismatchError,
    CacheMissingError,
    build_cache,
    cache_dir_for,
    cache_lock,
    read_index,
    read_report,
    run_cache,
)
from jointdit.data.dataset import LatentDataset, ensure_cache
from jointdit.data.media import read_clip, write_mp4

ROW_FIELDS = {"id", "split", "caption", "label", "fps", "sample_rate", "video_shape", "audio_shape", "video_latent_fps",
              "audio_latent_fps", "source", "shard", "first_frame", "events", "codec", "tensors"}


def _cfg(root: Path, synthetic_root: Path, *overrides: str):
    return compose("cache", [f"paths.root_dir={root}", f"data.root={synthetic_root}", "data.num_clips=8", *overrides])


def _shard_ids(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["ids"])


def _assert_consistent(out: Path, complete_run: bool = True) -> list[dict]:
    """Every visible shard is whole and every index row names one that holds its tensors; no id twice.

    After a finished run, also no shard outside the index. (A run killed between renaming a shard into
    place and appending its rows leaves such a whole but unindexed shard; the next run removes it.)
    """
    rows = read_index(out)
    keys = [(r["split"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)), "a clip is in the index twice"
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert {r["shard"] for r in rows} <= set(shards), "the index names a missing shard"
    if complete_run:
        assert sorted({r["shard"] for r in rows}) == shards, "a shard outside the index"
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:  # a half-written file fails to open
            names = set(handle.keys())
            assert {f"{i}.video" for i in json.loads(handle.metadata()["ids"])} <= names
        for row in (r for r in rows if r["shard"] == shard):
            assert set(row["tensors"].values()) <= names
    return rows


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("pixel_cache")
    cfg = _cfg(root, synthetic_root, "split=all", "shard_size=3")
    reports = run_cache(cfg, progress=False, log=lambda _: None)
    assert [r.cached for r in reports] == [7, 1]
    return cfg, Path(cfg.out_dir)


# ----------------------------------------------------------------------------------------------
# pixel_mel end to end
# ----------------------------------------------------------------------------------------------


def test_pixel_mel_cache_rows_have_every_field_and_latents_decode_back(pixel_cache, synthetic_root):
    cfg, out = pixel_cache
    assert out == cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)
    rows = _assert_consistent(out)
    assert len(rows) == 8 and sorted(r["split"] for r in rows).count("val") == 1
    assert len(list(out.glob("shard-*.safetensors"))) == 4  # 7 train clips in shards of 3 (3+3+1) + 1 val shard
    metadata = {json.loads(line)["id"]: json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()}
    video_codec, audio_codec = build_codecs(cfg.codec)
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["events"] == metadata[row["id"]]["events"] and row["caption"] == metadata[row["id"]]["caption"]
        assert (row["fps"], row["sample_rate"], row["video_latent_fps"], row["audio_latent_fps"]) == (8.0, 16000, 8.0, 100.0)
        assert row["video_shape"] == [16, 192, 8, 8] and row["audio_shape"] == [1, 200, 64] and row["codec"] == "pixel_mel"
        clip = read_clip(row["source"], fps=8, size=64, seconds=2.0, sample_rate=16000)
        with safe_open(str(out / row["shard"]), framework="pt") as handle:
            z_video = handle.get_tensor(row["tensors"]["video"])
            z_audio = handle.get_tensor(row["tensors"]["audio"])
            first = handle.get_tensor(row["tensors"]["first_frame"])
        assert torch.equal(z_video, video_codec.encode(clip.frames[None])[0])
        assert torch.equal(video_codec.decode(z_video[None])[0], clip.frames)  # the pixel codec is lossless
        torch.testing.assert_close(z_audio, audio_codec.encode(clip.wave[None])[0], atol=1e-5, rtol=0)
        expected_first = clip.frames[0].add(1).mul(127.5).round().to(torch.uint8)
        assert first.dtype == torch.uint8 and torch.equal(first, expected_first)
        png = torch.from_numpy(np.array(Image.open(out / row["first_frame"]))).permute(2, 0, 1)
        assert torch.equal(png, expected_first)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["codec"]["name"] == "pixel_mel" and meta["config"]["data"]["root"] == str(synthetic_root)
    report = read_report(out)
    assert report["train"]["failed"] == [] and report["train"]["in_index"] == 7


def test_rerun_skips_cached_clips_and_a_mismatched_config_is_refused(pixel_cache, synthetic_root, tmp_path):
    cfg, out = pixel_cache
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    report = build_cache(cfg.data, cfg.codec, out, "train", shard_size=3, progress=False)
    assert (report.cached, report.already, report.in_index, report.ok) == (0, 7, 7, True)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}

    other = _cfg(cfg.paths.root_dir, synthetic_root, "codec.audio.n_mels=80")
    with pytest.raises(CacheMismatchError, match=r"codec\.audio\.n_mels: cached 64, now 80"):
        build_cache(other.data, other.codec, out, "train", progress=False)
    # Runtime-only codec settings (decoding, batching, device) do not make a cache stale.
    same = _cfg(cfg.paths.root_dir, synthetic_root, "codec.audio.griffin_lim_iters=4", "codec.audio.encode_batch=2")
    assert build_cache(same.data, same.codec, out, "train", progress=False).already == 7
    with cache_lock(out), pytest.raises(CacheError, match="another cache run is writing"):
        build_cache(cfg.data, cfg.codec, out, "train", progress=False)

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    report = build_cache(other.data, other.codec, copy, "val", overwrite=True, progress=False, log=lambda _: None)
    assert report.cached == 1 and [r["audio_shape"] for r in read_index(copy)] == [[1, 200, 80]]
    assert len(list(copy.glob("shard-*.safetensors"))) == 1


# ----------------------------------------------------------------------------------------------
# Bad files, exit codes, the entry point
# ----------------------------------------------------------------------------------------------


def _bad_folder(root: Path, synthetic_root: Path, good: int = 3) -> dict[str, str]:
    """AVSync15 layout with ``good`` good clips, a truncated MP4, a silent video and a zero-byte file."""
    sources = sorted((synthetic_root / "videos").glob("*/*.mp4"))[:good]
    (root / "videos" / "good").mkdir(parents=True)
    (root / "videos" / "bad").mkdir(parents=True)
    listed = []
    for i, src in enumerate(sources):
        shutil.copy(src, root / "videos" / "good" / f"clip{i}.mp4")
        listed.append(f"good/clip{i}.mp4")
    data = sources[0].read_bytes()
    (root / "videos" / "bad" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "videos" / "bad" / "empty.mp4").write_bytes(b"")
    clip = read_clip(sources[0], fps=8, size=64, seconds=2.0, sample_rate=16000)
    write_mp4(root / "videos" / "bad" / "silent.mp4", clip.frames, 8)
    bad = {"bad/truncated.mp4": "truncated or corrupt", "bad/empty.mp4": "empty", "bad/silent.mp4": "no audio stream"}
    (root / "train.txt").write_text("\n".join(listed[:1] + list(bad) + listed[1:]) + "\n")
    (root / "test.txt").write_text("bad/empty.mp4\nbad/truncated.mp4\n")
    return bad


def test_bad_files_are_listed_with_reasons_and_every_good_clip_is_cached(tmp_path, synthetic_root):
    data_root = tmp_path / "avsync"
    bad = _bad_folder(data_root, synthetic_root)
    result = run_module("jointdit.cache", "data=folder", f"data.root={data_root}", f"paths.root_dir={tmp_path}",
                        "shard_size=2", "split=train")
    assert result.returncode == 0, result.stdout + result.stderr
    out = next((tmp_path / "data" / "cache").glob("folder-pixel_mel-*"))
    rows = _assert_consistent(out)
    assert sorted(r["id"] for r in rows) == ["good__clip0", "good__clip1", "good__clip2"]
    failed = {Path(f["path"]).relative_to(data_root / "videos").as_posix(): f["reason"]
              for f in read_report(out)["train"]["failed"]}
    assert set(failed) == set(bad)
    for name, phrase in bad.items():
        assert phrase in failed[name], (name, failed[name])
        assert f"failed   {data_root / 'videos' / name}: " in result.stdout  # the printed summary
    assert "3 cached now" in result.stdout and "3 failed" in result.stdout


def test_nothing_cached_exits_non_zero_with_the_report(tmp_path, synthetic_root):
    data_root = tmp_path / "avsync"
    _bad_folder(data_root, synthetic_root, good=1)
    result = run_module("jointdit.cache", "data=folder", f"data.root={data_root}", f"paths.root_dir={tmp_path}",
                        "split=val")
    assert result.returncode != 0
    assert "nothing of split 'val' could be cached" in result.stdout
    out = next((tmp_path / "data" / "cache").glob("folder-pixel_mel-*"))
    report = read_report(out)["val"]
    assert {Path(f["path"]).name for f in report["failed"]} == {"empty.mp4", "truncated.mp4"}
    assert report["in_index"] == 0 and not list(out.glob("shard-*"))


def _cache_args(tmp_path: Path, synthetic_root: Path, *extra: str) -> list[str]:
    return [f"paths.root_dir={tmp_path}", f"data.root={synthetic_root}", "data.num_clips=8", *extra]


def test_a_run_killed_mid_shard_leaves_no_partial_shard_and_a_rerun_completes(tmp_path, synthetic_root):
    args = _cache_args(tmp_path, synthetic_root, "shard_size=2", "batch_size=2")
    crashed = run_module("jointdit.cache", *args, env={CRASH_ENV: "1"})
    assert crashed.returncode != 0
    out = next((tmp_path / "data" / "cache").glob("synthetic-*"))
    # The second shard's temp file was complete but never renamed: only the first shard is visible.
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")], "the hook should die after writing a temp file"
    rows = _assert_consistent(out)
    assert len(rows) == 2 and len(LatentDataset(out, "train")) == 2  # the partial cache is usable as is

    done = run_module("jointdit.cache", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 cached now, 2 already cached" in done.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    rows = _assert_consistent(out)
    train_ids = sorted(json.loads(line)["id"] for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()
                       if json.loads(line)["split"] == "train")
    assert sorted(r["id"] for r in rows) == train_ids
    for shard in out.glob("shard-*.safetensors"):
        assert _shard_ids(shard) == [r["id"] for r in rows if r["shard"] == shard.name]


@pytest.mark.slow
def test_a_sigkilled_run_restarts_to_a_complete_cache(tmp_path, synthetic_root):
    """A real SIGKILL at whatever point the run has reached once its first shard is in place (the default
    run kills deterministically mid-write through the CRASH_ENV hook instead)."""
    args = _cache_args(tmp_path, synthetic_root, "shard_size=1", "batch_size=1", "read_workers=0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")}
    proc = subprocess.Popen([sys.executable, "-m", "jointdit.cache", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_root = tmp_path / "data" / "cache"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not list(cache_root.glob("synthetic-*/shard-00000.safetensors")):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        assert list(cache_root.glob("synthetic-*/shard-00000.safetensors")), "no shard appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = next(cache_root.glob("synthetic-*"))
    rows_before = _assert_consistent(out, complete_run=False)
    assert 0 <= len(rows_before) < 7
    done = run_module("jointdit.cache", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _assert_consistent(out)
    assert len(rows) == 7 and {r["id"] for r in rows_before} <= {r["id"] for r in rows}


# ----------------------------------------------------------------------------------------------
# CLIP gate
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory) -> Path:
    """A tiny open_clip architecture (random weights) registered from a JSON file named after it."""
    path = tmp_path_factory.mktemp("clip") / "jd-tiny-clip.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    return path


def _clip_cfg(config: Path, threshold: float) -> dict:
    return {"enabled": True, "model": config.stem, "pretrained": None, "model_config": str(config),
            "threshold": threshold, "store_embeddings": True}


def test_clip_gate_keeps_clips_above_the_threshold_and_stores_embeddings(tmp_path, synthetic_root, tiny_clip_config):
    cfg = _cfg(tmp_path, synthetic_root)
    keep = build_cache(cfg.data, cfg.codec, tmp_path / "keep", "train", clip_cfg=_clip_cfg(tiny_clip_config, -1.0),
                       progress=False)
    assert (keep.cached, keep.filtered) == (7, [])
    rows = read_index(tmp_path / "keep")
    assert all(-1.0 <= r["clip_similarity"] <= 1.0 for r in rows)
    item = LatentDataset(tmp_path / "keep", "train")[0]
    assert item["clip_image"].shape == (32,) and item["clip_text_pooled"].shape == (32,)
    assert item["clip_text_tokens"].shape == (77, 64)
    # The stored similarity is the cosine of the stored embeddings.
    cosine = torch.nn.functional.cosine_similarity(item["clip_image"], item["clip_text_pooled"], dim=0)
    assert abs(float(cosine) - rows[0]["clip_similarity"]) < 1e-5

    drop = build_cache(cfg.data, cfg.codec, tmp_path / "drop", "train", clip_cfg=_clip_cfg(tiny_clip_config, 1.01),
                       progress=False)
    assert drop.cached == 0 and not drop.ok and len(drop.filtered) == 7
    assert all(f["similarity"] < 1.01 and f["threshold"] == 1.01 for f in drop.filtered)
    assert "filtered by CLIP" in drop.summary() and "CLIP similarity" in drop.summary()
    assert read_report(tmp_path / "drop")["train"]["filtered"] == drop.filtered
    with pytest.raises(CacheMismatchError, match="clip.threshold"):
        build_cache(cfg.data, cfg.codec, tmp_path / "drop", "train", clip_cfg=_clip_cfg(tiny_clip_config, 0.5),
                    progress=False)


# ----------------------------------------------------------------------------------------------
# Pretrained codecs (tiny random-init models in the real folder layout)
# ----------------------------------------------------------------------------------------------


def _make_tiny_pretrained():
    spec = importlib.util.spec_from_file_location("_jd_codec_fixtures", REPO / "tests" / "codecs" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_pretrained


def test_svd_audioldm2_cache_end_to_end(tmp_path, synthetic_root):
    _make_tiny_pretrained()(tmp_path / "assets" / "models")
    cfg = _cfg(tmp_path, synthetic_root, "codec=svd_audioldm2", f"paths.assets_dir={tmp_path / 'assets'}",
               "codec.device=cpu", "shard_size=4")
    (report,) = run_cache(cfg, progress=False, log=lambda _: None)
    assert report.cached == 7 and report.failed == []
    out = Path(cfg.out_dir)
    rows = _assert_consistent(out)
    # The tiny SVD VAE downsamples by 2 (two encoder blocks), the tiny AudioLDM2 VAE by 4.
    assert all(r["video_shape"] == [16, 4, 32, 32] and r["audio_shape"] == [8, 50, 16] for r in rows)
    assert (rows[0]["video_latent_fps"], rows[0]["audio_latent_fps"], rows[0]["codec"]) == (8.0, 25.0, "svd_audioldm2")
    video_codec, audio_codec = build_codecs(cfg.codec)
    clip = read_clip(rows[0]["source"], fps=8, size=64, seconds=2.0, sample_rate=16000)
    item = LatentDataset(out, "train", random_crop=False)[0]
    torch.testing.assert_close(item["video"], video_codec.encode(clip.frames[None])[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(item["audio"], audio_codec.encode(clip.wave[None])[0], atol=1e-4, rtol=1e-4)
    frames = video_codec.decode(item["video"][None])
    wave = audio_codec.decode(item["audio"][None])
    assert frames.shape == (1, 16, 3, 64, 64) and wave.shape == (1, 32000)
    cropped = LatentDataset(out, "train", max_t=8, seed=0)
    starts = {cropped.crop_window(i, e)[0] for i in range(len(cropped)) for e in range(4)}
    assert starts == {0, 8}  # 8 latent frames/s vs 25 audio steps/s: exact alignment every 8 frames
    assert cropped[0]["audio"].shape == (8, 25, 16)


# ----------------------------------------------------------------------------------------------
# ensure_cache (what the trainer calls)
# ----------------------------------------------------------------------------------------------


def test_ensure_cache_builds_the_synthetic_cache_once_where_cache_yaml_points(tmp_path, synthetic_root, capsys):
    cfg = _cfg(tmp_path, synthetic_root)
    out = ensure_cache(cfg, progress=False)
    assert out == Path(cfg.out_dir) == cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)
    assert sorted(r["split"] for r in read_index(out)) == ["train"] * 7 + ["val"]
    stamp = (out / "index.jsonl").stat().st_mtime_ns
    assert ensure_cache(cfg, progress=False) == out and (out / "index.jsonl").stat().st_mtime_ns == stamp

    data_root = tmp_path / "avsync"
    _bad_folder(data_root, synthetic_root, good=2)
    folder = compose("cache", [f"paths.root_dir={tmp_path}", "data=folder", f"data.root={data_root}"])
    with pytest.raises(CacheMissingError, match=r"python -m jointdit\.cache data=folder codec=pixel_mel split=train"):
        ensure_cache(folder)
    build_cache(folder.data, folder.codec, folder.out_dir, "train", progress=False)
    shutil.rmtree(data_root)  # a built cache trains without the raw files (and without a val split)
    assert ensure_cache(folder) == Path(folder.out_dir)
