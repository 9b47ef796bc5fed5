"""Resolution-aware timestep shift, shared by training (the logit-normal mean) and sampling (the sigmas).

A shift ``s`` warps flow time ``t ∈ [0, 1]`` (t = 1 is noise) as

    t ↦ s·t / (1 + (s − 1)·t)            ⇔      logit(t) ↦ logit(t) + ln s

so ``s > 1`` spends more of training and of the ODE steps at high noise. More tokens carry more
redundant copies of the same signal, so the same ``t`` destroys less of it: the shift should grow with
the token count. Rules (``method``):

==========  ==============================================================================================
``sd3``     ``s = sqrt(n / reference_tokens)`` — SD3 (Esser et al. 2024, §5.3.2): the noise level that keeps
            the per-token SNR of a ``reference_tokens`` sequence; SD3 trains at 256 tokens (256² px).
``linear``  ``ln s = base_shift + (max_shift − base_shift)·(n − base_tokens)/(max_tokens − base_tokens)``, the
            Flux / LTX-Video rule (``mu`` of diffusers' ``calculate_shift``; LTX-2 uses 0.95 at 1024 tokens
            and 2.05 at 4096).
``constant`` ``s = shift`` whatever ``n``.
``none``    ``s = 1``.
==========  ==============================================================================================

``min_shift`` floors the token-count rules (``s = max(min_shift, rule(n))``). With ``min_shift = 1`` a
sequence shorter than the reference keeps the unshifted schedule instead of being pushed towards low
noise: measured on ``experiment=synthetic_cpu`` (README, "What each method change did"), sd3's
s = sqrt(200/256) = 0.88 for the audio stream lowered v2a event F1 from 0.55 to 0.45.

Each modality has its own ``t`` (per-modality adaLN), so each gets the shift of its own token count
``n_video`` / ``n_audio``. The rule and the two shifts it gave at the training resolution are stored in
the export's ``jointdit.json`` under :data:`EXPORT_KEY`; the sampler recomputes the shifts for the token
counts it samples at (:func:`sampling_shifts`), unless given explicit ones.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

EXPORT_KEY = "timestep_shift"
METHODS: tuple[str, ...] = ("sd3", "linear", "constant", "none")


@dataclass(frozen=True)
class ShiftRule:
    """How the timestep shift follows a modality's token count (see the module docstring)."""

    method: str = "sd3"
    reference_tokens: int = 256      # sd3
    base_tokens: int = 1024          # linear
    max_tokens: int = 4096           # linear
    base_shift: float = 0.95         # linear: ln s at base_tokens
    max_shift: float = 2.05          # linear: ln s at max_tokens
    shift: float = 1.0               # constant
    min_shift: float = 0.0           # sd3 / linear: s = max(min_shift, rule(n)); 0 = no floor

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown timestep shift method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "sd3" and self.reference_tokens <= 0:
            raise ValueError(f"timestep shift reference_tokens must be > 0, got {self.reference_tokens}")
        if self.method == "linear" and self.max_tokens == self.base_tokens:
            raise ValueError("timestep shift max_tokens must differ from base_tokens")
        if self.method == "constant" and self.shift <= 0:
            raise ValueError(f"a constant timestep shift must be > 0, got {self.shift}")
        if self.min_shift < 0:
            raise ValueError(f"timestep shift min_shift must be >= 0 (0 = no floor), got {self.min_shift}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any | None) -> ShiftRule:
        """``objective.timestep_shift`` (a mapping, or None for the default rule) → a rule."""
        if cfg is None:
            return cls()
        if isinstance(cfg, ShiftRule):
            return cfg
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = set(items) - known
        if unknown:
            raise ValueError(f"unknown timestep shift field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in items.items() if v is not None})

    def __call__(self, num_tokens: int) -> float:
        """The shift ``s`` for a sequence of ``num_tokens`` tokens of one modality."""
        n = int(num_tokens)
        if n <= 0:
            raise ValueError(f"token count must be > 0, got {n}")
        if self.method == "none":
            return 1.0
        if self.method == "constant":
            return float(self.shift)
        if self.method == "sd3":
            return max(self.min_shift, math.sqrt(n / self.reference_tokens))
        mu = self.base_shift + (self.max_shift - self.base_shift) * (n - self.base_tokens) / (self.max_tokens - self.base_tokens)
        return max(self.min_shift, math.exp(mu))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_counts(model_config: Mapping[str, Any], video_shape, audio_shape) -> tuple[int, int]:
    """Tokens per sample of each modality for latents ``video_shape [Tv, Cv, hv, wv]``,
    ``audio_shape [Ca, La, Fa]`` (no batch dim) under the model's patch sizes."""
    pt, ph, pw = (int(p) for p in model_config["video_patch_size"])
    pa, pf = (int(p) for p in model_config["audio_patch_size"])
    tv, _, hv, wv = (int(d) for d in video_shape)
    _, la, fa = (int(d) for d in audio_shape)
    return (tv // pt) * (hv // ph) * (wv // pw), (la // pa) * (fa // pf)


def shifts(rule: ShiftRule | Mapping[str, Any] | None, n_video: int, n_audio: int) -> tuple[float, float]:
    """``(shift_video, shift_audio)`` for the given token counts."""
    rule = ShiftRule.from_config(rule)
    return rule(n_video), rule(n_audio)


def logit_normal_means(mean: float, shift_video: float, shift_audio: float) -> tuple[float, float]:
    """The training logit-normal means ``mean + ln s`` of each modality (see the module docstring)."""
    return mean + math.log(shift_video), mean + math.log(shift_audio)


def export_entry(rule: ShiftRule | Mapping[str, Any] | None, n_video: int, n_audio: int) -> dict[str, Any]:
    """What ``jointdit.json[EXPORT_KEY]`` holds: the rule, the training token counts and their shifts."""
    rule = ShiftRule.from_config(rule)
    sv, sa = shifts(rule, n_video, n_audio)
    return {"rule": rule.as_dict(), "video_tokens": int(n_video), "audio_tokens": int(n_audio),
            "shift_video": sv, "shift_audio": sa}


def sampling_shifts(meta: Mapping[str, Any] | None, n_video: int, n_audio: int,
                    override: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """The sampler's ``(shift_video, shift_audio)``.

    ``override`` (e.g. the sample config's ``schedule``) with ``shift_video`` / ``shift_audio`` set wins,
    with a warning when it differs from what the model was trained with. Otherwise the exported rule is
    applied to the token counts being sampled (equal to the stored shifts at the training resolution).
    An export without the entry (trained before the shift existed) samples with shift 1, as it trained.
    """
    entry = (meta or {}).get(EXPORT_KEY)
    if entry:
        trained = shifts(entry["rule"], n_video, n_audio)
    else:
        trained = (1.0, 1.0)
    override = dict(override or {})
    out = []
    for name, value in zip(("shift_video", "shift_audio"), trained):
        given = override.get(name)
        if given is None:
            out.append(float(value))
            continue
        given = float(given)
        if given <= 0:
            raise ValueError(f"{name} must be > 0, got {given}")
        if not math.isclose(given, value, rel_tol=1e-6):
            warnings.warn(f"{name}={given} overrides the model's timestep shift {value:.4g} "
                          f"(from its exported rule at this resolution)", stacklevel=2)
        out.append(given)
    return out[0], out[1]
