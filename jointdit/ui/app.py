"""The Gradio Blocks app: a model picker, one tab per task, the sampling and memory controls.

Layout::

    model picker (exported folders under outputs/ and multirun/, MLflow-logged models) · refresh · model line
    prompt · negative prompt
    ┌ tabs: video + sound | extend / inpaint | video or sound alone ┐  ┌ guidance preset           ┐
    │ tabs: text → video+sound | image → sounding video | …         │  │ w_v w_a w_txt w_neg w_img │
    │ the task's note and inputs (upload / webcam / held-out frame  │  │ steps, seed, n samples    │
    │   / record; seconds given, span or region)                    │  │ VRAM knobs + live memory  │
    │ Generate · Cancel · status line (seeds, folders, warnings)    │  │ estimate for the task of  │
    │ result player (MP4; t2a: WAV) · preview PNG · downloads       │  │ the selected tab          │
    └───────────────────────────────────────────────────────────────┘  └───────────────────────────┘

Each task of the sampler (:data:`jointdit.ui.backend.TASKS`) has its own tab, inputs, Generate button and
result. Ten tabs do not fit one row, so a top row of three (:data:`TAB_GROUPS`) holds them: video + sound
(joint, i2sv, a2v, v2a), extend / inpaint (extend_v, extend_a, inpaint_v, inpaint_a), video or sound alone
(t2v, t2a). The memory estimate follows the selected tab (t2v / t2a run fewer guidance rows:
:meth:`jointdit.ui.backend.Backend.branches`). t2v's result is an MP4 without a sound track and t2a's a WAV
(an audio player, no MP4), which the labels and the status line say; a task the model's export did not
train still runs, and the status line shows the sampler's warning.

Every event that touches the model (generate in any tab, switching models) shares one concurrency group
(``device``) of size 1 in Gradio's queue, so one job runs on the device at a time. Cancel has a group of its
own with no limit (it never waits for the device) and stops only the jobs of the page that pressed it
(:mod:`jointdit.ui.jobs`): the running one before its next sampling step, a waiting one before its first. Uploads, webcam photos and microphone
recordings are checked by :mod:`jointdit.ui.uploads` as soon as they arrive and again on Generate (a clip
the sampler reads whole must then be at least as long as the clip sampled); extend / inpaint parameters
outside the clip are refused by the backend with the allowed range. Refusals and input errors land in the
tab's status line (and a toast), never as a traceback. A file over
``uploads.max_mb`` is stopped by Gradio itself before any byte is sent (``max_file_size``; its toast
names the file and the limit), and its server refuses such an upload too (HTTP 413).
"""

from __future__ import annotations

import html
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from jointdit.ui import catalog as cat
from jointdit.ui.backend import KNOBS, ONE_STREAM, TASKS, WEIGHTS, Backend, Cancelled, GenerateRequest, NoModel, Output
from jointdit.ui.jobs import CancelBoard
from jointdit.ui.uploads import VIDEO_SUFFIXES, UploadError, UploadLimits, check_audio, check_image, check_video

log = logging.getLogger(__name__)

TASK_TITLES = {"joint": "text → video + sound", "i2sv": "image → sounding video", "a2v": "audio → video",
               "v2a": "video → audio", "extend_v": "extend a video", "extend_a": "extend a sound",
               "inpaint_v": "inpaint a video", "inpaint_a": "inpaint a sound", "t2v": "text → video only",
               "t2a": "text → sound only"}
# the line at the top of each tab: what is kept, what is generated (the sampler's task name first)
TASK_NOTES = {
    "joint": "`joint` — video and sound from noise (and the prompt, when the model has a CLIP encoder).",
    "i2sv": "`i2sv` — the image is the first frame; the rest of the video and its sound are generated.",
    "a2v": "`a2v` — the sound is kept; a video is generated for it.",
    "v2a": "`v2a` — the clip's video is kept; its sound is generated (the clip's own sound is not used).",
    "extend_v": "`extend_v` — the clip's first *seconds given* of video are kept (ticked: of its sound too); the "
                "rest is generated. The clip must be at least as long as the model's (see the model line).",
    "extend_a": "`extend_a` — the sound's first *seconds given* are kept, the rest and the whole video are "
                "generated (a shorter sound is padded with silence); ticked: a clip's first seconds of video too.",
    "inpaint_v": "`inpaint_v` — the clip's video is kept except a time span, or a region of every frame (fractions "
                 "of the frame: 0 = top / left, 1 = bottom / right), which is regenerated; the sound is generated.",
    "inpaint_a": "`inpaint_a` — the sound is kept except a time span, which is regenerated; the video is generated.",
    "t2v": "`t2v` — the video alone, blind to sound: its MP4 has no sound track.",
    "t2a": "`t2a` — the sound alone, blind to video: a WAV and its spectrogram, no MP4.",
}
# the top row of tabs: id → (title, its tasks, a tab each in a row below); every task is in one
TAB_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sounding-video": ("video + sound", ("joint", "i2sv", "a2v", "v2a")),
    "edit": ("extend / inpaint", ("extend_v", "extend_a", "inpaint_v", "inpaint_a")),
    "one-stream": ("video or sound alone", ("t2v", "t2a")),
}
SOUND_INPUTS = {"a2v": "Sound", "extend_a": "Sound to extend", "inpaint_a": "Sound to inpaint"}
CLIP_INPUTS = {"v2a": "Clip", "extend_v": "Clip to extend", "inpaint_v": "Clip to inpaint",
               "extend_a": "Clip whose first seconds of video are kept (when ticked)"}
