"""Inputs and outputs of sampling: condition files in, MP4/WAV/PNG out (no model code here).

- :mod:`jointdit.io.conditions` — an image, a sound, a video or a cached clip → tensors at the
  model's clip geometry (fps, size, seconds, sample rate).
- :mod:`jointdit.io.outputs` — a fresh output folder per call (never overwriting earlier samples) and
  the MP4 (with sound), video-only MP4, WAV and preview PNG of one sample.

MP4/WAV reading and writing itself lives in :mod:`jointdit.data.media` (one module for media).
"""

from jointdit.io.conditions import cache_entry, fit_wave, load_audio, load_image, load_reference_frame, load_video
from jointdit.io.outputs import OutputExistsError, claim_output_dir, write_preview, write_sample

__all__ = ["cache_entry", "fit_wave", "load_audio", "load_image", "load_reference_frame", "load_video",
           "OutputExistsError", "claim_output_dir", "write_preview", "write_sample"]
