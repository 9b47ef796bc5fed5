"""Sampling as a library — ``load_session`` once, ``generate`` many times — and ``python -m jointdit.sample``.

    from jointdit.sample import SampleRequest, generate, load_session

    session = load_session("outputs/demo/export/last")                     # model, codecs, CLIP, geometry
    result = generate(session, SampleRequest(task="i2sv", image="frame.png", seeds=[0, 1], steps=30,
                                             out_dir="outputs/samples"))
    result.mp4, result.wav, result.png          # first seed's files; result.samples[k] for every seed
    result.frames, result.wave                  # first seed's decoded clip: [T, 3, H, W], [N] in [-1, 1]

The pieces, in the order ``generate`` runs them:

1. conditions → tensors at the model's clip geometry (:mod:`jointdit.io.conditions`), encoded by the
   session's codecs (and normalised by the latent spec, when it carries statistics);
2. CLIP features of the prompt, the negative prompt and the image, when the session has an encoder;
3. the guided flow ODE per seed (:func:`jointdit.diffusion.sampler.sample_latents`, pure tensors);
   ``progress(done, total)`` is called after every step and may return True to cancel;
4. decode: latents de-normalised, the video decoded ``vid_decode_chunk`` frames at a time
   (``vram.vid_decode_chunk`` / ``JOINTDIT_VID_DECODE_CHUNK``), the audio decoded and cut to the clip;
5. files (when ``out_dir`` is set) into this call's own folder (:mod:`jointdit.io.outputs`): never
   over earlier samples unless ``overwrite=True``.

``sample_to_files(cfg)`` is the composed-config wrapper (adds MLflow logging and a progress bar) that
the Hydra entry point ``main`` calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from jointdit.config import CONFIG_DIR, register_resolvers
from jointdit.diffusion import masks
from jointdit.diffusion.sampler import TASKS, SamplingCancelled, sample_latents
from jointdit.errors import ConfigError
from jointdit.io.outputs import OUTPUT_KINDS
from jointdit.latents import LatentSpec

log = logging.getLogger(__name__)
register_resolvers()

__all__ = ["Session", "SampleRequest", "Sample", "SampleResult", "SamplingCancelled", "load_session", "generate",
           "sample_to_files", "decode_video", "main"]

TASK_INPUTS = {"joint": "", "i2sv": "image= or reference=", "a2v": "audio=", "v2a": "video=", "extend_v": "video=",
               "extend_a": "audio=", "inpaint_v": "video=", "inpaint_a": "audio=", "t2v": "", "t2a": ""}
VIDEO_TASKS = ("v2a", "extend_v", "inpaint_v")     # an input video is (partly) kept
AUDIO_TASKS = ("a2v", "extend_a", "inpaint_a")     # an input sound is (partly) kept


# --------------------------------------------------------------------------------------------------
# Clip geometry: the model's LatentSpec (jointdit.latents), never recomputed here
# --------------------------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    from jointdit.config import to_plain

    return to_plain(x) if x is not None else None


def _spec_of_clip(clip: Mapping, video_codec, audio_codec, base: LatentSpec | None) -> LatentSpec:
    """``{seconds, fps, size[, sample_rate]}`` → a spec through the codecs, keeping ``base``'s
    normalisation, patch sizes and CLIP widths (the model's, when known)."""
    sr = int(audio_codec.sample_rate)
    if clip.get("sample_rate") and int(clip["sample_rate"]) != sr:
        warnings.warn(f"sample_rate={clip['sample_rate']} differs from the audio codec's {sr} Hz; using {sr}",
                      stacklevel=3)
    spec = LatentSpec.from_codecs(video_codec, audio_codec, fps=float(clip["fps"]), size=clip["size"],
                                  seconds=float(clip["seconds"]))
    if base is None:
        return spec
    return dataclasses.replace(spec, codec=base.codec, clip_widths=base.clip_widths, video_mean=base.video_mean,
                               video_std=base.video_std, audio_mean=base.audio_mean, audio_std=base.audio_std)


# --------------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------------
@dataclass
class Session:
    """A loaded model with everything ``generate`` needs; build it with :func:`load_session`."""

    model: torch.nn.Module
    video_codec: Any
    audio_codec: Any
    spec: LatentSpec
    checkpoint: Path
    meta: dict
    device: torch.device
    clip: Any = None                      # a ClipConditioner, or None (prompts are then ignored)
    vid_decode_chunk: int | None = None   # frames per video-decoder call (None: the codec's own setting)
    cache_dir: Path | None = None         # the latent cache of the model's data (for reference=<clip id>)

    def set_vram(self, vram: Mapping | None = None, kv_downsample: int | None = None,
                 kv_pool_space: int | None = None) -> None:
        """Apply memory knobs ``{q_chunk_v, q_chunk_a, kv_pool_space, kv_downsample, vid_decode_chunk}``
        (missing: off / the codec's own). The K/V pooling knobs change the function the model computes, so
        each is: explicit argument (warned when it differs from the export's) > the export's
        (``jointdit.json`` ``attention``) > ``vram.<knob>`` > 1."""
        vram = _plain(vram) or {}
        pooling = {name: _attention_knob(self.meta, vram, name, value)
                   for name, value in (("kv_downsample", kv_downsample), ("kv_pool_space", kv_pool_space))}
        self.model.set_memory_knobs(q_chunk_v=int(_knob(vram, "q_chunk_v", 0)), q_chunk_a=int(_knob(vram, "q_chunk_a", 0)),
                                    **pooling)
        chunk = _knob(vram, "vid_decode_chunk")
        self.vid_decode_chunk = None if chunk is None else int(chunk)


def _attention_knob(meta: Mapping, vram: Mapping, name: str, explicit: int | None) -> int:
    exported = (meta.get("attention") or {}).get(name)
    if explicit is None:
        return int(exported or _knob(vram, name, 1))
    if exported is not None and int(explicit) != int(exported):
        warnings.warn(f"{name}={int(explicit)} overrides the {name}={int(exported)} the model was trained with: it "
                      f"samples a different function than the one trained", stacklevel=3)
    return int(explicit)


def _knob(vram: Mapping | None, key: str, default: Any = None) -> Any:
    value = (vram or {}).get(key, default)
    return default if value is None else value


def _load_clip(clip: Any, meta: dict, model, device: torch.device):
    """``clip``: None → the export's encoder (if any); False or ``{enabled: false}`` → none; a mapping
    ``{model, pretrained, model_config}``; or a ready ``ClipConditioner``."""
    from jointdit.models.conditioning import ClipConditioner

    if isinstance(clip, ClipConditioner):
        encoder = clip
    else:
        settings = meta.get("clip") if clip is None else _plain(clip)
        if not settings or settings.get("enabled", True) is False:
            return None
        import open_clip

        if settings.get("model_config"):
            open_clip.add_model_config(Path(settings["model_config"]).expanduser())
        encoder = ClipConditioner(settings.get("model", "ViT-B-16"), settings.get("pretrained"), device=device)
    want = {k: model.config[k] for k in encoder.model_kwargs()}
    if want != encoder.model_kwargs():
        raise ValueError(f"the CLIP encoder gives {encoder.model_kwargs()} but the model was trained with {want}; "
                         f"use the encoder named in the export's jointdit.json (clip)")
    return encoder


def load_session(checkpoint: str | Path, *, device: str | torch.device | None = None, vram: Mapping | None = None,
                 codec: Mapping | tuple | None = None, clip: Any = None, kv_downsample: int | None = None,
                 kv_pool_space: int | None = None, spec: Any = None, cache_dir: str | Path | None = None, adapters: Any = None,
                 merge_adapters: bool = False, check_memory: bool = True,
                 plan_for: SampleRequest | None = None) -> Session:
    """Load an exported model folder (``config.json`` + weights + ``jointdit.json``) or a training
    checkpoint for sampling.

    device         ``None``/``"auto"``: CUDA when available, else CPU
    vram           memory knobs ``{q_chunk_v, q_chunk_a, kv_pool_space, kv_downsample, vid_decode_chunk}`` (the
                   ``vram`` group)
    codec          a codec config (the ``codec`` group), or ready ``(video_codec, audio_codec)``;
                   None: the codec stored in ``jointdit.json``
    clip           see :func:`_load_clip`; None: the CLIP encoder named in ``jointdit.json``, if any
    kv_downsample  K/V pooling over time / over space; None: the export's (they change the function the
    kv_pool_space  model computes), else ``vram.<knob>``, else 1; a value differing from the export's warns
    spec           the clip to sample: ``{seconds, fps, size}``; None: the export's
    cache_dir      the latent-cache root (``paths.cache_dir``), for ``reference=<cached clip id>``
    adapters       LoRA adapter folders to add, each ``path``, ``"path:scale"`` or ``{path, scale}``
                   (:func:`jointdit.lora.parse_adapters`); a ``checkpoint`` that is itself an adapter folder
                   loads its base with it merged. merge_adapters: fold them into the weights
    check_memory   check the memory plan BEFORE anything is loaded (:func:`jointdit.memory.check_sampling_plan`:
                   model, adapters, codecs, CLIP, the guided forward, decoding, against ``vram.budget_gb`` or
                   the device's memory); a plan that cannot fit raises ``MemoryPlanError`` naming the knob
    plan_for       the request the session will serve, sizing that plan (its guidance rows, ``batch_size``,
                   ``max_t``); None: the planner's default of 3 guidance rows, one seed at a time
    """
    from jointdit import checkpoints
    from jointdit.codecs import build_codecs
    from jointdit.codecs.base import resolve_device

    ckpt = Path(checkpoint).expanduser()
    device = resolve_device(device)
    vram = _plain(vram) or {}
    if check_memory:
        _check_plan(ckpt, device, vram, codec, clip, spec, adapters,
                    {"kv_downsample": kv_downsample, "kv_pool_space": kv_pool_space}, plan_for)
    model = checkpoints.load_model(ckpt)
    if adapters:
        from jointdit import lora

        model = lora.apply_adapters(model, lora.parse_adapters(adapters), merge=bool(merge_adapters))
    model = model.to(device).eval()
    meta = checkpoints.load_export_meta(ckpt)
    if isinstance(codec, tuple):
        video_codec, audio_codec = codec
    else:
        codec_cfg = _plain(codec) or meta.get("codec")
        if not codec_cfg:
            raise ValueError(f"{ckpt} has no codec settings in jointdit.json; pass codec=pixel_mel (or another codec group)")
        video_codec, audio_codec = build_codecs(codec_cfg)
    for c in (video_codec, audio_codec):
        c.to(device)
    spec = _plain(spec)
    exported = LatentSpec.from_export_meta(meta, dict(model.config)) if meta else None
    if isinstance(spec, LatentSpec):
        geometry = spec
    elif spec:
        geometry = _spec_of_clip(spec, video_codec, audio_codec, exported)
    elif exported is not None:
        geometry = exported
    else:
        raise ValueError(f"{ckpt} has no jointdit.json to read the clip geometry from; give it as "
                         f"spec={{seconds: 2.0, fps: 8, size: 64}} (manual_shapes= on the command line)")
    if geometry.video_patch_t is None:   # a manual clip: whole temporal patches of this model
        geometry = geometry.with_patches(model.config.video_patch_size[0], model.config.audio_patch_size[0])
    _check_fits(model, geometry)
    latent_cache = None
    if cache_dir is not None and (meta.get("data") or {}).get("name") and meta.get("codec"):
        from jointdit.data.cache import cache_dir_for

        latent_cache = cache_dir_for(meta["data"], meta["codec"], cache_dir)
    session = Session(model=model, video_codec=video_codec, audio_codec=audio_codec, spec=geometry, checkpoint=ckpt,
                      meta=meta, device=device, clip=_load_clip(clip, meta, model, device), cache_dir=latent_cache)
    session.set_vram(vram, kv_downsample, kv_pool_space)
    return session


def _check_plan(ckpt: Path, device: torch.device, vram: dict, codec: Any, clip: Any, spec: Any, adapters: Any,
                pooling: Mapping[str, int | None], request: SampleRequest | None) -> None:
    """:func:`jointdit.memory.check_sampling_plan` for what :func:`load_session` is about to load."""
    from jointdit import checkpoints
    from jointdit.memory import check_sampling_plan

    plan_kw: dict[str, Any] = {}
    if request is not None:
        iso_prob = checkpoints.load_export_meta(ckpt).get("iso_prob") if ckpt.is_dir() else None
        plan_kw = {"branches": _guidance(request.guidance, iso_prob, quiet=True), "batch_size": int(request.batch_size),
                   "max_t": int(request.max_t or 0), "task": request.task}
    clip = _plain(clip)
    codec = codec if isinstance(codec, tuple) else _plain(codec)
    knobs = {**vram, **{name: int(value) for name, value in pooling.items() if value is not None}}
    check_sampling_plan(ckpt, device=device, vram=knobs, codec=codec, spec=_plain(spec), adapters=adapters,
                        clip=clip if clip is None or clip is False or isinstance(clip, Mapping) else None, **plan_kw)


def _check_fits(model, g: LatentSpec) -> None:
    cfg = model.config
    if g.video_shape[1] != cfg.video_in_channels or g.audio_shape[0] != cfg.audio_in_channels:
        raise ValueError(f"latent shapes video {g.video_shape} / audio {g.audio_shape} do not fit the model "
                         f"(video_in_channels={cfg.video_in_channels}, audio_in_channels={cfg.audio_in_channels}); "
                         f"check codec and spec / manual_shapes")


# --------------------------------------------------------------------------------------------------
# Request and result
# --------------------------------------------------------------------------------------------------
@dataclass
class SampleRequest:
    """What to generate. Inputs may be file paths or data in memory (see :mod:`jointdit.io.conditions`).

    task             joint | i2sv | a2v | v2a | extend_v | extend_a | inpaint_v | inpaint_a | t2v | t2a
                     (t2v: video alone, audio absent; t2a: audio alone — see :func:`generate` for their files)
    image            i2sv: an image file, PIL image, ``[H,W,3]`` uint8 array or ``[3,H,W]`` tensor in [-1, 1]
    reference        i2sv: an MP4 or a cached clip id (of the model's latent cache); its first frame is the image
    audio            a2v: a WAV/FLAC/OGG/MP4 file, a wave ``[N]`` at the model's rate, or ``(rate, samples)``
    video            v2a: an MP4 file or frames ``[T,3,H,W]`` in [-1, 1] at the model's fps
    guidance         a :class:`~jointdit.diffusion.guidance.JointCFG`, a guidance config mapping, or a
                     name of ``conf/guidance`` (``jointcfg`` | ``cfg`` | ``stg`` | ``ltx2`` | ``none``); iso
                     weights of a model not trained with iso modes are zeroed (with a warning)
    shift_video      timestep shifts; None: the export's rule at this token count (``diffusion.schedule``)
    shift_audio
    out_dir          where this call's folder goes; None writes nothing (tensors only)
    name             the folder's name under ``out_dir``; None: ``<time>_<task>_seed<first seed>``
    overwrite        reuse an existing ``name`` (its files are replaced); otherwise it is refused
    outputs          which files to write per seed: mp4, video_mp4, wav, png
    batch_size       seeds integrated together in one solver call (1: one at a time, least memory)
    max_t            sample at most this many latent video frames (``LatentSpec.crop``; 0: the whole clip)
    seconds_given    extend_v / extend_a: keep the input's first seconds, generate the rest
    both             extend_*: also keep the other stream's first seconds (extend_v: ``audio=`` or the
                     video file's own sound; extend_a: ``video=``)
    region           inpaint_v: ``(top, left, bottom, right)`` fractions of the frame to regenerate
    span             inpaint_v / inpaint_a: ``(start_s, end_s)`` seconds to regenerate
    """

    task: str = "joint"
    prompt: str = ""
    negative_prompt: str = ""
    image: Any = None
    reference: Any = None
    audio: Any = None
    video: Any = None
    seeds: Sequence[int] = (0,)
    steps: int = 30
    guidance: Any = "jointcfg"
    shift_video: float | None = None
    shift_audio: float | None = None
    out_dir: str | Path | None = None
    name: str | None = None
    overwrite: bool = False
    outputs: Sequence[str] = OUTPUT_KINDS
    batch_size: int = 1
    max_t: int = 0
    seconds_given: float | None = None
    both: bool = False
    region: Sequence[float] | None = None
    span: Sequence[float] | None = None


@dataclass
class Sample:
    """One seed's output. The stream a task leaves absent (t2v's audio, t2a's video) is None."""

    seed: int
    frames: torch.Tensor | None           # [T, 3, H, W] in [-1, 1]
    wave: torch.Tensor | None             # [N] in [-1, 1]
    z_video: torch.Tensor | None          # [Tv, Cv, hv, wv] the sampled latent (model space)
    z_audio: torch.Tensor | None          # [Ca, La, Fa]
    fps: float
    sample_rate: int
    files: dict[str, Path] = field(default_factory=dict)   # kind → path (mp4, video_mp4, wav, png)

    @property
    def mp4(self) -> Path | None:
        return self.files.get("mp4")

    @property
    def video_mp4(self) -> Path | None:
        return self.files.get("video_mp4")

    @property
    def wav(self) -> Path | None:
        return self.files.get("wav")

    @property
    def png(self) -> Path | None:
        return self.files.get("png")


@dataclass
class SampleResult:
    """One ``generate`` call: a :class:`Sample` per seed; ``frames``/``wave``/``mp4``/... are the first seed's."""

    request: SampleRequest
    samples: list[Sample]
    fps: float
    sample_rate: int
    folder: Path | None = None

    @property
    def frames(self) -> torch.Tensor | None:
        return self.samples[0].frames

    @property
    def wave(self) -> torch.Tensor | None:
        return self.samples[0].wave

    @property
    def mp4(self) -> Path | None:
        return self.samples[0].mp4

    @property
    def video_mp4(self) -> Path | None:
        return self.samples[0].video_mp4

    @property
    def wav(self) -> Path | None:
        return self.samples[0].wav

    @property
    def png(self) -> Path | None:
        return self.samples[0].png

    @property
    def files(self) -> list[Path]:
        """Every written file, seed by seed."""
        return [p for s in self.samples for p in s.files.values()]


# --------------------------------------------------------------------------------------------------
# Generate
# --------------------------------------------------------------------------------------------------
def _seeds(seeds: Any) -> list[int]:
    seeds = _plain(seeds)
    out = [int(seeds)] if isinstance(seeds, (int, str)) else [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds is empty; give at least one seed, e.g. seeds=[0]")
    return out


def _guidance(g: Any, iso_prob: Any = None, quiet: bool = False):
    """A JointCFG, a guidance config mapping, or a ``conf/guidance`` name → a JointCFG (``iso_prob``: the
    export's, so iso weights of a model that never learned them are zeroed; ``quiet``: without the warnings
    of building it, when it only sizes a memory plan)."""
    from jointdit.diffusion.guidance import JointCFG, build_guidance

    if quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _guidance(g, iso_prob)

    if isinstance(g, JointCFG):
        return g
    if g is None:
        return JointCFG()
    if isinstance(g, str):
        from omegaconf import OmegaConf

        path = CONFIG_DIR / "guidance" / f"{g}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in (CONFIG_DIR / "guidance").glob("*.yaml"))
            raise ConfigError(f"guidance={g!r}: no conf/guidance/{g}.yaml", hint=f"choose one of {', '.join(names)}")
        g = OmegaConf.load(path)
    return build_guidance(_plain(g), iso_prob=iso_prob)


def _shifts(session: Session, spec: LatentSpec, request: SampleRequest) -> tuple[float, float]:
    """The timestep shifts: the request's, else the export's rule at this clip's token counts."""
    from jointdit.diffusion.schedule import sampling_shifts, token_counts

    n_video, n_audio = token_counts(dict(session.model.config), spec.video_shape, spec.audio_shape)
    return sampling_shifts(session.meta, n_video, n_audio,
                           {"shift_video": request.shift_video, "shift_audio": request.shift_audio})


def check_request(request: SampleRequest) -> None:
    """Every check that needs no model: task, steps, seeds, the task's input is given (and exists when
    it is a file, unless it may be a cached clip id), output kinds. Raises ValueError / MediaError."""
    from jointdit.data.media import MediaError

    if request.task not in TASKS:
        raise ConfigError(f"task={request.task!r}; choose one of {', '.join(TASKS)}")
    if int(request.steps) < 1:
        raise ConfigError(f"steps={request.steps} must be >= 1")
    if int(request.batch_size) < 1:
        raise ConfigError(f"batch_size={request.batch_size} must be >= 1")
    if int(request.max_t or 0) < 0:
        raise ConfigError(f"max_t={request.max_t} must be >= 0 (0: the whole clip)")
    _seeds(request.seeds)
    task = request.task
    need = {"i2sv": request.image if request.image is not None else request.reference,
            **{t: request.video for t in VIDEO_TASKS}, **{t: request.audio for t in AUDIO_TASKS}}.get(task, True)
    if need is None or (isinstance(need, str) and not need):
        raise ConfigError(f"task={task} needs `{TASK_INPUTS[task]}<file>`")
    if task.startswith("extend_") and not (request.seconds_given and float(request.seconds_given) > 0):
        raise ConfigError(f"task={task} needs seconds_given=<seconds> > 0, the length of the input kept")
    if task == "extend_a" and request.both and request.video is None:
        raise ConfigError("task=extend_a both=true also keeps the video's first seconds: give video=<file>")
    if task == "extend_v" and request.both and request.audio is None and not isinstance(request.video, (str, Path)):
        raise ConfigError("task=extend_v both=true also keeps the sound's first seconds: give audio=<file> "
                          "(or a video file with sound)")
    if task == "inpaint_v" and (request.region is None) == (request.span is None):
        raise ConfigError("task=inpaint_v needs exactly one of region=[top,left,bottom,right] (fractions of the "
                          "frame) and span=[start_s,end_s] (seconds) to regenerate")
    if task == "inpaint_a" and request.span is None:
        raise ConfigError("task=inpaint_a needs span=[start_s,end_s], the seconds of sound to regenerate")
    for key in ("image", "audio", "video"):
        value = getattr(request, key)
        if isinstance(value, (str, Path)) and value and not Path(value).expanduser().is_file():
            raise MediaError(Path(value).expanduser(), f"no such file (given as {key}=)")
    unknown = set(request.outputs) - set(OUTPUT_KINDS)
    if unknown:
        raise ConfigError(f"unknown outputs {sorted(unknown)}; choose from {list(OUTPUT_KINDS)}")


def _mask_params(request: SampleRequest) -> dict[str, Any]:
    """The mask parameters of the request's task (:func:`jointdit.diffusion.masks.set_mode`)."""
    task, out = request.task, {}
    if task.startswith("extend_"):
        out = {"seconds_given": float(request.seconds_given), "both": bool(request.both)}
    elif task == "inpaint_v":
        out = {"region": None if request.region is None else tuple(float(r) for r in request.region),
               "span": None if request.span is None else tuple(float(r) for r in request.span)}
    elif task == "inpaint_a":
        out = {"span": tuple(float(r) for r in request.span)}
    return out


def decode_video(codec, z: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``[B, Tv, Cv, hv, wv]`` → frames ``[B, T, 3, H, W]``, at most ``chunk`` latent frames per decoder call.

    A codec whose ``decode`` takes ``decode_chunk`` (the SVD temporal VAE: chunks decoded with
    ``num_frames``) gets it; any other codec decodes frame by frame independently (the pixel codec), so
    its time axis is split into chunks here. ``chunk`` None or <= 0: the codec's own setting / one call.
    """
    from jointdit.codecs.base import apply_in_chunks

    if "decode_chunk" in inspect.signature(codec.decode).parameters:
        return codec.decode(z) if chunk is None else codec.decode(z, decode_chunk=int(chunk))
    return apply_in_chunks(codec.decode, z, chunk, dim=1)


def clamp_to_codec_range(z_audio: torch.Tensor, audio_codec) -> torch.Tensor:
    """Clamp a generated log-mel latent to the mel codec's range [-1, 1] before Griffin-Lim.

    The mel codec maps ln(mel) affinely onto [-1, 1] (-1 = digital silence, +1 ≈ a full-scale tone).
    A sampled latent outside that range is louder than full scale or quieter than silence; left as is,
    librosa's NNLS mel inversion can take minutes on it. Other codecs' latents pass through unchanged.
    """
    from jointdit.codecs.mel import MelAudioCodec

    return z_audio.clamp(-1.0, 1.0) if isinstance(audio_codec, MelAudioCodec) else z_audio


def _conditions(session: Session, request: SampleRequest, geometry: LatentSpec, entry: dict | None):
    """Encode the task's input: ``(image [3,H,W] | None, first [1,Cv,hv,wv], video_latent, audio_latent)``."""
    from jointdit.io import conditions as io

    g, dev = geometry, session.device
    image = first = video_latent = audio_latent = None
    with torch.inference_mode():
        if request.task == "i2sv":
            if request.image is not None:
                image = io.load_image(request.image, g.size)
            else:
                image = io.load_reference_frame(entry if entry is not None else request.reference,
                                                fps=g.fps, size=g.size, sample_rate=g.sample_rate)
            z = session.video_codec.encode(image[None, None].to(dev))                     # [1, 1, Cv, hv, wv]
            first = g.normalize_video(z)[:, 0]                                           # [1, Cv, hv, wv]
        keep_video = request.task in VIDEO_TASKS or (request.task == "extend_a" and request.both)
        keep_audio = request.task in AUDIO_TASKS or (request.task == "extend_v" and request.both)
        if keep_video:
            frames = io.load_video(request.video, fps=g.fps, size=g.size, seconds=g.seconds,
                                   sample_rate=g.sample_rate)                           # [T, 3, H, W]
            image = frames[0]
            z = session.video_codec.encode(frames[None].to(dev))                          # [1, Tv', Cv, hv, wv]
            video_latent = g.normalize_video(z[:, : g.video_shape[0]])
        if keep_audio:
            source = request.audio if request.audio is not None else request.video     # extend_v both: its own sound
            wave = io.load_audio(source, seconds=g.seconds, sample_rate=g.sample_rate, fps=g.fps, size=g.size)
            z = session.audio_codec.encode(wave[None].to(dev))                            # [1, Ca, La', Fa]
            audio_latent = g.normalize_audio(z[:, :, : g.audio_shape[1]])                # the spec's whole patches
    return image, first, video_latent, audio_latent


def _clip_conditions(session: Session, request: SampleRequest, image: torch.Tensor | None):
    prompt, negative = str(request.prompt or ""), str(request.negative_prompt or "")
    if session.clip is None:
        if prompt or negative:
            warnings.warn("no CLIP encoder is configured (set clip.model / clip.pretrained, or a checkpoint "
                          "trained with CLIP embeddings); the prompt and negative prompt are ignored", stacklevel=3)
        return None, None
    cond = session.clip.encode(texts=[prompt] if prompt else None, images=None if image is None else image[None])
    if cond.batch_size is None:
        cond = None
    neg = session.clip.encode(texts=[negative]) if negative else None
    return cond, neg


def generate(session: Session, request: SampleRequest,
             progress: Callable[[int, int], bool | None] | None = None) -> SampleResult:
    """Sample every seed of ``request``; decode; write the files when ``request.out_dir`` is set.

    Every task goes through the one solver (:func:`jointdit.diffusion.sampler.integrate`). ``t2v`` / ``t2a``
    generate one stream with the other absent: it is neither decoded nor written (``frames`` / ``wave`` /
    ``z_*`` of that stream are None). t2v writes ``mp4`` as a video WITHOUT an audio track (silence would
    claim the model generated silence; ``video_mp4`` would be the same file, so it is not written), no WAV,
    and the PNG shows the frames only; t2a writes the WAV and a spectrogram PNG, no MP4. A task missing
    from the export's ``tasks`` (the training mix) is sampled with a warning.

    ``progress(done, total)`` is called after every solver step (``total = steps · len(seeds)``);
    returning True cancels: :class:`SamplingCancelled` is raised and nothing is written (the call's
    folder is removed again). Output folder problems (an existing ``name``) are raised before sampling.
    """
    from jointdit.io.outputs import claim_output_dir, write_sample

    check_request(request)
    task, steps, seeds = request.task, int(request.steps), _seeds(request.seeds)
    geometry, entry = session.spec.crop(int(request.max_t or 0)), None
    ref = request.reference
    if task == "i2sv" and request.image is None and isinstance(ref, str) and not Path(ref).expanduser().exists():
        from jointdit.io.conditions import cache_entry

        if session.cache_dir is None:
            raise ConfigError(f"reference={ref!r} is not a file, and no latent cache is known to look it up in",
                              hint="give an MP4 path, or load the session with cache_dir=<paths.cache_dir>")
        entry = cache_entry(ref, session.cache_dir)   # its stored first frame is the image
    guidance = _guidance(request.guidance, session.meta.get("iso_prob"))
    shift_video, shift_audio = _shifts(session, geometry, request)
    _warn_untrained(task, session.meta)

    folder = None
    if request.out_dir is not None:
        folder = claim_output_dir(request.out_dir, request.name, overwrite=bool(request.overwrite), task=task,
                                  seeds=seeds)
    try:
        image, first, video_latent, audio_latent = _conditions(session, request, geometry, entry)
        cond, neg_cond = _clip_conditions(session, request, image)
        total, done = steps * len(seeds), 0

        def step_callback(step: int, _steps: int) -> bool | None:
            return None if progress is None else progress(done + step, total)

        latents: list[tuple[torch.Tensor, torch.Tensor]] = []
        bs = int(request.batch_size)
        for i in range(0, len(seeds), bs):
            z_v, z_a = sample_latents(
                session.model, geometry.video_shape, geometry.audio_shape, steps=steps, seed=seeds[i:i + bs],
                task=task, guidance=guidance, cond=cond, neg_cond=neg_cond, first_frame=first,
                video_latent=video_latent, audio_latent=audio_latent, shift_video=shift_video, shift_audio=shift_audio,
                spec=geometry, mask_params=_mask_params(request), callback=step_callback)
            latents += list(zip(z_v, z_a))
            done += steps * len(seeds[i:i + bs])

        samples = []
        if folder is not None:
            _write_request(folder / "request.json", session, request, geometry, guidance, (shift_video, shift_audio))
        video_on, audio_on = (stream in masks.present_streams(task) for stream in ("video", "audio"))
        for seed, (z_v, z_a) in zip(seeds, latents):
            frames, wave = _decode(session, geometry, task, z_v[None], z_a[None])
            z_v, z_a = (z_v if video_on else None), (z_a if audio_on else None)
            files = {}
            if folder is not None:
                files = write_sample(folder, f"{task}_seed{seed:03d}_steps{steps}", frames, wave, geometry.fps,
                                     geometry.sample_rate, title=f"{task} seed {seed} steps {steps}",
                                     kinds=request.outputs)
                log.info("seed %d: %s", seed, ", ".join(str(p) for p in files.values()))
            samples.append(Sample(seed, frames, wave, None if z_v is None else z_v.cpu(),
                                  None if z_a is None else z_a.cpu(), geometry.fps, geometry.sample_rate, files))
    except BaseException:
        if folder is not None and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return SampleResult(request, samples, geometry.fps, geometry.sample_rate, folder)


def _describe_input(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__} {tuple(shape)}>" if shape is not None else f"<{type(value).__name__}>"


def _write_request(path: Path, session: Session, request: SampleRequest, spec: LatentSpec, guidance,
                   shifts: tuple[float, float]) -> None:
    """``request.json``: what made this folder (model, request, geometry, guidance, shifts, knobs)."""
    import json

    from jointdit.safeio import write_text

    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    fields.update({k: _describe_input(fields[k]) for k in ("image", "reference", "audio", "video", "out_dir")})
    fields["guidance"] = repr(guidance)
    fields["seeds"], fields["outputs"] = list(_seeds(request.seeds)), list(request.outputs)
    knobs = session.model.knobs
    record = {"checkpoint": str(session.checkpoint), "step": session.meta.get("step"), "request": fields,
              "spec": spec.to_json(), "shift_video": shifts[0], "shift_audio": shifts[1],
              "vram": {"q_chunk_v": knobs.q_chunk_v, "q_chunk_a": knobs.q_chunk_a, "kv_downsample": knobs.kv_downsample,
                       "kv_pool_space": knobs.kv_pool_space, "vid_decode_chunk": session.vid_decode_chunk}}
    write_text(path, json.dumps(record, indent=1, default=str))


def _warn_untrained(task: str, meta: Mapping[str, Any]) -> None:
    """Warn when the export names its training task mix and ``task`` had no weight in it."""
    trained = meta.get("tasks")
    if trained and float(trained.get(task, 0.0)) <= 0:
        warnings.warn(f"the model was not trained on task {task} (its objective.tasks: {dict(trained)}); "
                      f"the sample may be poor — train with {task} in objective.tasks", stacklevel=3)


@torch.inference_mode()
def _decode(session: Session, geometry: LatentSpec, task: str, z_v: torch.Tensor, z_a: torch.Tensor):
    """Model-space latents ``[1, ...]`` → ``(frames [T,3,H,W], wave [N])`` in [-1, 1]; the stream the task
    leaves absent (t2v's audio, t2a's video) is not decoded: None."""
    from jointdit.io.conditions import fit_wave

    present = masks.present_streams(task)
    frames = wave = None
    if "video" in present:
        z_v = geometry.denormalize_video(z_v)
        frames = decode_video(session.video_codec, z_v.to(session.device), session.vid_decode_chunk)[0]
        frames = frames.float().cpu().clamp(-1, 1)
    if "audio" in present:
        z_a = geometry.denormalize_audio(z_a)
        if task != "a2v":  # a2v's audio is the (already in-range) input
            z_a = clamp_to_codec_range(z_a, session.audio_codec)
        wave = session.audio_codec.decode(z_a.to(session.device))
        wave = fit_wave(wave[0].float().cpu(), geometry.num_samples).clamp(-1, 1)
    return frames, wave


# --------------------------------------------------------------------------------------------------
# Composed config → files (the entry point's library side)
# --------------------------------------------------------------------------------------------------
def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def request_from_cfg(cfg: DictConfig | Mapping) -> SampleRequest:
    """The ``sample`` config's request fields → a :class:`SampleRequest`."""
    get = cfg.get
    return SampleRequest(
        task=str(get("task", "joint")), prompt=str(get("prompt") or ""), negative_prompt=str(get("negative_prompt") or ""),
        image=get("image"), reference=get("reference"), audio=get("audio"), video=get("video"),
        seeds=_seeds(get("seeds", [0])), steps=int(get("steps", 30)), guidance=_plain(get("guidance")),
        shift_video=_opt_float((get("schedule") or {}).get("shift_video")),
        shift_audio=_opt_float((get("schedule") or {}).get("shift_audio")),
        out_dir=None if get("out_dir") is None else str(get("out_dir")), name=get("name"),
        overwrite=bool(get("overwrite", False)), outputs=tuple(_plain(get("outputs")) or OUTPUT_KINDS),
        batch_size=int(get("batch_size", 1) or 1), max_t=int(get("max_t", 0) or 0),
        seconds_given=_opt_float(get("seconds_given")), both=bool(get("both", False)),
        region=_plain(get("region")), span=_plain(get("span")))


def sample_to_files(cfg: DictConfig | Mapping) -> SampleResult:
    """Composed ``sample`` config → load the session, generate every seed, write MP4/WAV/PNG into a fresh
    folder under ``out_dir``, and log them to MLflow (``logger``). Bad requests fail before any loading."""
    from tqdm.auto import tqdm

    from jointdit.tracking import Tracker, flatten, job_run_name

    from jointdit.io.outputs import check_output_name

    request = request_from_cfg(cfg)
    check_request(request)
    if request.out_dir is not None:
        check_output_name(request.out_dir, request.name, overwrite=bool(request.overwrite))
    paths = cfg.get("paths") or {}
    session = load_session(str(cfg.checkpoint), device=cfg.get("device"), vram=cfg.get("vram"), codec=cfg.get("codec"),
                           clip=cfg.get("clip"), kv_downsample=cfg.get("kv_downsample"),
                           kv_pool_space=cfg.get("kv_pool_space"),
                           spec=cfg.get("manual_shapes"), cache_dir=paths.get("cache_dir"),
                           adapters=cfg.get("adapters"), merge_adapters=bool(cfg.get("merge_adapters", False)),
                           check_memory=bool(cfg.get("check_memory", True)), plan_for=request)
    tracker = Tracker(cfg.get("logger"), run_name=job_run_name(str(cfg.get("task_name", "sample"))))
    if isinstance(cfg, DictConfig):
        tracker.log_params(flatten(cfg))
    bar = tqdm(total=request.steps * len(request.seeds), desc=f"sampling {request.task}",
               disable=not bool(cfg.get("progress", True)), leave=False)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        result = generate(session, request, progress=progress)
        for path in result.files:
            tracker.log_artifact(path, "samples")
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        bar.close()
    tracker.end()
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")
def main(cfg: DictConfig) -> None:
    """``python -m jointdit.sample checkpoint=<model folder> task=... [overrides]``; prints the written files."""
    from jointdit.errors import run_cli

    run_cli(lambda: _sample(cfg))


def _sample(cfg: DictConfig) -> None:
    from jointdit.schema import validate

    validate(cfg)
    result = sample_to_files(cfg)
    if result.folder is not None:
        print(result.folder)
    for path in result.files:
        print(path)


if __name__ == "__main__":
    main()