BOTH_LABELS = {"extend_v": "also keep the first seconds of its sound",
               "extend_a": "also keep the first seconds of a clip's video (upload it below)"}
REGION = ("top", "left", "bottom", "right")


class Results(NamedTuple):
    """How a tab shows what its task writes."""

    player: str       # the result player's label
    preview: str      # the preview image's
    downloads: str    # what the downloads hold
    note: str         # the status line's word on it ("" when the MP4 has its sound)


# by the stream a task generates alone (ONE_STREAM; None: both)
RESULTS = {
    None: Results("Result (MP4 with sound)", "Frame strip + spectrogram (solid: audio onsets, dashed: video events)",
                  "MP4 with sound, WAV, PNG", ""),
    "video": Results("Result (MP4 without sound: the video alone)", "Frame strip", "MP4 without sound, PNG",
                     "The video alone: its MP4 has no sound track, and there is no WAV."),
    "audio": Results("Result (WAV: the sound alone)", "Mel spectrogram", "WAV, PNG",
                     "The sound alone: a WAV and its spectrogram, no MP4."),
}
# the parameters' starting values before any model is loaded: those of a 2 s clip
UNLOADED_CLIP_SECONDS = 2.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEVICE_GROUP = "device"   # the concurrency group of every event that runs on the model
PROGRESS_HZ = 4.0         # progress-bar updates per second
# Random seeds come from the OS, not the global `random` state, which training or any library may have
# seeded (accelerate's set_seed does): the "random" toggle would then draw the same seeds in every process.
_SEED_SOURCE = random.SystemRandom()


@dataclass
class AppConfig:
    """What the page needs besides the backend (filled from ``conf/ui.yaml``)."""

    root_dir: str
    tracking_uri: str | None = None
    model_cache: str = ""
    checkpoint: str | None = None
    guidance_presets: dict[str, dict[str, float]] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)        # the starting weights
    vram: dict[str, int] = field(default_factory=dict)              # the starting knobs
    steps: int = 30
    seed: int = 0
    samples: int = 1
    max_samples: int = 8
    max_steps: int = 1000
    limits: UploadLimits = field(default_factory=UploadLimits)


@dataclass
class TabParts:
    """One task tab's components: what its Generate reads (``inputs``, by name) and writes."""

    inputs: dict[str, Any]
    button: Any
    cancel: Any
    status: Any
    result: Any        # gr.Video, or gr.Audio for t2a
    gallery: Any
    files: Any


def _with_request(fn):
    """Have Gradio pass the page's ``gr.Request`` to ``fn``'s ``request`` parameter.

    Gradio injects it into a parameter whose type hint resolves to ``gr.Request``; a string hint does not
    resolve here (gradio is imported lazily, not at module level), so the class itself is set."""
    import gradio as gr

    fn.__annotations__["request"] = gr.Request
    return fn


def _namer(components: Mapping[str, Any]) -> Callable[[Mapping[Any, Any]], dict[str, Any]]:
    """For an event whose inputs are the SET of ``components``: Gradio then passes one ``{component: value}``
    dict, which the returned function turns into ``{name: value}`` (so a handler with many inputs reads
    them by name, not by a position that every caller must keep in step)."""
    names = {comp: name for name, comp in components.items()}
    return lambda values: {names[comp]: value for comp, value in values.items()}


def _returns(value: Any) -> Callable[[], Any]:
    """An event handler without inputs that returns ``value``."""
    return lambda: value


def _number(value: Any, what: str) -> float:
    """A number box's value; an empty box is an input error that names it."""
    if value is None or value == "":
        raise ValueError(f"{what} is empty: give a number")
    return float(value)


