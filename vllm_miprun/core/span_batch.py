"""Batched span statistics: every (i, j) span from one set of per-state matrices, on the
states' own device (pure maths; the calibration device keeps the states, issue 14).

Each function matches its one-pair reference in :mod:`vllm_miprun.core.mi` or
:mod:`vllm_miprun.core.scoring` up to float64 round-off (``tests/test_scale.py`` checks
them against the values recorded from the per-pair CPU code). The work per state
(centring, PCA, Gram matrix, entropy) is done once, and the pairs of one row ``i`` run
as one batched product or eigen-solve; states are processed in chunks so that device
memory stays at a few states' worth of ``N x N`` or ``N x d`` float64 matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# States per batched eigen-solve / product: bounds the float64 work memory to
# CHUNK * max(N, d)^2 * 8 bytes (about 0.5 GB at N = 2048).
CHUNK = 8
# Token rows per step of the skip-channel Gram accumulation.
ROW_CHUNK = 512


def _chunks(count: int, size: int = CHUNK):
    for start in range(0, count, size):
        yield start, min(start + size, count)


def pca_project_many(states: Sequence[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Each state centred and projected on its own top ``dim`` principal components, float64.

    The same subspace as :func:`vllm_miprun.core.mi.pca_project` (whose eigenvectors of
    ``X^T X`` give ``X V``); when there are fewer rows ``N`` than dimensions ``d`` it is
    read off the ``N x N`` Gram matrix instead, ``X V = U S`` from ``X X^T = U S^2 U^T``,
    which is ``(d/N)^3`` times cheaper. Components may differ in sign from the reference,
    which no Gaussian MI can see (a sign flip is an orthogonal map).
    """
    rows, width = states[0].shape
    dim = int(min(dim, rows, width))
    if dim < 1:
        raise ValueError("dim must be >= 1")
    out: list[torch.Tensor] = []
    for start, stop in _chunks(len(states)):
        x = torch.stack([s.to(torch.float64) for s in states[start:stop]])
        x = x - x.mean(dim=1, keepdim=True)
        if rows < width:
            values, vectors = torch.linalg.eigh(x @ x.transpose(1, 2))
            top = vectors[..., -dim:].flip(-1) * values[..., -dim:].flip(-1).clamp_min(0.0).sqrt()[:, None, :]
        else:
            _, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)
            top = x @ vectors[..., -dim:].flip(-1)
        out.extend(top.unbind(0))
    return out


def _renyi_entropies(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_alpha`` of each trace-1 PSD matrix of a batch ``[k, N, N]`` (nats)."""
    lam = torch.linalg.eigvalsh(a).clamp_min(0.0)
    lam = lam / lam.sum(dim=-1, keepdim=True)
    if abs(alpha - 1.0) < 1e-12:
        return -torch.where(lam > 0, lam * torch.log(lam), torch.zeros_like(lam)).sum(-1)
    return torch.log((lam ** alpha).sum(-1)) / (1.0 - alpha)


def _grams(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Trace-normalised Gaussian-kernel Gram matrices ``[m, N, N]`` with each state's own
    median-distance width (``vllm_miprun.core.mi._gram`` with ``sigma=None``)."""
    grams = []
    for state in states:
        x = state.to(torch.float64)
        sq = (x * x).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
        d2.fill_diagonal_(0.0)
        n = d2.shape[0]
        upper = torch.triu_indices(n, n, offset=1, device=d2.device)
        median = float(torch.sqrt(d2[upper[0], upper[1]]).median())
        sigma = median if median > 0.0 else 1.0
        k = torch.exp(-d2 / (2.0 * sigma * sigma))  # unit diagonal: already normalised
        grams.append(k / torch.trace(k))
    return torch.stack(grams)


def renyi_mi_matrix(states: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``(L+1)x(L+1)`` matrix-based Renyi MI ``S(A_i) + S(A_j) - S(A_i o A_j)``, NaN for i >= j.

    One Gram matrix and one entropy per state; the joint entropies of row ``i`` are one
    batched eigen-solve over the Hadamard products with every later state.
    """
    grams = _grams(states)
    entropy = _renyi_entropies(grams, alpha)
    size = len(states)
    out = torch.full((size, size), float("nan"), dtype=torch.float64, device=grams.device)
    for i in range(size - 1):
        for start, stop in _chunks(size - i - 1):
            joint = grams[i] * grams[i + 1 + start:i + 1 + stop]
            joint = joint / joint.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
            columns = slice(i + 1 + start, i + 1 + stop)
            out[i, columns] = entropy[i] + entropy[columns] - _renyi_entropies(joint, alpha)
    return out


def skip_channel_moments(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signal [m], noise [m, m])`` of the isotropic skip channel, float64.

    ``signal[k] = tr Cov(g_k)`` (unbiased) and ``noise[i, j] = E||g_j - g_i||^2`` with
    ``g = rms_normalise(h)``, accumulated over chunks of token rows so that no
    ``[m, N, d]`` float64 stack is ever held.
    """
    size = len(states)
    count, width = states[0].shape
    device = states[0].device
    gram = torch.zeros(size, size, dtype=torch.float64, device=device)
    sums = torch.zeros(size, width, dtype=torch.float64, device=device)
    for start in range(0, count, ROW_CHUNK):
        g = torch.stack([s[start:start + ROW_CHUNK].to(torch.float64) for s in states])
        g = g / g.pow(2).mean(dim=2, keepdim=True).clamp_min(1e-30).sqrt()
        flat = g.reshape(size, -1)
        gram += flat @ flat.T
        sums += g.sum(dim=1)
    squares = gram.diagonal()
    signal = (squares - sums.pow(2).sum(dim=1) / count) / (count - 1)
    noise = (squares[:, None] + squares[None, :] - 2.0 * gram) / count
    return signal, noise
