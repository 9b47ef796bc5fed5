"""Sampling: integrate the flow ODE from t = 1 (noise) to t = 0 (data) for joint video+audio latents.

ODE and solver. With ``x_t = (1 − t)·x0 + t·ε`` the model's velocity ``v = ε − x0 = dx_t/dt``; the
sampler runs Euler steps ``x_{t_{i+1}} = x_{t_i} + (t_{i+1} − t_i)·v̂(x_{t_i}, t_i)`` through diffusers'
``FlowMatchEulerDiscreteScheduler`` (whose ``sigma`` is our ``t``; its ``step`` computes exactly that
update). ``v̂`` is the guided prediction (:mod:`jointdit.diffusion.guidance`).

Per-modality schedules. Video and audio each own a scheduler instance (``shift_video`` /
``shift_audio`` warp their sigmas, ``σ ← s·σ / (1 + (s − 1)·σ)``; 1 = uniform in t), so each modality's
adaLN gets its own timestep. Conditional tasks feed the conditioning part clean, at t = 0, and keep it
fixed (as in training, :mod:`jointdit.diffusion.flow`):

========  ====================================================  =================
task      clean and fixed                                       generated
========  ====================================================  =================
joint     nothing                                               video, audio
i2sv      latent video frame 0 (the encoded image), t_video[:,0]=0  frames 1.., audio
a2v       the audio latent (encoded input audio), t_audio = 0    video
v2a       the video latent (encoded input video), t_video = 0    audio
========  ====================================================  =================

Determinism: the initial noise comes from ``torch.Generator('cpu').manual_seed(seed)`` (video noise
drawn first, then audio, for every task), and Euler needs no further randomness.

``sample_to_files(cfg)`` is the library side of ``python -m jointdit.sample``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jointdit.diffusion.guidance import JointCFG, build_guidance
from jointdit.models.conditioning import Condition

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("joint", "i2sv", "a2v", "v2a")


# --------------------------------------------------------------------------------------------------
# The ODE loop
# --------------------------------------------------------------------------------------------------
def make_scheduler(steps: int, shift: float = 1.0, device: torch.device | str | None = None):
    """A ``FlowMatchEulerDiscreteScheduler`` with ``steps`` sigmas from 1 towards 0 (then 0 appended)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    sigmas = np.linspace(1.0, 0.0, int(steps) + 1)[:-1]
    sched.set_timesteps(sigmas=sigmas.tolist(), device=device)
    return sched


