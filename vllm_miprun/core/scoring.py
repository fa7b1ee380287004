"""Block and span scores from the hidden states at the L+1 block boundaries (pure maths).

``span_mi[i][j] = I(h_i; h_j)`` for ``i < j`` scores pruning the run of blocks ``[i, j)``:
if the state entering the run already carries most of what leaves it, the run adds
little. ``block_scores[b] = span_mi[b][b+1]``. The baselines' scores come from the same
states: ShortGPT's block influence ``1 - mean cos(h_b, h_{b+1})`` over every calibration
token, and Gromov et al.'s angular distance ``arccos(cos(h_i, h_j)) / pi`` on each
sequence's last token, averaged over sequences.

Tokens are treated as independent samples; attention mixes positions, so the chain is
Markov per sequence rather than per token and the per-token MI is an approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vllm_miprun.core import mi, span_batch

# mi_tokens rows are kept per boundary (the skip-channel statistics use all of them);
# the Gaussian span MI uses every other row: N = 2048 is still 8x the joint PCA dimension.
GAUSSIAN_DEFAULTS = {"shrinkage": 1e-3, "pca_dim": 128, "mi_tokens": 4096, "gaussian_row_stride": 2}
RENYI_DEFAULTS = {"alpha": 1.01, "sigma": "median", "mi_tokens": 512}


def estimator_params(estimator: str) -> dict:
    return dict(GAUSSIAN_DEFAULTS if estimator == "gaussian" else RENYI_DEFAULTS)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, rows: int = 256) -> float:
    """Mean cosine similarity of matching rows (tokens) of ``a`` and ``b`` [N, d], in float64.

    Converted ``rows`` rows at a time: the float64 copies of a chunk stay in the CPU's cache,
    where copies of the whole [8192, 576] pair did not (calibration spent 16% of its time
    here). Each row's cosine is computed alone, so the chunking changes no value."""
    per_row = [torch.nn.functional.cosine_similarity(a[start:start + rows].double(), b[start:start + rows].double(),
                                                     dim=-1)
               for start in range(0, a.shape[0], rows)]
    return float(torch.cat(per_row).mean())


def angular_matrix(last_tokens: Sequence[torch.Tensor]) -> np.ndarray:
    """(L+1)x(L+1) mean angular distance between boundary states on the last token."""
    size = len(last_tokens)
    unit = torch.stack([torch.nn.functional.normalize(t.double(), dim=-1) for t in last_tokens])
    cos = torch.einsum("isd,jsd->ijs", unit, unit).clamp(-1.0, 1.0)
    angle = (torch.arccos(cos) / math.pi).mean(dim=-1).cpu().numpy()
    return _upper(angle, size)


@torch.no_grad()
def span_mi_matrix(states: Sequence[torch.Tensor], estimator: str, params: dict) -> np.ndarray:
    """(L+1)x(L+1) matrix of ``I(h_i; h_j)`` for ``i < j``, NaN elsewhere, in nats.

    Computed in float64 on the states' device, every span from one set of per-state
    matrices (:mod:`vllm_miprun.core.span_batch`); only the small result comes back.
    """
    if estimator == "gaussian":
        stride = params.get("gaussian_row_stride", 1)
        projected = _shared_pca([state[::stride] for state in states], params["pca_dim"])
        matrix = mi.gaussian_mi_matrix(projected, shrinkage=params["shrinkage"]).cpu().numpy()
        return _upper(matrix, len(states))
    if estimator == "renyi":
        return _upper(span_batch.renyi_mi_matrix(states, params["alpha"]).cpu().numpy(), len(states))
    raise ValueError(f"estimator must be gaussian or renyi, got {estimator!r}")


def _shared_pca(states: Sequence[torch.Tensor], dim: int | None) -> list[torch.Tensor]:
    """Project each state on its own top principal components (MI is invariant to this map
    when no information is cut, and it keeps N well above the joint dimension)."""
    if not dim or dim >= states[0].shape[1]:
        return list(states)
    return span_batch.pca_project_many(states, dim)


def _upper(matrix: np.ndarray, size: int) -> np.ndarray:
    out = np.full((size, size), np.nan)
    rows, cols = np.triu_indices(size, k=1)
    out[rows, cols] = matrix[rows, cols]
    return out


# --------------------------------------------------------------------------- skip-channel MI
# (research issue: the span statistics behind ``vllm_miprun.core.span_cost.span_cost_matrix``)


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-token RMS normalisation ``x / sqrt(mean(x^2))``: what the next block's input
    norm sees (before its learned gain)."""
    x = x.double()
    return x / x.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-30).sqrt()


@torch.no_grad()
def isotropic_skip_mi_matrix(states: Sequence[torch.Tensor]) -> np.ndarray:
    """(L+1)x(L+1) isotropic skip-channel MI ``I_skip(h_i; h_j)``, nats, NaN for ``i >= j``.

    Model pruning the run ``[i, j)`` as the channel ``g_j = g_i + n`` that the residual
    skip path leaves, with ``g = rms_normalise(h)`` and isotropic Gaussian signal and
    noise. Its MI is ``(d/2) * log(tr Cov(g_j) / E||g_j - g_i||^2)``: the information
    about the state the next block expects that survives when the run is replaced by the
    identity. Per dimension it is ``0.5 * log`` of the skip channel's SNR. Unlike the
    plain ``I(h_i; h_j)`` it is NOT invariant to invertible maps, which is the point: an
    invertible but essential run keeps ``I(h_i; h_j)`` high while destroying the skip
    channel. Cost: O(L^2 N d).
    """
    size, d = len(states), states[0].shape[1]
    signal, noise = span_batch.skip_channel_moments(states)
    value = 0.5 * d * torch.log(signal[None, :] / noise.clamp_min(1e-30))
    return _upper(value.cpu().numpy(), size)


def extra_span_scores(states: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """Extra span statistics for the score cache, from the same ``[N, d]`` boundary-state
    rows as the span MI (``collect_boundary_stats(...).mi_states``).

    Returns ``{"skip_mi_iso": (L+1)x(L+1) array}`` (see :func:`isotropic_skip_mi_matrix`);
    store it with :func:`vllm_miprun.core.matrices.to_nested_list` as ``cache.baselines["skip_mi_iso"]``.
    ``vllm_miprun.core.span_cost.span_cost_matrix`` reads it from there.
    """
    return {"skip_mi_iso": isotropic_skip_mi_matrix(states)}
