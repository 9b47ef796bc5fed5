"""Model mode: sample clips per task from a model, conditioned on held-out real clips, then score them.

For each task in ``plan.tasks`` and i = 0 … num_clips − 1, condition c = real[i mod n] and seed s =
plan.seed + i:

    joint      caption of c (when the model has a CLIP encoder)        → frames + audio
    i2sv       first frame of c (+ caption)                             → frames + audio
    a2v        audio of c                                               → frames (audio = c's audio)
    v2a        frames of c                                              → audio (frames = c's frames)
    extend_v   c's video before ``seconds_given``                       → the rest of the video + audio
    extend_a   c's audio before ``seconds_given``                       → the rest of the audio + video
    inpaint_v  c's video outside ``span``                               → the span's video + audio
    inpaint_a  c's audio outside ``span``                               → the span's audio + video
    t2v        caption of c                                             → frames only (no audio)
    t2a        caption of c                                             → audio only (no video)

Figures per task are :func:`~jointdit.evaluate.evaluation.evaluate_clips`'s. A mask mode is scored as the
task whose event accuracy judges the stream it continues or fills in (:data:`SCORED_AS`: ``extend_v`` /
``inpaint_v`` like a2v — the generated video's events against c's known events —, ``extend_a`` /
``inpaint_a`` like v2a), its keys named after the mode (``extend_a_f1``). t2v / t2a make one stream, so
sync and event figures do not apply; they keep that stream's distances to the real clips
(``fd_video``/``kid_video``, ``fd_audio``/``kid_audio``). Their files: t2v an MP4 without sound, t2a a WAV.

Generated clip names are ``<c's id>_<task>_s<s>``, so event accuracy finds c's known events. The
same seeds, steps and guidance on the same conditions give the same clips (``generate`` is seeded).
Real clips are read at the model's own geometry (fps, size, seconds, sample rate), so references and
samples are scored on equal terms. A model trained only in ``iso`` attention (no cross-modal attention)
is sampled in ``iso`` mode (``sampling.attention: auto``), as it was trained.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jointdit.data.media import Clip, read_clip, write_mp4, write_wav
from jointdit.diffusion.masks import MODES, present_streams
from jointdit.evaluate.evaluation import TASKS, EvalReport, evaluate_clips
from jointdit.evaluate.settings import DetectorSettings
from jointdit.evaluate.sync import analyse_clip, clip_name

log = logging.getLogger(__name__)

SAMPLING_TASKS: tuple[str, ...] = MODES   # every sampler task; TASKS (joint i2sv a2v v2a) is the default
SCORED_AS = {"extend_v": "a2v", "inpaint_v": "a2v", "extend_a": "v2a", "inpaint_a": "v2a", "t2v": "joint",
             "t2a": "joint"}
SINGLE_STREAM_KEYS = {"t2v": ("fd_video", "kid_video"), "t2a": ("fd_audio", "kid_audio")}
SHARED_KEYS = ("ceiling", "ceiling_gated", "floor", "floor_gated", "n_real", "n_generated")


@dataclass(frozen=True)
class SamplingPlan:
    tasks: tuple[str, ...] = TASKS
    num_clips: int = 8          # per task
    seed: int = 0
    steps: int = 30
    guidance: Any = "jointcfg"  # a conf/guidance name or a guidance mapping (the sampler's)
    shift_video: float | None = None  # None: the export's timestep-shift rule
    shift_audio: float | None = None
    batch_size: int = 1
    attention: str = "auto"     # full | iso | auto (iso for a model never trained in full attention)
    given_fraction: float = 0.5                  # extend_*: the first half of the clip is given
    span_fraction: tuple[float, float] = (1 / 3, 2 / 3)   # inpaint_*: this part of the clip is regenerated

    @classmethod
    def from_config(cls, cfg: Mapping | None, guidance: Any = None) -> SamplingPlan:
        from jointdit.config import to_plain
        from jointdit.errors import ConfigError

        values = dict(to_plain(cfg) or {})
        if guidance is not None:
            values["guidance"] = to_plain(guidance)
        tasks = values.get("tasks", TASKS)
        values["tasks"] = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        bad = [t for t in values["tasks"] if t not in SAMPLING_TASKS]
        if bad or not values["tasks"]:
            raise ConfigError(f"sampling.tasks={list(values['tasks'])}: choose from {list(SAMPLING_TASKS)}")
        if "span_fraction" in values:
            values["span_fraction"] = tuple(float(f) for f in values["span_fraction"])
            start, end = values["span_fraction"] if len(values["span_fraction"]) == 2 else (1.0, 0.0)
            if not 0.0 <= start < end <= 1.0:
                raise ConfigError(f"sampling.span_fraction={list(values['span_fraction'])}: give [start, end] "
                                  f"with 0 <= start < end <= 1 (fractions of the clip to regenerate)")
        if "given_fraction" in values:
            values["given_fraction"] = float(values["given_fraction"])
            if not 0.0 < values["given_fraction"] < 1.0:
                raise ConfigError(f"sampling.given_fraction={values['given_fraction']}: must be in (0, 1) "
                                  f"(the share of each clip that extend_v / extend_a are given)")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}", hint=f"known: {sorted(cls.__dataclass_fields__)}")
        if values.get("attention", "auto") not in ("auto", "full", "iso"):
            raise ConfigError(f"sampling.attention={values['attention']!r}: choose auto, full or iso")
        if int(values.get("num_clips", 1)) < 1 or int(values.get("steps", 1)) < 1:
            raise ConfigError("sampling.num_clips and sampling.steps must be >= 1")
        return cls(**values)


class FixedAttention(torch.nn.Module):
    """The wrapped JointDiT run in one attention ``mode`` whatever mode the sampler asks for.

    The sampler's positive branch runs in ``full`` mode; an iso model (trained with each modality blind
    to the other, ``objective.iso_prob: 1``) is sampled as it was trained by wrapping it in ``iso``.
    """

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.inner, self.mode = model, mode

    def forward(self, z_video, z_audio, t_video, t_audio, cond=None, mode=None, *args, **kwargs):
        return self.inner(z_video, z_audio, t_video, t_audio, cond, self.mode, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def attention_mode(plan: SamplingPlan, meta: Mapping[str, Any]) -> str:
    """``plan.attention``, with ``auto`` → ``iso`` when the export's ``iso_prob`` left no ``full`` samples."""
    if plan.attention != "auto":
        return plan.attention
    from jointdit.diffusion.flow import mode_probabilities

    probs = mode_probabilities(meta.get("iso_prob"))
    return "iso" if probs.get("full", 0.0) <= 0.0 and probs.get("iso", 0.0) > 0.0 else "full"


