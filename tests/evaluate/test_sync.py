"""Acceptance: the metric on real synthetic clips written as MP4 (H.264 + AAC) and read back through PyAV."""

import pytest
import torch

from jointdit.data.media import Clip
from jointdit.evaluate import evaluate_clips
from jointdit.evaluate.events import event_accuracy
from jointdit.evaluate.sync import analyse_clip


def _variant(clip: Clip, frames=None, wave=None) -> Clip:
    return Clip(frames=clip.frames if frames is None else frames, wave=clip.wave if wave is None else wave,
                fps=clip.fps, sample_rate=clip.sample_rate, path=clip.path, meta=dict(clip.meta))


def _delay(clip: Clip, seconds: float) -> Clip:
    shift = int(round(seconds * clip.sample_rate))
    wave = torch.zeros_like(clip.wave)
    wave[shift:] = clip.wave[:-shift]
    return _variant(clip, wave=wave)


@pytest.fixture(scope="module")
def real_report(real_clips):
    clips, events = real_clips
    return evaluate_clips(None, clips, events, with_distances=False)


def test_detectors_recover_the_known_event_times(real_report):
    s = real_report.summary
    assert s["real_onset_f1"] >= 0.9, s
    assert s["real_event_f1"] >= 0.9, s
    assert abs(s["real_onset_offset_ms"]) < 20  # a hop is 10 ms; a video frame 125 ms


def test_event_accuracy_counts_each_clip_against_its_own_events(real_report, real_clips):
    _, events = real_clips
    # Give every clip the events of another clip: recall collapses.
    rotated = dict(zip(events, list(events.values())[1:] + list(events.values())[:1]))
    wrong, _ = event_accuracy(real_report.real, rotated, "audio")
    right, _ = event_accuracy(real_report.real, events, "audio")
    assert wrong.f1 < 0.6 < 0.9 <= right.f1


def test_shuffled_pairs_score_below_matched_ones(real_report):
    s = real_report.summary
    assert s["ceiling"] >= 0.8
    assert s["floor"] < s["ceiling"] - 0.3


def test_quarter_second_shift_drops_the_score_to_the_floor(real_clips, real_report):
    clips, events = real_clips
    shifted = evaluate_clips([_delay(c, 0.25) for c in clips], clips, events, with_distances=False).summary
    matched = real_report.summary
    assert shifted["sync"] <= matched["floor"] + 0.1, (shifted["sync"], matched["floor"])
    assert shifted["sync"] < 0.5 * matched["ceiling"]
    # The same clips unshifted score the ceiling: the drop is the shift, not the generated/real roles.
    same = evaluate_clips(clips, None, events, with_distances=False).summary
    assert same["sync"] == pytest.approx(matched["ceiling"])


@pytest.mark.parametrize("kind", ["silent", "blank", "static"])
def test_silent_blank_and_static_clips_score_zero_gated(real_clips, kind):
    clip = real_clips[0][2]
    if kind == "silent":
        broken = _variant(clip, wave=torch.zeros_like(clip.wave))
    elif kind == "blank":
        broken = _variant(clip, frames=torch.full_like(clip.frames, -1.0))
    else:
        broken = _variant(clip, frames=clip.frames[:1].expand_as(clip.frames).clone())
    assert analyse_clip(clip).gate.passed  # the original passes...
    analysis = analyse_clip(broken)
    assert not analysis.gate.passed  # ...the broken one does not
    report = evaluate_clips([broken, broken], None, with_distances=False)
    assert report.summary["sync_gated"] == 0.0 and report.summary["gate_pass_rate"] == 0.0


def test_static_video_keeps_its_onsets_but_the_gate_zeros_it(real_clips):
    """A still picture over the right sound: onsets remain, events do not, and the gated figure is 0."""
    clip = real_clips[0][0]
    still = _variant(clip, frames=clip.frames[:1].expand_as(clip.frames).clone())
    analysis = analyse_clip(still)
    assert analysis.onsets.size > 0 and analysis.events.size == 0
    assert analysis.gate.failures == ("no moving object",)