def initial_noise(video_shape, audio_shape, seed: int, batch: int = 1) -> tuple[Tensor, Tensor]:
    """Seeded Gaussian noise ``([B,*video_shape], [B,*audio_shape])`` drawn on the CPU (device-independent)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise_v = torch.randn((batch, *video_shape), generator=gen)
    noise_a = torch.randn((batch, *audio_shape), generator=gen)
    return noise_v, noise_a


@torch.inference_mode()
def sample_latents(
    model,
    video_shape: tuple[int, ...],
    audio_shape: tuple[int, ...],
    *,
    steps: int,
    seed: int,
    task: str = "joint",
    guidance: JointCFG | None = None,
    cond: Condition | None = None,
    neg_cond: Condition | None = None,
    first_frame: Tensor | None = None,
    video_latent: Tensor | None = None,
    audio_latent: Tensor | None = None,
    shift_video: float = 1.0,
    shift_audio: float = 1.0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Integrate the guided flow ODE; returns clean latents ``(z_video [1,Tv,Cv,hv,wv], z_audio [1,Ca,La,Fa])``.

    first_frame  [1, Cv, hv, wv]  (i2sv) the encoded image, kept at latent frame 0
    audio_latent [1, Ca, La, Fa]  (a2v)  the encoded audio, kept fixed at t = 0
    video_latent [1, Tv, Cv, hv, wv] (v2a) the encoded video, kept fixed at t = 0
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    guidance = guidance or JointCFG()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    noise_v, noise_a = initial_noise(video_shape, audio_shape, seed)
    x_v, x_a = noise_v.to(device, dtype), noise_a.to(device, dtype)
    b, tv = 1, video_shape[0]

    fixed_v = fixed_a = False
    if task == "i2sv":
        if first_frame is None:
            raise ValueError("task=i2sv needs the encoded first frame (an image or a reference clip)")
        first_frame = first_frame.to(device, dtype).reshape(b, *video_shape[1:])
        x_v[:, 0] = first_frame
    elif task == "a2v":
        if audio_latent is None:
            raise ValueError("task=a2v needs the encoded conditioning audio")
        x_a = _check(audio_latent, (b, *audio_shape), "audio latent").to(device, dtype)
        fixed_a = True
    elif task == "v2a":
        if video_latent is None:
            raise ValueError("task=v2a needs the encoded conditioning video")
        x_v = _check(video_latent, (b, *video_shape), "video latent").to(device, dtype)
        fixed_v = True
    if cond is not None:
        cond = cond.to(device=device)
    if neg_cond is not None:
        neg_cond = neg_cond.to(device=device)

    sched_v = make_scheduler(steps, shift_video, device)
    sched_a = make_scheduler(steps, shift_audio, device)
    zero = torch.zeros(b, device=device)
    for i in tqdm(range(int(steps)), desc=f"sampling {task}", disable=not progress, leave=False):
        sig_v, sig_a = sched_v.sigmas[i], sched_a.sigmas[i]
        t_v = zero if fixed_v else torch.full((b, tv), float(sig_v), device=device)     # [B, Tv]
        if task == "i2sv":
            t_v[:, 0] = 0.0                                                             # clean first frame
        t_a = zero if fixed_a else torch.full((b,), float(sig_a), device=device)       # [B]
        pred_v, pred_a = guidance(model, x_v, x_a, t_v, t_a, cond, neg_cond)
        if not fixed_v:
            x_v = sched_v.step(pred_v, sched_v.timesteps[i], x_v, return_dict=False)[0]
            if task == "i2sv":
                x_v[:, 0] = first_frame
        if not fixed_a:
            x_a = sched_a.step(pred_a, sched_a.timesteps[i], x_a, return_dict=False)[0]
    return x_v.float(), x_a.float()


def _check(z: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    if tuple(z.shape) != tuple(shape):
        raise ValueError(f"the {what} has shape {tuple(z.shape)} but the model samples {tuple(shape)}; "
                         f"the conditioning input must match the checkpoint's data settings (seconds, fps, size)")
    return z


# --------------------------------------------------------------------------------------------------
# Shapes, codecs, conditioning inputs
# --------------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    video_shape: tuple[int, int, int, int]   # [Tv, Cv, hv, wv]
    audio_shape: tuple[int, int, int]        # [Ca, La, Fa]
    fps: float
    size: tuple[int, int]                    # (H, W)
    seconds: float
    sample_rate: int
    spec: Any = None                         # the LatentSpec the shapes come from (normalisation, time origins)

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))


def _plain(x: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _size(size: Any) -> tuple[int, int]:
    size = _plain(size)
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def resolve_shapes(meta: dict, manual: dict | None, video_codec, audio_codec) -> Shapes:
    """Latent shapes from ``manual_shapes`` {seconds, fps, size, sample_rate} or the export's LatentSpec."""
    from jointdit.latents import LatentSpec

    if manual:
        manual = _plain(manual)
        sr = int(audio_codec.sample_rate)
        if manual.get("sample_rate") and int(manual["sample_rate"]) != sr:
            warnings.warn(f"manual_shapes.sample_rate={manual['sample_rate']} differs from the codec's {sr} Hz; "
                          f"using {sr}", stacklevel=2)
        spec = LatentSpec.from_codecs(video_codec, audio_codec, fps=float(manual["fps"]), size=_plain(manual["size"]),
                                      seconds=float(manual["seconds"]))
    else:
        spec = LatentSpec.from_export_meta(meta)
    return Shapes(spec.video_shape, spec.audio_shape, spec.fps, spec.size, spec.seconds, spec.sample_rate, spec)


def _fit_wave(wave: Tensor, n: int) -> Tensor:
    wave = wave.reshape(-1)[:n]
    return torch.nn.functional.pad(wave, (0, n - wave.shape[0])) if wave.shape[0] < n else wave


def load_image(path: str | Path, size: tuple[int, int]) -> Tensor:
    """An image file → ``[3, H, W]`` in [-1, 1], scaled to cover ``size`` and centre-cropped."""
    from PIL import Image

    from jointdit.data.media import MediaError, _resize_center_crop

    path = Path(path).expanduser()
    if not path.exists():
        raise MediaError(path, "no such file")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0
    return _resize_center_crop(x, size)[0].clamp(-1, 1)


