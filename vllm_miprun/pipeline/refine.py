"""MI-guided refinement of a block selection with a next-token MI objective (track B).

The cheap span costs (:mod:`vllm_miprun.core.span_cost`) rank candidate pruned sets without
any forward pass; this module measures, for only a few of those candidates, how much
information the pruned model's final state still carries about the next token, and
keeps the best.

Objective (Barber-Agakov bound)
-------------------------------
For the pruned set ``P`` let ``h_L^P`` be the final boundary state of the pruned model
and ``Y`` the next token. With the model's own final norm + LM head as the variational
decoder ``q(y | h)``::

    I(h_L^P; Y) >= H(Y) - CE(P),    CE(P) = E[-log q(Y | h_L^P)]

``H(Y)`` does not depend on ``P``, so maximising the bound is minimising the pruned
model's cross-entropy on **calibration** tokens (never the evaluation split). The bound
is what SLEB greedily optimises too; the difference is the search: SLEB tries every
remaining block in every round, MI-PRUN only tries what the span costs propose.

The default (``objective="kl"``, :class:`CalibrationKL`) takes ``Y`` from the *full*
model's next-token distribution instead of the text: the soft cross-entropy is
``H(p_full) + KL(p_full || q_P)``, so maximising the bound is minimising that KL. Every
position then scores the whole distribution, not one sampled token. On SmolLM2-135M it
picks the same sets on 2 calibration sequences as the hard-label bound on 4, at half the
cost, and the same set for every calibration seed at keep 0.9
(``benchmarks/results/mi_research.md``, session 3).

Search (``refine`` = ``mi_guided_greedy`` + ``portfolio_refine``, the default)
------------------------------------------------------------------------------
Blocks are removed one at a time, as in SLEB, but each round only measures the bound for
the ``candidates`` blocks whose removal the span cost says is cheapest *given the blocks
already removed*: the marginal objective ``J(P + {b}) - J(P)``, which merges ``b`` with
adjacent pruned runs and prices the merged run by its own span cost. One greedy trace
gives the selection for every smaller drop count too (a prefix).

``swap_refine`` is the alternative: start from the exact span-cost optimum and try the
cheapest single swaps (one pruned block out, one kept block in) until none improves.

Compute is counted in *block passes* (one block applied to the calibration batch).
Every evaluation resumes from stored boundary states (the full model's, or those of the
best sets evaluated so far) at the first block where the candidate differs from them
(prefix reuse), so it costs only the kept blocks after that point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from vllm_miprun.core.selection import Selection, _make_selection, exact_select, fast_block_select, objective_value


@dataclass
class _Counter:
    evaluations: int = 0
    block_passes: int = 0
    trace: list = field(default_factory=list)


class CalibrationCE:
    """``CE(P)`` on a fixed calibration batch, with prefix reuse and memoisation.

    ``model`` is a :class:`~vllm_miprun.model.blockwise.BlockwiseModel` (``resident_blocks=True``
    is advisable); ``input_ids`` [samples, seq_len] are calibration tokens. One full pass
    (``L`` block passes) caches every boundary state of the full model; ``states`` may
    be given instead when the caller already has them.
    """

    def __init__(self, model, input_ids, states=None, keep_chains: int = 4):
        import torch

        self.chains: dict[frozenset, list] = {}
        self.keep_chains = keep_chains
        self.model = model
        self.ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        self.memo: dict[frozenset, float] = {}
        self.block_passes = 0
        if states is None:
            h = model.embed_tokens(self.ids)
            states = [h]
            for b in range(model.num_blocks):
                with model.block(b) as layer:
                    h = model.run_block(layer, h)
                states.append(h)
            self.block_passes += model.num_blocks
        self.states = states

    def __call__(self, pruned: Iterable[int]) -> float:
        pruned = frozenset(int(b) for b in pruned)
        if pruned not in self.memo:
            m = self.model
            # resume from the stored chain that agrees with `pruned` the longest
            base, start = (), min(pruned) if pruned else m.num_blocks
            for other in self.chains:
                diff = pruned.symmetric_difference(other)
                s = min(diff) if diff else m.num_blocks
                if s > start:
                    base, start = other, s
            h = self.states[start] if not base else self.chains[base][start]
            chain = (list(self.states[: start + 1]) if not base else list(self.chains[base][: start + 1]))
            for b in range(start, m.num_blocks):
                if b not in pruned:
                    with m.block(b) as layer:
                        h = m.run_block(layer, h)
                    self.block_passes += 1
                chain.append(h)
            self.memo[pruned] = self.loss(h)
            self._remember(pruned, chain)
        return self.memo[pruned]

    def loss(self, final_state) -> float:
        """Next-token cross-entropy on the calibration tokens' own next tokens."""
        return float(self.model.token_nll(final_state, self.ids))

    def _remember(self, pruned: frozenset, chain: list) -> None:
        """Keep the boundary states of the ``keep_chains`` most recently evaluated sets
        (first in, first out); a later candidate that shares their first removed blocks
        resumes from them. Greedy searches extend a set they have just evaluated."""
        self.chains[pruned] = chain
        while len(self.chains) > self.keep_chains:
            del self.chains[next(iter(self.chains))]


