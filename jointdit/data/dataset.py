"""Training data over the latent cache (``jointdit.data.cache``): memory-mapped, time-aligned crops.

Every item's video and audio latents cover the SAME seconds: the video latent runs at
``video_latent_fps`` and the audio latent at ``audio_latent_fps`` (both in the index), so a crop of
``max_t`` latent video frames starting at frame ``s`` is the audio crop starting at latent step
``s * audio_fps / video_fps``. By default crop starts are restricted to the frames where that is an
exact integer (exactly aligned; e.g. every 2nd frame for pixel_mel's 8 -> 100 fps); with
``exact_align=False`` any start is allowed and the audio start is rounded (off by at most half an
audio latent step).

Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped) once per worker process and
read with ``get_slice``, so an item reads only its own (cropped) bytes.

    data = LatentDataset(cache_dir, "train", spec=latents.spec_for_config(cfg))  # or max_t=8
    loader = DataLoader(data, batch_size=8, collate_fn=collate_latents, num_workers=2)
    for batch in loader:  # video [B,Tv,Cv,hv,wv], audio [B,Ca,La,Fa], caption [B], first_frame [B,3,H,W], ...
        ...

The trainer orders batches with ``training.EpochBatchSampler`` (each index paired with its epoch, so
crops drawn in worker processes follow the epoch).
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from jointdit.latents import LatentSpec, aligned_lengths
from jointdit.data.cache import (
    META_NAME,
    SPLITS,
    CacheMissingError,
    build_cache,
    build_command,
    cache_dir_for,
    cache_lock,
    cache_status,
    read_cache_spec,
    read_index,
    _build_locked,
)

CLIP_KEYS = ("clip_image", "clip_text_tokens", "clip_text_pooled")

__all__ = ["LatentDataset", "aligned_lengths", "collate_latents", "ensure_cache", "cache_dir_for", "build_cache",
           "CacheMissingError"]


def _ratio(audio_fps: float, video_fps: float) -> Fraction:
    return Fraction(audio_fps).limit_denominator(10_000) / Fraction(video_fps).limit_denominator(10_000)


def _missing_message(cache_dir: Path, split: str, why: str) -> str:
    meta_path = cache_dir / META_NAME
    command = "python -m jointdit.cache data=<data> codec=<codec> split=" + split
    if meta_path.exists():
        try:
            config = json.loads(meta_path.read_text()).get("config", {})
            command = build_command(config.get("data"), config.get("codec"), split)
        except (ValueError, AttributeError):
            pass
    return f"{why}; build the latent cache first: `{command}`"


class LatentDataset(Dataset):
    """Items of one split of a latent cache.

    Args:
        cache_dir: a folder written by ``python -m jointdit.cache``.
        split: ``train`` or ``val``.
        max_t: crop to at most this many latent video frames (0 = no crop); audio is cropped to the same seconds.
            Shorthand for ``spec=read_cache_spec(cache_dir).crop(max_t)`` without normalisation.
        spec: the :class:`~jointdit.latents.LatentSpec` items follow (usually the cache's spec cropped and
            trimmed to the model's patches, ``latents.spec_for_config``): every item is exactly
            ``spec.video_shape`` / ``spec.audio_shape``, normalised with the spec's per-channel statistics
            (none: raw latents). Overrides ``max_t``.
        seed: crop starts are drawn from ``(seed, index, epoch)`` — deterministic, different every epoch.
        random_crop: random crop starts (default: True for ``train``, else crops start at 0).
        exact_align: only use crop starts where the audio start is an exact latent step (see module doc).

    An item is a dict: ``video`` [Tv,Cv,hv,wv], ``audio`` [Ca,La,Fa], ``caption``, ``id``, ``index``,
    ``first_frame`` float [3,H,W] in [-1,1] (the clip's first frame), ``clip_image`` / ``clip_text_tokens``
    / ``clip_text_pooled`` when the cache stores them, ``video_start`` / ``audio_start`` (latent steps),
    ``start_seconds``, ``video_latent_fps``, ``audio_latent_fps``.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str = "train", max_t: int = 0, seed: int = 0,
                 random_crop: bool | None = None, exact_align: bool = True, spec: LatentSpec | None = None):
        self.cache_dir = Path(cache_dir)
        self.split = split
        if not (self.cache_dir / "index.jsonl").exists():
            why = (f"no latent cache at {self.cache_dir}" if not self.cache_dir.exists()
                   else f"{self.cache_dir} holds no cache index (index.jsonl)")
            raise CacheMissingError(_missing_message(self.cache_dir, split, why))
        self.rows = read_index(self.cache_dir, split)
        if not self.rows:
            raise CacheMissingError(_missing_message(
                self.cache_dir, split, f"the cache {self.cache_dir} holds no clips of split {split!r}"))
        if spec is None:
            cache_spec = read_cache_spec(self.cache_dir)
            if cache_spec is None:
                raise CacheMissingError(_missing_message(
                    self.cache_dir, split, f"{self.cache_dir} has an index but no {META_NAME} (the cache's LatentSpec)"))
            spec = cache_spec.with_stats(None, None).crop(int(max_t or 0))
        self.spec = spec
        self.video_fps, self.audio_fps = spec.video_latent_fps, spec.audio_latent_fps
        held = {r["id"]: aligned_lengths(int(r["video_shape"][0]), int(r["audio_shape"][1]), self.video_fps,
                                         self.audio_fps) for r in self.rows}
        short = [i for i, (tv, la) in held.items() if tv < spec.video_shape[0] or la < spec.audio_shape[1]]
        if short:
            raise ValueError(f"{self.cache_dir}: clips {short[:5]} hold fewer latents than the spec's "
                             f"{spec.video_shape[0]} video frames / {spec.audio_shape[1]} audio steps")
        self.max_t = spec.video_shape[0]
        self.seed = int(seed)
        self.random_crop = (split == "train") if random_crop is None else bool(random_crop)
        self.exact_align = bool(exact_align)
        self.epoch = 0
        self._handles: dict[str, Any] = {}
        self._pid: int | None = None

    # -- plumbing ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:  # open shard handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _handle(self, shard: str):
        if self._pid != os.getpid():  # a forked worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            path = self.cache_dir / shard
            if not path.exists():
                raise CacheMissingError(_missing_message(self.cache_dir, self.split, f"shard {path} is missing"))
            from jointdit.safeload import SHARD_SHA_KEY, cache_rebuild_command, shard_problem

            expected = next((r.get(SHARD_SHA_KEY) for r in self.rows if r["shard"] == shard), None)
            problem = shard_problem(path, expected)  # checked once per process, before any tensor is read
            if problem:
                from jointdit.errors import CacheCorruptError

                raise CacheCorruptError(f"cache shard {path} is {problem}",
                                        hint=f"rebuild it: `{cache_rebuild_command(self.cache_dir, self.split)}` "
                                             f"(a re-run re-caches just the clips of damaged shards)")
            handle = self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
        return handle

    # -- cropping ---------------------------------------------------------------------------------
    def crop_window(self, index: int, epoch: int | None = None) -> tuple[int, int, int, int]:
        """``(video_start, video_len, audio_start, audio_len)`` in latent steps for item ``index``."""
        row = self.rows[index]
        fv, fa = self.video_fps, self.audio_fps
        tv_all, la_all = aligned_lengths(int(row["video_shape"][0]), int(row["audio_shape"][1]), fv, fa)
        tv, la = self.spec.video_shape[0], self.spec.audio_shape[1]
        if tv_all <= tv:
            return 0, tv, 0, la
        ratio = _ratio(fa, fv)
        step = ratio.denominator if self.exact_align else 1
        starts = [s for s in range(0, tv_all - tv + 1, step) if int(round(s * fa / fv)) + la <= la_all] or [0]
        s = 0
        if self.random_crop and len(starts) > 1:
            epoch = self.epoch if epoch is None else int(epoch)
            entropy = np.random.SeedSequence([self.seed, int(index), epoch]).generate_state(1)[0]
            s = starts[int(np.random.default_rng(int(entropy)).integers(len(starts)))]
        a0 = int(round(s * fa / fv))
        return s, tv, a0, min(la, la_all - a0)

    # -- items ------------------------------------------------------------------------------------
    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        row = self.rows[index]
        names = row["tensors"]
        handle = self._handle(row["shard"])
        v0, tv, a0, la = self.crop_window(index, epoch)
        item = {
            "id": row["id"], "caption": row["caption"], "index": index,
            "video": self.spec.normalize_video(handle.get_slice(names["video"])[v0 : v0 + tv]),
            "audio": self.spec.normalize_audio(handle.get_slice(names["audio"])[:, a0 : a0 + la]),
            "video_start": v0, "audio_start": a0, "start_seconds": v0 / self.video_fps,
            "video_latent_fps": self.video_fps, "audio_latent_fps": self.audio_fps,
        }
        if "first_frame" in names:
            item["first_frame"] = handle.get_tensor(names["first_frame"]).float().div(127.5).sub(1.0)
        for key_ in CLIP_KEYS:
            if key_ in names:
                item[key_] = handle.get_tensor(names[key_])
        return item

    def __repr__(self) -> str:
        return (f"LatentDataset({str(self.cache_dir)!r}, split={self.split!r}, clips={len(self)}, max_t={self.max_t}, "
                f"video_latent_fps={self.video_fps}, audio_latent_fps={self.audio_fps})")


def collate_latents(items: Sequence[dict]) -> dict:
    """Batch items; items of different lengths are first cropped to the common (shortest) span.

    Items of one length (a :class:`LatentDataset` with a spec) are stacked as they are.

    Every item starts at its own aligned start, so cutting the tails to ``aligned_lengths`` of the
    shortest keeps each clip's video and audio on the same seconds. Returns ``video`` [B,Tv,Cv,hv,wv],
    ``audio`` [B,Ca,La,Fa], lists ``caption`` / ``id``, stacked ``first_frame`` and CLIP tensors when every
    item has them, ``index`` / ``video_start`` / ``audio_start`` (long) / ``start_seconds`` [B], and the
    two latent rates as floats.
    """
    if not items:
        raise ValueError("collate_latents got an empty batch")
    fv, fa = float(items[0]["video_latent_fps"]), float(items[0]["audio_latent_fps"])
    if any(float(i["video_latent_fps"]) != fv or float(i["audio_latent_fps"]) != fa for i in items):
        raise ValueError("collate_latents: items with different latent rates cannot share a batch")
    tv, la = min(i["video"].shape[0] for i in items), min(i["audio"].shape[1] for i in items)
    if any(i["video"].shape[0] != tv or i["audio"].shape[1] != la for i in items):  # ragged: cut to a common span
        tv, la = aligned_lengths(tv, la, fv, fa)
    batch: dict[str, Any] = {
        "video": torch.stack([i["video"][:tv] for i in items]),
        "audio": torch.stack([i["audio"][:, :la] for i in items]),
        "caption": [i["caption"] for i in items],
        "id": [i["id"] for i in items],
        "video_latent_fps": fv,
        "audio_latent_fps": fa,
    }
    for key, dtype in (("index", torch.long), ("video_start", torch.long), ("audio_start", torch.long),
                       ("start_seconds", torch.float32)):
        if all(key in i for i in items):
            batch[key] = torch.tensor([i[key] for i in items], dtype=dtype)
    for key in ("first_frame", *CLIP_KEYS):
        present = [key in i for i in items]
        if all(present):
            batch[key] = torch.stack([i[key] for i in items])
        elif any(present):
            raise ValueError(f"collate_latents: only some items have {key!r}")
    return batch


def _built_clip_settings(out: Path) -> dict | None:
    try:
        clip = json.loads((out / META_NAME).read_text()).get("config", {}).get("clip")
    except (OSError, ValueError):
        return None
    return {**clip, "enabled": True} if clip else None


def ensure_cache(cfg: Any, progress: bool = True) -> Path:
    """The cache folder for ``cfg`` (``cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)``), built if needed.

    For ``data.name == "synthetic"`` a missing or incomplete cache is built (both splits; a cache of a
    different synthetic config in that folder is rebuilt). Options come from ``cfg.cache`` when the
    config has one (``shard_size``, ``batch_size``, ``device``, ``read_workers``, ``clip``); otherwise
    the defaults, and the CLIP settings the folder was built with (none for a new one). For real data
    the folder must hold a train split built with the same data/codec config (the raw files are not
    needed), else :class:`CacheMissingError` names the commands to run. Concurrent callers wait on the
    folder's lock (call it on the main process first).
    """
    out = cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)
    options = cfg.get("cache") or {}
    clip_cfg = options.get("clip")
    compare_clip = clip_cfg is not None
    if not compare_clip:  # keep whatever CLIP settings the folder was built with
        clip_cfg = _built_clip_settings(out)
    if cfg.data.name != "synthetic":  # real data: the train split must be there; the raw files need not be
        status = cache_status(out, cfg.data, cfg.codec, clip_cfg, compare_clip=compare_clip, splits=("train",),
                              check_source=False)
        if status.complete:
            return out
        commands = " and ".join(f"`{build_command(cfg.data, cfg.codec, s)}`" for s in SPLITS)
        raise CacheMissingError(f"{status.problem}; build the latent cache first: {commands} "
                                f"(with paths.cache_dir={cfg.paths.cache_dir})")
    status = cache_status(out, cfg.data, cfg.codec, clip_cfg, compare_clip=compare_clip)
    if status.complete:
        return out
    with cache_lock(out, wait=True):
        status = cache_status(out, cfg.data, cfg.codec, clip_cfg, compare_clip=compare_clip)  # another process may have built it
        if not status.complete:
            for i, split in enumerate(SPLITS):
                report = _build_locked(
                    cfg.data, cfg.codec, out, split, shard_size=int(options.get("shard_size", 64)),
                    batch_size=int(options.get("batch_size", 4)), device=str(options.get("device", "auto")),
                    clip_cfg=clip_cfg, read_workers=int(options.get("read_workers", 2)),
                    store_first_frame=bool(options.get("store_first_frame", True)),
                    overwrite=status.mismatch and i == 0, progress=progress, log=print)
                print(report.summary())
    return out
