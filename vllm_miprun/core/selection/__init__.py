"""Choose which decoder blocks to prune: MI-PRUN's Fast-Block-Select, an exact solver, baselines.

Conventions (fixed by the calibration code)
-------------------------------------------
A model has ``L`` blocks ``0..L-1`` and ``L+1`` boundary hidden states ``h_0..h_L``;
block ``b`` maps ``h_b -> h_{b+1}``. Pruning the contiguous run of blocks ``[i, j)``
(``i < j``) feeds ``h_i`` where ``h_j`` used to be.

``cost`` is an ``(L+1) x (L+1)`` float array: ``cost[i, j]`` (``i < j``) estimates the
information lost by skipping the run ``[i, j)``; lower is safer to prune, NaN where
``i >= j``. It comes from mutual information through the data-processing inequality
(DPI), so it is monotone: ``cost[i, j] >= max(cost[i, k], cost[k, j])`` for ``i < k < j``.

The objective
-------------
Given a number of blocks to prune ``k = L - K``, choose a pruned set ``P`` with
``|P| = k`` that contains no protected block and minimises::

    J(P) = sum of cost[i, j] over the MAXIMAL contiguous runs [i, j) of P

Adjacent pruned blocks form one run and are scored once, as that run: skipping
``[2, 4)`` costs ``cost[2, 4]``, not ``cost[2, 3] + cost[3, 4]``, because the model then
feeds ``h_2`` straight into block 4, and the DPI says nothing about the span being the
sum of its parts. A lower ``J`` is a better choice.

Modules, one per concern
------------------------
- :mod:`.result`: the :class:`Selection` every selector returns; keep/prune counts;
  protected blocks and the checks on a prune request.
- :mod:`.objective`: ``J``, maximal runs, the DPI check of a cost matrix.
- :mod:`.runs`: ``exact_select``, the optimum by dynamic programming over positions
  (``O(L^2 k)`` time, reads every admissible run cost).
- :mod:`.fast_block`: ``fast_block_select``, the paper's iterative Fast-Block-Select plus
  a DPI lower-bound certificate; it reads far fewer run costs and returns the exact
  optimum whenever the cost matrix obeys the DPI.
- :mod:`.mi_search`: MI-PRUN's default search given a calibration loss (greedy guided by
  the span costs, then a portfolio of Fast-Block-Select proposals); the loss itself,
  measured with forward passes, is in :mod:`vllm_miprun.pipeline.refine`.
- :mod:`.baselines`: ShortGPT, angular distance, last blocks, random.
- :mod:`.sleb`: SLEB's greedy (its forward-pass objective is in :mod:`vllm_miprun.pipeline.refine`).
- :mod:`.instances`: random DPI-obeying cost matrices for tests and benchmarks.
- :mod:`.dispatch`: :func:`select` by method name, and :func:`select_for_latency`.

A new selection method is a module here returning a :class:`Selection` (built with
:func:`make_selection`), a name in ``METHODS`` and a branch in :func:`select`.
"""

from vllm_miprun.core.selection.baselines import select_angular, select_last, select_random, select_shortgpt
from vllm_miprun.core.selection.dispatch import latency_floor, max_keep_for_budget, select, select_for_latency
from vllm_miprun.core.selection.fast_block import fast_block_select
from vllm_miprun.core.selection.instances import INSTANCE_KINDS, random_dpi_cost
from vllm_miprun.core.selection.mi_search import mi_guided_greedy, mi_prun_search, portfolio_refine, swap_refine
from vllm_miprun.core.selection.objective import dpi_violations, maximal_runs, objective_value
from vllm_miprun.core.selection.result import (
    DEFAULT_METHOD,
    METHODS,
    Selection,
    check_prune_request,
    keep_count,
    make_selection,
    parse_protect,
    prune_count,
)
from vllm_miprun.core.selection.runs import exact_select
from vllm_miprun.core.selection.sleb import select_sleb

__all__ = [
    "DEFAULT_METHOD", "INSTANCE_KINDS", "METHODS", "Selection",
    "check_prune_request", "dpi_violations", "exact_select", "fast_block_select", "keep_count",
    "latency_floor", "make_selection", "max_keep_for_budget", "maximal_runs", "mi_guided_greedy",
    "mi_prun_search", "objective_value", "parse_protect", "portfolio_refine", "prune_count",
    "random_dpi_cost", "select", "select_angular", "select_for_latency", "select_last",
    "select_random", "select_shortgpt", "select_sleb", "swap_refine",
]
