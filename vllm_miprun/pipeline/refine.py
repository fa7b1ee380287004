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

Search
------
The search that proposes which sets to measure is pure and lives in core:
:func:`vllm_miprun.core.selection.mi_search.mi_prun_search` (MI-PRUN, via :func:`refine`
here) and :func:`vllm_miprun.core.selection.sleb.select_sleb` (SLEB, via :func:`sleb`
here). This module supplies what they call: the calibration loss of a pruned set.

Compute is counted in *block passes* (one block applied to the calibration batch).
Every evaluation resumes from stored boundary states (the full model's, or those of the
best sets evaluated so far) at the first block where the candidate differs from them
(prefix reuse), so it costs only the kept blocks after that point.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np

from vllm_miprun.core.selection import Selection, mi_prun_search, select
from vllm_miprun.core.selection.mi_search import DRIFT_NATS, WIDE_CANDIDATES


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
            if base:
                self._touch(base)
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

    def block_noise(self, pruned: Iterable[int]) -> list[float]:
        """Per block ``b``, the skip channel's noise fraction ``exp(-2 I_skip(h_b; h_b+1) / d)``
        on the boundary states of the model with ``pruned`` removed (0 for a pruned block):
        what the greedy ranks by. The states are those of the last measurement of ``pruned``,
        so this costs no block pass unless they were dropped since."""
        from vllm_miprun.core.span_batch import skip_channel_moments

        chain = self._chain(frozenset(int(b) for b in pruned))
        signal, noise = skip_channel_moments([h.reshape(-1, h.shape[-1]) for h in chain])
        return [float(noise[b, b + 1] / signal[b + 1].clamp_min(1e-30)) for b in range(self.model.num_blocks)]

    def _chain(self, pruned: frozenset) -> list:
        if not pruned:
            return self.states
        if pruned not in self.chains:  # measured, but its states were dropped: measure again
            self.memo.pop(pruned, None)
            self(pruned)
        self._touch(pruned)
        return self.chains[pruned]

    def loss(self, final_state) -> float:
        """Next-token cross-entropy on the calibration tokens' own next tokens."""
        return float(self.model.token_nll(final_state, self.ids))

    def _remember(self, pruned: frozenset, chain: list) -> None:
        """Keep the boundary states of the ``keep_chains`` most recently used sets (least
        recently used out first); a later candidate that shares their first removed blocks
        resumes from them. Greedy searches extend a set they have just evaluated, and a
        round's base set and winner are used again and again: evicting them in arrival
        order cost about 3% more block passes on SmolLM2's keep-0.6 search."""
        self.chains[pruned] = chain
        while len(self.chains) > self.keep_chains:
            del self.chains[next(iter(self.chains))]

    def _touch(self, pruned: frozenset) -> None:
        """Mark ``pruned``'s stored chain as just used (dicts keep insertion order)."""
        self.chains[pruned] = self.chains.pop(pruned)


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
        self.teacher_probs = model.teacher_probs(self.teacher)

    def loss(self, final_state) -> float:
        return float(self.model.token_kl(self.teacher, final_state, teacher_probs=self.teacher_probs))