def cache_entry(cfg, meta: dict, clip_id: str) -> tuple[dict, Path]:
    """The index row of ``clip_id`` in the latent cache of the checkpoint's data and codec."""
    from jointdit.data.cache import cache_dir_for, read_index

    if not (meta.get("data") or {}).get("name") or not meta.get("codec"):
        raise ValueError(f"reference={clip_id!r} is not a file, and the checkpoint names no data set to look it up in")
    cache_dir = cache_dir_for(meta["data"], meta["codec"], str(cfg.paths.cache_dir))
    rows = read_index(cache_dir) if (cache_dir / "index.jsonl").exists() else []
    for row in rows:
        if row["id"] == clip_id:
            return row, cache_dir
    raise ValueError(f"reference={clip_id!r} is neither a file nor a clip id in the latent cache {cache_dir} "
                     f"({len(rows)} clips); give an MP4 path or an id from its index.jsonl")


def load_first_frame(cfg, shapes: Shapes, entry: tuple[dict, Path] | None = None) -> Tensor:
    """i2sv's image: ``image`` (a file), or the first frame of ``reference`` (an MP4 or a cached clip)."""
    from jointdit.data.media import read_clip

    if cfg.get("image"):
        return load_image(cfg.image, shapes.size)
    if entry is not None:
        row, cache_dir = entry
        return load_image(cache_dir / row["first_frame"], shapes.size)
    if cfg.get("reference"):
        clip = read_clip(Path(str(cfg.reference)).expanduser(), fps=shapes.fps, size=shapes.size,
                         seconds=1.0 / shapes.fps, sample_rate=shapes.sample_rate, allow_missing_audio=True)
        return clip.frames[0]
    raise ValueError("task=i2sv needs `image=<image file>` or `reference=<mp4 or cached clip id>` (its first frame is used)")


def load_audio(path: str | Path, shapes: Shapes) -> Tensor:
    """a2v's audio: a sound file (WAV/FLAC/OGG) or the audio track of a clip, cut/padded to the clip length."""
    from jointdit.data.media import read_clip, read_wav

    path = Path(str(path)).expanduser()
    if path.suffix.lower() in (".wav", ".flac", ".ogg"):
        wave, _ = read_wav(path, shapes.sample_rate)
    else:
        wave = read_clip(path, fps=shapes.fps, size=shapes.size, seconds=shapes.seconds,
                         sample_rate=shapes.sample_rate).wave
    return _fit_wave(wave, shapes.num_samples)


def load_video(path: str | Path, shapes: Shapes) -> Tensor:
    """v2a's video: ``[T, 3, H, W]`` frames at the checkpoint's fps and size."""
    from jointdit.data.media import read_clip

    clip = read_clip(Path(str(path)).expanduser(), fps=shapes.fps, size=shapes.size, seconds=shapes.seconds,
                     sample_rate=shapes.sample_rate, allow_missing_audio=True)
    return clip.frames


