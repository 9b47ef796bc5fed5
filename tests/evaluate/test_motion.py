import numpy as np
import pytest
import torch

from jointdit.evaluate.motion import analyse_motion, detect_video_events

FPS = 8.0
SIZE = 64


def _render(centres_per_frame, radius=6.0, background=0.15, color=(0.9, 0.2, 0.1)):
    """Anti-aliased discs on a flat background → [T, 3, H, W] in [-1, 1]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    frames = []
    for centres in centres_per_frame:
        canvas = np.full((SIZE, SIZE, 3), background)
        for cy, cx in centres:
            alpha = np.clip(radius + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1)[..., None]
            canvas = canvas * (1 - alpha) + np.array(color) * alpha
        frames.append(canvas)
    return torch.from_numpy(np.stack(frames)).float().permute(0, 3, 1, 2).mul(2).sub(1)


def test_a_reversal_is_an_event_at_its_frame():
    # x moves right 5 px per frame and reverses exactly at frame 7 (x peaks there): one event at 7/8 s.
    xs = [10 + 5 * min(k, 14 - k) for k in range(16)]
    events = detect_video_events(_render([[(32, x)] for x in xs]), FPS)
    assert events.tolist() == [7 / FPS]


def test_steady_motion_and_free_fall_are_not_events():
    constant = _render([[(32, 8 + 3 * k)] for k in range(16)])
    assert detect_video_events(constant, FPS).size == 0
    # A ball thrown up under gravity (a parabola, no bounce): a steady 3 px/frame² (0.047 of the frame,
    # above the 0.03 threshold) that is not an event.
    thrown = _render([[(56 - 13.5 * k + 1.5 * k * k, 12 + 4 * k)] for k in range(10)])
    assert detect_video_events(thrown, FPS).size == 0


def test_two_discs_meeting_and_parting_is_one_event():
    # Mirror-image discs approach the centre, touch at frame 6 and part: a collision.
    gaps = [6 + 4 * abs(6 - k) for k in range(16)]
    frames = _render([[(32, 32 - g), (32, 32 + g)] for g in gaps])
    assert detect_video_events(frames, FPS).tolist() == [6 / FPS]


@pytest.mark.parametrize("kind", ["blank", "static"])
def test_blank_and_still_clips_have_no_objects_or_events(kind):
    if kind == "blank":
        frames = torch.full((16, 3, SIZE, SIZE), -1.0)
    else:
        frames = _render([[(30, 30)]] * 16)
    analysis = analyse_motion(frames, FPS)
    assert analysis.object_frames == 0.0 and analysis.travel == 0.0
    assert detect_video_events(frames, FPS).size == 0


def test_frames_must_be_t3hw():
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        detect_video_events(torch.zeros(16, SIZE, SIZE, 3), FPS)
