"""The latent cache: clips -> codec latents in sharded safetensors plus one JSON-lines index.

Layout of a cache folder (``cache_dir_for(data, codec, cache_root)``)::

    meta.json                 format, the data/codec (/CLIP) config the cache was built with, and ``spec``: the
                              LatentSpec of its clips (shapes, rates, time origins, CLIP widths, per-channel
                              mean/std of the train split) — see ``read_cache_spec``
    index.jsonl               one row per cached clip (see ``_row``); appended only after its shard is in place
    shard-00000.safetensors   tensors "<id>.video" [Tv,Cv,hv,wv], "<id>.audio" [Ca,La,Fa],
                              "<id>.first_frame" uint8 [3,H,W], optional "<id>.clip_image" [Di],
                              "<id>.clip_text_tokens" [L,Dt], "<id>.clip_text_pooled" [Dp]
    first_frames/<id>.png     the first frame of every cached clip
    report.json               per split: clips that failed (file, reason) or were filtered by the CLIP gate

Crash safety: a shard is written under a hidden temporary name in the same folder, fsynced and renamed
into place (``os.replace``); only then are its index rows appended (and fsynced). So the index never
names a missing shard, a killed run leaves no half-written ``shard-*.safetensors``, and a re-run
(which reads the index and skips the clips it lists) completes the cache. On start, a run removes temp
files, a torn last index line and shards no index row names. One run at a time per folder (a lock file).

    python -m jointdit.cache data=avsync15 codec=svd_audioldm2 split=train
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from jointdit.config import to_plain
from jointdit.latents import LatentSpec, clip_widths_of, spec_for_data
from jointdit.safeload import SHARD_SHA_KEY, damaged_shards, file_sha256

INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"
REPORT_NAME = "report.json"
LOCK_NAME = ".lock"
FIRST_FRAMES_DIR = "first_frames"
SHARD_GLOB = "shard-*.safetensors"
TEMP_PREFIX = ".tmp-"
CACHE_FORMAT = 1
CRASH_ENV = "JOINTDIT_CACHE_CRASH_AFTER_SHARDS"  # test hook: die mid-write of the shard after N shards
SPLITS = ("train", "val")

# Codec settings that change how fast or how decoding runs, never what an encoded latent holds.
_RUNTIME_CODEC_KEYS = {"device", "encode_batch", "decode_batch", "decode_chunk", "decode_overlap",
                       "griffin_lim_iters", "griffin_lim_momentum", "seed"}
_CLIP_KEYS = ("model", "pretrained", "model_config", "threshold", "store_embeddings")


class CacheError(RuntimeError):
    """A cache folder that cannot be used as asked."""


class CacheMismatchError(CacheError):
    """The folder holds a cache built with a different data/codec/CLIP configuration."""


class CacheMissingError(FileNotFoundError):
    """No (or no complete) cache where one was expected; the message says how to build it."""


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------


def cache_dir_for(data_cfg: Any, codec_cfg: Any, cache_root: str | os.PathLike) -> Path:
    """The cache folder for a (data, codec) pair under ``cache_root`` (``cfg.paths.cache_dir``).

    ``<data.name>-<codec.name>-<size>px-<fps>fps-<seconds>s``; conf/cache.yaml's ``out_dir`` is the
    same expression. Other settings (root, seed, codec parameters, ...) are checked against
    ``meta.json`` so a mismatch is refused rather than silently mixed.
    """
    d, c = to_plain(data_cfg), to_plain(codec_cfg)
    return Path(cache_root) / f"{d['name']}-{c['name']}-{d['size']}px-{d['fps']}fps-{d['seconds']}s"


def _strip_runtime(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _strip_runtime(v) for k, v in tree.items() if k not in _RUNTIME_CODEC_KEYS}
    return tree


def clip_settings(clip_cfg: Any) -> dict | None:
    """The CLIP gate settings that shape a cache's content, or None when the gate is off."""
    c = to_plain(clip_cfg) or {}
    if not c.get("enabled", False):
        return None
    return {k: c.get(k) for k in _CLIP_KEYS}