def build_conditions(cfg, meta: dict, model, image: Tensor | None, device) -> tuple[Condition | None, Condition | None]:
    """CLIP conditions for the prompt / negative prompt / image, when a CLIP encoder is configured.

    The encoder settings come from ``cfg.clip`` or the checkpoint's ``jointdit.json`` (``clip``):
    ``{model, pretrained, model_config}``. Without one, prompts and the image condition are ignored
    (with a warning) and the model gets its learned null conditions.
    """
    clip_cfg = _plain(cfg.get("clip")) or meta.get("clip")
    prompt, negative = str(cfg.get("prompt") or ""), str(cfg.get("negative_prompt") or "")
    if not clip_cfg or clip_cfg.get("enabled", True) is False:
        if prompt or negative:
            warnings.warn("no CLIP encoder is configured (set clip.model / clip.pretrained, or a checkpoint "
                          "trained with CLIP embeddings); the prompt and negative prompt are ignored", stacklevel=2)
        return None, None
    import open_clip

    from jointdit.models.conditioning import ClipConditioner

    if clip_cfg.get("model_config"):
        open_clip.add_model_config(Path(clip_cfg["model_config"]).expanduser())
    encoder = ClipConditioner(clip_cfg.get("model", "ViT-B-16"), clip_cfg.get("pretrained"), device=device)
    want = {k: model.config[k] for k in encoder.model_kwargs()}
    if want != encoder.model_kwargs():
        raise ValueError(f"the CLIP encoder gives {encoder.model_kwargs()} but the model expects {want}")
    cond = encoder.encode(texts=[prompt] if prompt else None, images=None if image is None else image[None])
    if cond.batch_size is None:
        cond = None
    neg = encoder.encode(texts=[negative]) if negative else None
    return cond, neg


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
def write_preview(path: Path, frames: Tensor, wave: Tensor, sample_rate: int, title: str = "", max_frames: int = 8) -> Path:
    """A PNG: up to ``max_frames`` evenly spaced frames in a strip, above the log-mel spectrogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jointdit.codecs.mel import MelParams, log_mel

    t = frames.shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(max_frames, t)).round().astype(int))
    strip = torch.cat([frames[i] for i in idx], dim=-1)                                  # [3, H, k·W]
    strip = ((strip.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    params = MelParams(sample_rate=int(sample_rate), fmax=min(8000.0, sample_rate / 2))
    mel = log_mel(wave.reshape(1, -1).float().cpu(), params)[0].T.numpy()               # [n_mels, frames]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(max(6.0, 1.2 * len(idx)), 5), height_ratios=[1, 1])
    ax0.imshow(strip)
    ax0.set_axis_off()
    ax0.set_title(title)
    ax1.imshow(mel, origin="lower", aspect="auto", cmap="magma",
               extent=(0, wave.numel() / sample_rate, 0, params.n_mels))
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("mel band")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@dataclass
class SampleResult:
    seed: int
    frames: Tensor                      # [T, 3, H, W] in [-1, 1]
    wave: Tensor                        # [N] in [-1, 1]
    fps: float
    sample_rate: int
    files: dict[str, Path] = field(default_factory=dict)   # mp4, video_mp4, wav, png


def clamp_to_codec_range(z_audio: Tensor, audio_codec) -> Tensor:
    """Clamp a generated log-mel latent to the mel codec's range [-1, 1] before Griffin-Lim.

    The mel codec maps ln(mel) affinely onto [-1, 1] (-1 = digital silence, +1 ≈ a full-scale tone).
    A sampled latent outside that range is louder than full scale or quieter than silence; left as is,
    librosa's NNLS mel inversion can take minutes on it. Other codecs' latents pass through unchanged.
    """
    from jointdit.codecs.mel import MelAudioCodec

    return z_audio.clamp(-1.0, 1.0) if isinstance(audio_codec, MelAudioCodec) else z_audio


def _device(name: str | None) -> torch.device:
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_to_files(cfg) -> list[SampleResult]:
    """Compose → load model, codecs and inputs → sample each seed → write MP4 (+audio), MP4, WAV, PNG.

    Returns one :class:`SampleResult` per seed (decoded tensors and the written files).
    """
    from jointdit import checkpoints
    from jointdit.codecs import build_codecs
    from jointdit.data.media import write_mp4, write_wav
    from jointdit.tracking import Tracker, flatten, job_run_name

    task = str(cfg.task)
    if task not in TASKS:
        raise ValueError(f"task={task!r}; choose one of {', '.join(TASKS)}")
    device = _device(cfg.get("device"))
    ckpt = Path(str(cfg.checkpoint)).expanduser()
    model = checkpoints.load_model(ckpt).to(device).eval()
    vram = cfg.get("vram") or {}
    model.set_memory_knobs(q_chunk_v=int(vram.get("q_chunk_v", 0) or 0), q_chunk_a=int(vram.get("q_chunk_a", 0) or 0),
                           kv_downsample=int(vram.get("kv_downsample", 1) or 1))
    meta = checkpoints.load_export_meta(ckpt)
    codec_cfg = _plain(cfg.get("codec")) or meta.get("codec")
    if not codec_cfg:
        raise ValueError(f"{ckpt} has no codec settings in jointdit.json; pass codec=pixel_mel (or another codec group)")
    video_codec, audio_codec = build_codecs(codec_cfg)
    for c in (video_codec, audio_codec):
        c.to(device)
    reference = cfg.get("reference")
    entry = None
    if reference and not Path(str(reference)).expanduser().exists():
        entry = cache_entry(cfg, meta, str(reference))  # a clip id: shapes and first frame from the cache
    shapes = resolve_shapes(meta, _plain(cfg.get("manual_shapes")), video_codec, audio_codec)
    spec = shapes.spec
    if shapes.video_shape[1] != model.config.video_in_channels or shapes.audio_shape[0] != model.config.audio_in_channels:
        raise ValueError(f"latent shapes video {shapes.video_shape} / audio {shapes.audio_shape} do not fit the model "
                         f"(video_in_channels={model.config.video_in_channels}, "
                         f"audio_in_channels={model.config.audio_in_channels}); check codec and manual_shapes")

    # conditioning inputs (encoded once, shared by every seed)
    image = first = video_latent = audio_latent = None
    with torch.inference_mode():
        if task == "i2sv":
            image = load_first_frame(cfg, shapes, entry)                                        # [3, H, W]
            first = spec.normalize_video(video_codec.encode(image[None, None].to(device)))[:, 0]  # [1, Cv, hv, wv]
        elif task == "a2v":
            if not cfg.get("audio"):
                raise ValueError("task=a2v needs `audio=<wav or mp4>`")
            audio_latent = audio_codec.encode(load_audio(cfg.audio, shapes)[None].to(device))    # [1, Ca, La', Fa]
            audio_latent = spec.normalize_audio(audio_latent[:, :, : shapes.audio_shape[1]])     # the spec's whole patches
        elif task == "v2a":
            if not cfg.get("video"):
                raise ValueError("task=v2a needs `video=<mp4>`")
            video_latent = spec.normalize_video(video_codec.encode(load_video(cfg.video, shapes)[None].to(device)))
    cond, neg_cond = build_conditions(cfg, meta, model, image, device)
    guidance = build_guidance(cfg.get("guidance"))
    sched = cfg.get("schedule") or {}
    steps = int(cfg.steps)
    seeds = [int(s) for s in (_plain(cfg.seeds) if not isinstance(cfg.seeds, (int, str)) else [cfg.seeds])]
    out_dir = Path(str(cfg.out_dir)).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    tracker = Tracker(cfg.get("logger"), run_name=job_run_name(str(cfg.get("task_name", "sample"))))
    tracker.log_params(flatten(cfg))
    results: list[SampleResult] = []
    try:
        for seed in seeds:
            z_v, z_a = sample_latents(
                model, shapes.video_shape, shapes.audio_shape, steps=steps, seed=seed, task=task, guidance=guidance,
                cond=cond, neg_cond=neg_cond, first_frame=first, video_latent=video_latent, audio_latent=audio_latent,
                shift_video=float(sched.get("shift_video", 1.0)), shift_audio=float(sched.get("shift_audio", 1.0)),
                progress=bool(cfg.get("progress", True)))
            z_v, z_a = spec.denormalize_video(z_v), spec.denormalize_audio(z_a)
            if task != "a2v":
                z_a = clamp_to_codec_range(z_a, audio_codec)
            with torch.inference_mode():
                frames = video_codec.decode(z_v)[0].float().cpu().clamp(-1, 1)                 # [T, 3, H, W]
                wave = _fit_wave(audio_codec.decode(z_a)[0].float().cpu(), shapes.num_samples).clamp(-1, 1)
            base = out_dir / f"{task}_seed{seed:03d}_steps{steps}"
            files = {
                "mp4": write_mp4(base.with_suffix(".mp4"), frames, shapes.fps, wave, shapes.sample_rate),
                "video_mp4": write_mp4(base.with_name(base.name + "_video.mp4"), frames, shapes.fps),
                "wav": write_wav(base.with_suffix(".wav"), wave, shapes.sample_rate),
                "png": write_preview(base.with_suffix(".png"), frames, wave, shapes.sample_rate,
                                     title=f"{task} seed {seed} steps {steps}"),
            }
            log.info("seed %d: %s", seed, ", ".join(str(p) for p in files.values()))
            for path in files.values():
                tracker.log_artifact(path, "samples")
            results.append(SampleResult(seed, frames, wave, shapes.fps, shapes.sample_rate, files))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return results
