import math

import numpy as np
import pytest

from jointdit.evaluate.matching import accuracy, iou, match_events


def test_maximum_matching_beats_greedy_nearest():
    # Greedy nearest-first would pair 0.10 with 0.05 (distance 0.05) and leave 0.00 unmatched;
    # the maximum one-to-one matching within 0.1 pairs 0.00-0.05 and 0.10-0.18: two pairs.
    match = match_events([0.0, 0.10], [0.05, 0.18], tolerance=0.1)
    assert sorted(match.pairs) == [(0, 0), (1, 1)]
    assert match.iou == pytest.approx(1.0)


def test_one_to_one_and_iou_by_hand():
    # Two audio onsets near one video event: only one may match. A = {1.0, 1.05, 3.0}, V = {1.02, 2.0}.
    match = match_events([1.0, 1.05, 3.0], [1.02, 2.0], tolerance=0.125)
    assert match.matched == 1
    assert match.iou == pytest.approx(1 / (3 + 2 - 1))
    # Among the two possible single matches the closer one (1.0 → 1.02 is 0.02, 1.05 → 1.02 is 0.03) is kept.
    assert match.pairs == [(0, 0)]
    assert match.offsets[0] == pytest.approx(0.02)


def test_tolerance_is_inclusive_at_exactly_one_frame():
    assert iou([0.5], [0.625], tolerance=1 / 8) == 1.0
    assert iou([0.5], [0.6251], tolerance=1 / 8) == 0.0


def test_empty_sets():
    assert iou([], [], 0.1) == 0.0
    assert iou([1.0], [], 0.1) == 0.0
    acc = accuracy([], [1.0, 2.0], 0.1)
    assert (acc.precision, acc.recall, acc.f1) == (0.0, 0.0, 0.0) and math.isnan(acc.offset_ms)


def test_accuracy_figures_by_hand():
    # ref = {1, 2, 3}; pred = {1.05, 2.9, 5}: two matches (+50 ms, −100 ms), one false positive, one miss.
    acc = accuracy([1.05, 2.9, 5.0], [1.0, 2.0, 3.0], tolerance=0.125)
    assert (acc.matched, acc.num_pred, acc.num_ref) == (2, 3, 3)
    assert acc.precision == pytest.approx(2 / 3) and acc.recall == pytest.approx(2 / 3)
    assert acc.f1 == pytest.approx(2 / 3)
    assert acc.offset_ms == pytest.approx(-25.0) and acc.abs_offset_ms == pytest.approx(75.0)


def test_matching_is_symmetric_in_count():
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.uniform(0, 2, 7)), np.sort(rng.uniform(0, 2, 5))
    assert match_events(a, b, 0.125).matched == match_events(b, a, 0.125).matched
