"""The Gradio Blocks app: a model picker, one tab per task, the sampling and memory controls.

Layout::

    model picker (exported folders under outputs/ and multirun/, MLflow-logged models) · refresh · model line
    prompt · negative prompt
    ┌ tabs: text → video+sound | image → sounding video | audio → video | video → audio ┐  ┌ guidance preset   ┐
    │ task inputs (upload / webcam / held-out frame / record)                          │  │ w_v w_a w_txt …   │
    │ Generate · Cancel                                                               │  │ steps, seed, n    │
    │ MP4 with sound · frame strip over spectrogram · MP4/WAV/PNG downloads           │  │ VRAM knobs + live │
    │ status line (seeds, folders, errors)                                            │  │ memory estimate   │
    └──────────────────────────────────────────────────────────────────────────────────┘  └───────────────────┘

Every event that touches the model (generate in any tab, switching models) shares one concurrency group
(``device``) of size 1 in Gradio's queue, so one job runs on the device at a time. Cancel has a group of its
own with no limit (it never waits for the device) and stops only the jobs of the page that pressed it
(:mod:`jointdit.ui.jobs`): the running one before its next sampling step, a waiting one before its first. Uploads, webcam photos and microphone
recordings are checked by :mod:`jointdit.ui.uploads` as soon as they arrive and again on Generate;
refusals and input errors land in the tab's status line (and a toast), never as a traceback. A file over
``uploads.max_mb`` is stopped by Gradio itself before any byte is sent (``max_file_size``; its toast
names the file and the limit), and its server refuses such an upload too (HTTP 413).
"""

from __future__ import annotations

import html
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jointdit.ui import catalog as cat
from jointdit.ui.backend import KNOBS, TASKS, WEIGHTS, Backend, Cancelled, GenerateRequest, NoModel, Output
from jointdit.ui.jobs import CancelBoard
from jointdit.ui.uploads import VIDEO_SUFFIXES, UploadError, UploadLimits, check_audio, check_image, check_video

log = logging.getLogger(__name__)

TASK_TITLES = {"joint": "text → video + sound", "i2sv": "image → sounding video", "a2v": "audio → video",
               "v2a": "video → audio"}
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