def with_attention(session, plan: SamplingPlan):
    """The session itself, or a copy whose model runs in the plan's attention mode (see ``FixedAttention``)."""
    import dataclasses

    mode = attention_mode(plan, session.meta or {})
    if mode == "full":
        return session
    log.info("sampling %s with attention mode %s", session.checkpoint, mode)
    return dataclasses.replace(session, model=FixedAttention(session.model, mode).eval())


def read_real_at(refs: Sequence[Any], fps: float, size: int | tuple[int, int], seconds: float,
                 sample_rate: int) -> tuple[list[Clip], dict[str, list[float]], dict[str, str]]:
    """``ClipRef``s → clips at the given geometry, {id: events} (within ``seconds``) and {id: caption}."""
    clips, events, captions = [], {}, {}
    for ref in refs:
        clip = read_clip(ref.path, fps=fps, size=size, seconds=seconds, sample_rate=sample_rate)
        clip.meta["id"] = ref.id
        clips.append(clip)
        captions[ref.id] = ref.caption
        if ref.events is not None:
            events[ref.id] = [t for t in ref.events if t < seconds]
    return clips, events, captions


def task_inputs(task: str, condition: Clip, plan: SamplingPlan) -> dict[str, Any]:
    """The :class:`~jointdit.sample.SampleRequest` fields that condition ``task`` on the real clip."""
    seconds = condition.seconds
    span = tuple(f * seconds for f in plan.span_fraction)
    return {"joint": {}, "t2v": {}, "t2a": {}, "i2sv": {"image": condition.frames[0]},
            "a2v": {"audio": condition.wave}, "v2a": {"video": condition.frames},
            "extend_v": {"video": condition.frames, "seconds_given": plan.given_fraction * seconds},
            "extend_a": {"audio": condition.wave, "seconds_given": plan.given_fraction * seconds},
            "inpaint_v": {"video": condition.frames, "span": span},
            "inpaint_a": {"audio": condition.wave, "span": span}}[task]


