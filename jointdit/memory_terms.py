"""The terms of the memory planner (:mod:`jointdit.memory`): what each part of a run keeps live, in bytes.

Training, one optimizer step (P = all weights, θ = the trainable ones, per block i = 0 … depth−1):

    resident   = weights(P, quantized frozen linears at 1 byte + scales) + adapters + casts(2·P, mixed precision)
                 + optimizer state(θ) + EMA(4·θ) + C (runtime memory held through the whole step)
    saved_i    = what autograd keeps of block i (:func:`block_saved_bytes`, exact: checked against
                 :mod:`jointdit.memory_trace`); a checkpointed block keeps only its inputs (x_v, x_a);
                 an offloaded block (CUDA, ``save_on_cpu``) keeps nothing on the device
    backward   = max over i of [ io + Σ_{j<i} kept_j + saved_i + Σ_{j≥i} grads_j + grads_io
                               + ρ · saved_i ]              (block i's backward: its activations are
                 (re)computed and their gradients built while the later blocks' weight gradients are held)
    step       = grads(θ) + transient(optimizer, foreach)   optimizer.step() runs while the gradients are held
    train      = resident + max(backward, step)
    preview    = resident + 4·P (the exported copy) + the sampling plan's forward/decode/codec/CLIP terms

ρ (:data:`BACKWARD_WORKING`) and C (:data:`RUNTIME`) are the only fitted numbers of the training model, fitted
on the calibration rows of experiments/bench_memory.py (CPU, fp32; held-out rows are in
experiments/bench_memory_terms.py). The optimizer transients:

    AdamW foreach (multi-tensor; torch's default on CUDA): sqrt(v) for every tensor of a param group at once,
    4·Σ_group n for the largest group; AdamW single-tensor: sqrt(v)/bc for one tensor, 8·max n; 8-bit AdamW:
    one tensor's fp32 state dequantised, 8·max n; Adafactor (transformers): grad², the factored estimate and
    the update for one tensor, 12·max n.

The stage decides θ and which tensors autograd saves: ``stage=a`` all parameters; ``stage=b`` the glob groups
of ``stage.trainable``; LoRA (``stage.lora.rank > 0``) only the adapters (r·(d_in + d_out) per targeted linear).
A frozen linear without an adapter saves no input (its weight gradient is not needed); a frozen adaLN saves
no normalised activations. The layout comes from a model built on the ``meta`` device (no memory).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 ** 2
# Backward working set of one block, in units of that block's saved activations: the gradients of its
# intermediates being built and autograd's buffers, beyond what the io term already holds (the batch, noise,
# noisy input, target and loss tensors). Fitted (CPU fp32) on the calibration rows of
# experiments/bench_memory_terms.py (tiny, batch 1 / 4 / 8: all three within 0.1 %).
BACKWARD_WORKING = 0.35
# Runtime memory a training step holds that no tensor accounts for: autograd engine, oneDNN primitive cache and
# heap fragmentation on the CPU (fitted with BACKWARD_WORKING on the same rows); the cuBLAS workspace and cuDNN
# handles on CUDA (not measured here: no GPU; the margin must cover the difference).
RUNTIME = 8 * MiB

# Bytes per saved value under autocast (bf16/fp16 on CUDA) — NOT measured (no GPU here): autocast keeps the
# residual stream and LayerNorm/QK-norm tensors in fp32 and adds low-precision copies of every matmul input, so
# the fp32 count (4) is not a bound (qkv + its fp32 QK-norm copies: 14·D bytes vs 12·D); 5 covers that with room.
MIXED_SAVED_BYTES = 5

ROLE_MODULES = {"ada": "adaLN_modulation.1", "qkv": "qkv", "proj": "proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class ExpertTraining:
    """What one modality expert of one block trains: the roles (:data:`ROLE_MODULES`) whose weight trains,
    and the LoRA rank per adapted role."""

    trains: frozenset[str] = frozenset(ROLE_MODULES)
    lora: tuple[tuple[str, int], ...] = ()

    def saves_input(self, role: str) -> bool:
        """A linear keeps its input for backward when its weight or an adapter on it trains."""
        return role in self.trains or role in dict(self.lora)

    def rank(self, role: str) -> int:
        return dict(self.lora).get(role, 0)


@dataclass(frozen=True)
class BlockTraining:
    video: ExpertTraining
    audio: ExpertTraining
    context: bool = True        # the context K/V path needs gradients (context.kv or the condition embedder trains)
    context_rank: int = 0       # LoRA rank on context.kv
    grad_bytes: int = 0         # fp32 gradients of the block's trainable tensors


@dataclass
class Trainable:
    """What trains: parameter groups (one list of shapes per optimizer param group), added LoRA weights,
    the per-block layout, gradients outside the blocks, and the frozen Linear weights (quantizable)."""

    groups: list[list[tuple[int, ...]]]
    added_params: int = 0
    blocks: list[BlockTraining] = field(default_factory=list)
    grad_bytes_io: int = 0
    frozen_linear: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s for g in self.groups for s in g]

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def stage_model(model_config: Mapping[str, Any], stage: Mapping[str, Any] | None):
    """A JointDiT on the ``meta`` device with ``requires_grad`` set exactly as the stage trains it (the real
    ``lora.add_lora`` / ``checkpoints.select_parameters``), and the stage's parameter groups (name lists)."""
    import torch

    from jointdit.checkpoints import select_parameters
    from jointdit.lora import add_lora, groups_from_config, lora_enabled, lora_parameters
    from jointdit.memory import _full_config
    from jointdit.models.jointdit import JointDiT

    stage = dict(stage or {})
    with torch.device("meta"):
        model = JointDiT(**_full_config(model_config))
        model.train()
        if lora_enabled(stage.get("lora")):
            add_lora(model, groups_from_config(stage["lora"]))
            return model, [[n for n, _ in lora_parameters(model)]]
    trainable = stage.get("trainable") or {"all": {"patterns": ["*"]}}
    selected = select_parameters(model, {k: list(v["patterns"]) for k, v in trainable.items()})
    chosen = {n for params in selected.values() for n, _ in params}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return model, [[n for n, _ in params] for params in selected.values()]