def _with_request(fn):
    """Have Gradio pass the page's ``gr.Request`` to ``fn``'s ``request`` parameter.

    Gradio injects it into a parameter whose type hint resolves to ``gr.Request``; a string hint does not
    resolve here (gradio is imported lazily, not at module level), so the class itself is set."""
    import gradio as gr

    fn.__annotations__["request"] = gr.Request
    return fn


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
    def estimate(self, prompt, negative, w_v, w_a, w_txt, w_neg, w_img, samples, max_t, q_chunk_v, q_chunk_a,
                 kv_downsample, kv_pool_space, vid_decode_chunk, task: str = "i2sv") -> str:
        if not self.backend.loaded:
            return "Memory estimate: load a model first."
        weights = {"name": "jointcfg", **dict(zip(WEIGHTS, (w_v, w_a, w_txt, w_neg, w_img)))}
        knobs = dict(zip(KNOBS, (max_t, q_chunk_v, q_chunk_a, kv_downsample, kv_pool_space, vid_decode_chunk)))
        try:
            est = self.backend.estimate(task, weights, knobs, prompt or "", negative or "")
        except Exception as err:  # noqa: BLE001
            return f"Memory estimate unavailable: {html.escape(str(err))}"
        verdict = "fits" if est["fits"] else f"**does not fit** — {html.escape(est['advice'])}"
        where = "RAM available" if est["device"] == "cpu" else "device memory"
        rows = est["branches"]
        return (f"**Estimated peak {_fmt_bytes(est['planned'])}** for sampling (with the {est['margin']:.0%} margin): "
                f"model {_fmt_bytes(est['weights'])}, codecs {_fmt_bytes(est['codec_weights'])}, CLIP "
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
        """A v2a upload: (the checked clip for the preview player or None, status line)."""
        note = self.upload_note(check_video, path)
        return (None if note or not path else path), note

    def _check_inputs(self, task: str, image, reference, audio, video) -> dict[str, Any]:
        lim = self.config.limits
        if task == "i2sv":
            if image:
                return {"image": str(check_image(image, lim))}
            return {"reference": reference or None}
        if task == "a2v":
            return {"audio": str(check_audio(audio, lim)) if audio else None}
        if task == "v2a":
            return {"video": str(check_video(video, lim)) if video else None}
        return {}

    def generate(self, task: str, image, reference, audio, video, prompt, negative, w_v, w_a, w_txt, w_neg, w_img,
                 steps, seed, random_seed, samples, max_t, q_chunk_v, q_chunk_a, kv_downsample, kv_pool_space, vid_decode_chunk,
                 progress, cancel: threading.Event | None = None):
        """One click of Generate: returns (mp4, preview gallery, downloads, status, seed); ``cancel`` stops it
        between two sampling steps.

        With ``random_seed`` the seed is drawn uniformly from [0, 2**31) and written back to the seed box;
        the n samples use seed, seed+1, …, seed+n-1, each in its own folder named after its seed."""
        import gradio as gr
        from jointdit.data.media import MediaError

        seed = _SEED_SOURCE.randrange(2**31) if random_seed else int(seed or 0)
        n = max(1, min(int(samples or 1), self.config.max_samples))
        steps = max(1, min(int(steps or 1), self.config.max_steps))
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
            files = [str(p) for o in outputs for p in (o.mp4, o.wav, o.sync_png or o.png)]
            return (str(first.mp4) if first else None, str(first.sync_png or first.png) if first else None,
                    files or None, status, seed)

        try:
            inputs = self._check_inputs(task, image, reference, audio, video)
            req = GenerateRequest(task=task, seeds=[seed + k for k in range(n)], steps=steps,
                                  guidance={"name": "jointcfg", **dict(zip(WEIGHTS, (w_v, w_a, w_txt, w_neg, w_img)))},
                                  knobs=dict(zip(KNOBS, (max_t, q_chunk_v, q_chunk_a, kv_downsample, kv_pool_space, vid_decode_chunk))),
                                  prompt=prompt or "", negative_prompt=negative or "", **inputs)
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
        lines = [f"**Done: {len(outputs)} sample(s)**, seeds {', '.join(str(o.seed) for o in outputs)}, {steps} steps."]
        lines += [f"- seed {o.seed}: `{o.folder}`" + (f" · sync {o.sync:.2f}" if o.sync is not None else "")
                  for o in outputs]
        return result("\n".join(lines))

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
            with gr.Row():
                with gr.Column(scale=3):
                    tab_parts: dict[str, dict[str, Any]] = {}
                    with gr.Tabs():
                        for task in TASKS:
                            with gr.Tab(TASK_TITLES[task], id=task, elem_id=f"tab-{task}"):
                                tab_parts[task] = self._task_tab(task)
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
            est_inputs = [prompt, negative, *weights, samples, max_t, qv, qa, kv, kvs, vdc]
            common = [prompt, negative, *weights, steps, seed, random_seed, samples, max_t, qv, qa, kv, kvs, vdc]

            # live memory estimate
            for comp in est_inputs:
                comp.change(self.estimate, est_inputs, estimate, queue=False, show_progress="hidden")
            demo.load(self.estimate, est_inputs, estimate, queue=False, show_progress="hidden")
            preset.change(lambda name: [presets.get(name, {}).get(k, 0.0) for k in WEIGHTS], preset, weights,
                          queue=False, show_progress="hidden")

            # model picker: loading runs in the device group, after any running job
            refresh.click(lambda cur: gr.update(choices=self.refresh_entries(), value=cur), model, model, queue=False)
            held_dd = [tab_parts["i2sv"]["reference"]]
            model.change(self.switch_model, model, [model_line, *held_dd], concurrency_id=DEVICE_GROUP,
                         concurrency_limit=1).then(self.estimate, est_inputs, estimate, queue=False,
                                                   show_progress="hidden")

            take_ticket = _with_request(lambda request=None: self.jobs.ticket(_session_of(request)))
            cancel = _with_request(lambda request=None: gr.Info(self.cancel(_session_of(request))))
            for task, parts in tab_parts.items():
                task_inputs = [parts.get(k) or gr.State(None) for k in ("image_path", "reference", "audio", "video")]
                ticket = gr.State(None)
                # the ticket is taken at the click, outside the queue, so Cancel also reaches a waiting job
                parts["button"].click(take_ticket, None, ticket, queue=False, show_progress="hidden").then(
                    self._handler(task), [ticket, *task_inputs, *common],
                    [parts["result"], parts["gallery"], parts["files"], parts["status"], seed],
                    concurrency_id=DEVICE_GROUP, concurrency_limit=1)
                # no outputs: the page holds back an event whose outputs a running job still owns. Queued (in
                # its own unlimited group, so it never waits for the device) because only a queued event's
                # gr.Info reaches the page
                parts["cancel"].click(cancel, None, None, concurrency_id="cancel", concurrency_limit=None,
                                      show_progress="hidden")
        return demo

    def _handler(self, task: str):
        """The Generate handler of one tab, with explicit parameters (Gradio injects ``progress`` and the
        page's ``request``, whose session the job's cancel flag belongs to)."""
        import gradio as gr

        def run(ticket, image, reference, audio, video, prompt, negative, w_v, w_a, w_txt, w_neg, w_img, steps, seed,
                random_seed, samples, max_t, q_chunk_v, q_chunk_a, kv_downsample, kv_pool_space, vid_decode_chunk,
                progress=gr.Progress(), request=None):
            with self.jobs.job(_session_of(request), ticket) as cancel:
                return self.generate(task, image, reference, audio, video, prompt, negative, w_v, w_a, w_txt, w_neg,
                                     w_img, steps, seed, random_seed, samples, max_t, q_chunk_v, q_chunk_a,
                                     kv_downsample, kv_pool_space, vid_decode_chunk, progress, cancel)

        run.__name__ = f"generate_{task}"
        return _with_request(run)

    def _task_tab(self, task: str) -> dict[str, Any]:
        import gradio as gr

        parts: dict[str, Any] = {}
        if task == "joint":
            gr.Markdown("Video and sound from noise (and the prompt, when the model has a CLIP encoder).")
        elif task == "i2sv":
            with gr.Row():
                parts["image"] = gr.Image(sources=["upload", "webcam"], type="filepath", label="First frame",
                                          elem_id="i2sv-image", height=220)
                # what Generate reads: the path of the file in the image box, set by its change event below
                parts["image_path"] = gr.State(None)
                with gr.Column():
                    parts["reference"] = gr.Dropdown(choices=self.backend.held_out() if self.backend.loaded else [],
                                                     value=None, label="…or a held-out clip's first frame",
                                                     elem_id="i2sv-reference")
                    preview = gr.Image(label="held-out frame", interactive=False, height=140, elem_id="i2sv-preview")
            parts["reference"].change(self.held_out_preview, parts["reference"], preview, queue=False,
                                      show_progress="hidden")
        elif task == "a2v":
            parts["audio"] = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Sound (WAV/FLAC/OGG or MP4)",
                                      elem_id="a2v-audio")
        elif task == "v2a":
            # A File input, not gr.Video: the browser's player silently drops a clip it cannot play, so a
            # bad upload would never reach the server's check. The checked clip is shown beside it.
            with gr.Row():
                parts["video"] = gr.File(file_types=list(VIDEO_SUFFIXES), type="filepath", elem_id="v2a-video",
                                         label=f"Clip ({', '.join(s.lstrip('.').upper() for s in VIDEO_SUFFIXES)})",
                                         height=200)
                parts["video_preview"] = gr.Video(label="uploaded clip", interactive=False, height=200,
                                                  elem_id="v2a-preview")
        with gr.Row():
            parts["button"] = gr.Button("Generate", variant="primary", elem_id=f"generate-{task}")
            parts["cancel"] = gr.Button("Cancel", variant="stop", elem_id=f"cancel-{task}")
        parts["status"] = gr.Markdown(elem_id=f"status-{task}")
        # check an input as soon as it arrives, so a bad file is named before anyone presses Generate; on
        # change, not upload: a webcam photo or a microphone recording is not an "upload" to Gradio
        if task == "v2a":
            parts["video"].change(self.upload_video, parts["video"], [parts["video_preview"], parts["status"]],
                                  queue=False, show_progress="hidden")
        elif task == "a2v":
            parts["audio"].change(lambda p: self.upload_note(check_audio, p), parts["audio"], parts["status"],
                                  queue=False, show_progress="hidden")
        elif task == "i2sv":
            # preprocess=False: gr.Image's own preprocess opens the file with PIL before any handler runs, so
            # a file that is not an image would fail there as Gradio's bare "Error" and never reach the check
            parts["image"].change(self.upload_image, parts["image"], [parts["image_path"], parts["status"]],
                                  queue=False, show_progress="hidden", preprocess=False)
        parts["result"] = gr.Video(label="Result (MP4 with sound)", interactive=False, autoplay=False,
                                  elem_id=f"video-{task}", height=240)
        parts["gallery"] = gr.Image(label="Frame strip + spectrogram (solid: audio onsets, dashed: video events)",
                                    type="filepath", interactive=False, elem_id=f"preview-{task}")
        parts["files"] = gr.File(label="Downloads (MP4 with sound, WAV, PNG) of every sample", file_count="multiple", interactive=False,
                                 elem_id=f"files-{task}", height=120)
        return parts


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
