import numpy as np
import pytest

from jointdit.evaluate.onsets import detect_onsets
from jointdit.evaluate.settings import DetectorSettings

SR = 16000


def _bursts(times, amplitude, seconds=2.0, floor=1e-3, seed=0):
    """Decaying noise bursts whose first sample is at round(t * SR), over a faint noise floor."""
    rng = np.random.default_rng(seed)
    wave = rng.standard_normal(int(seconds * SR)) * floor
    decay = np.exp(-np.arange(int(0.25 * SR)) / SR * 25)
    for t in times:
        start = int(round(t * SR))
        stop = min(start + decay.size, wave.size)
        wave[start:stop] += amplitude * rng.standard_normal(stop - start) * decay[: stop - start]
    return wave.astype(np.float32)


@pytest.mark.parametrize("amplitude", [0.5, 0.05])
def test_onsets_land_on_the_attack_samples(amplitude):
    times = [0.3, 0.77, 1.2, 1.61]
    onsets = detect_onsets(_bursts(times, amplitude), SR)
    assert len(onsets) == len(times)
    # One hop (10 ms) plus the window's reach: well inside one video frame at 8 fps (125 ms).
    assert np.abs(onsets - np.array(times)).max() < 0.02


def test_silence_and_room_tone_have_no_onsets():
    assert detect_onsets(np.zeros(2 * SR, np.float32), SR).size == 0
    assert detect_onsets(_bursts([], 0.0, floor=1e-3), SR).size == 0


def test_threshold_is_absolute_not_relative_to_the_clip():
    """A clip of bursts far below the threshold stays silent; a relative threshold would find them."""
    quiet = _bursts([0.5, 1.0, 1.5], amplitude=3e-4, floor=0.0)  # about −70 dBFS: under the −60 dB floor
    assert detect_onsets(quiet, SR).size == 0
    settings = DetectorSettings(floor_db=-100.0)  # lower the floor and the same bursts are onsets
    assert detect_onsets(quiet, SR, settings).size == 3


def test_onsets_respect_the_minimum_gap():
    onsets = detect_onsets(_bursts([0.5, 0.55, 1.5], 0.5), SR, DetectorSettings(onset_min_gap=0.1))
    assert len(onsets) == 2