def _layout(model) -> tuple[list[BlockTraining], int]:
    """Per-block training layout and the gradient bytes outside the blocks, from ``requires_grad`` flags."""
    params = dict(model.named_parameters())
    trains = {n for n, p in params.items() if p.requires_grad}
    lora_rank = {}
    for name in trains:
        m = re.match(r"(.*)\.lora_A\.[^.]+\.weight$", name)
        if m:
            lora_rank[m.group(1)] = int(params[name].shape[0])
    cond_trains = any(n.startswith("cond_embed.") for n in trains)

    def role_trains(prefix: str) -> tuple[frozenset[str], tuple[tuple[str, int], ...]]:
        roles = frozenset(r for r, mod in ROLE_MODULES.items()
                          if f"{prefix}.{mod}.weight" in trains or f"{prefix}.{mod}.base_layer.weight" in trains)
        return roles, tuple((r, lora_rank[f"{prefix}.{mod}"]) for r, mod in ROLE_MODULES.items()
                            if f"{prefix}.{mod}" in lora_rank)

    blocks, in_blocks = [], 0
    for i in range(len(model.blocks)):
        grad = sum(4 * params[n].numel() for n in trains if n.startswith(f"blocks.{i}."))
        in_blocks += grad
        ctx_rank = lora_rank.get(f"blocks.{i}.context.kv", 0)
        ctx = cond_trains or ctx_rank > 0 or f"blocks.{i}.context.kv.weight" in trains
        blocks.append(BlockTraining(ExpertTraining(*role_trains(f"blocks.{i}.video")),
                                    ExpertTraining(*role_trains(f"blocks.{i}.audio")), ctx, ctx_rank, grad))
    return blocks, sum(4 * params[n].numel() for n in trains) - in_blocks