def cache_config(data_cfg: Any, codec_cfg: Any, clip_cfg: Any = None) -> dict:
    """What ``meta.json`` records and a re-run must match."""
    return {"data": to_plain(data_cfg), "codec": _strip_runtime(to_plain(codec_cfg)), "clip": clip_settings(clip_cfg)}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: cached {old!r}, now {new!r}"]


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def cache_lock(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``out/.lock`` (flock; released by the kernel if the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CacheError(f"another cache run is writing to {out}; wait for it to finish") from err
            raise
        yield
    finally:
        fh.close()


# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------


def read_index(cache_dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of ``index.jsonl`` (optionally one split). A torn last line (a killed append) is ignored."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.exists():
        return []
    rows = []
    complete = path.read_bytes().split(b"\n")[:-1]  # text after the last newline never finished writing
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise CacheError(f"{path} line {number} is not valid JSON ({err}); the index is corrupt") from err
    return [r for r in rows if split is None or r["split"] == split]


def _append_index(out: Path, rows: list[dict]) -> None:
    with open(out / INDEX_NAME, "ab") as fh:
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def _recover(out: Path, log: Callable[[str], None]) -> list[dict]:
    """Clean what a killed run may have left; returns the index rows (all splits)."""
    for tmp in out.glob(f"{TEMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
    for tmp in (out / FIRST_FRAMES_DIR).glob(f"{TEMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
    index = out / INDEX_NAME
    if index.exists():
        data = index.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn append: drop the partial line
            with open(index, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                os.fsync(fh.fileno())
    rows = read_index(out)
    missing = [r for r in rows if not (out / r["shard"]).exists()]
    if missing:
        log(f"warning: {len(missing)} index rows name missing shards; those clips will be cached again")
        keep = [r for r in rows if (out / r["shard"]).exists()]
        _write_atomic(index, b"".join(json.dumps(r).encode() + b"\n" for r in keep))
        rows = keep
    damaged = damaged_shards(out, rows)  # truncated, or not matching its checksum in the index
    if damaged:
        for name, problem in damaged.items():
            log(f"warning: shard {out / name} is {problem}; its clips will be cached again")
        rows = [r for r in rows if r["shard"] not in damaged]
        _write_atomic(index, b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    named = {r["shard"] for r in rows}
    for shard in out.glob(SHARD_GLOB):
        if shard.name not in named:  # renamed into place, but its index rows never got written
            shard.unlink()
    return rows


def _shard_number(name: str) -> int:
    try:
        return int(name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class CacheReport:
    """What one run did for one split."""

    out_dir: str
    split: str
    listed: int = 0  # clips the source lists for the split
    already: int = 0  # skipped: already in the index
    cached: int = 0  # cached by this run
    in_index: int = 0  # rows of this split in the index after the run
    failed: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}
    filtered: list[dict] = field(default_factory=list)  # {"id", "path", "similarity", "threshold", "caption"}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Something of this split is cached (the exit code is non-zero only when nothing is)."""
        return self.in_index > 0

    def summary(self) -> str:
        lines = [f"cache {self.out_dir} [{self.split}]: {self.cached} cached now, {self.already} already cached, "
                 f"{len(self.failed)} failed, {len(self.filtered)} filtered by CLIP; {self.in_index} of "
                 f"{self.listed} clips in the index ({self.seconds:.1f} s)"]
        lines += [f"  failed   {f['path']}: {f['reason']}" for f in self.failed]
        lines += [f"  filtered {f['path']}: CLIP similarity {f['similarity']:.3f} < {f['threshold']}"
                  for f in self.filtered]
        if not self.ok:
            lines.append(f"  nothing of split {self.split!r} could be cached")
        return "\n".join(lines)


def _save_report(out: Path, report: CacheReport) -> None:
    path = out / REPORT_NAME
    try:
        everything = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        everything = {}
    everything[report.split] = asdict(report)
    _write_json(path, everything)


def read_report(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / REPORT_NAME
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


class _ClipGate:
    """First-frame/caption CLIP similarity (open_clip, through ClipConditioner) and embeddings."""

    def __init__(self, settings: dict, device: torch.device):
        import jointdit  # noqa: F401  (torchvision fix before open_clip)
        import open_clip

        from jointdit.models.conditioning import ClipConditioner

        if settings.get("model_config"):
            open_clip.add_model_config(Path(settings["model_config"]).expanduser())
        self.threshold = settings.get("threshold")
        self.store = bool(settings.get("store_embeddings", True))
        self.encoder = ClipConditioner(settings["model"], settings.get("pretrained"), device=device)

    @torch.no_grad()
    def __call__(self, first_frames: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict]:
        tokens, pooled = self.encoder.encode_text(captions)
        image = self.encoder.encode_image(first_frames)
        similarity = torch.nn.functional.cosine_similarity(image, pooled, dim=-1).cpu()
        return similarity, {"clip_image": image.cpu(), "clip_text_tokens": tokens.cpu(), "clip_text_pooled": pooled.cpu()}


class _ShardWriter:
    """Buffers encoded clips and writes them ``shard_size`` at a time: temp file, fsync, rename, index."""

    def __init__(self, out: Path, shard_size: int, first_number: int):
        self.out, self.shard_size, self.number = out, max(int(shard_size), 1), first_number
        self.buffer: list[tuple[dict, dict[str, torch.Tensor]]] = []
        self.written = 0
        crash = os.environ.get(CRASH_ENV, "").strip()
        self.crash_after = int(crash) if crash else None

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> int:
        self.buffer.append((row, tensors))
        return self.flush() if len(self.buffer) >= self.shard_size else 0

    def flush(self) -> int:
        from safetensors.torch import save_file

        if not self.buffer:
            return 0
        name = f"shard-{self.number:05d}.safetensors"
        flat, rows = {}, []
        for row, tensors in self.buffer:
            row = {**row, "shard": name, "tensors": {k: f"{row['id']}.{k}" for k in tensors}}
            flat.update({f"{row['id']}.{k}": v for k, v in tensors.items()})
            rows.append(row)
        tmp = self.out / f"{TEMP_PREFIX}{name}.{os.getpid()}"
        try:
            save_file(flat, str(tmp), metadata={"format": "pt", "jointdit_cache": str(CACHE_FORMAT),
                                                "ids": json.dumps([r["id"] for r in rows])})
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; shards are plain data
            _fsync_path(tmp)
        except OSError as err:  # disk full: no temp left; the shards and index written so far stay valid
            from jointdit import safeio

            safeio.discard(tmp)
            raise safeio.write_error(err, self.out / name) from err
        digest = file_sha256(tmp)  # in every row of the index: a damaged shard is named, then rebuilt
        rows = [{**row, SHARD_SHA_KEY: digest} for row in rows]
        if self.crash_after is not None and self.written >= self.crash_after:
            os._exit(1)  # test hook: the temp file is complete, the rename never happens
        os.replace(tmp, self.out / name)
        _fsync_path(self.out)
        _append_index(self.out, rows)
        self.number += 1
        self.written += 1
        count, self.buffer = len(self.buffer), []
        return count


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _try_read(read: Callable, ref) -> Any:
    try:
        return read(ref)
    except Exception as err:  # noqa: BLE001 - every unreadable file is reported, none stops the run
        return err


def _read_batches(refs: list, batch_size: int, read: Callable, workers: int) -> Iterator[list[tuple[Any, Any]]]:
    """``[(ref, Clip | Exception)]`` per batch, reading the next batch while the caller encodes this one."""
    batches = (refs[i : i + batch_size] for i in range(0, len(refs), batch_size))
    if workers <= 0:
        for batch in batches:
            yield [(ref, _try_read(read, ref)) for ref in batch]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-read") as pool:
        submit = lambda batch: [(ref, pool.submit(_try_read, read, ref)) for ref in batch]  # noqa: E731
        pending = deque(submit(b) for b in islice(batches, 2))
        while pending:
            current = pending.popleft()
            following = next(batches, None)
            if following is not None:
                pending.append(submit(following))
            yield [(ref, future.result()) for ref, future in current]


def _reason(err: BaseException) -> str:
    from jointdit.data.media import MediaError

    return err.problem if isinstance(err, MediaError) else f"{type(err).__name__}: {err}"


def _to_uint8(frame: torch.Tensor) -> torch.Tensor:
    return frame.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def _save_png(path: Path, image_u8: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    Image.fromarray(image_u8.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def _safe_name(clip_id: str) -> str:
    return clip_id.replace(os.sep, "__").replace("/", "__")


def _check_meta(out: Path, config: dict, overwrite: bool, log: Callable[[str], None]) -> None:
    path = out / META_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        problems = [] if old.get("format") == CACHE_FORMAT else [f"format: cached {old.get('format')!r}, now {CACHE_FORMAT}"]
        problems += _diff(old.get("config", {}), config)
        if not problems:
            return
        if not overwrite:
            raise CacheMismatchError(
                f"{out} holds a cache built with a different configuration:\n  " + "\n  ".join(problems)
                + f"\nUse another folder (out_dir=... or paths.cache_dir=...), delete {out}, or pass overwrite=true "
                "to rebuild it.")
        log(f"rebuilding {out}: its configuration changed ({'; '.join(problems)})")
        wipe_cache(out)
    elif (out / INDEX_NAME).exists():
        raise CacheMismatchError(f"{out} has an {INDEX_NAME} but no {META_NAME}; delete the folder or pass overwrite=true")
    _write_json(path, {"format": CACHE_FORMAT, "config": config, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def wipe_cache(out: str | os.PathLike) -> None:
    """Remove the files a cache consists of (and nothing else) from ``out``."""
    out = Path(out)
    for pattern in (SHARD_GLOB, f"{TEMP_PREFIX}*", INDEX_NAME, META_NAME, REPORT_NAME):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    frames = out / FIRST_FRAMES_DIR
    if frames.is_dir():
        for path in frames.iterdir():
            path.unlink(missing_ok=True)
        frames.rmdir()


def _codec_config(codec_cfg: Any, device: str) -> dict:
    c = to_plain(codec_cfg)
    if "device" in c and str(device) != "auto" and str(c.get("device", "auto")) == "auto":
        c["device"] = str(device)
    return c


def build_cache(
    data_cfg: Any,
    codec_cfg: Any,
    out_dir: str | os.PathLike,
    split: str = "train",
    *,
    shard_size: int = 64,
    batch_size: int = 4,
    device: str = "auto",
    clip_cfg: Any = None,
    read_workers: int = 2,
    store_first_frame: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CacheReport:
    """Cache one split of ``data_cfg``'s clips with ``codec_cfg``'s codecs into ``out_dir`` (resumable).

    Returns the run's :class:`CacheReport` (also saved in ``report.json``). Raises
    :class:`CacheMismatchError` when ``out_dir`` holds a cache of another configuration (unless
    ``overwrite``) and :class:`CacheError` when another run holds the folder.
    """
    out = Path(out_dir)
    with cache_lock(out):
        return _build_locked(data_cfg, codec_cfg, out, split, shard_size=shard_size, batch_size=batch_size,
                             device=device, clip_cfg=clip_cfg, read_workers=read_workers,
                             store_first_frame=store_first_frame, overwrite=overwrite, progress=progress, log=log)


def _build_locked(data_cfg, codec_cfg, out: Path, split: str, *, shard_size, batch_size, device, clip_cfg,
                  read_workers, store_first_frame, overwrite, progress, log) -> CacheReport:
    from tqdm import tqdm

    from jointdit.codecs import build_codecs
    from jointdit.codecs.base import resolve_device
    from jointdit.data.media import read_clip
    from jointdit.data.sources import build_source

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    started = time.perf_counter()
    data = to_plain(data_cfg)
    config = cache_config(data_cfg, codec_cfg, clip_cfg)
    _check_meta(out, config, overwrite, log)
    rows = _recover(out, log)
    report = CacheReport(out_dir=str(out), split=split)

    refs = build_source(data_cfg).clips(split)
    report.listed = len(refs)
    done = {r["id"] for r in rows if r["split"] == split}
    seen, todo = set(), []
    for ref in refs:
        if ref.id in seen:
            report.failed.append({"id": ref.id, "path": str(ref.path), "reason": "duplicate clip id in the source"})
            continue
        seen.add(ref.id)
        if ref.id in done:
            report.already += 1
        else:
            todo.append(ref)

    if todo:
        dev = resolve_device(device)
        video_codec, audio_codec = build_codecs(_codec_config(codec_cfg, device))
        gate = _ClipGate(config["clip"], dev) if config["clip"] else None
        numbers = [_shard_number(p.name) for p in out.glob(SHARD_GLOB)] + [_shard_number(r["shard"]) for r in rows]
        writer = _ShardWriter(out, shard_size, max(numbers, default=-1) + 1)
        fps, sr, seconds = float(data["fps"]), int(data["sample_rate"]), float(data["seconds"])
        if sr != int(audio_codec.sample_rate):
            raise CacheError(f"data.sample_rate={sr} but the audio codec runs at {audio_codec.sample_rate} Hz; "
                             f"set data.sample_rate={audio_codec.sample_rate}")
        read = lambda ref: read_clip(ref.path, fps=fps, size=data["size"], seconds=seconds, sample_rate=sr,  # noqa: E731
                                     allow_missing_audio=bool(data.get("allow_missing_audio", False)))
        codec_spec = LatentSpec.from_codecs(video_codec, audio_codec, fps=fps, size=data["size"], seconds=seconds,
                                            sample_rate=sr, codec=config["codec"])
        video_fps, audio_fps = codec_spec.video_latent_fps, codec_spec.audio_latent_fps
        bar = tqdm(total=len(todo), desc=f"cache {split}", unit="clip", disable=not progress, dynamic_ncols=True)
        for batch in _read_batches(todo, max(int(batch_size), 1), read, int(read_workers)):
            good = []
            for ref, result in batch:
                if isinstance(result, BaseException):
                    report.failed.append({"id": ref.id, "path": str(ref.path), "reason": _reason(result)})
                else:
                    good.append((ref, result))
            if good:
                report.cached += _encode_and_add(good, video_codec, audio_codec, gate, writer, dev, report,
                                                 out, store_first_frame, codec_name=str(config["codec"]["name"]),
                                                 video_fps=video_fps, audio_fps=audio_fps)
            bar.update(len(batch))
            bar.set_postfix(failed=len(report.failed), filtered=len(report.filtered))
        report.cached += writer.flush()
        bar.close()

    if report.cached or not _meta(out).get("spec"):
        write_cache_spec(out, codec_spec if todo else None, config, log)
    report.in_index = len(read_index(out, split))
    report.seconds = time.perf_counter() - started
    _save_report(out, report)
    return report


@torch.inference_mode()
def _encode_and_add(good, video_codec, audio_codec, gate, writer: _ShardWriter, dev, report: CacheReport, out: Path,
                    store_first_frame: bool, codec_name: str, video_fps: float, audio_fps: float) -> int:
    frames = torch.stack([clip.frames for _, clip in good])  # [B,T,3,H,W]
    waves = torch.stack([clip.wave for _, clip in good])  # [B,N]
    first = frames[:, 0]
    keep = list(range(len(good)))
    similarity, embeddings = None, {}
    if gate is not None:
        similarity, found = gate(first.to(dev), [ref.caption for ref, _ in good])
        if gate.threshold is not None:
            keep = [i for i in keep if float(similarity[i]) >= float(gate.threshold)]
            for i in sorted(set(range(len(good))) - set(keep)):
                ref = good[i][0]
                report.filtered.append({"id": ref.id, "path": str(ref.path), "similarity": float(similarity[i]),
                                        "threshold": float(gate.threshold), "caption": ref.caption})
        if gate.store:
            embeddings = found
    if not keep:
        return 0
    frames, waves, first = frames[keep], waves[keep], first[keep]
    z_video = video_codec.encode(frames.to(dev)).float().cpu()
    z_audio = audio_codec.encode(waves.to(dev)).float().cpu()
    written = 0
    for j, i in enumerate(keep):
        ref, clip = good[i]
        tensors = {"video": z_video[j].contiguous().clone(), "audio": z_audio[j].contiguous().clone()}
        image = _to_uint8(first[j])
        if store_first_frame:
            tensors["first_frame"] = image.contiguous().clone()
        for key, value in embeddings.items():
            tensors[key] = value[i].float().contiguous().clone()
        png = f"{FIRST_FRAMES_DIR}/{_safe_name(ref.id)}.png"
        _save_png(out / png, image)
        row = {
            "id": ref.id, "split": ref.split, "label": ref.label, "caption": ref.caption, "source": str(ref.path),
            "events": list(ref.events) if ref.events is not None else None,
            "fps": clip.fps, "sample_rate": clip.sample_rate, "seconds": clip.seconds,
            "num_frames": int(clip.frames.shape[0]), "num_samples": int(clip.wave.shape[0]),
            "size": [int(clip.frames.shape[2]), int(clip.frames.shape[3])], "has_audio": bool(clip.has_audio),
            "video_shape": list(tensors["video"].shape), "audio_shape": list(tensors["audio"].shape),
            "video_latent_fps": video_fps, "audio_latent_fps": audio_fps,
            "codec": codec_name, "video_codec": getattr(video_codec, "name", ""),
            "audio_codec": getattr(audio_codec, "name", ""), "first_frame": png,
            "clip_similarity": None if similarity is None else float(similarity[i]),
        }
        written += writer.add(row, tensors)
    return written


# ----------------------------------------------------------------------------------------------
# The cache's LatentSpec
# ----------------------------------------------------------------------------------------------

STATS_MAX_CLIPS = 1024  # per-channel statistics are measured on at most this many train clips (index order)
_STD_FLOOR = 1e-3  # a constant channel (e.g. a flat border of space-to-depth pixels) normalises by this, not by 0


def _meta(out: Path) -> dict:
    try:
        return json.loads((out / META_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _channel_stats(out: Path, rows: list[dict], key: str, channel_axis: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (float64 sums, population std) of tensor ``key`` over ``rows``."""
    from safetensors import safe_open

    total = total_sq = None
    count = 0
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, shard_rows in by_shard.items():
        with safe_open(str(out / shard), framework="pt", device="cpu") as handle:
            for row in shard_rows:
                z = handle.get_tensor(row["tensors"][key]).double().movedim(channel_axis, 0).flatten(1)  # [C, n]
                total = z.sum(1) if total is None else total + z.sum(1)
                total_sq = (z * z).sum(1) if total_sq is None else total_sq + (z * z).sum(1)
                count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(_STD_FLOOR)
    return mean.tolist(), std.tolist()


def write_cache_spec(out: Path, codec_spec: LatentSpec | None, config: dict, log: Callable[[str], None] = print) -> LatentSpec | None:
    """Write ``meta.json``'s ``spec``: ``codec_spec`` (or one computed from the config), checked against every
    row's stored shapes, with the CLIP widths and the train split's per-channel mean/std measured from the shards."""
    rows = read_index(out)
    if not rows:
        return None
    spec = codec_spec or spec_for_data(config["data"], config["codec"])
    odd = [r["id"] for r in rows if tuple(r["video_shape"]) != spec.video_shape or tuple(r["audio_shape"]) != spec.audio_shape]
    if odd:
        raise CacheError(f"{out}: clips {odd[:5]} have latent shapes {rows[0]['video_shape']} / {rows[0]['audio_shape']}, "
                         f"but the codecs give {list(spec.video_shape)} / {list(spec.audio_shape)} for "
                         f"{spec.seconds} s at {spec.fps} fps; rebuild the cache (overwrite=true)")
    train = [r for r in rows if r["split"] == "train"] or rows
    sample = train[:STATS_MAX_CLIPS]
    from safetensors import safe_open

    with safe_open(str(out / sample[0]["shard"]), framework="pt", device="cpu") as handle:
        stored = {k: handle.get_tensor(v) for k, v in sample[0]["tensors"].items() if k.startswith("clip_")}
    spec = dataclasses.replace(spec, clip_widths=clip_widths_of(stored)).with_stats(
        _channel_stats(out, sample, "video", 1), _channel_stats(out, sample, "audio", 0))
    meta = _meta(out)
    meta["spec"] = spec.to_json()
    _write_json(out / META_NAME, meta)
    return spec


def read_cache_spec(cache_dir: str | os.PathLike) -> LatentSpec | None:
    """The :class:`LatentSpec` of a cache folder (``None`` when there is no cache there).

    Caches written before the spec existed have none in ``meta.json``: theirs is rebuilt from the first
    index row (shapes, rates) and the codec config (time origins); they carry no statistics.
    """
    out = Path(cache_dir)
    meta = _meta(out)
    if meta.get("spec"):
        return LatentSpec.from_json(meta["spec"])
    rows = read_index(out) if (out / INDEX_NAME).exists() else []
    config = meta.get("config") or {}
    if not rows or not config.get("data") or not config.get("codec"):
        return None
    row = rows[0]
    base = spec_for_data(config["data"], config["codec"])
    return dataclasses.replace(base, video_shape=tuple(row["video_shape"]), audio_shape=tuple(row["audio_shape"]),
                               video_latent_fps=float(row["video_latent_fps"]), audio_latent_fps=float(row["audio_latent_fps"]))


# ----------------------------------------------------------------------------------------------
# From a composed config (the entry point and ensure_cache)
# ----------------------------------------------------------------------------------------------


def resolve_out_dir(cfg: Any) -> Path:
    """``cfg.out_dir``, or :func:`cache_dir_for` under ``cfg.paths.cache_dir`` when it is null."""
    out_dir = cfg.get("out_dir") if hasattr(cfg, "get") else None
    return Path(out_dir) if out_dir else cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)


def run_cache(cfg: Any, progress: bool = True, log: Callable[[str], None] = print) -> list[CacheReport]:
    """Cache ``cfg.split`` (``train``, ``val`` or ``all``) as the composed ``cache`` config says."""
    split = str(cfg.get("split", "train"))
    splits = list(SPLITS) if split in ("all", "both") else [split]
    out = resolve_out_dir(cfg)
    reports = []
    for i, s in enumerate(splits):
        report = build_cache(
            cfg.data, cfg.codec, out, s, shard_size=int(cfg.get("shard_size", 64)), batch_size=int(cfg.get("batch_size", 4)),
            device=str(cfg.get("device", "auto")), clip_cfg=cfg.get("clip"), read_workers=int(cfg.get("read_workers", 2)),
            store_first_frame=bool(cfg.get("store_first_frame", True)),
            overwrite=bool(cfg.get("overwrite", False)) and i == 0, progress=progress, log=log)
        log(report.summary())
        reports.append(report)
    return reports


@dataclass
class CacheStatus:
    out_dir: Path
    complete: bool
    mismatch: bool = False
    problem: str = ""


def cache_status(out: str | os.PathLike, data_cfg: Any, codec_cfg: Any, clip_cfg: Any = None,
                 compare_clip: bool = False, splits: Iterable[str] = SPLITS, check_source: bool = True) -> CacheStatus:
    """Is ``out`` a complete cache of ``data_cfg`` with ``codec_cfg``?

    Complete: ``meta.json`` matches, the index holds clips of ``splits``, and (with ``check_source``)
    every clip the source lists for each split is either in the index or reported as failed/filtered.
    The CLIP settings count only with ``compare_clip``.
    """
    splits = tuple(splits)
    out = Path(out)
    meta_path = out / META_NAME
    if not meta_path.exists():
        return CacheStatus(out, False, problem=f"no cache at {out}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return CacheStatus(out, False, mismatch=True, problem=f"{meta_path} is not valid JSON")
    want = cache_config(data_cfg, codec_cfg, clip_cfg)
    have = dict(meta.get("config", {}))
    if not compare_clip:
        want.pop("clip"), have.pop("clip", None)
    problems = _diff(have, want) + ([] if meta.get("format") == CACHE_FORMAT else ["format"])
    if problems:
        return CacheStatus(out, False, mismatch=True,
                           problem=f"{out} was built with a different configuration: " + "; ".join(problems))
    rows = read_index(out)
    for split in splits:
        if not any(r["split"] == split for r in rows) and not check_source:
            return CacheStatus(out, False, problem=f"{out} holds no clips of split {split!r}")
    if not check_source:
        return CacheStatus(out, True)
    from jointdit.data.sources import build_source

    report = read_report(out)
    source = build_source(data_cfg)
    for split in splits:
        accounted = {r["id"] for r in rows if r["split"] == split}
        accounted |= {f["id"] for f in report.get(split, {}).get("failed", [])}
        accounted |= {f["id"] for f in report.get(split, {}).get("filtered", [])}
        missing = [ref.id for ref in source.clips(split) if ref.id not in accounted]
        if missing:
            return CacheStatus(out, False, problem=f"{out} lacks {len(missing)} clips of split {split!r}")
    if not any(r["split"] in splits for r in rows):
        return CacheStatus(out, False, problem=f"{out} holds no clips")
    return CacheStatus(out, True)


def build_command(data_cfg: Any, codec_cfg: Any, split: str = "train") -> str:
    """The command line that builds the cache for ``(data, codec)``."""
    d, c = to_plain(data_cfg) or {}, to_plain(codec_cfg) or {}
    extra = f" data.root={d['root']}" if d.get("name") == "folder" and d.get("root") else ""
    return f"python -m jointdit.cache data={d.get('name', '...')} codec={c.get('name', '...')} split={split}{extra}"


__all__ = [
    "CacheError", "CacheMismatchError", "CacheMissingError", "CacheReport", "CacheStatus", "build_cache",
    "build_command", "cache_dir_for", "cache_config", "cache_status", "read_index", "read_report", "resolve_out_dir",
    "run_cache", "wipe_cache", "read_cache_spec", "write_cache_spec", "INDEX_NAME", "META_NAME", "REPORT_NAME", "CRASH_ENV",
]