def _session_of(request) -> str:
    """The page's Gradio session (one per page load), "" when called outside a page."""
    return str(getattr(request, "session_hash", None) or "")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Studio:
    """The app's state and handlers; :meth:`build` makes the Blocks."""

    def __init__(self, backend: Backend, config: AppConfig):
        self.backend, self.config = backend, config
        self.jobs = CancelBoard()
        self.entries: dict[str, cat.ModelEntry] = {}

    # ------------------------------------------------------------------------------------------
    # Model picker
    # ------------------------------------------------------------------------------------------
    def refresh_entries(self) -> list[tuple[str, str]]:
        extra = [self.config.checkpoint] if self.config.checkpoint else []
        entries = cat.catalog(self.config.root_dir, self.config.tracking_uri, extra)
        self.entries = {e.key: e for e in entries}
        return [(e.label, e.key) for e in entries]

    def switch_model(self, key: str | None):
        """Free the current model, load ``key``; returns (model line, held-out choices, estimate)."""
        import gradio as gr

        if not key:
            self.backend.unload()
            return "No model loaded.", gr.update(choices=[], value=None)
        entry = self.entries.get(key)
        try:
            folder = (cat.materialize(entry, self.config.tracking_uri, self.config.model_cache) if entry
                      else Path(key))
            self.backend.load(folder)
        except Exception as err:  # noqa: BLE001 - shown in the page
            self.backend.unload()
            log.exception("cannot load %s", key)
            return f"**Cannot load {html.escape(str(key))}:** {html.escape(str(err))}", gr.update(choices=[], value=None)
        held = self.backend.held_out()
        return self.backend.describe(), gr.update(choices=held, value=None)

    # ------------------------------------------------------------------------------------------
    # Memory estimate
    # ------------------------------------------------------------------------------------------
    def estimate(self, values: Mapping[str, Any]) -> str:
        """The estimate line for ``values``: prompt, negative, the weights, the knobs, ``task`` (the selected
        tab's) and ``both`` (extend_a's box: a kept video adds an image condition)."""
        if not self.backend.loaded:
            return "Memory estimate: load a model first."
        task = values.get("task") or "joint"
        weights = {"name": "jointcfg", **{k: values[k] for k in WEIGHTS}}
        try:
            est = self.backend.estimate(task, weights, {k: values[k] for k in KNOBS}, values["prompt"] or "",
                                        values["negative"] or "", both=bool(values.get("both")))
        except Exception as err:  # noqa: BLE001
            return f"Memory estimate unavailable: {html.escape(str(err))}"
        verdict = "fits" if est["fits"] else f"**does not fit** — {html.escape(est['advice'])}"
        where = "RAM available" if est["device"] == "cpu" else "device memory"
        rows = est["branches"]
        return (f"**Estimated peak {_fmt_bytes(est['planned'])}** for sampling {task} (with the {est['margin']:.0%} "
                f"margin): model {_fmt_bytes(est['weights'])}, codecs {_fmt_bytes(est['codec_weights'])}, CLIP "
                f"{_fmt_bytes(est['clip_weights'])}, forward of {rows} guidance branch{'es' if rows != 1 else ''} in "
                f"one batch {_fmt_bytes(est['forward'])} ({est['tokens_video']} video + {est['tokens_audio']} audio "
                f"tokens), decode {_fmt_bytes(est['decode'])} · {where} {_fmt_bytes(est['budget'])}: {verdict}. "
                "Samples run one after another, so n samples does not add memory.")

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    def cancel(self, session: str) -> str:
        """Stop the jobs of page ``session`` (the running one before its next step, waiting ones before their
        first; each then reports "Cancelled"); other pages' jobs go on. Returns the toast text."""
        outcome = self.jobs.cancel(session)
        if not outcome.any:
            return ("Nothing to cancel: no job of this page is running or waiting "
                    "(other pages' jobs are theirs to cancel).")
        parts = [f"{outcome.running} running job stops before its next step"] if outcome.running else []
        parts += [f"{outcome.waiting} waiting job(s) will not run"] if outcome.waiting else []
        return "Cancelling: " + "; ".join(parts) + "."

    def held_out_preview(self, clip_id: str | None):
        """The held-out clip's stored first frame as pixels (no server path is handed to the page)."""
        from PIL import Image

        path = self.backend.held_out_frame(clip_id) if clip_id else None
        if path is None:
            return None
        with Image.open(path) as im:
            return im.convert("RGB").copy()

    def upload_note(self, check, path) -> str:
        """The status line for a fresh upload: empty when it passes ``check``, else the refusal."""
        if not path:
            return ""
        try:
            check(path, self.config.limits)
        except UploadError as err:
            return f"**Upload refused:** {html.escape(str(err))}"
        return ""

    def upload_image(self, payload: dict | None):
        """An i2sv image (upload or webcam photo), unprocessed by Gradio: (its path on the server, status line)."""
        path = (payload or {}).get("path")
        return path, self.upload_note(check_image, path)

    def upload_video(self, path):
        """A clip upload: (the checked clip for the preview player or None, status line)."""
        note = self.upload_note(check_video, path)
        return (None if note or not path else path), note

    def _task_request(self, task: str, values: Mapping[str, Any], max_t: int) -> dict[str, Any]:
        """The tab's inputs as :class:`GenerateRequest` fields: uploads checked again (a clip the sampler reads
        whole at least as long as the clip sampled), numbers read; their ranges are the backend's to check."""
        lim = self.config.limits
        if task == "i2sv":
            image = values.get("image")
            return {"image": str(check_image(image, lim))} if image else {"reference": values.get("reference") or None}
        out: dict[str, Any] = {}
        if values.get("audio"):
            out["audio"] = str(check_audio(values["audio"], lim))
        both = bool(values.get("both"))
        if values.get("video") and (task != "extend_a" or both):   # extend_a reads its clip only when ticked
            out["video"] = str(check_video(values["video"], lim, min_seconds=self.backend.clip_seconds(max_t)))
            if task == "extend_v" and both:   # its own sound is kept too
                check_audio(values["video"], lim)
        if task in ("extend_v", "extend_a"):
            out.update(seconds_given=_number(values.get("seconds_given"), "seconds given"), both=both)
        if task == "inpaint_a" or (task == "inpaint_v" and values.get("target") == "span"):
            out["span"] = (_number(values.get("span_start"), "span start"), _number(values.get("span_end"), "span end"))
        elif task == "inpaint_v":
            out["region"] = tuple(_number(values.get(side), side) for side in REGION)
        return out

    def generate(self, task: str, values: Mapping[str, Any], progress, cancel: threading.Event | None = None):
        """One click of Generate: ``values`` are the tab's inputs and the shared controls by name (:meth:`build`);
        returns (player file, preview, downloads, status, seed); ``cancel`` stops it between two sampling steps.

        With ``random_seed`` the seed is drawn uniformly from [0, 2**31) and written back to the seed box;
        the n samples use seed, seed+1, …, seed+n-1, each in its own folder named after its seed."""
        import gradio as gr
        from jointdit.data.media import MediaError

        seed = _SEED_SOURCE.randrange(2**31) if values["random_seed"] else int(values["seed"] or 0)
        n = max(1, min(int(values["samples"] or 1), self.config.max_samples))
        steps = max(1, min(int(values["steps"] or 1), self.config.max_steps))
        knobs = {k: values[k] for k in KNOBS}
        outputs: list[Output] = []

        last = [0.0]

        def on_step(k: int, total: int, done: int, steps_: int) -> None:
            # at most PROGRESS_HZ updates a second: a flood of them keeps the page too busy to send a click
            now = time.monotonic()
            if now - last[0] >= 1.0 / PROGRESS_HZ or done == steps_:
                last[0] = now
                progress((k * steps_ + done, total * steps_), desc=f"sample {k + 1}/{total} · step {done}/{steps_}",
                         unit="steps")

        def result(status: str):
            first = outputs[0] if outputs else None
            files = [str(p) for o in outputs for p in (o.mp4, o.wav, o.sync_png or o.png) if p is not None]
            return (str(first.mp4 or first.wav) if first else None, str(first.sync_png or first.png) if first else None,
                    files or None, status, seed)

        try:
            inputs = self._task_request(task, values, int(knobs["max_t"] or 0))
            req = GenerateRequest(task=task, seeds=[seed + k for k in range(n)], steps=steps,
                                  guidance={"name": "jointcfg", **{k: values[k] for k in WEIGHTS}}, knobs=knobs,
                                  prompt=values["prompt"] or "", negative_prompt=values["negative"] or "", **inputs)
            progress((0, n * steps), desc=f"sample 1/{n} · step 0/{steps}", unit="steps")
            outputs = self.backend.generate(req, on_step=on_step, cancel=cancel)
        except Cancelled as err:
            outputs = err.outputs
            gr.Warning(f"Cancelled: {err}")
            return result(f"**Cancelled** {html.escape(str(err))}; {len(outputs)} finished sample(s) kept.")
        except (UploadError, MediaError, ValueError, NoModel) as err:
            kind = "Upload refused" if isinstance(err, UploadError) else "Cannot sample"
            gr.Warning(f"{kind}: {err}")
            return result(f"**{kind}:** {html.escape(str(err))}")
        lines = [f"**Done: {len(outputs)} sample(s)**, seeds {', '.join(str(o.seed) for o in outputs)}, {steps} steps.",
                 RESULTS[ONE_STREAM.get(task)].note]
        lines += [f"- seed {o.seed}: `{o.folder}`" + (f" · sync {o.sync:.2f}" if o.sync is not None else "")
                  for o in outputs]
        warned = dict.fromkeys(w for o in outputs for w in o.warnings)
        lines += [f"- **Sampler warning:** {html.escape(w)}" for w in warned]
        return result("\n".join(line for line in lines if line))

    # ------------------------------------------------------------------------------------------
    # Layout
    # ------------------------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        c = self.config
        choices = self.refresh_entries()
        start = str(Path(c.checkpoint).expanduser().resolve()) if c.checkpoint else (choices[0][1] if choices else None)
        if start and self.backend.folder is None:
            self.switch_model(start)
        presets = c.guidance_presets
        preset_names = sorted(presets)
        w0 = {k: float(c.guidance.get(k, 0.0) or 0.0) for k in WEIGHTS}
        start_preset = str(c.guidance.get("name", "jointcfg"))

        with gr.Blocks(title="jointdit studio", analytics_enabled=False) as demo:
            gr.Markdown("## jointdit studio — joint video + audio sampling")
            with gr.Row():
                model = gr.Dropdown(choices=choices, value=start, label="Model (run · export · step · val loss)",
                                    scale=5, elem_id="model-picker", allow_custom_value=False)
                refresh = gr.Button("Refresh list", scale=1, elem_id="refresh-models")
            model_line = gr.Markdown(self.backend.describe(), elem_id="model-line")
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", placeholder="a red ball bouncing on the floor", scale=3,
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", scale=2, elem_id="negative")
            current = gr.State(TASKS[0])   # the selected tab's task (at first the first tab's): the estimate's
            with gr.Row():
                with gr.Column(scale=3):
                    tabs, selects = self._tabs(current)
                with gr.Column(scale=2):
                    preset = gr.Dropdown(choices=preset_names, value=start_preset if start_preset in presets else None,
                                         label="Guidance preset (fills the weights)", elem_id="preset")
                    with gr.Row():
                        w = {k: gr.Number(value=w0[k], label=k, step=0.1, min_width=60, elem_id=k) for k in WEIGHTS}
                    with gr.Row():
                        steps = gr.Slider(1, c.max_steps, value=c.steps, step=1, label="Sampling steps", elem_id="steps")
                        samples = gr.Slider(1, c.max_samples, value=c.samples, step=1, label="Samples (seed, seed+1, …)",
                                            elem_id="samples")
                    with gr.Row():
                        seed = gr.Number(value=c.seed, precision=0, label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
                    with gr.Accordion("VRAM knobs", open=True):
                        v = c.vram
                        with gr.Row():
                            max_t = gr.Number(value=int(v.get("max_t", 0) or 0), precision=0, minimum=0,
                                              label="max_t (latent frames, 0 = all)", elem_id="max_t")
                            kv = gr.Slider(0, 16, value=0, step=1, label="kv_downsample (0 = the model's own)",
                                           elem_id="kv_downsample")
                            kvs = gr.Slider(0, 4, value=0, step=1, label="kv_pool_space (0 = the model's own)",
                                            elem_id="kv_pool_space")
                        with gr.Row():
                            qv = gr.Number(value=int(v.get("q_chunk_v", 0) or 0), precision=0, minimum=0,
                                           label="q_chunk_v (0 = off)", elem_id="q_chunk_v")
                            qa = gr.Number(value=int(v.get("q_chunk_a", 0) or 0), precision=0, minimum=0,
                                           label="q_chunk_a (0 = off)", elem_id="q_chunk_a")
                            vdc = gr.Number(value=int(v.get("vid_decode_chunk", 8) or 0), precision=0, minimum=0,
                                            label="vid_decode_chunk", elem_id="vid_decode_chunk")
                        estimate = gr.Markdown(elem_id="memory-estimate")

            weights = [w[k] for k in WEIGHTS]
            knobs = dict(zip(KNOBS, (max_t, qv, qa, kv, kvs, vdc)))
            # what every Generate reads besides its tab's inputs, by the names Studio.generate reads
            controls = {"prompt": prompt, "negative": negative, **w, "steps": steps, "seed": seed,
                        "random_seed": random_seed, "samples": samples, **knobs}

            # live memory estimate, for the selected tab's task
            est_inputs = {"prompt": prompt, "negative": negative, **w, **knobs, "task": current,
                          "both": tabs["extend_a"].inputs["both"]}
            est_named = _namer(est_inputs)

            def live(values: dict) -> str:
                return self.estimate(est_named(values))

            for comp in est_inputs.values():
                comp.change(live, set(est_inputs.values()), estimate, queue=False, show_progress="hidden")
            for selected in selects:
                selected.then(live, set(est_inputs.values()), estimate, queue=False, show_progress="hidden")
            demo.load(live, set(est_inputs.values()), estimate, queue=False, show_progress="hidden")
            preset.change(lambda name: [presets.get(name, {}).get(k, 0.0) for k in WEIGHTS], preset, weights,
                          queue=False, show_progress="hidden")

            # model picker: loading runs in the device group, after any running job
            refresh.click(lambda cur: gr.update(choices=self.refresh_entries(), value=cur), model, model, queue=False)
            held_dd = [tabs["i2sv"].inputs["reference"]]
            model.change(self.switch_model, model, [model_line, *held_dd], concurrency_id=DEVICE_GROUP,
                         concurrency_limit=1).then(live, set(est_inputs.values()), estimate, queue=False,
                                                   show_progress="hidden")

            take_ticket = _with_request(lambda request=None: self.jobs.ticket(_session_of(request)))
            cancel = _with_request(lambda request=None: gr.Info(self.cancel(_session_of(request))))
            for task, parts in tabs.items():
                ticket = gr.State(None)
                inputs = {**parts.inputs, **controls, "ticket": ticket}
                # the ticket is taken at the click, outside the queue, so Cancel also reaches a waiting job
                parts.button.click(take_ticket, None, ticket, queue=False, show_progress="hidden").then(
                    self._handler(task, inputs), set(inputs.values()),
                    [parts.result, parts.gallery, parts.files, parts.status, seed],
                    concurrency_id=DEVICE_GROUP, concurrency_limit=1)
                # no outputs: the page holds back an event whose outputs a running job still owns. Queued (in
                # its own unlimited group, so it never waits for the device) because only a queued event's
                # gr.Info reaches the page
                parts.cancel.click(cancel, None, None, concurrency_id="cancel", concurrency_limit=None,
                                   show_progress="hidden")
        return demo

    def _handler(self, task: str, inputs: Mapping[str, Any]):
        """The Generate handler of one tab. Its event's inputs are the set of ``inputs`` (the tab's own, the
        shared controls and the click's cancel ``ticket``), read by name; Gradio injects ``progress`` and the
        page's ``request``, whose session the job's cancel flag belongs to."""
        import gradio as gr

        named = _namer(inputs)

        def run(values: dict, progress=gr.Progress(), request=None):
            values = named(values)
            with self.jobs.job(_session_of(request), values.pop("ticket")) as cancel:
                return self.generate(task, values, progress, cancel)

        run.__name__ = f"generate_{task}"
        return _with_request(run)

    def _tabs(self, current) -> tuple[dict[str, TabParts], list[Any]]:
        """A row of :data:`TAB_GROUPS` tabs, each holding a row of tabs, one per task (one row of ten does not
        fit a page). Selecting a task's tab sets ``current`` to it; selecting a group's tab sets ``current`` to
        the task selected inside that group (kept per group). Returns the tabs' parts and their select events
        (a State's change event does not fire on a handler's update, so what follows is chained to these)."""
        import gradio as gr

        parts: dict[str, TabParts] = {}
        selects: list[Any] = []
        # made outside the Tabs: a State made among its tabs garbles their row of titles (Gradio 6)
        shown_in = {group: gr.State(tasks[0]) for group, (_, tasks) in TAB_GROUPS.items()}
        with gr.Tabs():
            for group, (title, tasks) in TAB_GROUPS.items():
                shown = shown_in[group]
                with gr.Tab(title, id=group, elem_id=f"tab-{group}") as outer:
                    with gr.Tabs():
                        for task in tasks:
                            with gr.Tab(TASK_TITLES[task], id=task, elem_id=f"tab-{task}") as tab:
                                parts[task] = self._task_tab(task)
                            selects.append(tab.select(_returns((task, task)), None, [current, shown], queue=False,
                                                      show_progress="hidden"))
                selects.append(outer.select(lambda task: task, shown, current, queue=False, show_progress="hidden"))
        return parts, selects

    def _task_tab(self, task: str) -> TabParts:
        """What a task's tab holds, top to bottom: its note, its inputs (each checked as soon as it changes, in
        the status line), its parameters, Generate / Cancel, the status line and the results."""
        import gradio as gr

        gr.Markdown(TASK_NOTES[task])
        clip = self.backend.clip_seconds() if self.backend.loaded else UNLOADED_CLIP_SECONDS
        inputs: dict[str, Any] = {}
        checks: list[tuple[Any, Callable, list[Any], dict[str, Any]]] = []   # wired once the status line exists
        if task == "i2sv":
            with gr.Row():
                image = gr.Image(sources=["upload", "webcam"], type="filepath", label="First frame",
                                 elem_id="i2sv-image", height=220)
                # what Generate reads: the path of the file in the image box, set by its change event below
                inputs["image"] = gr.State(None)
                with gr.Column():
                    inputs["reference"] = gr.Dropdown(choices=self.backend.held_out() if self.backend.loaded else [],
                                                      value=None, label="…or a held-out clip's first frame",
                                                      elem_id="i2sv-reference")
                    preview = gr.Image(label="held-out frame", interactive=False, height=140, elem_id="i2sv-preview")
            inputs["reference"].change(self.held_out_preview, inputs["reference"], preview, queue=False,
                                       show_progress="hidden")
            # preprocess=False: gr.Image's own preprocess opens the file with PIL before any handler runs, so
            # a file that is not an image would fail there as Gradio's bare "Error" and never reach the check
            checks.append((image, self.upload_image, [inputs["image"]], {"preprocess": False}))
        if task in SOUND_INPUTS:
            inputs["audio"] = gr.Audio(sources=["upload", "microphone"], type="filepath", elem_id=f"{task}-audio",
                                       label=f"{SOUND_INPUTS[task]} (WAV/FLAC/OGG or MP4)")
            checks.append((inputs["audio"], partial(self.upload_note, check_audio), [], {}))
        clip_last = task == "extend_a"   # its clip is optional: below the box that asks for it
        if task in CLIP_INPUTS and not clip_last:
            checks.append(self._clip_input(task, inputs))
        if task in BOTH_LABELS:
            with gr.Row():
                inputs["seconds_given"] = gr.Number(value=round(clip / 2, 3), elem_id=f"{task}-seconds",
                                                    label="Seconds given (kept from the start)")
                inputs["both"] = gr.Checkbox(value=False, label=BOTH_LABELS[task], elem_id=f"{task}-both")
        if task in ("inpaint_v", "inpaint_a"):
            inputs.update(self._inpaint_inputs(task, clip))
        if task in CLIP_INPUTS and clip_last:
            checks.append(self._clip_input(task, inputs))
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id=f"generate-{task}")
            cancel = gr.Button("Cancel", variant="stop", elem_id=f"cancel-{task}")
        status = gr.Markdown(elem_id=f"status-{task}")
        # check an input as soon as it arrives, so a bad file is named before anyone presses Generate; on
        # change, not upload: a webcam photo or a microphone recording is not an "upload" to Gradio
        for comp, check, outputs, options in checks:
            comp.change(check, comp, [*outputs, status], queue=False, show_progress="hidden", **options)
        labels = RESULTS[ONE_STREAM.get(task)]
        if ONE_STREAM.get(task) == "audio":
            result = gr.Audio(label=labels.player, type="filepath", interactive=False, elem_id=f"audio-{task}")
        else:
            result = gr.Video(label=labels.player, interactive=False, autoplay=False, elem_id=f"video-{task}",
                              height=240)
        gallery = gr.Image(label=labels.preview, type="filepath", interactive=False, elem_id=f"preview-{task}")
        files = gr.File(label=f"Downloads ({labels.downloads}) of every sample", file_count="multiple",
                        interactive=False, elem_id=f"files-{task}", height=120)
        return TabParts(inputs, button, cancel, status, result, gallery, files)

    def _clip_input(self, task: str, inputs: dict[str, Any]) -> tuple[Any, Callable, list[Any], dict[str, Any]]:
        """A clip upload (``inputs["video"]``) with the checked clip's player beside it; returns its check.

        A File input, not gr.Video: the browser's player silently drops a clip it cannot play, so a bad upload
        would never reach the server's check."""
        import gradio as gr

        with gr.Row():
            inputs["video"] = gr.File(file_types=list(VIDEO_SUFFIXES), type="filepath", elem_id=f"{task}-video",
                                      label=f"{CLIP_INPUTS[task]} "
                                            f"({', '.join(s.lstrip('.').upper() for s in VIDEO_SUFFIXES)})",
                                      height=200)
            preview = gr.Video(label="uploaded clip", interactive=False, height=200, elem_id=f"{task}-preview")
        return inputs["video"], self.upload_video, [preview], {}

    def _inpaint_inputs(self, task: str, clip: float) -> dict[str, Any]:
        """What to regenerate: a time span (seconds; it starts as the middle half of the ``clip`` seconds), or
        for a video instead a region of every frame."""
        import gradio as gr

        out: dict[str, Any] = {}
        if task == "inpaint_v":
            out["target"] = gr.Radio([("a time span", "span"), ("a region of every frame", "region")], value="span",
                                     label="Regenerate", elem_id=f"{task}-target")
        with gr.Row() as span_row:
            out["span_start"] = gr.Number(value=round(clip / 4, 3), label="span start (s)",
                                          elem_id=f"{task}-span-start")
            out["span_end"] = gr.Number(value=round(3 * clip / 4, 3), label="span end (s)", elem_id=f"{task}-span-end")
        if task == "inpaint_v":
            with gr.Row(visible=False) as region_row:
                for side, value in zip(REGION, (0.25, 0.25, 0.75, 0.75)):
                    out[side] = gr.Number(value=value, label=f"{side} (fraction of the frame)",
                                          elem_id=f"{task}-{side}")

            def show(target: str):
                return gr.update(visible=target == "span"), gr.update(visible=target == "region")

            out["target"].change(show, out["target"], [span_row, region_row], queue=False, show_progress="hidden")
        return out


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------
def check_host(host: str) -> str:
    """Loopback unless asked otherwise; any other address warns that the UI is reachable from the network."""
    import warnings

    host = str(host or "127.0.0.1")
    if host not in LOOPBACK:
        msg = (f"jointdit ui: binding {host}, so anyone who can reach this machine on the port can use the UI and "
               f"read what it generates; the default host=127.0.0.1 keeps it on this machine")
        warnings.warn(msg, stacklevel=2)
        print(f"WARNING: {msg}", flush=True)
    return host


