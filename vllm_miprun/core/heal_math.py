"""Healing maths: a linear map per pruned run, folded into the block before it (pure torch).

Algebra (Llama-style pre-norm block ``b``; ``h_b`` is the residual stream entering it)::

    r_b     = h_b + attn_b(norm(h_b))
    d_b     = W_down,b · act_b                 (the MLP output, ``down_proj``)
    h_{b+1} = r_b + d_b

Pruning the run ``[i, j)`` feeds ``h_i`` straight to block ``j``. A general map on the
residual stream, ``h_j ≈ A h_i``, cannot live in ``down_proj``: it would also act on
``r_{i-1}``, which no weight of block ``i−1`` produces alone. What does fold is a map ``T``
on the MLP output only::

    h_j ≈ r_{i-1} + T d_{i-1}    ⇔   (T − I) d_{i-1} ≈ h_j − h_i

and then ``T d = (T W_down) act``: the folded weight is ``T @ W_down`` (and ``T @ b`` for a
bias), same shape, no serving cost. ``T = I`` is the unhealed model. This is ReplaceMe's
form (arXiv 2505.02819). Row-parallel sharding splits ``W_down`` by input columns, and
``T`` mixes output rows, so folding before sharding equals folding each shard.

Other families add the MLP output in another form; ``d`` is then what the block adds
last (``Architecture.heal_site`` says where each family's comes from and folds):

* Gemma 2/3 and OLMo 2 add ``d = norm(mlp(·))`` (``post_feedforward_layernorm``, an RMSNorm
  with per-channel gain ``g``). A diagonal ``T = diag(t)`` folds into the gain: ``t ⊙ g``.
  Gemma stores ``w`` and applies ``g = 1 + w``, so ``w' = t ⊙ (1 + w) − 1``; OLMo 2 applies
  ``g = w``, so ``w' = t ⊙ w``. A non-diagonal map has no place there.
* Granite adds ``d = m · W_down · act`` (``residual_multiplier``, a scalar); ``T`` commutes
  with ``m``, so ``T @ W_down`` is exact when the fit's ``x`` is ``m · W_down · act``. Its
  attention multiplier only shapes ``r``, which the fit takes as it is.

A run starting at block 0 has no block before it: ``h_0`` is the token embedding, so
``h_j ≈ T h_0`` folds into the embedding rows (``E @ T.T``) when the embedding is not
tied to the LM head; a tied embedding would change the head too, so such a run is left
unhealed (see ``vllm_miprun.pipeline.heal``).

Fits (``fit_map``) minimise ``Σ_t w_t ‖T x_t − y_t‖²`` with ``x = d_{i-1}``,
``y = h_j − r_{i-1}``, in one of several forms, always shrunk towards ``T = I`` (unhealed)
by a ridge term ``λ·mean(diag XᵀWX)·‖T − I‖²``.
"""

from __future__ import annotations

import math

import torch

FORMS = ("full", "diag", "lowrank", "rotdiag")