OBJECTIVES = {"ce": CalibrationCE, "kl": CalibrationKL}


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
    evaluator: CalibrationCE | None = None,
    drift: float = DRIFT_NATS,
    known: Sequence[int] = (),
) -> Selection:
    """MI-PRUN's default selection (the best configuration found on SmolLM2-135M):
    :func:`~vllm_miprun.core.selection.mi_search.mi_prun_search` -- a greedy guided by the
    span costs and, past ``drift``, by the skip-channel MI of the model pruned so far
    (:meth:`CalibrationCE.block_noise`), then a portfolio
    of Fast-Block-Select optima at each of ``powers`` (``cost`` is the skip-MI noise fraction
    raised to ``cost_power``) -- whose loss is measured on calibration tokens ``input_ids``
    [samples, seq_len] (the SLEB calibration batch; never evaluation text). The lowest
    calibration loss (= highest Barber-Agakov bound) wins.

    ``objective`` is ``"kl"`` (default: ``KL(p_full || p_P)``, the bound on
    ``I(h_L^P; Y_full)``) or ``"ce"`` (cross-entropy on the text, the bound on ``I(h_L^P; Y)``).

    Cost: one full pass (``L`` block passes), ``candidates`` evaluations per round (8 once
    the pruned model has drifted ``drift`` nats from the full one) and ``len(powers)`` more, each
    resuming from stored states; ``details["block_passes"]`` reports the total.
    ``max_evaluations`` (optional) lowers ``candidates``, in every round, so that
    ``candidates * num_prune <= max_evaluations`` (at least 1 per round). Protected
    blocks are never proposed.

    ``evaluator`` (optional) is an ``OBJECTIVES[objective]`` on ``input_ids`` from an earlier
    call: a planner that searches several counts for one model (a latency or quality budget)
    passes the same one, so the full pass is made once and every set already measured (the
    greedy for a smaller count is a prefix of a larger one's) comes from its memo. The losses
    are the same numbers, so the selections are the same; ``block_passes`` and
    ``run_evaluations`` then count only this call's new work.

    ``known`` (optional) is the greedy's block order from an earlier call on the same
    calibration tokens and settings (``details["greedy_trace"]``, as a score cache stores it):
    its rounds are not searched again (:func:`~vllm_miprun.core.selection.mi_search.mi_guided_greedy`).
    A trace made under ``max_evaluations`` depends on its count, so the two do not combine.
    """
    import torch

    from vllm_miprun.model.blockwise import BlockwiseModel

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    protect = frozenset(protect)
    wide = WIDE_CANDIDATES
    if max_evaluations is not None and known:
        raise ValueError("refine takes known (an earlier greedy trace) or max_evaluations, not both")
    if max_evaluations is not None and num_prune > 0:
        candidates = wide = max(1, min(candidates, int(max_evaluations) // num_prune))
    if model is None:
        model = BlockwiseModel(model_dir, device=device, resident_blocks=True)
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(np.asarray(input_ids))
    passes_before, measured_before = 0, 0  # a new evaluator's full pass is this call's work
    if evaluator is None:
        evaluator = OBJECTIVES[objective](model, ids)
    elif type(evaluator) is not OBJECTIVES[objective] or not torch.equal(evaluator.ids, ids):
        raise ValueError(f"the evaluator passed to refine must be a {OBJECTIVES[objective].__name__} on these "
                         f"calibration tokens, got a {type(evaluator).__name__} on {tuple(evaluator.ids.shape)} tokens")
    else:
        passes_before, measured_before = evaluator.block_passes, len(evaluator.memo)
    result = mi_prun_search(evaluator, cost, num_prune, protect, candidates=candidates, powers=powers,
                            cost_power=cost_power, block_noise=evaluator.block_noise,
                            wide_candidates=wide, drift=drift, known=known)
    if num_prune == 0:
        return result
    details = {**result.details, "objective": objective,
               "block_passes": evaluator.block_passes - passes_before, "calibration_tokens": int(ids.numel())}
    return replace(result, run_evaluations=len(evaluator.memo) - measured_before, details=details)


def sleb(model, input_ids, num_prune: int, protect: Iterable[int] = frozenset(), *, cost=None,
         clock=time.perf_counter) -> Selection:
    """SLEB on calibration tokens ``input_ids`` [samples, seq_len]: the greedy of
    :func:`vllm_miprun.core.selection.sleb.select_sleb`, whose ``evaluate`` is the pruned
    model's cross-entropy (:class:`CalibrationCE`) -- the same bound MI-PRUN maximises,
    searched over every remaining block each round. ``model`` is a
    :class:`~vllm_miprun.model.blockwise.BlockwiseModel`; ``cost`` (optional) sets the
    selection's ``objective`` to ``J`` on the span costs. ``details["block_passes"]`` counts
    the block passes, as :func:`refine` does, and each step of ``details["trace"]`` its
    ``seconds``: wall time from the start of the full pass to the end of that round. A plan
    for a smaller count runs exactly the first rounds, so this is also what it would take.
    ``clock`` reads the time (seconds)."""
    start = clock()
    evaluate = CalibrationCE(model, input_ids)
    finished: list[float] = []  # wall time after each evaluation

    def timed(pruned: frozenset) -> float:
        loss = evaluate(pruned)
        finished.append(clock() - start)
        return loss

    result = select("sleb", model.num_blocks, num_prune, protect=protect, evaluate=timed, cost=cost)
    trace = [{**step, "seconds": round(finished[step["evaluations"] - 1], 3)}
             for step in result.details.get("trace", ())]
    return replace(result, details={**result.details, "trace": trace, "block_passes": evaluate.block_passes})
