"""One-to-one matching of two sets of event times within a tolerance, and the figures built on it.

A pair (a, b) may match when |a − b| ≤ tolerance. Among all one-to-one matchings the one with the
most pairs is kept, and among those the one with the smallest total |a − b| (an assignment problem,
solved with ``scipy.optimize.linear_sum_assignment``). With m matched pairs out of |A| and |B| times:

    IoU       = m / (|A| + |B| − m)          (0 when both are empty: nothing to be in sync)
    precision = m / |pred|,  recall = m / |ref|,  F1 = 2·m / (|pred| + |ref|)
    offset    = mean over the pairs of (pred − ref), in ms; abs_offset the mean of |pred − ref|
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-9  # timestamps exactly one tolerance apart still match


@dataclass(frozen=True)
class Match:
    pairs: list[tuple[int, int]]   # (index into a, index into b)
    offsets: np.ndarray            # [m] b[j] − a[i] for the pairs, seconds
    num_a: int
    num_b: int

    @property
    def matched(self) -> int:
        return len(self.pairs)

    @property
    def iou(self) -> float:
        union = self.num_a + self.num_b - self.matched
        return self.matched / union if union > 0 else 0.0


def match_events(a: np.ndarray | list[float], b: np.ndarray | list[float], tolerance: float) -> Match:
    """Maximum one-to-one matching of times ``a`` and ``b`` within ``tolerance`` (seconds).

    ``offsets`` are ``b[j] − a[i]`` for the matched pairs, in seconds.
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        return Match([], np.zeros(0), int(a.size), int(b.size))
    distance = np.abs(a[:, None] - b[None, :])  # [|A|, |B|]
    allowed = distance <= tolerance + _EPS
    # Each allowed pair earns a large bonus, so the count is maximised first, then the total distance minimised.
    bonus = 1.0 + float(distance[allowed].sum()) if allowed.any() else 1.0
    cost = np.where(allowed, distance - bonus, 0.0)
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols) if allowed[i, j]]
    offsets = np.array([b[j] - a[i] for i, j in pairs], dtype=np.float64)
    return Match(pairs, offsets, int(a.size), int(b.size))


def iou(a: np.ndarray | list[float], b: np.ndarray | list[float], tolerance: float) -> float:
    """IoU of the maximum one-to-one matching (see the module docstring)."""
    return match_events(a, b, tolerance).iou


@dataclass(frozen=True)
class Accuracy:
    precision: float
    recall: float
    f1: float
    offset_ms: float       # mean signed offset pred − ref over matched pairs (nan when none)
    abs_offset_ms: float   # mean |pred − ref| (nan when none)
    matched: int
    num_pred: int
    num_ref: int

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def accuracy(pred: np.ndarray | list[float], ref: np.ndarray | list[float], tolerance: float) -> Accuracy:
    """Precision, recall, F1 and offsets of predicted event times against reference times."""
    match = match_events(ref, pred, tolerance)
    return accuracy_from_counts(match.matched, match.num_b, match.num_a, match.offsets)


def accuracy_from_counts(matched: int, num_pred: int, num_ref: int, offsets: np.ndarray) -> Accuracy:
    """The same figures pooled over many clips: sums of counts and all the pairs' offsets (seconds)."""
    precision = matched / num_pred if num_pred else 0.0
    recall = matched / num_ref if num_ref else 0.0
    f1 = 2 * matched / (num_pred + num_ref) if num_pred + num_ref else 0.0
    offsets = np.asarray(offsets, dtype=np.float64)
    offset = float(offsets.mean() * 1000) if offsets.size else float("nan")
    abs_offset = float(np.abs(offsets).mean() * 1000) if offsets.size else float("nan")
    return Accuracy(precision, recall, f1, offset, abs_offset, matched, num_pred, num_ref)
