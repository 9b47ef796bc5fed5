"""Memory terms the planner's base estimate (:func:`jointdit.memory.estimate_peak`) leaves out, so that
the plan never promises less memory than the run needs.

What is live at once during one training step (bytes; P = all parameters, θ = the trainable ones):

    resident  = params(P + LoRA) + casts + state(optimizer, θ) + ema(θ) + overhead
    backward  = grads(θ) + activations + attention       with gradient checkpointing: the gradients of the
                                                          later blocks build up while an earlier block is
                                                          recomputed, so both are live (a sum)
              = max(grads(θ), activations + attention)    without it (the base planner's calibrated form)
    step      = grads(θ) + transient(optimizer, foreach)  optimizer.step() runs while the gradients are held
    train     = resident + max(backward, step)

    transient: AdamW foreach (multi-tensor; torch's default on CUDA) — sqrt(v) for every tensor of a param
               group at once: 4·Σ_group n, the largest group; AdamW single-tensor — sqrt(v)/bc for one tensor:
               8·max n; 8-bit AdamW — one tensor's fp32 state is dequantised: 8·max n; Adafactor
               (transformers) — grad², the factored estimate and the update for one tensor: 12·max n.

Preview sampling (``sample_every`` and the final preview) runs in the training process after
``zero_grad(set_to_none=True)``, with the optimizer state and EMA still held:

    preview   = resident + 4·P (the exported copy the sampler loads) + codec + CLIP weights
                + sampling forward (``branches`` guidance branches, base planner) + decoded media

    peak      = max(train, preview) (preview only when previews run)

Sampling alone: 4·P + codec + CLIP + the sampling forward + decoded media.

The stage decides θ: ``stage=a`` all parameters; ``stage=b`` the glob groups of ``stage.trainable``;
LoRA (``stage.lora.rank > 0``) only the adapters, r·(d_in + d_out) per targeted linear, which also add to
the parameters. Shapes come from a model built on the ``meta`` device (no memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jointdit.memory import Estimate, Knobs, estimate_peak
from jointdit.optimizers import state_bytes

MiB = 1024 ** 2
# The stated margin a plan must keep: on 9 held-out CPU set-ups (experiments/results/bench_memory_terms.md) the
# full estimate was at worst 11.9 % under the measured peak (tiny models, where the base planner's activation
# count is lowest), so a plan fits only if total · (1 + SAFETY_MARGIN) <= budget.
SAFETY_MARGIN = 0.15


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class Trainable:
    """What trains: parameter groups (one list of shapes per optimizer param group) and added weights."""

    groups: list[list[tuple[int, ...]]]
    added_params: int = 0        # LoRA adapter elements (not in the base model's P)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for g in self.groups for s in g]

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def trainable_of(model_config: Mapping[str, Any], stage: Mapping[str, Any] | None) -> Trainable:
    """The trainable tensors a stage config selects, from a ``meta``-device model (no memory used)."""
    import torch

    from jointdit.checkpoints import select_parameters
    from jointdit.lora import groups_from_config, lora_enabled, resolve_targets
    from jointdit.memory import _full_config
    from jointdit.models.jointdit import JointDiT

    stage = dict(stage or {})
    with torch.device("meta"):
        model = JointDiT(**_full_config(model_config))
    if lora_enabled(stage.get("lora")):
        groups = groups_from_config(stage["lora"])
        targets = resolve_targets(model, groups)
        shapes = []
        for name, group in targets.items():
            lin = model.get_submodule(name)
            shapes += [(group.rank, lin.in_features), (lin.out_features, group.rank)]
        return Trainable([shapes], added_params=sum(_numel(s) for s in shapes))
    trainable = stage.get("trainable") or {"all": {"patterns": ["*"]}}
    selected = select_parameters(model, {k: list(v["patterns"]) for k, v in trainable.items()})
    return Trainable([[tuple(p.shape) for _, p in params] for params in selected.values()])


def step_transient(optimizer: str, trainable: Trainable, foreach: bool | None, device: str = "cpu") -> int:
    """Extra bytes allocated inside ``optimizer.step()`` (see the module docstring)."""
    if not trainable.shapes:
        return 0
    largest = max(_numel(s) for s in trainable.shapes)
    if optimizer == "adamw":
        if foreach is None:
            foreach = device == "cuda"  # torch's default: multi-tensor when every tensor is on CUDA
        if foreach:
            return 4 * max(sum(_numel(s) for s in g) for g in trainable.groups if g)
        return 8 * largest
    if optimizer == "adamw8bit":
        return 8 * largest
    if optimizer == "adafactor":
        return 12 * largest
    raise ValueError(f"unknown optimizer {optimizer!r}")


def weights_bytes(folder: str | Path | None) -> int:
    """Bytes of the weights a pretrained codec / CLIP folder or checkpoint file loads (safetensors/bin/pt)."""
    if not folder:
        return 0
    path = Path(folder).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.exists():
        return 0
    return sum(p.stat().st_size for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in path.rglob(ext))


@dataclass
class FullEstimate:
    """The base estimate plus the terms above; ``total`` is what the plan must fit."""

    base: Estimate
    params: int
    optimizer_state: int
    ema: int
    grads: int
    transient: int
    backward: int
    train: int
    preview: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return max(self.train, self.preview)

    @property
    def planned(self) -> int:
        """``total`` with the stated :data:`SAFETY_MARGIN`: what the budget must hold."""
        return int(self.total * (1 + SAFETY_MARGIN))

    def as_dict(self) -> dict[str, Any]:
        keys = ("params", "optimizer_state", "ema", "grads", "transient", "backward", "train", "preview")
        return {**{k: int(getattr(self, k)) for k in keys}, "total": self.total, "planned": self.planned, **self.info}


def estimate_training(model_config: Mapping[str, Any], video_shape: Sequence[int], audio_shape: Sequence[int],
                      knobs: Knobs | Mapping[str, Any], *, stage: Mapping[str, Any] | None = None,
                      optimizer: str = "adamw", foreach: bool | None = None, ema: bool = True,
                      precision: str = "no", device: str = "cpu", attention_kernel: str = "flash",
                      preview: bool = False, preview_branches: int = 3, codec_bytes: int = 0, clip_bytes: int = 0,
                      decoded_bytes: int = 0) -> FullEstimate:
    """Peak bytes of training with every term live at once (module docstring), never below the base."""
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    base = estimate_peak(model_config, video_shape, audio_shape, kn, precision=precision, training=True, ema=ema,
                         attention_kernel=attention_kernel, device=device)
    tr = trainable_of(model_config, stage)
    n = tr.numel
    params = base.params + 4 * tr.added_params
    opt_state = state_bytes(optimizer, tr.shapes)
    ema_b = 4 * n if ema else 0
    grads = 4 * n
    act = base.activations + base.attention
    backward = grads + act if kn.gradient_checkpointing else max(grads, act)
    transient = step_transient(optimizer, tr, foreach, device)
    resident = params + base.casts + opt_state + ema_b + base.overhead
    train = resident + max(backward, grads + transient)
    out = FullEstimate(base, params, opt_state, ema_b, grads, transient, backward, train,
                       info={"trainable": n, "optimizer": optimizer, "foreach": foreach})
    if preview:
        sample = estimate_peak(model_config, video_shape, audio_shape, kn, micro_batch=preview_branches,
                               precision=precision, training=False, attention_kernel=attention_kernel, device=device)
        out.preview = (resident + base.params + codec_bytes + clip_bytes + sample.activations + sample.attention
                       + sample.overhead + decoded_bytes)
    return out


def estimate_sampling(model_config: Mapping[str, Any], video_shape: Sequence[int], audio_shape: Sequence[int],
                      knobs: Knobs | Mapping[str, Any], *, branches: int = 3, adapters_params: int = 0,
                      codec_bytes: int = 0, clip_bytes: int = 0, decoded_bytes: int = 0, precision: str = "no",
                      device: str = "cpu", attention_kernel: str = "flash") -> int:
    """Peak bytes of ``jointdit.sample``: weights (+ adapters), codec, CLIP, one batched forward, media."""
    est = estimate_peak(model_config, video_shape, audio_shape, knobs, micro_batch=branches, precision=precision,
                        training=False, attention_kernel=attention_kernel, device=device)
    return int(est.params + 4 * adapters_params + codec_bytes + clip_bytes + est.activations + est.attention
               + est.overhead + decoded_bytes)


def decoded_media_bytes(frames: int, height: int, width: int, samples: int, branches_copy: int = 2) -> int:
    """Decoded clip tensors held while writing outputs: fp32 frames [T, 3, H, W] and wave [N], ×copies."""
    return int(branches_copy * 4 * (frames * 3 * height * width + samples))


def estimate_for_run(cfg: Any, video_shape: Sequence[int], audio_shape: Sequence[int],
                     model_config: Mapping[str, Any], device: str = "cpu") -> FullEstimate:
    """The full estimate of a composed training config: its stage (LoRA / trainable groups), ``vram``
    knobs, optimizer and ``foreach``, EMA, and the preview sample when ``sample_every >= 0``.

    ``video_shape``/``audio_shape`` are the latents the model trains on (already cropped); the knobs'
    ``max_t`` is therefore not applied again.
    """
    from omegaconf import OmegaConf

    vram = OmegaConf.to_container(cfg.vram, resolve=True)
    knobs = Knobs.from_mapping({**vram, "max_t": 0})
    precision = "no" if device == "cpu" else str(vram.get("mixed_precision", "no"))
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    foreach = vram.get("optimizer_foreach")
    return estimate_training(dict(model_config), list(video_shape), list(audio_shape), knobs, stage=stage,
                             optimizer=str(vram.get("optimizer", "adamw")), foreach=foreach,
                             ema=bool(cfg.ema.enabled), precision=precision, device=device,
                             preview=int(cfg.get("sample_every", -1)) >= 0)


# ----------------------------------------------------------------------------------------------
# Sampling-side terms: codec weights and decode working memory, CLIP weights, decoded media
# ----------------------------------------------------------------------------------------------
# Live feature maps of a diffusers VAE decoder's last (full-resolution) up block per output pixel, in units
# of ``block_out_channels[0]`` values: the ResNet input, its norm/conv intermediates and the upsampler's
# output. Fitted on the tiny random-init SVD / AudioLDM2 VAEs (experiments/bench_memory_terms.py, calibration
# rows "decode ..."), see :func:`codec_terms`.
VAE_DECODER_LIVE_MAPS = 4.0
# HiFi-GAN: live maps at the widest stage (channels × samples), input + resblock intermediates + sum.
VOCODER_LIVE_MAPS = 4.0
# Griffin-Lim on a log-mel [L, n_mels]: linear magnitude, complex spectra (angles, rebuilt, previous for
# momentum) and the STFT's framed copy, each (n_fft/2+1)·L values; counted in 4-byte units.
GRIFFIN_LIM_LIVE_SPECTRA = 10.0


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _component_folder(path: str | Path | None, sub: str) -> Path | None:
    """``path`` itself when it holds config.json, else ``path/sub`` (the layouts ``find_model_folder`` accepts)."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    return p if (p / "config.json").exists() else p / sub


