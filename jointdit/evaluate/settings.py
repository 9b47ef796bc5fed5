"""``DetectorSettings``: every threshold the weight-free metrics use, in one frozen record.

Every threshold is ABSOLUTE (dB re full scale, fractions of the frame size, pixel values in [0, 1]),
never relative to the clip's own maximum: a silent clip has no onsets and a still clip has no events,
instead of its noise being normalised up into some. The same settings must score the generated clips,
the real-clip ceiling and the shuffled floor, so a report carries the settings it used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from jointdit.errors import ConfigError


@dataclass(frozen=True)
class DetectorSettings:
    # Audio onsets: onset strength on a log-mel spectrogram (see onsets.py).
    n_fft: int = 512                  # STFT window (samples); 32 ms at 16 kHz
    hop_seconds: float = 0.01         # onset-envelope resolution
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None         # None: sr / 2
    floor_db: float = -60.0           # mel power below this (dB re a full-scale sine) is clamped: silence has no flux
    lag_seconds: float = 0.02         # flux compares each frame with the one this much later
    onset_threshold_db: float = 3.0   # absolute: mean positive flux over the mel bands, dB
    onset_min_gap: float = 0.1        # seconds between two onsets
    # Video events: motion of distinct objects against the clip's median background (see motion.py).
    foreground_threshold: float = 0.12    # |pixel − background| in [0, 1] units that marks an object pixel
    min_object_area: float = 0.002        # object area as a fraction of the frame
    max_object_area: float = 0.25         # larger blobs are not "distinct objects" (noise, scene changes)
    max_jump: float = 0.6                 # fastest plausible object move per frame, fraction of the frame size
    accel_threshold: float = 0.03         # |Δvelocity| − |steady| per frame², fraction of the frame size
    energy_threshold: float = 0.01        # frame-difference energy (mean |Δpixel| in [0, 1]) for energy peaks
    video_sources: tuple[str, ...] = ("acceleration",)  # any of: acceleration, energy
    # Matching.
    tolerance_frames: float = 1.0     # an onset and an event match when |Δt| ≤ tolerance_frames / fps
    # Gates ("sanity figures"): a clip failing any of them scores 0 on the gated figure.
    min_rms_db: float = -45.0         # audio RMS, dBFS
    min_brightness: float = 0.02      # mean pixel value in [0, 1]
    max_brightness: float = 0.98
    min_object_frames: float = 0.5    # a distinct object in at least this fraction of the frames...
    min_travel: float = 0.05          # ...moving at least this far over the clip (fraction of the frame size)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> DetectorSettings:
        """Build from a mapping or DictConfig of field overrides; an unknown key is an error naming it."""
        if cfg is None:
            return cls()
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(cfg):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown detector setting(s) {unknown}", hint=f"known: {sorted(known)}")
        values = dict(cfg)
        if "video_sources" in values:
            sources = values["video_sources"]
            values["video_sources"] = (sources,) if isinstance(sources, str) else tuple(sources)
            bad = set(values["video_sources"]) - {"acceleration", "energy"}
            if bad or not values["video_sources"]:
                raise ConfigError(f"detector.video_sources must be a non-empty subset of [acceleration, energy], got {sources}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["video_sources"] = list(self.video_sources)
        return out
