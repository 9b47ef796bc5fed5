"""The UI's one adapter to the sampler: load a model folder, estimate memory, generate, free.

Everything the page does to a model goes through :class:`Backend`; the Gradio code never touches
torch, codecs or the sampler. Generation is :func:`jointdit.sample.generate` on a
:func:`jointdit.sample.load_session` session — the same calls as ``python -m jointdit.sample`` — for every
task the sampler has (:data:`TASKS`):

- ``joint`` (text → video + sound), ``i2sv`` (image → sounding video), ``a2v`` (sound kept, video
  generated), ``v2a`` (video kept, sound generated);
- ``extend_v`` / ``extend_a``: the input's first ``seconds_given`` kept, the rest generated (``both``: the
  other stream's first seconds kept too — extend_v: the clip's own sound, extend_a: a clip's video);
- ``inpaint_v``: the clip's video kept except a time ``span`` (seconds) or a spatial ``region`` (top, left,
  bottom, right fractions of the frame) in every frame; ``inpaint_a``: the sound kept except a ``span``;
- ``t2v`` / ``t2a``: one stream alone, the other absent (t2v writes an MP4 without a sound track, no WAV;
  t2a a WAV and its spectrogram, no MP4: :data:`ONE_STREAM`).

Before anything is sampled, a task's missing input and an extend / inpaint parameter outside the clip
sampled (the model's ``LatentSpec.seconds``, after ``max_t``) raise ``ValueError`` naming the allowed range.
The sampler's warnings while sampling (a task the export's ``tasks`` never trained, an overridden K/V knob,
zeroed iso weights …) are kept on each :class:`Output` for the page to show. Besides:

- progress: ``generate``'s ``progress(done, total)`` is called after every ODE step; the backend
  reports ``(sample k of n, step i of N)`` and returns True when the cancel flag is set, so sampling
  stops between two steps (:class:`~jointdit.sample.SamplingCancelled`) and that sample writes nothing;
- one folder per output: each seed is its own ``generate`` call with ``out_dir`` = the UI's folder and
  no name, so the sampler claims a fresh ``<YYYYmmdd-HHMMSS>_<task>_seed<seed>[-k]`` folder with an
  exclusive ``mkdir`` (nothing is ever overwritten). It holds the sampler's files
  (``<task>_seed<seed>_steps<N>.mp4`` with sound, ``…_video.mp4``, ``.wav``, ``.png``; fewer for t2v / t2a)
  and ``request.json``; where both streams exist the backend adds ``sync.png``: the frame strip over the
  spectrogram with the detected audio onsets (solid) and video events (dashed) of :mod:`jointdit.evaluate`,
  titled with the clip's sync score (IoU of its own onsets and events).

Memory. ``max_t`` (latent frames) samples a shorter clip (``LatentSpec.crop``); ``q_chunk_v`` /
``q_chunk_a`` / ``kv_downsample`` / ``kv_pool_space`` / ``vid_decode_chunk`` go to ``Session.set_vram``
(the K/V pooling knobs at 0 = the model's own: the export's setting, which changes the function the model
computes). :meth:`Backend.estimate` is the sampler's own plan (:func:`jointdit.memory.sampling_plan`) for
the same shapes and knobs, the batched forward being as large as the number of guidance rows the
sampler will run for that task (:meth:`Backend.branches`).

Switching models drops every reference to the old session (model, codecs, CLIP), runs the garbage
collector and empties the CUDA cache before the new one loads.
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the sampler's tasks (jointdit.diffusion.masks.MODES), in the page's order; kept here so that importing the
# UI does not import torch
TASKS: tuple[str, ...] = ("joint", "i2sv", "a2v", "v2a", "extend_v", "extend_a", "inpaint_v", "inpaint_a", "t2v",
                          "t2a")
ONE_STREAM: dict[str, str] = {"t2v": "video", "t2a": "audio"}   # the one stream these tasks generate
KNOBS: tuple[str, ...] = ("max_t", "q_chunk_v", "q_chunk_a", "kv_downsample", "kv_pool_space", "vid_decode_chunk")
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
    audio: str | None = None                       # a2v, extend_a, inpaint_a: a sound file or a clip with sound
    video: str | None = None                       # v2a, extend_v, inpaint_v, extend_a with both: a clip
    seconds_given: float | None = None             # extend_v / extend_a: the input's first seconds, kept
    both: bool = False                             # extend_*: also keep the other stream's first seconds
    span: tuple[float, float] | None = None        # inpaint_v (temporal) / inpaint_a: (start, end) s regenerated
    region: tuple[float, float, float, float] | None = None   # inpaint_v (spatial): top, left, bottom, right


@dataclass
class Output:
    seed: int
    folder: Path
    png: Path                                      # the sampler's preview (frame strip and / or spectrogram)
    mp4: Path | None = None                        # with sound; t2v: without a sound track; t2a: none
    video_mp4: Path | None = None                  # the video alone (not for t2v, whose mp4 is that already)
    wav: Path | None = None                        # t2v: none
    sync_png: Path | None = None                   # the preview with onsets / video events drawn, and the score
    sync: float | None = None                      # the clip's own sync score (IoU of onsets and events)
    warnings: tuple[str, ...] = ()                 # what the sampler warned about while making this sample


StepHook = Callable[[int, int, int, int], None]   # (sample index, samples, step done, steps)

# the input each task samples from (a GenerateRequest field), and what to tell a user who gave none
NEEDS: dict[str, tuple[str, str]] = {
    "a2v": ("audio", "audio → video needs a sound: upload one or record it"),
    "v2a": ("video", "video → audio needs a clip: upload one"),
    "extend_v": ("video", "extend_v needs the clip to extend: upload one"),
    "extend_a": ("audio", "extend_a needs the sound to extend: upload one or record it"),
    "inpaint_v": ("video", "inpaint_v needs the clip to inpaint: upload one"),
    "inpaint_a": ("audio", "inpaint_a needs the sound to inpaint: upload one or record it"),
}


def _check_inputs(req: GenerateRequest) -> None:
    """What a request needs before any model is asked: a known task, seeds, the task's input and parameters
    (their ranges depend on the model: :meth:`Backend._check_mask`)."""
    if req.task not in TASKS:
        raise ValueError(f"unknown task {req.task!r}; choose one of {', '.join(TASKS)}")
    if not req.seeds:
        raise ValueError("no seeds to sample")
    if req.task == "i2sv" and not (req.image or req.reference):
        raise ValueError("image → sounding video needs a first frame: upload an image, take one with the "
                         "webcam, or pick a held-out clip")
    name, missing = NEEDS.get(req.task, ("", ""))
    if name and not getattr(req, name):
        raise ValueError(missing)
    if req.task == "extend_a" and req.both and not req.video:
        raise ValueError("extend_a keeping a clip's first seconds of video too needs that clip: upload one")
    if req.task.startswith("extend_") and req.seconds_given is None:
        raise ValueError(f"{req.task} needs seconds given: how much of the input's start to keep")
    if req.task == "inpaint_v" and (req.span is None) == (req.region is None):
        raise ValueError("inpaint_v regenerates a time span or a region of every frame: give exactly one")
    if req.task == "inpaint_a" and req.span is None:
        raise ValueError("inpaint_a needs the span (start and end, in seconds) of sound to regenerate")


@contextmanager
def _recorded() -> Iterator[list[str]]:
    """The messages of the user warnings raised inside (repeats too: the sampler's), logged instead of printed.

    ``warnings.catch_warnings`` is process-wide: a warning another thread raises meanwhile lands here too
    (the page's other calls meanwhile only estimate memory, whose warnings say the same about this model);
    other categories (a garbage-collected event loop's ResourceWarning …) are left to their filters."""
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", UserWarning)
        yield caught
        caught.extend(str(r.message) for r in records if issubclass(r.category, UserWarning))
    for message in caught:
        log.warning("sampler: %s", message)


class Backend:
    """One loaded model (or none) on one device, and the calls the page makes on it."""

    def __init__(self, *, out_dir: str | Path, cache_dir: str | Path, device: str | None = "auto",
                 clip: dict | None = None, codec: dict | None = None):
        self.out_dir = Path(out_dir).expanduser()
        self.cache_dir = str(cache_dir)
        self.device_name = device
        self.clip, self.codec = clip, codec
        self.folder: Path | None = None
        self.session = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.session is not None

    @property
    def device(self):
        return self.session.device if self.session is not None else None

    def load(self, folder: str | Path) -> None:
        """Load an exported model folder (freeing the current model first)."""
        from jointdit.sample import load_session

        folder = Path(folder).expanduser().resolve()
        with self._lock:
            self.unload()
            self.session = load_session(folder, device=self.device_name, codec=self.codec, clip=self.clip,
                                        cache_dir=self.cache_dir)
            self.folder = folder
            log.info("loaded %s on %s", folder, self.session.device)

    def unload(self) -> None:
        """Drop the session (model, codecs, CLIP) and give its memory back."""
        import torch

        with self._lock:
            self.session, self.folder = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _need(self):
        if self.session is None:
            raise NoModel("no model is loaded: pick one in the model list")
        return self.session

    def describe(self) -> str:
        """One markdown line about the loaded model."""
        if self.session is None:
            return "No model loaded."
        s, g = self.session, self.session.spec
        n = sum(p.numel() for p in s.model.parameters())
        return (f"**{self.folder}** · {n / 1e6:.2f} M parameters · step {s.meta.get('step', '?')} · "
                f"{g.seconds:g} s at {g.fps:g} fps, {g.size[0]}×{g.size[1]} px, {g.sample_rate} Hz · "
                f"latents video {list(g.video_shape)} audio {list(g.audio_shape)} · "
                f"{'CLIP ' + str((s.meta.get('clip') or {}).get('model', '')) if s.clip is not None else 'no CLIP (prompts unused)'}"
                f" · {s.device}")

    @property
    def latent_frames(self) -> int:
        return int(self.session.spec.video_shape[0]) if self.session is not None else 0

    def clip_seconds(self, max_t: int = 0) -> float:
        """Seconds of the clip sampled: the model's ``LatentSpec.seconds`` after the ``max_t`` crop."""
        return float(self._need().spec.crop(int(max_t or 0)).seconds)

    def has_clip(self) -> bool:
        return self.session is not None and self.session.clip is not None

    def held_out(self) -> list[tuple[str, str]]:
        """``(label, clip id)`` of the validation clips in the model's latent cache (for i2sv's first frame)."""
        from jointdit.data.cache import read_index

        cache = self.session.cache_dir if self.session is not None else None
        if cache is None or not (Path(cache) / "index.jsonl").exists():
            return []
        rows = read_index(Path(cache))
        held = [r for r in rows if r.get("split") in ("val", "test") and r.get("first_frame")]
        return [(f"{r['id']} — {r.get('caption') or r.get('label') or ''}".strip(" —"), r["id"]) for r in held]

    def held_out_frame(self, clip_id: str) -> Path | None:
        """The stored first frame (PNG) of a held-out clip, for a preview."""
        from jointdit.io.conditions import cache_entry

        if not clip_id or self.session is None or self.session.cache_dir is None:
            return None
        row = cache_entry(clip_id, self.session.cache_dir)
        return Path(row["dir"]) / row["first_frame"] if row.get("first_frame") else None

    # ------------------------------------------------------------------------------------------
    # Memory
    # ------------------------------------------------------------------------------------------
    def branches(self, task: str, weights: dict[str, Any], prompt: str = "", negative: str = "",
                 both: bool = False) -> int:
        """Rows of the guided forward the sampler runs per step for this request (``pos`` + each guidance
        branch, :mod:`jointdit.diffusion.guidance`): the guidance as the sampler builds it (iso weights of a
        model never trained with iso modes are zeroed), less the iso branch for t2v / t2a (their present
        stream is already isolated from the absent one, so the sampler drops it:
        :mod:`jointdit.diffusion.sampler`); the text / negative / image branches only with a CLIP encoder and
        a prompt / negative prompt / image condition (i2sv's frame, or the first frame of the video a task
        keeps: ``jointdit.sample``)."""
        from jointdit.diffusion.guidance import build_guidance
        from jointdit.memory import guidance_branches
        from jointdit.sample import VIDEO_TASKS

        guidance = build_guidance(dict(weights), iso_prob=self._need().meta.get("iso_prob"))
        if task in ONE_STREAM:
            guidance = guidance.without("iso")
        clip = self.has_clip()
        image = task == "i2sv" or task in VIDEO_TASKS or (task == "extend_a" and bool(both))
        return guidance_branches(guidance, prompt=clip and bool(prompt), negative=clip and bool(negative),
                                 image=clip and image)

    def estimate(self, task: str, weights: dict[str, Any], knobs: dict[str, Any], prompt: str = "",
                 negative: str = "", both: bool = False) -> dict[str, Any]:
        """The sampling plan (:func:`jointdit.memory.sampling_plan`: model, codec and CLIP weights, the batched
        forward of the guidance rows that will run, the decode) for these knobs, as a dict with ``branches``
        and ``fits``. On CPU the budget is the RAM still available, which the loaded session already left
        out, so only the working memory is judged against it; on CUDA the whole plan against the device."""
        from jointdit.memory import sampling_plan

        s = self._need()
        branches = self.branches(task, weights, prompt, negative, both)
        # K/V pooling 0 = the model's own: sampling_plan falls back to the export's attention settings itself
        vram = {k: int(knobs.get(k) or 0) for k in ("q_chunk_v", "q_chunk_a", "kv_downsample", "kv_pool_space")}
        vram["vid_decode_chunk"] = int(knobs.get("vid_decode_chunk") or 0) or None
        plan = sampling_plan(s.checkpoint, device=s.device, vram=vram, codec=(s.video_codec, s.audio_codec),
                             clip=None if s.clip is not None else False, spec=s.spec, branches=branches,
                             max_t=int(knobs.get("max_t") or 0), task=task)
        resident = plan.weights + plan.codec_weights + plan.clip_weights
        needed = plan.planned - (int(resident * (1 + plan.margin)) if s.device.type == "cpu" else 0)
        return {**plan.as_dict(), "branches": branches, "needed": needed, "fits": needed <= plan.budget,
                "advice": plan.advice()}

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    def generate(self, req: GenerateRequest, on_step: StepHook | None = None,
                 cancel: threading.Event | None = None) -> list[Output]:
        """Sample ``req.seeds`` one after the other, each into its own new folder; one :class:`Output` per seed.

        Raises :class:`Cancelled` (when ``cancel`` is set) between steps — the finished seeds ride on it —,
        ``ValueError`` / ``MediaError`` for unusable inputs or parameters out of range, :class:`NoModel` when
        nothing is loaded.
        """
        from jointdit.sample import SampleRequest, SamplingCancelled, generate

        _check_inputs(req)
        knobs = {k: int(req.knobs.get(k) or 0) for k in KNOBS}
        with self._lock:
            session = self._need()
            self._check_mask(req, knobs["max_t"])
            with _recorded() as knob_warnings:
                session.set_vram({"q_chunk_v": knobs["q_chunk_v"], "q_chunk_a": knobs["q_chunk_a"],
                                  "vid_decode_chunk": knobs["vid_decode_chunk"] or None},
                                 kv_downsample=knobs["kv_downsample"] or None,
                                 kv_pool_space=knobs["kv_pool_space"] or None)
            outputs: list[Output] = []
            steps = int(req.steps)
            for k, seed in enumerate(req.seeds):
                def progress(done: int, total: int, _k: int = k) -> bool:
                    if on_step is not None:
                        on_step(_k, len(req.seeds), done, total)
                    return cancel is not None and cancel.is_set()

                request = SampleRequest(task=req.task, prompt=req.prompt or "", negative_prompt=req.negative_prompt or "",
                                        image=req.image or None, reference=None if req.image else req.reference,
                                        audio=req.audio, video=req.video, seeds=[int(seed)], steps=steps,
                                        guidance=dict(req.guidance), out_dir=str(self.out_dir), max_t=knobs["max_t"],
                                        seconds_given=req.seconds_given, both=bool(req.both), span=req.span,
                                        region=req.region)
                if cancel is not None and cancel.is_set():
                    err = Cancelled(k, 0, steps)
                    err.outputs = outputs
                    raise err
                try:
                    with _recorded() as sample_warnings:
                        result = generate(session, request, progress=progress)
                except SamplingCancelled as stop:
                    err = Cancelled(k, stop.step, steps)
                    err.outputs = outputs
                    raise err from None
                sample = result.samples[0]
                out = Output(seed=int(seed), folder=result.folder, png=sample.png, mp4=sample.mp4,
                             video_mp4=sample.video_mp4, wav=sample.wav,
                             warnings=tuple(dict.fromkeys(knob_warnings + sample_warnings)))
                if sample.frames is not None and sample.wave is not None:
                    out.sync_png, out.sync = self._sync_plot(sample, result.folder, req.task, steps)
                outputs.append(out)
            return outputs

    def _check_mask(self, req: GenerateRequest, max_t: int) -> None:
        """The extend / inpaint parameters against the clip sampled (the model's, after the ``max_t`` crop);
        each refusal names the allowed range. The sampler would take some of them silently: a prefix
        shorter than one latent patch keeps nothing, one as long as the clip leaves nothing to generate."""
        from jointdit.diffusion.masks import Geometry

        spec = self.session.spec.crop(max_t)
        cropped = spec.seconds < self.session.spec.seconds
        clip = f"the {spec.seconds:g} s clip {f'max_t={max_t}' if cropped else 'the model'} samples"
        if req.task in ("extend_v", "extend_a"):
            video = req.task == "extend_v"
            cfg = self.session.model.config
            g = Geometry.from_spec(spec, cfg.video_patch_size, cfg.audio_patch_size)
            rate, offset, n, patch = ((g.video_rate, g.video_offset, g.video[0], g.video_patch[0]) if video
                                      else (g.audio_rate, g.audio_offset, g.audio_steps, g.audio_patch_t))
            given = float(req.seconds_given)
            if not 0 < g.given_prefix(given, video=video) < n:
                raise ValueError(f"seconds given = {given:g} is out of range for {clip}: give "
                                 f"{offset + patch / rate:g} to {offset + (n - patch) / rate:g} s (at least one "
                                 f"latent patch of {'video' if video else 'sound'} kept, and one generated)")
        if req.span is not None:
            start, end = (float(x) for x in req.span)
            if not 0 <= start < end <= spec.seconds:
                raise ValueError(f"span {start:g}–{end:g} s is out of range for {clip}: give "
                                 f"0 ≤ start < end ≤ {spec.seconds:g} s")
        if req.region is not None:
            top, left, bottom, right = (float(x) for x in req.region)
            if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
                raise ValueError(f"region top {top:g}, left {left:g}, bottom {bottom:g}, right {right:g} is out of "
                                 "range: give fractions of the frame with 0 ≤ top < bottom ≤ 1 and "
                                 "0 ≤ left < right ≤ 1")

    @staticmethod
    def _sync_plot(sample, folder: Path, task: str, steps: int) -> tuple[Path | None, float | None]:
        """``sync.png``: onsets and video events (jointdit.evaluate) on the strip + spectrogram, with the score."""
        try:
            from jointdit.data.media import Clip
            from jointdit.evaluate import analyse_clip, sync_score
            from jointdit.evaluate.plot import plot_sync

            analysis = analyse_clip(Clip(sample.frames, sample.wave, sample.fps, sample.sample_rate))
            score = float(sync_score(analysis))
            png = plot_sync(sample.frames, sample.wave, sample.sample_rate, sample.fps, analysis.onsets,
                            analysis.events, folder / "sync.png",
                            title=f"{task} seed {sample.seed} · sync {score:.2f} · {len(analysis.onsets)} audio onsets "
                                  f"(solid) · {len(analysis.events)} video events (dashed)")
            return png, score
        except Exception as err:  # noqa: BLE001 - the sample stands without its sync figure
            log.warning("no sync figure for seed %s: %s", sample.seed, err)
            return None, None