@dataclass
class CodecTerms:
    """Bytes the codecs hold (``weights``) and need while decoding one clip (``decode_video``/``decode_audio``)."""

    weights: int = 0
    decode_video: int = 0
    decode_audio: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def decode(self) -> int:
        """Video and audio decode one after the other: the larger of the two is live at once."""
        return max(self.decode_video, self.decode_audio)


def codec_terms(codec: Mapping[str, Any] | None, frames: int, size: Sequence[int], latent_audio_steps: int,
                vid_decode_chunk: int | None = None) -> CodecTerms:
    """The codec config's weights and decode working memory for one clip of ``frames`` frames at ``size``
    (H, W) and ``latent_audio_steps`` latent audio steps (the model-side audio length).

    pixel_mel: no weights; video decode is a reshape (the output is counted as decoded media); audio decode
    is Griffin-Lim: :data:`GRIFFIN_LIM_LIVE_SPECTRA` · (n_fft/2+1) · L · 4 bytes.
    svd_audioldm2: the folders' weight files; the SVD temporal decoder decodes ``chunk + 2·overlap`` frames
    per call (``vid_decode_chunk`` > ``video.decode_chunk``; ≤ 0: all frames), holding
    :data:`VAE_DECODER_LIVE_MAPS` · C₀ · H · W values per frame (C₀ = ``block_out_channels[0]`` of its
    config); the AudioLDM2 VAE the same on the mel image [4·La, n_mels] per clip, then the HiFi-GAN vocoder
    :data:`VOCODER_LIVE_MAPS` · max over stages (channels · samples). Bytes per value follow ``codec.dtype``.
    """
    c = dict(codec or {})
    h, w = int(size[0]), int(size[1])
    out = CodecTerms()
    name = c.get("name", "pixel_mel")
    audio = dict(c.get("audio") or {})
    n_fft = int(audio.get("n_fft", 1024))
    if name == "pixel_mel":
        out.decode_audio = int(GRIFFIN_LIM_LIVE_SPECTRA * (n_fft // 2 + 1) * latent_audio_steps * 4)
        return out
    if name != "svd_audioldm2":
        out.notes.append(f"codec {name!r} is not modelled: its weights and decode are not counted")
        return out
    value = 2 if str(c.get("dtype", "float32")) in ("float16", "bfloat16") else 4
    video = dict(c.get("video") or {})
    vae = _component_folder(video.get("vae_path"), "vae")
    audio_vae = _component_folder(audio.get("root") or audio.get("vae_path"), "vae")
    vocoder = _component_folder(audio.get("vocoder_path") or (Path(audio["root"]) / "vocoder" if audio.get("root") else None),
                                "vocoder")
    for folder, what in ((vae, "SVD VAE"), (audio_vae, "AudioLDM2 VAE"), (vocoder, "vocoder")):
        n = weights_bytes(folder)
        if not n:
            out.notes.append(f"{what} weights not found at {folder}: not counted")
        out.weights += n
    chunk = int(video.get("decode_chunk", 8) if vid_decode_chunk is None else vid_decode_chunk)
    per_call = frames if chunk <= 0 else min(frames, chunk + 2 * int(video.get("decode_overlap", 2) or 0))
    c0 = int((_read_json(vae / "config.json") if vae else {}).get("block_out_channels", [128])[0])
    out.decode_video = int(VAE_DECODER_LIVE_MAPS * c0 * h * w * per_call * value)
    a_cfg = _read_json(audio_vae / "config.json") if audio_vae else {}
    mel_frames, n_mels = 4 * latent_audio_steps, int(audio.get("n_mels", 64))
    batch = 1  # _decode decodes one clip at a time
    vae_audio = VAE_DECODER_LIVE_MAPS * int(a_cfg.get("block_out_channels", [128])[0]) * mel_frames * n_mels * batch
    v_cfg = _read_json(vocoder / "config.json") if vocoder else {}
    ch, length, widest = int(v_cfg.get("upsample_initial_channel", 512)), mel_frames, 0
    for rate in v_cfg.get("upsample_rates", [5, 4, 2, 2, 2]):
        ch, length = ch // 2, length * int(rate)
        widest = max(widest, ch * length)
    out.decode_audio = int(max(vae_audio, VOCODER_LIVE_MAPS * widest) * value)
    return out


def clip_weights_bytes(settings: Mapping[str, Any] | None) -> tuple[int, str | None]:
    """Bytes of the CLIP encoder ``{model, pretrained, model_config}`` loads, and a note when it is a guess.

    A local ``pretrained`` file counts its size. Otherwise the open_clip model config (registered
    ``model_config`` file, or open_clip's own by name) gives the transformer widths/layers: each layer holds
    12·W² weights (attention 4·W², MLP 8·W²), plus the text token embedding, in fp32.
    """
    if not settings or settings.get("enabled", True) is False:
        return 0, None
    pretrained = settings.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_file():
        return Path(str(pretrained)).expanduser().stat().st_size, None
    cfg: dict[str, Any] = {}
    if settings.get("model_config"):
        cfg = _read_json(Path(str(settings["model_config"])).expanduser()).get("model_cfg") or \
            _read_json(Path(str(settings["model_config"])).expanduser())
    if not cfg:
        try:
            import open_clip

            cfg = open_clip.get_model_config(str(settings.get("model", "ViT-B-16"))) or {}
        except Exception:  # noqa: BLE001 - open_clip missing or the name unknown: fall back to ViT-B-16's size
            cfg = {}
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    wv, lv = int(vision.get("width", 768)), int(vision.get("layers", 12))
    wt, lt = int(text.get("width", 512)), int(text.get("layers", 12))
    n = 12 * lv * wv ** 2 + 12 * lt * wt ** 2 + int(text.get("vocab_size", 49408)) * wt
    return 4 * n, f"CLIP weights estimated from its config ({n / 1e6:.0f} M parameters)"
