"""Issue 14: span statistics on the calibration device agree with the recorded per-pair CPU
values, and the same plans come out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cross_cpu import FLOAT32_STATS_RTOL, assert_stats_close
from span_fixture import CASES, REFERENCE, build_models, compute_case, model_for
from vllm_miprun.core import mi, scoring, span_batch


def _matrix(values) -> np.ndarray:
    """A recorded vector or matrix; None (JSON's NaN) becomes NaN."""
    return np.array(values, dtype=float)


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("span-ref"))


STATISTICS = ("span_scores", "skip_mi_iso", "angular", "block_influence")


@pytest.mark.parametrize("case", sorted(CASES))
def test_span_statistics_match_the_recorded_cpu_values(case, fixture_models, tmp_path):
    """Recorded on another CPU: the plans exactly, the statistics to float32's cross-CPU tolerance."""
    reference = json.loads(REFERENCE.read_text())[case]
    now = compute_case(case, model_for(case, fixture_models), tmp_path)
    for key in STATISTICS:
        assert_stats_close(_matrix(now[key]), _matrix(reference[key]), f"{case}: {key}")
    assert now["plans"] == reference["plans"]


def test_cross_cpu_tolerance_still_catches_one_more_calibration_sample(fixture_models, tmp_path, monkeypatch):
    """The tolerance above is loose enough for another CPU, not for a real change: one more
    calibration sample moves every statistic past it."""
    model_kwargs, settings = CASES["d128_n62"]
    monkeypatch.setitem(CASES, "one_more_sample", (model_kwargs, {**settings, "samples": settings["samples"] + 1}))
    changed = compute_case("one_more_sample", model_for("one_more_sample", fixture_models), tmp_path)
    reference = json.loads(REFERENCE.read_text())["d128_n62"]
    for key in STATISTICS:
        got, expected = _matrix(changed[key]), _matrix(reference[key])
        defined = ~np.isnan(expected)
        relative = np.abs(got[defined] - expected[defined]) / np.abs(expected[defined])
        assert relative.max() > 10 * FLOAT32_STATS_RTOL, key


def _states(count=5, rows=40, width=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, width, generator=generator)
    states = [base]
    for _ in range(count - 1):
        states.append(states[-1] + 0.5 * torch.randn(rows, width, generator=generator))
    return states


@pytest.mark.parametrize("rows, width", [(40, 24), (24, 40)])
def test_batched_pca_spans_the_reference_subspace(rows, width):
    states = _states(rows=rows, width=width)
    for state, projected in zip(states, span_batch.pca_project_many(states, 6)):
        reference = mi.pca_project(state, 6)
        # same columns up to sign: compare the projections' absolute values
        torch.testing.assert_close(projected.abs(), reference.abs(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("alpha, constant", [(1.01, False), (1.0, False), (1.01, True)])
def test_batched_renyi_matches_the_per_pair_estimator(alpha, constant):
    """alpha = 1 is the von Neumann limit; a state whose rows are all equal (median distance 0)
    gets the per-pair code's kernel width 1 and shares no information."""
    states = _states(count=4, rows=30, width=6)
    if constant:
        states[1] = torch.ones_like(states[1])
    matrix = span_batch.renyi_mi_matrix(states, alpha=alpha)
    for i in range(4):
        for j in range(i + 1, 4):
            reference = mi.renyi_mi(states[i], states[j], alpha=alpha)
            assert float(matrix[i, j]) == pytest.approx(reference, rel=1e-9, abs=1e-9)
            assert abs(reference) > 0.1 or (constant and 1 in (i, j))
    assert torch.isnan(matrix[2, 1]) and torch.isnan(matrix[1, 1])


def test_more_states_than_one_batched_chunk_match_the_per_pair_code():
    """11 states: PCA in chunks of 8 and 3 states, row 0's 10 Renyi pairs in chunks of 8 and 2."""
    states = _states(count=span_batch.CHUNK + 3, rows=20, width=6)
    assert len(states) > span_batch.CHUNK + 1
    for state, projected in zip(states, span_batch.pca_project_many(states, 3), strict=True):
        torch.testing.assert_close(projected.abs(), mi.pca_project(state, 3).abs(), rtol=1e-6, atol=1e-8)
    matrix = span_batch.renyi_mi_matrix(states, alpha=1.01)
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            assert float(matrix[i, j]) == pytest.approx(mi.renyi_mi(states[i], states[j], alpha=1.01), rel=1e-9)


def test_an_unknown_estimator_is_refused_naming_it():
    with pytest.raises(ValueError, match="estimator must be gaussian or renyi, got 'knn'"):
        scoring.span_mi_matrix(_states(count=3), "knn", scoring.estimator_params("gaussian"))


def test_skip_moments_accumulated_over_row_chunks_match_one_pass(monkeypatch):
    states = _states(count=4, rows=50, width=8)
    one_pass = scoring.isotropic_skip_mi_matrix(states)
    monkeypatch.setattr(span_batch, "ROW_CHUNK", 7)  # 50 rows in 8 uneven chunks
    np.testing.assert_allclose(scoring.isotropic_skip_mi_matrix(states), one_pass, rtol=1e-12, equal_nan=True)
    g = [scoring.rms_normalise(s) for s in states]
    expected = 0.5 * 8 * np.log(float(g[3].var(dim=0).sum()) / float((g[3] - g[1]).pow(2).sum(1).mean()))
    assert one_pass[1, 3] == pytest.approx(expected, rel=1e-12)