class CalibrationKL(CalibrationCE):
    """``KL(p_full || p_P)`` per calibration token, with the same prefix reuse.

    The Barber-Agakov bound with the *full model's* next-token distribution as ``Y``:
    ``I(h_L^P; Y_full) >= H(Y_full) - CE(p_full, q(. | h_L^P))``, and the soft cross-entropy
    is ``H(p_full) + KL``. Soft targets carry the whole distribution at every position, not
    one sampled token, so the estimate is less noisy on few tokens than :class:`CalibrationCE`.
    """

    def __init__(self, model, input_ids, states=None, keep_chains: int = 4):
        super().__init__(model, input_ids, states, keep_chains)
        self.teacher = model.token_logprobs(self.states[-1])

    def loss(self, final_state) -> float:
        return float(self.model.token_kl(self.teacher, final_state))


OBJECTIVES = {"ce": CalibrationCE, "kl": CalibrationKL}


def mi_guided_greedy(
    evaluate: Callable[[frozenset], float],
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    candidates: int = 3,
) -> Selection:
    """Greedy removal; each round measures ``evaluate`` (calibration loss) for only the
    ``candidates`` blocks with the smallest marginal span cost ``J(P+{b}) - J(P)``.

    ``details["trace"]`` lists each round's chosen block and loss, so the first ``r``
    entries are the selection for ``r`` pruned blocks.
    """
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    protect = frozenset(protect)
    pruned: set[int] = set()
    trace = []
    evaluations = 0
    for _ in range(num_prune):
        base = objective_value(cost, pruned) if pruned else 0.0
        free = [b for b in range(num_blocks) if b not in pruned and b not in protect]
        ranked = sorted(free, key=lambda b: (objective_value(cost, pruned | {b}) - base, b))
        best = (math.inf, None)
        for b in ranked[:candidates]:
            value = float(evaluate(frozenset(pruned | {b})))
            evaluations += 1
            if value < best[0]:
                best = (value, b)
        pruned.add(best[1])
        trace.append({"block": best[1], "loss": best[0], "tried": ranked[:candidates],
                      "evaluations": evaluations,
                      "block_passes": getattr(evaluate, "block_passes", None)})
    return _make_selection(
        "mi-prun", num_blocks, pruned, cost, run_evaluations=evaluations, iterations=num_prune,
        details={"trace": trace, "search": "mi_guided_greedy", "candidates": candidates},
    )


def swap_refine(
    evaluate: Callable[[frozenset], float],
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    top_swaps: int = 4,
    max_evaluations: int = 40,
    start: Iterable[int] | None = None,
) -> Selection:
    """Local search from the exact span-cost optimum (or ``start``): each round measures
    ``evaluate`` for the ``top_swaps`` untried single swaps with the lowest span objective
    and moves to the best if it lowers the loss; stops when a round brings no improvement
    or the budget of evaluations is spent."""
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    protect = frozenset(protect)
    current = frozenset(exact_select(cost, num_prune, protect).pruned if start is None else start)
    best_value = float(evaluate(current))
    evaluations, tried = 1, {current}
    trace = [{"pruned": sorted(current), "loss": best_value}]
    while evaluations < max_evaluations:
        swaps = []
        for b in current:
            for c in range(num_blocks):
                if c in current or c in protect:
                    continue
                cand = (current - {b}) | {c}
                if cand not in tried:
                    swaps.append((objective_value(cost, cand), tuple(sorted(cand))))
        swaps.sort()
        improved = None
        for _, cand in swaps[:top_swaps]:
            if evaluations >= max_evaluations:
                break
            cand = frozenset(cand)
            tried.add(cand)
            value = float(evaluate(cand))
            evaluations += 1
            if value < best_value:
                best_value, improved = value, cand
        if improved is None:
            break
        current = improved
        trace.append({"pruned": sorted(current), "loss": best_value})
    return _make_selection(
        "mi-prun", num_blocks, current, cost, run_evaluations=evaluations,
        iterations=len(trace), details={"trace": trace, "search": "swap_refine"},
    )


