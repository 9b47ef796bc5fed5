import numpy as np
import pytest

from jointdit.evaluate.distances import frechet_distance, kernel_distance


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # For diagonal covariances FD = Σ (μa − μb)² + Σ (σa − σb)², computed here from the sample moments.
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 1.0], [1.0, 2.0], size=(4000, 2))
    b = rng.normal([0.5, -1.0], [3.0, 0.5], size=(4000, 2))
    # Decorrelate exactly so the closed form holds for the sample covariances too.
    a = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T * a.std(0, ddof=1) + a.mean(0)
    b = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T * b.std(0, ddof=1) + b.mean(0)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0, ddof=1) - b.std(0, ddof=1)) ** 2).sum()
    assert frechet_distance(a, b, standardise=False) == pytest.approx(expected, rel=1e-6)


def test_identical_sets_are_at_frechet_distance_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 5))
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-6)


def test_kid_grows_with_a_mean_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(64, 6)), rng.normal(size=(64, 6))
    near, far = kernel_distance(a, b, standardise=False), kernel_distance(a, b + 2.0, standardise=False)
    assert abs(near) < 0.1 < far


def test_too_few_clips_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


@pytest.mark.parametrize("n", [6, 300])  # fewer clips than features (nuclear-norm path) and more (eigen path)
def test_frechet_distance_agrees_with_the_matrix_square_root_formula(n):
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(n, 10)) @ rng.normal(size=(10, 10)), rng.normal(1.0, 2.0, size=(n + 3, 10))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(np.real(linalg.sqrtm(cov_a @ cov_b))))
    assert frechet_distance(a, b, standardise=False) == pytest.approx(expected, rel=1e-5, abs=1e-6)