def pruned_runs(pruned: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs ``[i, j)`` of consecutive pruned block indices, in order."""
    runs: list[tuple[int, int]] = []
    for block in sorted(set(pruned)):
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs


# Rows scaled per chunk: bounds the float64 temporary (64 Mi elements, 512 MiB) whatever the shape.
_CHUNK_ELEMENTS = 1 << 26


def diagonal_of(transform: torch.Tensor) -> torch.Tensor | None:
    """The scales of a diagonal map (a 1-D map already is one), else None."""
    if transform.dim() == 1:
        return transform
    scales = torch.diagonal(transform)
    return scales if torch.count_nonzero(transform) == torch.count_nonzero(scales) else None


def compact(transform: torch.Tensor) -> torch.Tensor:
    """A diagonal map as its ``[dim]`` scales (what the folds need), any other map as it is."""
    scales = diagonal_of(transform)
    return transform if scales is None else scales.clone()


def _scale_rows(matrix: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``diag(s) @ M`` rounded once to ``M``'s dtype, as the dense float64 product would be:
    each entry is one product, exact in float64, so no ``[d, d]`` matrix is needed."""
    out = torch.empty_like(matrix)
    step = max(1, _CHUNK_ELEMENTS // max(1, matrix[0].numel()))
    scales = scales.double()
    for row in range(0, matrix.shape[0], step):
        rows = matrix[row:row + step].double()
        out[row:row + step] = (rows * scales[row:row + step].reshape(-1, *[1] * (rows.dim() - 1))).to(matrix.dtype)
    return out


def fold_down_proj(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``T @ W_down`` in float64, returned in the weight's dtype (shape ``[hidden, inter]``).
    A diagonal ``T`` (or its ``[hidden]`` scales) scales rows: O(hidden·inter), bit-identical."""
    scales = diagonal_of(transform)
    if scales is not None:
        return _scale_rows(weight, scales)
    return (transform.double() @ weight.double()).to(weight.dtype)


def fold_bias(bias: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    scales = diagonal_of(transform)
    if scales is not None:
        return _scale_rows(bias, scales)
    return (transform.double() @ bias.double()).to(bias.dtype)


def is_diagonal(transform: torch.Tensor) -> bool:
    return diagonal_of(transform) is not None


def fold_norm_gain(weight: torch.Tensor, transform: torch.Tensor, offset: float) -> torch.Tensor:
    """An RMSNorm's stored weight ``w`` (gain ``offset + w``) after a diagonal map
    ``diag(t)`` on its output: ``w' = t·(offset + w) − offset`` in float64, rounded once."""
    scales = diagonal_of(transform)
    if scales is None:
        raise ValueError("only a diagonal map folds into a norm's gain; got a full matrix")
    gain = scales.double().reshape(weight.shape) * (offset + weight.double())
    return (gain - offset).to(weight.dtype)


def fold_channel_scale(scale: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """A per-output-channel dequantization scale ``s`` (``W = q * s``) after ``diag(t) @ W``:
    ``s * |t|``; the signs of ``t`` go into the quantized values (:func:`flip_rows`)."""
    factor = diagonal_of(transform).double().abs().reshape(scale.shape)
    return (scale.double() * factor).to(scale.dtype)


def flip_rows(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """Quantized float values (FP8) with the rows where ``diag(t)`` is negative negated: the
    sign bit flipped, which is exact in every float format."""
    negative = diagonal_of(transform) < 0
    if not bool(negative.any()):
        return weight
    bits = weight.view(torch.uint8).clone()
    bits[negative] ^= 0x80
    return bits.view(weight.dtype)


def fold_embedding(embedding: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """Rows ``e`` become ``T e``: ``E @ T.T`` (shape ``[vocab, hidden]``); a diagonal ``T``
    scales the columns."""
    scales = diagonal_of(transform)
    if scales is not None:
        return _scale_rows(embedding.T, scales).T.contiguous()
    return (embedding.double() @ transform.double().T).to(embedding.dtype)


def token_weights(targets: torch.Tensor, inputs: torch.Tensor, scheme: str = "uniform",
                  clip: float = 3.0) -> torch.Tensor:
    """Per-token fit weights.

    * ``uniform``: every token 1.
    * ``clip``: tokens whose correction ``‖y − x‖`` exceeds ``clip`` × its median are
      down-weighted to that size (Huber-like). The attention-sink token stays in the
      fit, only with less pull; dropping it breaks the model.
    * ``cosine``: ``1 / ‖y‖²``, so every token counts by its direction, the first-order
      form of a cosine objective.
    """
    if scheme == "uniform":
        return torch.ones(targets.shape[0], dtype=torch.float64)
    if scheme == "clip":
        norm = (targets - inputs).double().norm(dim=1)
        limit = clip * norm.median()
        return torch.clamp(limit / norm.clamp_min(1e-12), max=1.0) ** 2
    if scheme == "cosine":
        return 1.0 / targets.double().norm(dim=1).clamp_min(1e-12) ** 2
    raise ValueError(f"token weight scheme must be uniform, clip or cosine; got {scheme!r}")


def rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed orthogonal matrix that spreads outlier channels (LinearPatch uses a Hadamard
    matrix; 576 is no power of two, so a seeded random rotation stands in)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def fit_map(inputs: torch.Tensor, targets: torch.Tensor, *, form: str = "full", ridge: float = 0.0,
            rank: int = 16, weights: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """``T`` (``[dim, dim]``, float32) minimising ``Σ w ‖T x − y‖² + λ s ‖T − I‖²``.

    ``inputs`` x and ``targets`` y are ``[tokens, dim]``; ``s`` is the mean diagonal of
    the weighted Gram matrix, so ``ridge`` is scale-free. ``form``: ``full`` (any matrix),
    ``diag`` (one scale per channel), ``lowrank`` (``I`` plus a rank-``rank`` correction,
    reduced-rank regression), ``rotdiag`` (``Rᵀ diag(s) R``, LinearPatch-style).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    x, y = inputs.double(), targets.double()
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double()
    dim = x.shape[1]
    eye = torch.eye(dim, dtype=torch.float64)
    if form in ("diag", "rotdiag"):
        rot = rotation(dim, seed) if form == "rotdiag" else eye
        xr, yr = x @ rot.T, y @ rot.T
        gram = (w[:, None] * xr * xr).sum(0)
        shrink = ridge * gram.mean()
        scale = ((w[:, None] * xr * yr).sum(0) + shrink) / (gram + shrink).clamp_min(1e-30)
        return (rot.T @ torch.diag(scale) @ rot).float()
    xw = x * w[:, None]
    gram = xw.T @ x
    shrink = ridge * torch.diagonal(gram).mean()
    # (T − I) = M minimises Σ w ‖M x − (y − x)‖² + λ s ‖M‖²
    cross = xw.T @ (y - x)
    correction = torch.linalg.solve(gram + shrink * eye, cross).T  # M, [dim, dim]
    if form == "lowrank":
        fitted = (x @ correction.T) * w.sqrt()[:, None]
        _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
        basis = vh[:rank].T  # top output directions of the fitted correction
        correction = basis @ basis.T @ correction
    return (eye + correction).float()


def residual_share(inputs: torch.Tensor, targets: torch.Tensor, transform: torch.Tensor) -> float:
    """``‖T x − y‖² / ‖x − y‖²``: the part of the unhealed error the map leaves."""
    x, y = inputs.double(), targets.double()
    healed = ((x @ transform.double().T) - y).pow(2).sum()
    plain = (x - y).pow(2).sum()
    return float(healed / plain) if plain > 0 else math.nan
