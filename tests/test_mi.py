"""Tests for vllm_miprun.core.mi on jointly Gaussian data with closed-form MI (all seeded)."""

import math

import pytest
import torch

from vllm_miprun.core import mi as M


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(n, d, true_mi, seed):
    """x ~ N(0, I_d), y = rho*x + sqrt(1-rho^2)*e, with the total MI split evenly over the d dims.

    Closed form: I = -(d/2) * log(1 - rho^2).
    """
    g = _gen(seed)
    rho = math.sqrt(1.0 - math.exp(-2.0 * true_mi / d))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, rho * x + math.sqrt(1.0 - rho * rho) * e


def _well_conditioned(d, seed):
    # Q * diag(s) * Q' with singular values in [0.5, 2]: invertible and well conditioned.
    g = _gen(seed)
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = 0.5 + 1.5 * torch.rand(d, generator=g, dtype=torch.float64)
    return q1 @ torch.diag(s) @ q2


# ---------------------------------------------------------------- gaussian_mi


@pytest.mark.parametrize("true_mi", [0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("d", [1, 4])
def test_gaussian_mi_matches_closed_form(true_mi, d):
    # With N = 20000 and d <= 4, the finite-sample bias is about d^2/(2N) nats and the
    # noise is below 1% of the true value, so 5% is a real check.
    x, y = _pair(20000, d, true_mi, seed=int(10 * true_mi) + d)
    est = M.gaussian_mi(x, y, shrinkage=1e-6)
    assert est == pytest.approx(true_mi, rel=0.05)


def test_gaussian_mi_independent_is_zero():
    # For independent Gaussians, 2N*I is asymptotically chi^2 with dx*dy degrees of
    # freedom, so E[I] ~ dx*dy/(2N) = 64/(2*20000) = 0.0016 nats. 0.02 nats is more than
    # 10x that, and a wrong shrinkage target (a global one) or a missing term fails it.
    g = _gen(0)
    x = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 8, generator=g, dtype=torch.float64) * 5.0 + 3.0
    assert 0.0 <= M.gaussian_mi(x, y) < 0.02
    # Shrinkage keeps the independent case at ~0 even when the shrinkage is large, because
    # each block is shrunk toward its own target.
    assert M.gaussian_mi(x, y, shrinkage=0.5) < 0.02


def test_gaussian_mi_invariant_under_linear_maps():
    x, y = _pair(4000, 6, 2.0, seed=3)
    a, b = _well_conditioned(6, 11), _well_conditioned(6, 12)
    base = M.gaussian_mi(x, y, shrinkage=1e-6)
    mapped = M.gaussian_mi(x @ a, y @ b + 7.0, shrinkage=1e-6)
    assert mapped == pytest.approx(base, rel=1e-3)
    # The estimate must move with the data: an unrelated y gives a clearly different value.
    assert abs(M.gaussian_mi(x, y.flip(0), shrinkage=1e-6) - base) > 1.0


def test_gaussian_mi_accepts_1d_and_float32():
    x, y = _pair(5000, 1, 1.0, seed=5)
    a = M.gaussian_mi(x[:, 0].float(), y[:, 0].float())
    b = M.gaussian_mi(x, y)
    assert isinstance(a, float) and a == pytest.approx(b, rel=1e-4)


def test_gaussian_mi_needs_shrinkage_when_rank_deficient():
    # N < d: the sample covariance is singular. Shrinkage makes it finite.
    g = _gen(1)
    x = torch.randn(20, 50, generator=g, dtype=torch.float64)
    assert math.isfinite(M.gaussian_mi(x, x + 0.1 * torch.randn(20, 50, generator=g, dtype=torch.float64)))


# ---------------------------------------------------------------- gaussian_skip_mi


@pytest.mark.parametrize("sigma_e", [0.3, 1.0, 3.0])
def test_skip_mi_tight_for_additive_noise(sigma_e):
    # y = x + e with e independent of x: h(y|x) = h(e) = h(y - x), so the bound is tight.
    # Closed form per dim: 0.5*log(1 + 1/sigma_e^2).
    d, n = 4, 20000
    g = _gen(int(10 * sigma_e))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + sigma_e * torch.randn(n, d, generator=g, dtype=torch.float64)
    true = 0.5 * d * math.log(1 + 1 / sigma_e**2)
    skip = M.gaussian_skip_mi(x, y, shrinkage=1e-6)
    full = M.gaussian_mi(x, y, shrinkage=1e-6)
    assert skip == pytest.approx(true, rel=0.05)
    assert skip == pytest.approx(full, rel=0.02)


def test_skip_mi_below_gaussian_mi_when_not_identity():
    # y = 2x + e: same MI as x vs y/2, but the identity decoder leaves y - x = x + e.
    d, n = 4, 20000
    g = _gen(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 2 * x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    full = M.gaussian_mi(x, y)
    skip = M.gaussian_skip_mi(x, y)
    # closed form: I = 0.5*d*log(1 + 4/0.25); bound = 0.5*d*log(4.25/1.25)
    assert full == pytest.approx(0.5 * d * math.log(17.0), rel=0.05)
    assert skip == pytest.approx(0.5 * d * math.log(4.25 / 1.25), rel=0.05)
    assert skip < full - 1.0


def test_skip_mi_clamped_at_zero():
    # y = -x + e: y - x = -2x + e has a larger variance than y, so the raw bound is negative.
    g = _gen(8)
    x = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    y = -x + 0.5 * torch.randn(5000, 3, generator=g, dtype=torch.float64)
    assert M.gaussian_skip_mi(x, y) == 0.0
    assert M.gaussian_mi(x, y) > 1.0
    with pytest.raises(ValueError):
        M.gaussian_skip_mi(x, y[:, :2])


# ---------------------------------------------------------------- gaussian_mi_matrix


def _chain(n, d, length, seed):
    # A residual chain of nonlinear "blocks", like hidden states at block boundaries.
    g = _gen(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = [h]
    for _ in range(length):
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        h = h + 0.5 * torch.tanh(h @ w) + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
        out.append(h.float())  # float32 input, as produced by a model
    return out


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("shrinkage", [1e-3, 0.1])
def test_mi_matrix_matches_pairwise(skip, shrinkage):
    states = _chain(600, 24, 6, seed=21)
    mat = M.gaussian_mi_matrix(states, shrinkage=shrinkage, skip=skip)
    fn = M.gaussian_skip_mi if skip else M.gaussian_mi
    assert mat.shape == (7, 7) and mat.dtype == torch.float64
    for i in range(7):
        for j in range(7):
            if i < j:
                ref = fn(states[i], states[j], shrinkage=shrinkage)
                assert mat[i, j].item() == pytest.approx(ref, rel=1e-6, abs=1e-9)
            else:
                assert math.isnan(mat[i, j].item())
    # The chain is informative: the MI of adjacent states is well above 0.
    assert mat[0, 1] > 1.0


def test_mi_matrix_rank_deficient():
    # N < d: shrinkage must still give finite values that agree with the pairwise function.
    states = _chain(30, 40, 3, seed=4)
    mat = M.gaussian_mi_matrix(states, shrinkage=1e-2)
    assert mat[0, 3].item() == pytest.approx(M.gaussian_mi(states[0], states[3], 1e-2), rel=1e-6)


# ---------------------------------------------------------------- renyi_mi


def _mehler_entropy(var, sigma, alpha):
    # The Gaussian kernel exp(-(x-x')^2/(2 sigma^2)) on N(0, var) has a geometric spectrum
    # (1-q) q^k (Rasmussen & Williams, sec. 4.3.1). This gives its population Renyi entropy.
    a, b = 1 / (4 * var), 1 / (2 * sigma**2)
    q = b / (a + b + math.sqrt(a * a + 2 * a * b))
    return math.log((1 - q) ** alpha / (1 - q**alpha)) / (1 - alpha)


def _renyi_population(true_mi, sigma, alpha):
    # 1-D unit-variance pair with correlation rho and equal widths: the joint kernel is
    # isotropic, so in the principal axes (variances 1 +- rho) it factorises.
    rho = math.sqrt(1 - math.exp(-2 * true_mi))
    h = lambda v: _mehler_entropy(v, sigma, alpha)  # noqa: E731
    return 2 * h(1.0) - h(1 + rho) - h(1 - rho)


@pytest.mark.parametrize("true_mi", [0.5, 2.0, 5.0])
def test_renyi_mi_matches_population_value(true_mi):
    # With a fixed width, the matrix estimator converges to the Renyi MI of the
    # kernel-smoothed Gaussian, which has a closed form (sampling noise at N=512: a few %). This checks the
    # normalisation, the Hadamard joint and the natural log. A log2 would be 44% off.
    x, y = _pair(512, 1, true_mi, seed=31)
    est = M.renyi_mi(x, y, alpha=1.01, sigma=1.0)
    assert est == pytest.approx(_renyi_population(true_mi, 1.0, 1.01), rel=0.1)


def test_renyi_mi_independent_near_zero():
    # The finite-sample bias under independence was measured at about 0.01 to 0.03 nats
    # (1-D, N=512 to 768, median width). The MI at 0.5 nats true is above 0.3, so 0.06
    # separates "independent" from "dependent" clearly.
    g = _gen(41)
    x = torch.randn(512, 1, generator=g, dtype=torch.float64)
    y = torch.randn(512, 1, generator=g, dtype=torch.float64)
    assert 0.0 <= M.renyi_mi(x, y) < 0.06


def test_renyi_mi_monotone_and_bounded():
    # Shared x and e (common random numbers), so only rho changes between the estimates.
    g = _gen(42)
    x = torch.randn(384, 1, generator=g, dtype=torch.float64)
    e = torch.randn(384, 1, generator=g, dtype=torch.float64)
    vals = []
    for true_mi in [0.1, 0.5, 1.0, 2.0, 5.0]:
        rho = math.sqrt(1 - math.exp(-2 * true_mi))
        y = rho * x + math.sqrt(1 - rho * rho) * e
        v = M.renyi_mi(x, y)
        a = M._gram(x, None)
        b = M._gram(y, None)
        bound = min(M.renyi_entropy(a), M.renyi_entropy(b))
        assert 0.0 <= v <= bound + 1e-9
        vals.append(v)
    assert all(b > a for a, b in zip(vals, vals[1:])), vals


def test_renyi_entropy_limits():
    # A = I/N has maximal entropy log N for every alpha. A rank-1 A has entropy 0.
    n = 64
    eye = torch.eye(n, dtype=torch.float64) / n
    for alpha in [0.5, 1.0, 1.01, 2.0]:
        assert M.renyi_entropy(eye, alpha) == pytest.approx(math.log(n), rel=1e-9)
    ones = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    assert M.renyi_entropy(ones, 1.01) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- helpers


def test_pca_project_and_subsample():
    g = _gen(51)
    z = torch.randn(500, 3, generator=g, dtype=torch.float64)
    x = z @ torch.randn(3, 20, generator=g, dtype=torch.float64) + 0.1 * torch.randn(500, 20, generator=g, dtype=torch.float64)
    p = M.pca_project(x, 3)
    assert p.shape == (500, 3)
    assert p.mean(0).abs().max() < 1e-10
    # The top 3 components keep almost all of the variance of rank-3 data.
    xc = x - x.mean(0)
    assert p.pow(2).sum() / xc.pow(2).sum() > 0.99
    # Gaussian MI is basis-free, so the projection keeps the MI with the latent.
    assert M.gaussian_mi(p, z, 1e-6) == pytest.approx(M.gaussian_mi(x, z, 1e-6), rel=0.05)

    s1 = M.subsample_rows(x, 100, seed=3)
    s2 = M.subsample_rows(x, 100, seed=3)
    s3 = M.subsample_rows(x, 100, seed=4)
    assert s1.shape == (100, 20) and torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert M.subsample_rows(x, 1000, seed=0) is x


def test_normalized_mi():
    assert M.normalized_mi(1.0, 2.0, 2.0) == pytest.approx(0.5)
    assert M.normalized_mi(1.0, 0.0, 2.0) == 0.0



@pytest.mark.parametrize("shrinkage", [1.0, -0.1, 1.5])
def test_gaussian_mi_refuses_a_shrinkage_outside_zero_to_one(shrinkage):
    x, y = _pair(200, 4, 0.5, 0)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        M.gaussian_mi(x, y, shrinkage=shrinkage)


def test_renyi_mi_gives_y_the_width_of_x_unless_told():
    """``sigma_y`` defaults to ``sigma``, not to y's own width (y is scaled so the two differ)."""
    x, y = _pair(200, 4, 0.5, 1)
    y = 5.0 * y
    assert M.renyi_mi(x, y, sigma=0.7) == M.renyi_mi(x, y, sigma=0.7, sigma_y=0.7)
