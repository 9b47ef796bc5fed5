"""The UI's one adapter to the sampler: load a model folder, estimate memory, generate, free.

Everything the page does to a model goes through :class:`Backend`; the Gradio code never touches
torch, codecs or the sampler. Generation calls the same functions as ``python -m jointdit.sample``
(:mod:`jointdit.diffusion.sampler`: input loading, CLIP conditions, ``sample_latents`` with JointCFG,
decoding, MP4/WAV/PNG writers), with two additions the page needs:

- a per-step hook: the guidance object is wrapped so that every ODE step (= one guided model call)
  reports ``(sample k of n, step i of N)`` and checks the cancel flag BEFORE computing; a set flag
  raises :class:`Cancelled`, so sampling stops between steps and nothing half-done is written;
- one folder per output: ``<out_dir>/<YYYYmmdd-HHMMSS>-<task>-seed<seed>[-k]``, created with
  ``exist_ok=False`` so nothing is ever overwritten; it holds ``sample.mp4`` (video + sound),
  ``sample_video.mp4``, ``sample.wav``, ``sample.png`` (frame strip over the spectrogram) and
  ``request.json`` (model, task, seed, steps, guidance, knobs, inputs).

Memory. ``max_t`` (latent frames) shortens the sampled clip to ``max_t / video_latent_fps`` seconds;
``q_chunk_v`` / ``q_chunk_a`` / ``kv_downsample`` set the model's attention knobs; ``vid_decode_chunk``
sets the video codec's decode chunk when it has one (SVD). :meth:`Backend.estimate` runs the memory
planner (:func:`jointdit.memory.estimate_peak`, ``training=False``) on the same shapes and knobs, with
the batched forward's size = the number of guidance branches that will be computed.

Switching models drops every reference to the old model and codecs, runs the garbage collector and
empties the CUDA cache before the new one loads.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("joint", "i2sv", "a2v", "v2a")
KNOBS: tuple[str, ...] = ("max_t", "q_chunk_v", "q_chunk_a", "kv_downsample", "vid_decode_chunk")
WEIGHTS: tuple[str, ...] = ("w_v", "w_a", "w_txt", "w_neg", "w_img")


class Cancelled(RuntimeError):
    """Sampling stopped between two steps because the cancel button was pressed."""

    def __init__(self, sample: int, step: int, steps: int):
        self.sample, self.step, self.steps = sample, step, steps
        self.outputs: list[Output] = []   # the samples finished before the cancel (their files are complete)
        super().__init__(f"stopped before step {step + 1} of {steps} (sample {sample + 1})")


class NoModel(RuntimeError):
    """No model is loaded."""


@dataclass
class GenerateRequest:
    task: str
    seeds: list[int]
    steps: int
    guidance: dict[str, Any]                       # {name, w_v, w_a, w_txt, w_neg, w_img}
    knobs: dict[str, int] = field(default_factory=dict)
    prompt: str = ""
    negative_prompt: str = ""
    image: str | None = None                       # i2sv: an image file
    reference: str | None = None                   # i2sv: a held-out clip id (its stored first frame)
    audio: str | None = None                       # a2v: a sound file or a clip with sound
    video: str | None = None                       # v2a: a clip


@dataclass
class Output:
    seed: int
    folder: Path
    mp4: Path
    video_mp4: Path
    wav: Path
    png: Path


StepHook = Callable[[int, int, int, int], None]   # (sample index, samples, step done, steps)


class _StepGuidance:
    """Wraps a guidance callable: one call = one ODE step. Checks ``cancel`` before the step, reports after."""

    def __init__(self, guidance, steps: int, sample: int, samples: int, on_step: StepHook | None,
                 cancel: threading.Event | None):
        self.guidance, self.steps, self.sample, self.samples = guidance, steps, sample, samples
        self.on_step, self.cancel, self.done = on_step, cancel, 0

    def __call__(self, *args, **kwargs):
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(self.sample, self.done, self.steps)
        out = self.guidance(*args, **kwargs)
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.sample, self.samples, self.done, self.steps)
        return out


def _device(name: str | None):
    import torch

    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unique_folder(out_dir: Path, stem: str) -> Path:
    """Create and return ``out_dir/stem`` (or ``stem-2``, ``stem-3`` …): never an existing folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        folder = out_dir / (stem if k == 1 else f"{stem}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"no free output folder name for {stem} in {out_dir}")


class Backend:
    """One loaded model (or none) on one device, and the calls the page makes on it."""

    def __init__(self, *, out_dir: str | Path, cache_dir: str | Path, device: str | None = "auto",
                 clip: dict | None = None, codec: dict | None = None):
        self.out_dir = Path(out_dir).expanduser()
        self.cache_dir = str(cache_dir)
        self.device = _device(device)
        self.clip, self.codec = clip, codec
        self.folder: Path | None = None
        self._model = self._video_codec = self._audio_codec = None
        self._meta: dict = {}
        self._shapes = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self, folder: str | Path) -> None:
        """Load an exported model folder (freeing the current model first)."""
        from jointdit import checkpoints
        from jointdit.codecs import build_codecs
        from jointdit.diffusion.sampler import _plain, resolve_shapes

        folder = Path(folder).expanduser().resolve()
        with self._lock:
            self.unload()
            model = checkpoints.load_model(folder).to(self.device).eval()
            meta = checkpoints.load_export_meta(folder)
            codec_cfg = _plain(self.codec) or meta.get("codec")
            if not codec_cfg:
                raise ValueError(f"{folder} has no codec settings in jointdit.json; start the UI with codec=<group>")
            video_codec, audio_codec = build_codecs(codec_cfg)
            for c in (video_codec, audio_codec):
                c.to(self.device)
            shapes = resolve_shapes(meta, None, video_codec, audio_codec)
            if (shapes.video_shape[1] != model.config.video_in_channels
                    or shapes.audio_shape[0] != model.config.audio_in_channels):
                raise ValueError(f"{folder}: latent shapes video {shapes.video_shape} / audio {shapes.audio_shape} "
                                 f"do not fit the model's input channels")
            self._model, self._video_codec, self._audio_codec = model, video_codec, audio_codec
            self._meta, self._shapes, self.folder = meta, shapes, folder
            log.info("loaded %s on %s", folder, self.device)

    def unload(self) -> None:
        """Drop the model and codecs and give their memory back."""
        import torch

        with self._lock:
            self._model = self._video_codec = self._audio_codec = None
            self._meta, self._shapes, self.folder = {}, None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _need(self) -> None:
        if self._model is None:
            raise NoModel("no model is loaded: pick one in the model list")

    def describe(self) -> str:
        """One markdown line about the loaded model."""
        if self._model is None:
            return "No model loaded."
        s = self._shapes
        n = sum(p.numel() for p in self._model.parameters())
        return (f"**{self.folder}** · {n / 1e6:.2f} M parameters · step {self._meta.get('step', '?')} · "
                f"{s.seconds:g} s at {s.fps:g} fps, {s.size[0]}×{s.size[1]} px, {s.sample_rate} Hz · "
                f"latents video {list(s.video_shape)} audio {list(s.audio_shape)} · {self.device}")

    @property
    def latent_frames(self) -> int:
        return int(self._shapes.video_shape[0]) if self._shapes is not None else 0

    def has_clip(self) -> bool:
        clip = self.clip or self._meta.get("clip")
        return bool(clip) and (clip.get("enabled", True) is not False)

    def held_out(self) -> list[tuple[str, str]]:
        """``(label, clip id)`` of the validation clips in the model's latent cache (for i2sv's first frame)."""
        from jointdit.data.cache import cache_dir_for, read_index

        data, codec = self._meta.get("data") or {}, self._meta.get("codec")
        if not data.get("name") or not codec:
            return []
        try:
            cache = cache_dir_for(data, codec, self.cache_dir)
            rows = read_index(cache) if (cache / "index.jsonl").exists() else []
        except Exception as err:  # noqa: BLE001 - a missing or foreign cache only hides the list
            log.warning("no held-out clips: %s", err)
            return []
        held = [r for r in rows if r.get("split") in ("val", "test") and r.get("first_frame")]
        return [(f"{r['id']} — {r.get('caption') or r.get('label') or ''}".strip(" —"), r["id"]) for r in held]

    def held_out_frame(self, clip_id: str) -> Path | None:
        """The stored first frame (PNG) of a held-out clip, for a preview."""
        from jointdit.data.cache import cache_dir_for, read_index

        if not clip_id:
            return None
        cache = cache_dir_for(self._meta["data"], self._meta["codec"], self.cache_dir)
        for row in read_index(cache):
            if row["id"] == clip_id and row.get("first_frame"):
                return cache / row["first_frame"]
        return None

    # ------------------------------------------------------------------------------------------
    # Memory
    # ------------------------------------------------------------------------------------------
    def branches(self, task: str, weights: dict[str, Any], prompt: str = "", negative: str = "") -> int:
        """Guidance branches one step computes (see :mod:`jointdit.diffusion.guidance`): ``pos`` + ``iso``
        (w_v or w_a) + ``no_text`` (w_txt and a prompt) + ``neg_text`` (w_neg and a negative prompt)
        + ``no_image`` (w_img and an image condition); text and image need a CLIP encoder."""
        w = {k: float(weights.get(k) or 0.0) for k in WEIGHTS}
        name = str(weights.get("name", "jointcfg"))
        if name == "none":
            return 1
        if name == "cfg":
            w["w_v"] = w["w_a"] = w["w_neg"] = 0.0
        clip = self.has_clip()
        n = 1 + bool(w["w_v"] or w["w_a"])
        n += bool(w["w_txt"] and clip and prompt)
        n += bool(w["w_neg"] and clip and negative)
        n += bool(w["w_img"] and clip and task == "i2sv")
        return n

    def estimate(self, task: str, weights: dict[str, Any], knobs: dict[str, Any], prompt: str = "",
                 negative: str = "") -> dict[str, Any]:
        """The planner's peak estimate for one sampling forward with these knobs; ``{total, budget, fits,
        branches, tokens_video, tokens_audio, keys, Tv, …}``."""
        from jointdit.memory import Knobs, detect_budget, estimate_peak

        self._need()
        kn = Knobs(max_t=int(knobs.get("max_t") or 0), q_chunk_v=int(knobs.get("q_chunk_v") or 0),
                   q_chunk_a=int(knobs.get("q_chunk_a") or 0), kv_downsample=max(1, int(knobs.get("kv_downsample") or 1)))
        branches = self.branches(task, weights, prompt, negative)
        est = estimate_peak(dict(self._model.config), self._shapes.video_shape, self._shapes.audio_shape, kn,
                            micro_batch=branches, training=False, device=self.device.type)
        budget = detect_budget(self.device)
        return {**est.as_dict(), "branches": branches, "budget": budget, "fits": est.total <= budget}

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    def _shapes_for(self, max_t: int):
        """The checkpoint's shapes, or a clip cut to ``max_t`` latent frames (as training crops):
        ``Tv' = max_t`` and ``La' = round(Tv'·audio_fps / video_fps)``, each cut down to a whole number of
        temporal patches; the clip lasts ``Tv' / video_latent_fps`` seconds."""
        from dataclasses import replace

        s = self._shapes
        if not max_t or max_t >= s.video_shape[0]:
            return s
        cfg = self._model.config
        pv, pa = int(cfg.video_patch_size[0]), int(cfg.audio_patch_size[0])
        tv = max(pv, int(max_t) // pv * pv)
        la = int(round(tv * float(cfg.audio_latent_fps) / float(cfg.video_latent_fps)))
        la = max(pa, la // pa * pa)
        return replace(s, video_shape=(tv, *s.video_shape[1:]), audio_shape=(s.audio_shape[0], la, *s.audio_shape[2:]),
                       seconds=tv / float(cfg.video_latent_fps))

    def generate(self, req: GenerateRequest, on_step: StepHook | None = None,
                 cancel: threading.Event | None = None) -> list[Output]:
        """Sample ``req.seeds`` one after the other; returns one :class:`Output` per finished seed.

        Raises :class:`Cancelled` (when ``cancel`` is set) between steps, ``ValueError`` / ``MediaError``
        for unusable inputs, :class:`NoModel` when nothing is loaded.
        """
        import torch
        from omegaconf import OmegaConf

        from jointdit.data.media import write_mp4, write_wav
        from jointdit.diffusion.guidance import build_guidance
        from jointdit.diffusion.sampler import (build_conditions, cache_entry, clamp_to_codec_range, load_audio,
                                                load_first_frame, load_video, sample_latents, write_preview)
        from jointdit.diffusion.sampler import _fit_wave

        if req.task not in TASKS:
            raise ValueError(f"unknown task {req.task!r}; choose one of {', '.join(TASKS)}")
        if int(req.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {req.steps}")
        if not req.seeds:
            raise ValueError("no seeds to sample")
        with self._lock:
            self._need()
            model, vcodec, acodec, device = self._model, self._video_codec, self._audio_codec, self.device
            knobs = {k: int(req.knobs.get(k) or 0) for k in KNOBS}
            model.set_memory_knobs(q_chunk_v=knobs["q_chunk_v"], q_chunk_a=knobs["q_chunk_a"],
                                   kv_downsample=max(1, knobs["kv_downsample"]))
            if knobs["vid_decode_chunk"] and hasattr(vcodec, "decode_chunk"):
                vcodec.decode_chunk = knobs["vid_decode_chunk"]
            shapes = self._shapes_for(knobs["max_t"])
            cfg = OmegaConf.create({"image": req.image, "reference": req.reference, "prompt": req.prompt or "",
                                    "negative_prompt": req.negative_prompt or "", "clip": self.clip,
                                    "paths": {"cache_dir": self.cache_dir}})
            image = first = video_latent = audio_latent = None
            with torch.inference_mode():
                if req.task == "i2sv":
                    if not (req.image or req.reference):
                        raise ValueError("image → sounding video needs a first frame: upload an image, take one with "
                                         "the webcam, or pick a held-out clip")
                    entry = None if req.image else cache_entry(cfg, self._meta, str(req.reference))
                    image = load_first_frame(cfg, shapes, entry)                                   # [3, H, W]
                    first = vcodec.encode(image[None, None].to(device))[:, 0]                      # [1, Cv, hv, wv]
                elif req.task == "a2v":
                    if not req.audio:
                        raise ValueError("audio → video needs a sound: upload one or record it")
                    audio_latent = acodec.encode(load_audio(req.audio, shapes)[None].to(device))   # [1, Ca, La, Fa]
                    audio_latent = audio_latent[:, :, : shapes.audio_shape[1]]
                elif req.task == "v2a":
                    if not req.video:
                        raise ValueError("video → audio needs a clip: upload an MP4")
                    video_latent = vcodec.encode(load_video(req.video, shapes)[None].to(device))   # [1, Tv, Cv, hv, wv]
                    video_latent = video_latent[:, : shapes.video_shape[0]]
            cond, neg_cond = build_conditions(cfg, self._meta, model, image, device)
            guidance = build_guidance(req.guidance)
            outputs: list[Output] = []
            for k, seed in enumerate(req.seeds):
                hooked = _StepGuidance(guidance, int(req.steps), k, len(req.seeds), on_step, cancel)
                try:
                    z_v, z_a = sample_latents(model, shapes.video_shape, shapes.audio_shape, steps=int(req.steps),
                                              seed=int(seed), task=req.task, guidance=hooked, cond=cond,
                                              neg_cond=neg_cond, first_frame=first, video_latent=video_latent,
                                              audio_latent=audio_latent)
                except Cancelled as err:
                    err.outputs = outputs
                    raise
                if req.task != "a2v":
                    z_a = clamp_to_codec_range(z_a, acodec)
                with torch.inference_mode():
                    frames = vcodec.decode(z_v)[0].float().cpu().clamp(-1, 1)                    # [T, 3, H, W]
                    wave = _fit_wave(acodec.decode(z_a)[0].float().cpu(), shapes.num_samples).clamp(-1, 1)
                folder = unique_folder(self.out_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{req.task}-seed{int(seed)}")
                out = Output(
                    seed=int(seed), folder=folder,
                    mp4=write_mp4(folder / "sample.mp4", frames, shapes.fps, wave, shapes.sample_rate),
                    video_mp4=write_mp4(folder / "sample_video.mp4", frames, shapes.fps),
                    wav=write_wav(folder / "sample.wav", wave, shapes.sample_rate),
                    png=write_preview(folder / "sample.png", frames, wave, shapes.sample_rate,
                                      title=f"{req.task} · seed {seed} · {req.steps} steps"),
                )
                record = {"model": str(self.folder), "request": asdict(req), "seed": int(seed),
                          "seconds": shapes.seconds, "fps": shapes.fps, "sample_rate": shapes.sample_rate,
                          "files": {k: str(v) for k, v in asdict(out).items() if isinstance(v, Path)}}
                (folder / "request.json").write_text(json.dumps(record, indent=1, default=str))
                outputs.append(out)
            return outputs