def refine(
    model_dir,
    input_ids,
    cost: np.ndarray,
    num_prune: int,
    protect: Iterable[int] = frozenset(),
    *,
    candidates: int = 3,
    powers: tuple[float, ...] = (1.0, 2.0),
    cost_power: float = 2.0,
    max_evaluations: int | None = None,
    device: str = "cpu",
    model=None,
    objective: str = "kl",
) -> Selection:
    """MI-PRUN's default selection (the best configuration found on SmolLM2-135M).

    1. :func:`mi_guided_greedy` on calibration tokens ``input_ids`` [samples, seq_len]
       (the SLEB calibration batch; never evaluation text), ranking each round's
       ``candidates`` by the span ``cost`` of :func:`vllm_miprun.core.span_cost.span_cost_matrix`
       (which is the skip-MI noise fraction raised to ``cost_power``).
    2. :func:`portfolio_refine` between the greedy set and the exact span-cost optima
       with the cost re-raised to each of ``powers`` (power 1 favours one contiguous run,
       power 2 spreads the blocks); the lowest calibration loss (= highest Barber-Agakov
       bound) wins. The span-cost optima come from Fast-Block-Select.

    ``objective`` is ``"kl"`` (default: ``KL(p_full || p_P)``, the bound on
    ``I(h_L^P; Y_full)``) or ``"ce"`` (cross-entropy on the text, the bound on ``I(h_L^P; Y)``).

    Cost: one full pass (``L`` block passes), ``candidates`` evaluations per round and
    ``len(powers)`` more, each resuming from stored states; ``details["block_passes"]``
    reports the total. ``max_evaluations`` (optional) lowers ``candidates`` so that
    ``candidates * num_prune <= max_evaluations`` (at least 1 per round). Protected
    blocks are never proposed.
    """
    import torch

    from vllm_miprun.model.blockwise import BlockwiseModel

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    protect = frozenset(protect)
    if max_evaluations is not None and num_prune > 0:
        candidates = max(1, min(candidates, int(max_evaluations) // num_prune))
    if model is None:
        model = BlockwiseModel(model_dir, device=device, resident_blocks=True)
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(np.asarray(input_ids))
    evaluator = OBJECTIVES[objective](model, ids)
    cost = np.asarray(cost, dtype=float)
    num_blocks = cost.shape[0] - 1
    if num_prune == 0:
        return _make_selection("mi-prun", num_blocks, (), cost)
    greedy = mi_guided_greedy(evaluator, cost, num_prune, protect, candidates=candidates)
    proposals = {"greedy": greedy.pruned}
    for power in powers:
        powered = np.clip(cost, 0.0, None) ** (float(power) / float(cost_power))
        # Fast-Block-Select: the paper's search, certified optimal on DPI-monotone costs.
        proposals[f"span_fbs_p{power:g}"] = fast_block_select(powered, num_prune, protect).pruned
    result = portfolio_refine(evaluator, proposals, num_blocks, cost)
    details = {**result.details, "greedy_trace": greedy.details["trace"], "candidates": candidates,
               "objective": objective,
               "block_passes": evaluator.block_passes, "calibration_tokens": int(ids.numel())}
    from dataclasses import replace

    return replace(result, run_evaluations=len(evaluator.memo), details=details)


def portfolio_refine(
    evaluate: Callable[[frozenset], float],
    proposals: dict[str, Iterable[int]],
    num_blocks: int,
    cost: np.ndarray | None = None,
) -> Selection:
    """Arbitrate between cheap proposals with the next-token MI bound: measure
    ``evaluate`` (calibration loss = H(Y) - BA bound) for each distinct proposed set and
    return the lowest. ``proposals`` maps a name to a pruned set, e.g. the exact
    span-cost optima at powers 1 and 2 and the :func:`mi_guided_greedy` result.
    ``details["scores"]`` lists every proposal's loss."""
    scores = {}
    seen: dict[frozenset, float] = {}
    for name, pruned in proposals.items():
        key = frozenset(int(b) for b in pruned)
        if key not in seen:
            seen[key] = float(evaluate(key))
        scores[name] = {"pruned": sorted(key), "loss": seen[key]}
    best = min(scores, key=lambda n: (scores[n]["loss"], scores[n]["pruned"]))
    return _make_selection(
        "mi-prun", num_blocks, scores[best]["pruned"], cost, run_evaluations=len(seen),
        details={"search": "portfolio", "chosen": best, "scores": scores},
    )