def generate_clips(session, conditions: Sequence[Clip], captions: Mapping[str, str], plan: SamplingPlan,
                   task: str, out_dir: str | os.PathLike | None = None) -> list[Clip]:
    """``plan.num_clips`` clips of ``task`` from ``session`` (a ``jointdit.sample.Session``), each written as
    ``<out_dir>/<name>.mp4`` when ``out_dir`` is set (t2v: without sound; t2a: ``<name>.wav``). A stream the
    task leaves absent is a blank one in the returned clip (black frames, silence; ``meta["absent"]``)."""
    from jointdit.sample import SampleRequest, generate

    if not conditions:
        raise ValueError("no conditions: the held-out split gave no real clips")
    clips = []
    for i in range(plan.num_clips):
        condition = conditions[i % len(conditions)]
        cond_id = clip_name(condition, f"condition_{i:04d}")
        seed = plan.seed + i
        caption = captions.get(cond_id, "") if session.clip is not None else ""
        result = generate(session, SampleRequest(task=task, prompt=caption, seeds=[seed], steps=plan.steps,
                                                 guidance=plan.guidance, shift_video=plan.shift_video,
                                                 shift_audio=plan.shift_audio, batch_size=plan.batch_size,
                                                 **task_inputs(task, condition, plan)))
        name = f"{cond_id}_{task}_s{seed}"
        frames = result.frames if result.frames is not None else -torch.ones_like(condition.frames)
        wave = result.wave if result.wave is not None else torch.zeros_like(condition.wave)
        absent = [s for s in ("video", "audio") if s not in present_streams(task)]
        clip = Clip(frames=frames, wave=wave, fps=float(result.fps), sample_rate=int(result.sample_rate),
                    has_audio=result.wave is not None,
                    meta={"id": name, "condition": cond_id, "task": task, "seed": seed, "absent": absent})
        if out_dir is not None:
            path = Path(out_dir) / name
            if result.frames is None:
                clip.path = str(write_wav(path.with_suffix(".wav"), result.wave, clip.sample_rate))
            else:
                clip.path = str(write_mp4(path.with_suffix(".mp4"), result.frames, clip.fps, result.wave,
                                          clip.sample_rate))
        clips.append(clip)
        log.info("sampled %s", name)
    return clips


def score_task(generated: Sequence[Clip], real: Sequence[Clip], events: Mapping[str, Sequence[float]], task: str,
               settings: DetectorSettings, *, with_distances: bool = True,
               real_analyses: Sequence[Any] | None = None) -> EvalReport:
    """:func:`evaluate_clips` for any sampler task: a mask mode scored as :data:`SCORED_AS` says, its keys
    renamed after the mode; t2v / t2a keep only the shared references and their stream's distances."""
    scored = SCORED_AS.get(task, task)
    report = evaluate_clips(generated, real, events, scored, settings, with_distances=with_distances,
                            real_analyses=real_analyses)
    if scored == task:
        return report
    report.task = task
    if task in SINGLE_STREAM_KEYS:
        keep = SINGLE_STREAM_KEYS[task]
        report.summary = {k: v for k, v in report.summary.items()
                          if k in keep or k in SHARED_KEYS or k.startswith(("real_onset_", "real_event_"))}
        report.notes.append(f"{task} makes one stream: no sync or event figures, only {', '.join(keep)}")
        return report

    def rename(key: str) -> str:
        return f"{task}_{key[len(scored) + 1:]}" if key.startswith(f"{scored}_") else key

    report.summary = {rename(k): v for k, v in report.summary.items()}
    report.clips = [{rename(k): v for k, v in row.items()} for row in report.clips]
    return report


def evaluate_session(session, real: Sequence[Clip], events: Mapping[str, Sequence[float]],
                     captions: Mapping[str, str], plan: SamplingPlan,
                     settings: DetectorSettings = DetectorSettings(), out_dir: str | os.PathLike | None = None,
                     with_distances: bool = True) -> tuple[dict[str, EvalReport], dict[str, list[Clip]]]:
    """Sample every task of ``plan`` on the real clips' conditions and score each beside the same real clips.

    Returns ({task: report}, {task: generated clips}); with ``out_dir`` the samples are written to
    ``<out_dir>/samples/<task>/``.
    """
    session = with_attention(session, plan)
    real = list(real)
    real_analyses = [analyse_clip(c, settings, clip_name(c, f"real_{i:04d}")) for i, c in enumerate(real)]
    reports, generated = {}, {}
    for task in plan.tasks:
        folder = None if out_dir is None else Path(out_dir) / "samples" / task
        generated[task] = generate_clips(session, real, captions, plan, task, folder)
        reports[task] = score_task(generated[task], real, events, task, settings, with_distances=with_distances,
                                   real_analyses=real_analyses)
    return reports, generated


def combined_summary(reports: Mapping[str, EvalReport]) -> dict[str, float]:
    """{task}/{key} for every task's summary; the real-clip references (same for every task) once, unprefixed."""
    shared = ("ceiling", "ceiling_gated", "floor", "floor_gated", "n_real")
    out: dict[str, float] = {}
    for task, report in reports.items():
        for key, value in report.summary.items():
            if key in shared or key.startswith(("real_onset_", "real_event_")):
                out.setdefault(key, value)
            else:
                out[f"{task}/{key}"] = value
    return out