@functools.lru_cache(maxsize=64)
def _trainable_cached(model_json: str, stage_json: str) -> Trainable:
    import torch

    model, group_names = stage_model(json.loads(model_json), json.loads(stage_json))
    params = dict(model.named_parameters())
    groups = [[tuple(params[n].shape) for n in names] for names in group_names]
    added = sum(p.numel() for n, p in params.items() if ".lora_" in n)
    blocks, grad_io = _layout(model)
    frozen = [tuple(m.weight.shape) for m in model.modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    return Trainable(groups, added, blocks, grad_io, frozen)


def trainable_of(model_config: Mapping[str, Any], stage: Mapping[str, Any] | None) -> Trainable:
    """The trainable tensors and per-block layout a stage config selects (meta model, cached per config)."""
    return _trainable_cached(json.dumps(dict(model_config), sort_keys=True, default=str),
                             json.dumps(dict(stage or {}), sort_keys=True, default=str))


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


@dataclass(frozen=True)
class Tokens:
    """Token counts of one sample: video/audio queries, pooled keys per modality, context, modulation groups."""

    video: int
    audio: int
    keys_video: int
    keys_audio: int
    context: int
    groups_video: int = 1
    groups_audio: int = 1

    @property
    def queries(self) -> int:
        return self.video + self.audio

    @property
    def keys(self) -> int:
        return self.keys_video + self.keys_audio + self.context


def _expert_saved(e: ExpertTraining, n: int, groups: int, d: int, mlp: int, heads: int) -> int:
    """Elements one modality expert saves for ``n`` tokens (see :func:`block_saved_bytes`)."""
    ada = "ada" in e.trains
    per_token_d = (1                              # x, LayerNorm 1 input
                   + ada                          # LN(x), kept by the modulation product when adaLN trains
                   + e.saves_input("qkv")         # the modulated, flattened input of qkv
                   + 3                            # qkv output (QK-norm inputs, v)
                   + 2                            # the attention's query (concatenated) and its output
                   + e.saves_input("proj")        # the reshaped attention output, input of proj
                   + ada                          # proj output, kept by the gate product
                   + 1                            # x', LayerNorm 2 input
                   + ada                          # LN(x')
                   + e.saves_input("fc1")         # modulated input of fc1
                   + ada)                         # fc2 output, kept by the gate product
    per_token = (per_token_d * d + mlp * (1 + e.saves_input("fc2"))   # fc1 output (GELU input), GELU output
                 + sum(e.rank(r) for r in ROLE_MODULES)              # adapter down-projections
                 + 4 + 4 * heads)                                    # LayerNorm / QK-norm mean and rstd
    # per modulation group: 1+scale (×2), the adaLN output (gates are its views), SiLU(c) when adaLN trains
    return n * per_token + groups * d * (8 + ada)


def block_saved_bytes(block: BlockTraining, tokens: Tokens, d: int, mlp: int, heads: int, batch: int,
                      value_bytes: int = 4, mixed_modes: bool = False, attention_kernel: str = "flash") -> int:
    """Bytes autograd keeps for the backward of one joint block, summed over its tensors' storages:

    per modality token (D = hidden size): x, [LN(x)], [qkv input], qkv (3), query + attention output (2),
    [proj input], [proj output], x', [LN(x')], [fc1 input], [fc2 output] in units of D — the bracketed ones only
    when their weight (adaLN for the LN/gate ones) or an adapter trains — plus the fc1 output, [the GELU
    output] (mlp wide), r per adapter and the norm statistics; per modulation group 8·D (9·D when adaLN trains);
    per block the concatenated keys and values 2·D·N_keys, the fp32 log-sum-exp, and the context's K/V
    projection 2·D (+ r) per context token when the context path needs gradients. Mixed attention modes in one
    batch add the per-mode key sets (≤ 2·D·(max N_keys of one modality + N_ctx)); the math kernel adds its
    [H, N_q, N_keys] probabilities. Exact for flash SDPA on fp32 (tests/test_memory_trace.py)."""
    n_elem = (_expert_saved(block.video, tokens.video, tokens.groups_video, d, mlp, heads)
              + _expert_saved(block.audio, tokens.audio, tokens.groups_audio, d, mlp, heads)
              + 2 * d * tokens.keys)
    if block.context:
        n_elem += tokens.context * (2 * d + 2 * heads + block.context_rank)
    if mixed_modes:
        n_elem += 2 * d * (max(tokens.keys_video, tokens.keys_audio) + tokens.context)
    if attention_kernel == "math":
        n_elem += 2 * heads * tokens.queries * tokens.keys          # softmax output + its dropout/probabilities
    lse = 4 * heads * tokens.queries                                 # fp32 whatever the precision
    return batch * (value_bytes * n_elem + lse)


def backward_peak(saved: Sequence[int], kept: Sequence[int], grads: Sequence[int], io: int, grads_io: int) -> int:
    """Peak bytes of the backward pass above the resident weights and states (module docstring):
    ``max_i [io + Σ_{j<i} kept_j + saved_i + Σ_{j≥i} grads_j + grads_io + ρ·saved_i]``, where
    ``kept_j`` is what block j holds until its backward (its saved tensors, or only its inputs when
    checkpointed, or nothing when offloaded) and ``saved_i`` what block i's backward needs (recomputed if
    checkpointed)."""
    peak, depth = 0, len(saved)
    for i in range(depth - 1, -1, -1):
        live = io + sum(kept[:i]) + saved[i] * (1 + BACKWARD_WORKING) + sum(grads[i:]) + grads_io
        peak = max(peak, live)
    return int(peak)


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


def quantized_weight_bytes(shapes: Sequence[Sequence[int]], scheme: str | None) -> int:
    """Bytes of frozen Linear weights stored as ``scheme``: fp32 when None; ``int8`` (optimum-quanto
    ``qint8`` weights): 1 byte per weight + one fp32 scale per output row."""
    if not scheme:
        return sum(4 * _numel(s) for s in shapes)
    if scheme == "int8":
        return sum(_numel(s) + 4 * int(s[0]) for s in shapes)
    raise ValueError(f"unknown vram.quantize_frozen={scheme!r}; use null or int8")


# Sampling-side terms: codec weights and decode working memory, CLIP weights, decoded media
# ----------------------------------------------------------------------------------------------
# Decode working memory, in live values per decoded unit. Structural counts, checked against the measured
# decode peaks of the real codecs (tiny random-init SVD / AudioLDM2 folders, pixel_mel) in
# experiments/bench_memory_terms.py (calibration rows "decode ..."):
# - a diffusers VAE decoder's full-resolution up block keeps about 12 maps of block_out_channels[0] values per
#   output pixel alive (ResNet input, GroupNorm/SiLU/conv intermediates, the skip, the upsampler's output;
#   the temporal decoder adds its time-mixing copies): measured 8.6-12;
VAE_DECODER_LIVE_MAPS = 12.0
# - HiFi-GAN, at its widest stage (channels x samples): input, the resblocks' intermediates and their sum;
VOCODER_LIVE_MAPS = 12.0
# - librosa's Griffin-Lim (float64/complex128) keeps the magnitude, angles, rebuilt and previous spectra and
#   the STFT frames: about 88 bytes per frequency bin and frame = 22 four-byte values (measured 19-26).
GRIFFIN_LIM_LIVE_SPECTRA = 26.0
# First-call runtime of a decoder (kernel workspaces, weight repacking), measured 9-13 MiB on CPU.
DECODE_RUNTIME = 16 * MiB
# librosa loads scipy.optimize / numba lazily on its first Griffin-Lim call: 175-237 MiB of host memory that
# stays (measured on this CPU in a sampling process). Host memory only: counted when the budget is the RAM.
GRIFFIN_LIM_HOST_RUNTIME = 240 * MiB


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
                vid_decode_chunk: int | None = None, device: str = "cpu") -> CodecTerms:
    """The codec config's weights and decode working memory for one clip of ``frames`` frames at ``size``
    (H, W) and ``latent_audio_steps`` latent audio steps (the model-side audio length).

    pixel_mel: no weights; video decode is a reshape (the output is counted as decoded media); audio decode
    is librosa's Griffin-Lim on the host: :data:`GRIFFIN_LIM_LIVE_SPECTRA` · (n_fft/2+1) · L · 4 bytes, plus
    :data:`GRIFFIN_LIM_HOST_RUNTIME` — both only when ``device`` is the CPU (on a GPU it is host memory).
    svd_audioldm2: the folders' weight files; the SVD temporal decoder decodes ``chunk + 2·overlap`` frames
    per call (``vid_decode_chunk`` > ``video.decode_chunk``; ≤ 0: all frames), holding
    :data:`VAE_DECODER_LIVE_MAPS` · C₀ · H · W values per frame (C₀ = ``block_out_channels[0]`` of its
    config); the AudioLDM2 VAE the same on the mel image [4·La, n_mels] per clip, then the HiFi-GAN vocoder
    :data:`VOCODER_LIVE_MAPS` · max over stages (channels · samples); each plus :data:`DECODE_RUNTIME`.
    Bytes per value follow ``codec.dtype``.
    """
    c = dict(codec or {})
    h, w = int(size[0]), int(size[1])
    out = CodecTerms()
    name = c.get("name", "pixel_mel")
    audio = dict(c.get("audio") or {})
    n_fft = int(audio.get("n_fft", 1024))
    if name == "pixel_mel":
        if device == "cpu":
            out.decode_audio = int(GRIFFIN_LIM_LIVE_SPECTRA * (n_fft // 2 + 1) * latent_audio_steps * 4
                                   + GRIFFIN_LIM_HOST_RUNTIME)
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
    out.decode_video = int(VAE_DECODER_LIVE_MAPS * c0 * h * w * per_call * value + DECODE_RUNTIME)
    a_cfg = _read_json(audio_vae / "config.json") if audio_vae else {}
    mel_frames, n_mels = 4 * latent_audio_steps, int(audio.get("n_mels", 64))
    batch = 1  # _decode decodes one clip at a time
    vae_audio = VAE_DECODER_LIVE_MAPS * int(a_cfg.get("block_out_channels", [128])[0]) * mel_frames * n_mels * batch
    v_cfg = _read_json(vocoder / "config.json") if vocoder else {}
    ch, length, widest = int(v_cfg.get("upsample_initial_channel", 512)), mel_frames, 0
    for rate in v_cfg.get("upsample_rates", [5, 4, 2, 2, 2]):
        ch, length = ch // 2, length * int(rate)
        widest = max(widest, ch * length)
    out.decode_audio = int(max(vae_audio, VOCODER_LIVE_MAPS * widest) * value + DECODE_RUNTIME)
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