def guidance_presets(config_dir: Path) -> dict[str, dict[str, float]]:
    """The ``guidance/`` config group's options (``jointcfg``, ``cfg``, ``none`` …) as weight dicts."""
    from omegaconf import OmegaConf

    out = {}
    for path in sorted((config_dir / "guidance").glob("*.yaml")):
        g = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        name = str(g.get("name", path.stem))
        if name == "cfg":  # plain CFG: the formula with only w_txt and w_img
            g = {**g, "w_v": 0.0, "w_a": 0.0, "w_neg": 0.0}
        out[name] = {k: float(g.get(k, 0.0) or 0.0) for k in WEIGHTS}
    return out


def create(cfg) -> tuple[Studio, Any]:
    """Compose-config → backend + studio + Blocks (not launched)."""
    from omegaconf import OmegaConf

    from jointdit.config import CONFIG_DIR

    plain = lambda x: OmegaConf.to_container(x, resolve=True) if x is not None and not isinstance(x, (str, int, float, dict, list)) else x  # noqa: E731
    backend = Backend(out_dir=str(cfg.out_dir), cache_dir=str(cfg.paths.cache_dir), device=cfg.get("device", "auto"),
                      clip=plain(cfg.get("clip")), codec=plain(cfg.get("codec")))
    picker = cfg.get("picker") or {}
    config = AppConfig(
        root_dir=str(cfg.paths.root_dir), tracking_uri=picker.get("tracking_uri"),
        model_cache=str(picker.get("cache_dir") or Path(str(cfg.out_dir)) / ".models"),
        checkpoint=str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        guidance_presets=guidance_presets(CONFIG_DIR), guidance=plain(cfg.get("guidance")) or {},
        vram={k: int(cfg.vram.get(k, 0) or 0) for k in KNOBS}, steps=int(cfg.get("steps", 30)),
        seed=int(cfg.get("seed", 0)), samples=int(cfg.get("samples", 1)),
        max_samples=int(cfg.get("max_samples", 8)), max_steps=int(cfg.get("max_steps", 1000)),
        limits=UploadLimits.from_cfg(cfg.get("uploads")))
    if config.checkpoint and not cat.is_model_folder(config.checkpoint):
        raise FileNotFoundError(f"checkpoint={config.checkpoint} is not an exported model folder "
                                f"(config.json + weights + jointdit.json), e.g. outputs/<run>/export/last")
    studio = Studio(backend, config)
    return studio, studio.build()


def launch(cfg, block: bool | None = None) -> tuple[Studio, Any, str]:
    """Build and start the app on ``cfg.host:cfg.port`` (loopback by default; never shared); prints the URL.

    ``block`` (default ``cfg.block``) waits until Ctrl-C; tests pass False and call ``demo.close()``.
    """
    host = check_host(cfg.get("host", "127.0.0.1"))
    studio, demo = create(cfg)
    out_dir = Path(str(cfg.out_dir)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1)
    max_mb = studio.config.limits.max_mb
    demo.launch(server_name=host, server_port=int(cfg.port) if cfg.get("port") else None, share=False,
                inbrowser=False, prevent_thread_lock=True, show_error=False, quiet=True,
                allowed_paths=[str(out_dir)], max_file_size=f"{max_mb:g}mb", footer_links=[],
                ssr_mode=False, mcp_server=False, pwa=False)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{demo.server_port}/"
    print(f"jointdit ui: serving {studio.backend.folder or 'no model'} at {url}", flush=True)
    if block if block is not None else bool(cfg.get("block", True)):
        try:
            demo.block_thread()
        finally:
            demo.close()
    return studio, demo, url


__all__: Sequence[str] = ("Studio", "AppConfig", "create", "launch", "check_host", "guidance_presets")
