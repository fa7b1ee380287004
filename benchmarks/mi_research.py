"""Research harness: which MI-based block selection works on SmolLM2-135M?

Everything expensive is cached under ``/tmp/miprun_research`` (boundary states of the
full model on calibration and evaluation text, and every perplexity ever measured), so
re-running a stage costs nothing. Perplexity of a pruned set reuses the full model's
boundary states up to the first pruned block (prefix reuse).

Stages (``--stage``):
  states   cache full-model boundary states (calibration + evaluation text)
  table    selections of every method at drop 3/6/8/12 and their wiki/c4 perplexity
  sleb     SLEB greedy trace up to drop 12 on 8x256 calibration tokens
  stability  Jaccard of pruned sets over calibration seeds 0..4
  objective  the default search under each bound: text cross-entropy (ce) or KL to the
             full model (kl), on 2 or 4 calibration sequences (``--variants``)
  variant    one configuration end to end for seeds 0..4: stability, time, perplexity

The model is SmolLM2-135M unless ``--model DIR`` names another Hugging Face folder; its
shape (blocks, hidden size) is read from its ``config.json``.

Run: ``python benchmarks/mi_research.py --stage table --out benchmarks/results/mi_research.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_miprun.tools import assets  # noqa: E402
from vllm_miprun.model.blockwise import BlockwiseModel  # noqa: E402
from vllm_miprun.model.checkpoint import read_config  # noqa: E402

CACHE = Path(os.environ.get("MIPRUN_RESEARCH_CACHE", "/tmp/miprun_research"))
CACHE.mkdir(parents=True, exist_ok=True)
DROPS = (3, 6, 8, 12)  # the first sessions' drop counts (of SmolLM2's 30 blocks: keep 27, 24, 22, 18)

torch.set_num_threads(int(os.environ.get("MIPRUN_THREADS", "2")))

_MODEL_DIR: Path | None = None  # --model; SmolLM2-135M when unset
_MODEL = None
_TOK = None
_STATES: dict = {}
COUNTER = {"block_passes": 0, "block_tokens": 0}


def model_dir() -> Path:
    return _MODEL_DIR or assets.smollm2_dir()


def shape() -> tuple[int, int]:
    """(number of blocks, hidden size) from the model's config.json."""
    config = read_config(model_dir())
    return int(config["num_hidden_layers"]), int(config["hidden_size"])


def num_blocks() -> int:
    return shape()[0]


def model() -> BlockwiseModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = BlockwiseModel(model_dir(), resident_blocks=True)
    return _MODEL


def tokenizer():
    global _TOK
    if _TOK is None:
        from transformers import AutoTokenizer

        _TOK = AutoTokenizer.from_pretrained(str(model_dir()))
    return _TOK


def token_ids(corpus: str, part: str, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    from vllm_miprun.pipeline.corpora import sample_token_windows

    path = CACHE / f"ids_{corpus}_{part}_{samples}x{seq_len}_s{seed}.npy"
    if not path.exists():
        np.save(path, sample_token_windows(tokenizer(), corpus, samples, seq_len, seed, part=part))
    return torch.from_numpy(np.load(path))


def boundary_states(corpus: str, part: str, samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """All L+1 boundary states of the full model, [samples, seq_len, d] each (cached)."""
    key = (corpus, part, samples, seq_len, seed)
    if key in _STATES:
        return _STATES[key]
    path = CACHE / f"states_{corpus}_{part}_{samples}x{seq_len}_s{seed}.pt"
    if path.exists():
        states = torch.load(path)
    else:
        ids = token_ids(corpus, part, samples, seq_len, seed)
        m = model()
        h = m.embed_tokens(ids)
        states = [h]
        for b in range(m.num_blocks):
            with m.block(b) as layer:
                h = m.run_block(layer, h)
            states.append(h)
        torch.save(states, path)
    _STATES[key] = states
    return states


def pruned_nll(pruned, corpus: str, part: str, samples: int, seq_len: int, seed: int = 0,
               count: bool = False) -> float:
    """Mean next-token NLL (nats) of the model with ``pruned`` blocks removed.

    Starts from the full model's cached state at the first pruned block (prefix reuse)."""
    pruned = frozenset(int(b) for b in pruned)
    states = boundary_states(corpus, part, samples, seq_len, seed)
    ids = token_ids(corpus, part, samples, seq_len, seed)
    m = model()
    start = min(pruned) if pruned else m.num_blocks
    if count:
        run = [b for b in range(start, m.num_blocks) if b not in pruned]
        COUNTER["block_passes"] += len(run)
        COUNTER["block_tokens"] += len(run) * samples * seq_len
    h = m.forward_from(states[start], start, pruned)
    return float(m.token_nll(h, ids))


_MEMO_PATH = CACHE / "ppl_memo.json"


def _memo() -> dict:
    if _MEMO_PATH.exists():
        return json.loads(_MEMO_PATH.read_text())
    return {}


def eval_ppl(pruned, corpus: str = "wiki", rows: int = 16, seq_len: int = 512) -> float:
    """Held-out perplexity (evaluation split, first ``rows`` of 16 x 512 windows), memoised."""
    key = f"{corpus}|{rows}x{seq_len}|{','.join(map(str, sorted(pruned)))}"
    memo = _memo()
    if key not in memo:
        pruned = frozenset(int(b) for b in pruned)
        states = [s[:rows] for s in boundary_states(corpus, "evaluation", 16, seq_len)]
        ids = token_ids(corpus, "evaluation", 16, seq_len)[:rows]
        m = model()
        start = min(pruned) if pruned else m.num_blocks
        h = m.forward_from(states[start], start, pruned)
        value = math.exp(float(m.token_nll(h, ids)))
        memo = _memo()
        memo[key] = value
        _MEMO_PATH.write_text(json.dumps(memo, indent=0))
    return memo[key]


def pruned_chain(pruned, corpus="wiki", part="calibration", samples=8, seq_len=256, seed=0):
    """Boundary states of the model with ``pruned`` removed: out[b] is the state entering
    block b (for b >= min(pruned) it differs from the full model). Counts block passes."""
    # causal attention: the first seq_len tokens of the cached 16x256 windows are exact
    full = [s[:samples, :seq_len] for s in boundary_states("wiki", "calibration", 16, 256, seed)]
    m = model()
    start = min(pruned) if pruned else m.num_blocks
    chain = list(full[: start + 1])
    h = chain[start]
    for b in range(start, m.num_blocks):
        if b not in pruned:
            with m.block(b) as layer:
                h = m.run_block(layer, h)
            COUNTER["block_passes"] += 1
        chain.append(h)
    return chain


def calib_nll_from(chain, start, pruned, ids) -> float:
    """Calibration NLL of ``pruned`` starting from ``chain[start]`` (state entering block start)."""
    m = model()
    h = chain[start]
    for b in range(start, m.num_blocks):
        if b in pruned:
            continue
        with m.block(b) as layer:
            h = m.run_block(layer, h)
        COUNTER["block_passes"] += 1
    return float(m.token_nll(h, ids))


SLEB_SAMPLES, SLEB_SEQ = 4, 128  # 512 calibration tokens: all the shared 2-core machine allowed


def run_sleb(max_drop: int = 12, samples: int = SLEB_SAMPLES, seq_len: int = SLEB_SEQ, seed: int = 0) -> dict:
    """SLEB greedy trace on calibration tokens, with prefix-state reuse.

    Also reports the naive cost (no reuse): round r evaluates L-r candidates, each running
    the L-r-1 remaining blocks."""
    path = CACHE / f"sleb_{samples}x{seq_len}_s{seed}.json"
    trace = json.loads(path.read_text()) if path.exists() else {"order": [], "nll": [], "block_passes": [], "seconds": []}
    ids = token_ids("wiki", "calibration", 16, 256, seed)[:samples, :seq_len]
    m = model()
    L = m.num_blocks
    while len(trace["order"]) < max_drop:
        t0, c0 = time.time(), COUNTER["block_passes"]
        pruned = frozenset(trace["order"])
        chain = pruned_chain(pruned, samples=samples, seq_len=seq_len, seed=seed)
        best = (math.inf, None)
        for b in range(L):
            if b in pruned:
                continue
            nll = calib_nll_from(chain, b, pruned | {b}, ids)
            if nll < best[0]:
                best = (nll, b)
        trace["order"].append(best[1])
        trace["nll"].append(best[0])
        trace["block_passes"].append(COUNTER["block_passes"] - c0)
        trace["seconds"].append(time.time() - t0)
        path.write_text(json.dumps(trace))
        print("sleb round", len(trace["order"]), best, trace["block_passes"][-1], round(time.time() - t0), flush=True)
    return trace


def sleb_naive_passes(drop: int, L: int | None = None) -> int:
    L = num_blocks() if L is None else L
    return sum((L - r) * (L - r - 1) for r in range(drop))


def sleb_reuse_passes(trace: dict, drop: int) -> int:
    return int(sum(trace["block_passes"][:drop]))


# --------------------------------------------------------------------------- scores


def calib_rows(seed: int = 0, samples: int = 16, seq_len: int = 256, tokens: int = 4096):
    """Boundary states at a seeded subsample of token rows (never position 0), [N, d] each."""
    states = boundary_states("wiki", "calibration", samples, seq_len, seed)
    from vllm_miprun.pipeline.calibrate import _mi_rows

    rows = _mi_rows(samples, seq_len, tokens, seed)
    return [s.flatten(0, 1)[rows].double() for s in states], states


def baseline_scores(seed: int = 0):
    from vllm_miprun.core import scoring

    _, states = calib_rows(seed)
    bi = [1.0 - scoring.mean_cosine(states[b].flatten(0, 1), states[b + 1].flatten(0, 1)) for b in range(len(states) - 1)]
    ang = scoring.angular_matrix([s[:, -1] for s in states])
    return np.array(bi), ang


def raw_matrices(seed: int = 0) -> dict:
    """Candidate span matrices (cached): Gaussian MI, skip-channel MI, in raw and
    RMS-normalised space, plus the mean cosine of h_i and h_j."""
    path = CACHE / f"raw_s{seed}.npz"
    if path.exists():
        return dict(np.load(path))
    from vllm_miprun.core import mi, scoring

    xs, _ = calib_rows(seed)
    out = {}
    t = time.time()
    out["mi_pca128"] = scoring.span_mi_matrix(xs, "gaussian", {"pca_dim": 128, "shrinkage": 1e-3})
    rms = [x / x.pow(2).mean(1, keepdim=True).sqrt() for x in xs]
    out["mi_rms_pca128"] = scoring.span_mi_matrix(rms, "gaussian", {"pca_dim": 128, "shrinkage": 1e-3})
    print("mi", time.time() - t, flush=True)
    out["skip_full"] = mi.gaussian_mi_matrix(xs, shrinkage=1e-3, skip=True).numpy()
    out["skip_rms"] = mi.gaussian_mi_matrix(rms, shrinkage=1e-3, skip=True).numpy()
    print("skip", time.time() - t, flush=True)
    n = len(xs)
    cos = np.full((n, n), np.nan)
    rcos = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            cos[i, j] = float(torch.nn.functional.cosine_similarity(xs[i], xs[j], dim=-1).mean())
    out["cos"] = cos
    # isotropic Gaussian skip channel on RMS-normalised states: per-dimension
    # 0.5*log(tr S_y / tr S_{y-x}) summed over d (a scalar-SNR information)
    d = xs[0].shape[1]
    iso = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            num = rms[j].var(0).sum()
            den = (rms[j] - rms[i]).pow(2).mean(0).sum()  # uncentred: identity decoder
            iso[i, j] = 0.5 * d * float(torch.log(num / den))
    out["iso_skip_rms"] = iso
    np.savez(path, **out)
    return out


def raw_matrices2(seed: int = 0) -> dict:
    """Full-dimension Gaussian MI (same space and shrinkage as the skip MI), raw and RMS."""
    path = CACHE / f"raw2_s{seed}.npz"
    if path.exists():
        return dict(np.load(path))
    from vllm_miprun.core import mi

    xs, _ = calib_rows(seed)
    rms = [x / x.pow(2).mean(1, keepdim=True).sqrt() for x in xs]
    out = {"mi_full": mi.gaussian_mi_matrix(xs, shrinkage=1e-3).numpy(),
           "mi_rms_full": mi.gaussian_mi_matrix(rms, shrinkage=1e-3).numpy()}
    np.savez(path, **out)
    return out


# --------------------------------------------------------------------------- selection


def closure(cost: np.ndarray) -> np.ndarray:
    from vllm_miprun.core.span_cost import monotone_closure

    return monotone_closure(cost)


def cost_variants(seed: int = 0) -> dict[str, np.ndarray]:
    """Every candidate span cost (lower = safer to prune), closed under the DPI."""
    raw = dict(raw_matrices(seed))
    if (CACHE / f"raw2_s{seed}.npz").exists() or os.environ.get("MIPRUN_RAW2", "1") == "1":
        raw.update(raw_matrices2(seed))
    bi, ang = baseline_scores(seed)
    out = {}
    for name in ("mi_pca128", "mi_rms_pca128", "mi_full", "mi_rms_full"):
        if name not in raw:
            continue
        m = raw[name]
        out[f"{name}:1-I/Imax"] = 1.0 - m / np.nanmax(m)
        out[f"{name}:-log(I/Imax)"] = -np.log(np.maximum(m, 1e-9) / np.nanmax(m))
    for name in ("skip_full", "skip_rms"):
        m = raw[name]
        out[f"{name}:1-Iskip/Imax"] = 1.0 - m / np.nanmax(m)
    # information present in h_j about h_i but not decodable through the identity skip
    if "mi_full" in raw:
        out["gap_full:I-Iskip"] = raw["mi_full"] - raw["skip_full"]
        out["gap_rms:I-Iskip"] = raw["mi_rms_full"] - raw["skip_rms"]
        out["gap_rms:1-Iskip/I"] = 1.0 - raw["skip_rms"] / np.maximum(raw["mi_rms_full"], 1e-9)
        out["gap_full:1-Iskip/I"] = 1.0 - raw["skip_full"] / np.maximum(raw["mi_full"], 1e-9)
    _, d = shape()
    out["iso_rms:exp(-2I/d)"] = np.exp(-2.0 * raw["iso_skip_rms"] / d)
    out["cos:1-cos"] = 1.0 - raw["cos"]
    out["angular_last"] = ang
    return {k: closure(v) for k, v in out.items()}


def select_exact(cost, drop):
    from vllm_miprun.core.selection import exact_select

    return tuple(exact_select(cost, drop).pruned)


def baselines(drop, seed=0):
    from vllm_miprun.core.selection import select_angular, select_last, select_shortgpt

    bi, ang = baseline_scores(seed)
    return {
        "shortgpt": tuple(select_shortgpt(bi, drop).pruned),
        "angular": tuple(select_angular(ang, drop).pruned),
        "last": tuple(select_last(num_blocks(), drop).pruned),
    }


def screen(rows: int = 4, drops=DROPS) -> dict:
    results = {}
    variants = cost_variants(0)
    for drop in drops:
        sets = {**baselines(drop), **{k: select_exact(c, drop) for k, c in variants.items()}}
        for name, pruned in sets.items():
            ppl = eval_ppl(pruned, "wiki", rows=rows)
            results.setdefault(name, {})[drop] = {"pruned": list(pruned), "wiki_ppl": ppl}
            print(f"drop {drop:2d} {name:28s} {str(list(pruned)):45s} {ppl:12.1f}", flush=True)
    return results


# --------------------------------------------------------------------------- track B


def calib_evaluator(samples: int = SLEB_SAMPLES, seq_len: int = SLEB_SEQ, seed: int = 0):
    """CalibrationCE on the same calibration tokens as SLEB (full states from the cache; the
    L block passes of that one full pass are added to the count by the caller)."""
    from vllm_miprun.pipeline.refine import CalibrationCE

    states = [s[:samples, :seq_len] for s in boundary_states("wiki", "calibration", 16, 256, seed)]
    ids = token_ids("wiki", "calibration", 16, 256, seed)[:samples, :seq_len]
    return CalibrationCE(model(), ids, states=states)


def track_b(cost_name: str, search: str, max_drop: int = 12, seed: int = 0, **kw) -> dict:
    """Run one track-B search; returns per-drop pruned sets and block passes (incl. the
    one full pass on the calibration batch)."""
    from vllm_miprun.core.selection import mi_guided_greedy, swap_refine

    name, _, power = cost_name.partition("^")
    cost = cost_variants(seed)[name] ** (float(power) if power else 1.0)
    out = {}
    full_pass = num_blocks()  # the one full pass on the calibration batch
    if search == "greedy":
        ev = calib_evaluator(seed=seed)
        sel = mi_guided_greedy(ev, cost, max_drop, **kw)
        trace = sel.details["trace"]
        for drop in DROPS:
            t = trace[drop - 1]
            out[drop] = {"pruned": sorted(x["block"] for x in trace[:drop]),
                         "block_passes": t["block_passes"] + full_pass, "evaluations": t["evaluations"]}
    else:
        for drop in DROPS:
            ev = calib_evaluator(seed=seed)
            sel = swap_refine(ev, cost, drop, **kw)
            out[drop] = {"pruned": list(sel.pruned), "block_passes": ev.block_passes + full_pass,
                         "evaluations": len(ev.memo)}
    return out


def jaccard_mean(sets) -> float:
    vals = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in itertools.combinations(sets, 2)]
    return float(np.mean(vals))


def stability(cost_name: str, drops=(6, 8), seeds=range(5), greedy_candidates: int | None = None) -> dict:
    """Mean pairwise Jaccard of pruned sets over calibration seeds, MI-PRUN vs ShortGPT."""
    from vllm_miprun.core.selection import mi_guided_greedy

    sets: dict = {}
    for seed in seeds:
        cost = cost_variants(seed)[cost_name]
        for drop in drops:
            sets.setdefault(("shortgpt", drop), []).append(baselines(drop, seed)["shortgpt"])
            sets.setdefault(("angular", drop), []).append(baselines(drop, seed)["angular"])
            sets.setdefault(("mi-exact", drop), []).append(select_exact(cost, drop))
        if greedy_candidates:
            sel = mi_guided_greedy(calib_evaluator(seed=seed), cost, max(drops), candidates=greedy_candidates)
            order = [t["block"] for t in sel.details["trace"]]
            for drop in drops:
                sets.setdefault(("mi-greedy", drop), []).append(tuple(sorted(order[:drop])))
        print("seed", seed, {f"{k[0]}@{k[1]}": v[-1] for k, v in sets.items()}, flush=True)
    return {f"{k[0]}@{k[1]}": {"jaccard": jaccard_mean(v), "sets": [list(x) for x in v]} for k, v in sets.items()}


def final_table(rows: int, trackb_tag: str, tracka_cost: str, corpora=("wiki", "c4")) -> dict:
    """Per-drop pruned sets and perplexities of every method (sets from the cached runs)."""
    sleb = json.loads((CACHE / f"sleb_{SLEB_SAMPLES}x{SLEB_SEQ}_s0.json").read_text())
    tb = json.loads((CACHE / "trackb.json").read_text()).get(trackb_tag, {})
    name, _, power = tracka_cost.partition("^")
    cost_a = cost_variants(0)[name] ** (float(power) if power else 1.0)
    L = num_blocks()
    table = {"rows": rows, "seq_len": 512, "dense": {c: eval_ppl((), c, rows=rows) for c in corpora}, "drops": {}}
    for drop in DROPS:
        sets = dict(baselines(drop))
        sets["mi-prun (span cost, exact DP)"] = select_exact(cost_a, drop)
        if str(drop) in tb:
            sets["mi-prun (refined, BA bound)"] = tuple(tb[str(drop)]["pruned"])
        if len(sleb["order"]) >= drop:
            sets["sleb"] = tuple(sorted(sleb["order"][:drop]))
        row = {}
        for method, pruned in sets.items():
            row[method] = {"pruned": sorted(pruned)}
            for c in corpora:
                if method == "last" and drop > 3:
                    continue  # catastrophic (>1e8 at rows=4); not worth the CPU
                row[method][f"{c}_ppl"] = eval_ppl(pruned, c, rows=rows)
            print(drop, method, row[method], flush=True)
        compute = {"sleb_naive_block_passes": sleb_naive_passes(drop, L)}
        if len(sleb["order"]) >= drop:
            compute["sleb_reuse_block_passes"] = sleb_reuse_passes(sleb, drop)
        if str(drop) in tb:
            compute["mi_refined_block_passes"] = tb[str(drop)]["block_passes"]
            compute["mi_refined_evaluations"] = tb[str(drop)]["evaluations"]
        row["compute"] = compute
        table["drops"][drop] = row
    return table


def lean_scores(seed: int, samples: int = 8, seq_len: int = 256, power: float = 2.0):
    """Only what the default needs, per calibration seed: iso skip-MI cost, BI, angular."""
    from vllm_miprun.core import scoring
    from vllm_miprun.pipeline.calibrate import _mi_rows
    from vllm_miprun.core.span_cost import skip_cost

    states = boundary_states("wiki", "calibration", samples, seq_len, seed)
    rows = _mi_rows(samples, seq_len, 4096, seed)
    xs = [s.flatten(0, 1)[rows] for s in states]
    iso = scoring.isotropic_skip_mi_matrix(xs)
    bi = [1.0 - scoring.mean_cosine(states[b].flatten(0, 1), states[b + 1].flatten(0, 1)) for b in range(num_blocks())]
    ang = scoring.angular_matrix([s[:, -1] for s in states])
    return skip_cost(iso, xs[0].shape[1], power), np.array(bi), ang


def lean_stability(drops=DROPS, seeds=range(5)) -> dict:
    from vllm_miprun.core.selection import fast_block_select, select_angular, select_shortgpt

    sets: dict = {}
    for seed in seeds:
        cost, bi, ang = lean_scores(seed)
        for drop in drops:
            sets.setdefault(f"mi-prun-spancost@{drop}", []).append(tuple(fast_block_select(cost, drop).pruned))
            sets.setdefault(f"shortgpt@{drop}", []).append(tuple(select_shortgpt(bi, drop).pruned))
            sets.setdefault(f"angular@{drop}", []).append(tuple(select_angular(ang, drop).pruned))
        print("seed", seed, {k: v[-1] for k, v in sets.items()}, flush=True)
    return {k: {"jaccard": jaccard_mean(v), "sets": [list(x) for x in v]} for k, v in sets.items()}


def refined_stability(max_drop: int = 6, seeds=range(5), candidates: int = 3) -> dict:
    """Pruned sets of the refined MI-PRUN (greedy, BA bound on each seed's own 4x128
    calibration tokens, span cost from that seed's 8x256 calibration rows)."""
    from vllm_miprun.core.selection import mi_guided_greedy
    from vllm_miprun.pipeline.refine import CalibrationCE

    path = CACHE / "refined_stability.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for seed in seeds:
        if str(seed) in out:
            continue
        cost, _, _ = lean_scores(seed)
        states = [s[:SLEB_SAMPLES, :SLEB_SEQ] for s in boundary_states("wiki", "calibration", 8, 256, seed)]
        ids = token_ids("wiki", "calibration", 8, 256, seed)[:SLEB_SAMPLES, :SLEB_SEQ]
        sel = mi_guided_greedy(CalibrationCE(model(), ids, states=states), cost, max_drop, candidates=candidates)
        out[str(seed)] = [t["block"] for t in sel.details["trace"]]
        path.write_text(json.dumps(out))
        print("seed", seed, out[str(seed)], flush=True)
    res = {}
    for drop in range(1, max_drop + 1):
        sets = [tuple(sorted(order[:drop])) for order in out.values()]
        res[f"mi-prun-refined@{drop}"] = {"jaccard": jaccard_mean(sets), "sets": [list(x) for x in sets]}
    return res


def portfolio_stability(drops=(3, 6), seeds=range(5)) -> dict:
    """Stability of the default (portfolio): per seed, BA-arbitrate between the greedy
    trace prefix (from refined_stability) and the exact span-cost optima at powers 1, 2."""
    from vllm_miprun.core.selection import exact_select, portfolio_refine
    from vllm_miprun.pipeline.refine import CalibrationCE

    orders = json.loads((CACHE / "refined_stability.json").read_text())
    sets: dict = {}
    for seed in seeds:
        if str(seed) not in orders:
            continue
        cost2, _, _ = lean_scores(seed)
        cost1 = np.sqrt(cost2)
        states = [s[:SLEB_SAMPLES, :SLEB_SEQ] for s in boundary_states("wiki", "calibration", 8, 256, seed)]
        ids = token_ids("wiki", "calibration", 8, 256, seed)[:SLEB_SAMPLES, :SLEB_SEQ]
        ev = CalibrationCE(model(), ids, states=states)
        for drop in drops:
            props = {"greedy": orders[str(seed)][:drop], "dp_p1": exact_select(cost1, drop).pruned,
                     "dp_p2": exact_select(cost2, drop).pruned}
            sel = portfolio_refine(ev, props, num_blocks())
            sets.setdefault(f"mi-prun-portfolio@{drop}", []).append(tuple(sel.pruned))
            print(seed, drop, sel.details["chosen"], sel.pruned, flush=True)
    return {k: {"jaccard": jaccard_mean(v), "sets": [list(x) for x in v]} for k, v in sets.items()}


# --------------------------------------------------------------------------- session 3: soft targets


def product_cost(seed: int = 0):
    """The product's default span cost (32x256 calibration tokens) through its score cache."""
    from vllm_miprun.pipeline.calibrate import calibrate
    from vllm_miprun.core.span_cost import span_cost_matrix
    from vllm_miprun.options import CalibrationSettings

    result = calibrate(model_dir(), CalibrationSettings(seed=seed), cache_dir=CACHE / "caches",
                       progress=False)
    return span_cost_matrix(result.cache)


def product_ids(seed: int = 0, samples: int = 4) -> torch.Tensor:
    """The forward-search calibration batch exactly as ``forward_search.ForwardSearch`` draws it."""
    from vllm_miprun.pipeline.calibrate import calibration_ids
    from vllm_miprun.options import CalibrationSettings

    return calibration_ids(model_dir(), CalibrationSettings(seed=seed))[:samples]


def objective_stage(variants, drops=DROPS, rows: int = 8, seed: int = 0, out: Path | None = None) -> dict:
    """MI-PRUN's default search (``refine``) under each objective variant ``(objective,
    samples, candidates)``; held-out wiki/c4 perplexity of every chosen set on ``rows``
    evaluation windows, plus every seed-0 set of the quality table on the same windows (keyed
    by the set's own size: the table prunes 3, 6, 7 and 12 blocks)."""
    from vllm_miprun.pipeline.refine import refine

    path = out or CACHE / "objective_stage.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    table = json.loads(Path("benchmarks/results/quality_smollm2.json").read_text())
    for record in table["records"]:
        pr = record.get("pruned")
        if pr and record.get("seed", 0) == 0:
            key = f"{len(pr)}|table:{record['row']}"
            if key not in res:
                res[key] = {"pruned": pr, "wiki": eval_ppl(pr, "wiki", rows), "c4": eval_ppl(pr, "c4", rows)}
                print(key, res[key], flush=True)
    cost = product_cost(seed)
    for objective, samples, candidates in variants:
        ids = product_ids(seed, samples)
        for drop in drops:
            key = f"{drop}|{objective}|n{samples}|c{candidates}"
            if key in res:
                continue
            t = time.perf_counter()
            sel = refine(model_dir(), ids, cost, drop, model=model(), objective=objective,
                         candidates=candidates)
            seconds = time.perf_counter() - t
            pr = list(sel.pruned)
            res[key] = {"pruned": pr, "seconds": seconds, "block_passes": sel.details["block_passes"],
                        "chosen": sel.details.get("chosen"),
                        "wiki": eval_ppl(pr, "wiki", rows), "c4": eval_ppl(pr, "c4", rows)}
            print(key, res[key], flush=True)
            path.write_text(json.dumps(res, indent=1))
    path.write_text(json.dumps(res, indent=1))
    return res


QUALITY_KEEPS = (0.9, 0.8, 0.75, 0.6)  # the quality table's keep ratios (SmolLM2: drop 3, 6, 7, 12)


def quality_drops() -> tuple[int, ...]:
    """The blocks the quality table prunes at each of ``QUALITY_KEEPS`` for this model."""
    from vllm_miprun.core.selection import prune_count

    return tuple(prune_count(keep, num_blocks()) for keep in QUALITY_KEEPS)


def variant_stage(objective: str, bound_samples: int, candidates: int, calib_samples: int,
                  seeds=range(5), drops=None, rows: int = 8, out: Path | None = None) -> dict:
    """One MI-PRUN configuration end to end for each calibration seed: the score cache
    (``calib_samples`` x 256 tokens, timed), then ``refine`` under ``objective`` on the
    first ``bound_samples`` sequences (timed per drop). Held-out perplexity for seed 0,
    mean pairwise Jaccard over the seeds."""
    from vllm_miprun.pipeline.calibrate import calibrate, calibration_ids
    from vllm_miprun.core.span_cost import span_cost_matrix
    from vllm_miprun.options import CalibrationSettings
    from vllm_miprun.pipeline.refine import refine

    drops = quality_drops() if drops is None else drops
    tag = f"{objective}|bound{bound_samples}|c{candidates}|calib{calib_samples}"
    path = out or CACHE / "variants.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    entry = res.setdefault(tag, {"seeds": {}})
    for seed in seeds:
        if str(seed) in entry["seeds"]:
            continue
        settings = CalibrationSettings(samples=calib_samples, seed=seed)
        cache = calibrate(model_dir(), settings, cache_dir=CACHE / "caches", progress=False).cache
        calib_s = cache.timings["total_s"]  # the cache's own timing, also when it was reused
        cost = span_cost_matrix(cache)
        ids = calibration_ids(model_dir(), settings)[:bound_samples]
        runs = {}
        for drop in drops:
            t = time.perf_counter()
            sel = refine(model_dir(), ids, cost, drop, model=model(), objective=objective,
                         candidates=candidates)
            runs[str(drop)] = {"pruned": list(sel.pruned), "seconds": time.perf_counter() - t,
                               "block_passes": sel.details["block_passes"], "chosen": sel.details.get("chosen")}
        entry["seeds"][str(seed)] = {"calibration_s": calib_s, "drops": runs}
        print(tag, seed, round(calib_s, 1), {d: (r["pruned"], round(r["seconds"], 1)) for d, r in runs.items()},
              flush=True)
        path.write_text(json.dumps(res, indent=1))
    summary = {}
    for drop in drops:
        sets = [entry["seeds"][str(s)]["drops"][str(drop)]["pruned"] for s in seeds]
        first = entry["seeds"][str(min(seeds))]["drops"][str(drop)]["pruned"]
        summary[str(drop)] = {"jaccard": jaccard_mean(sets) if len(sets) > 1 else None,
                              "wiki": eval_ppl(first, "wiki", rows), "c4": eval_ppl(first, "c4", rows),
                              "pruned_seed0": first}
        print(tag, drop, summary[str(drop)], flush=True)
    entry["summary"] = summary
    path.write_text(json.dumps(res, indent=1))
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: SmolLM2-135M)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cost", default="iso_rms:exp(-2I/d)^2")
    ap.add_argument("--search", default="greedy")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4, help="evaluation windows of 512 tokens (of 16)")
    ap.add_argument("--variants", default="ce:4:3,kl:4:3,kl:2:3")
    ap.add_argument("--variant", default="kl:2:3:8")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trackb", default="iso_rms:exp(-2I/d)^2|greedy|c3")
    args = ap.parse_args()
    global _MODEL_DIR, CACHE
    if args.model:  # another model's states and perplexities must not mix with SmolLM2's
        _MODEL_DIR = Path(args.model).resolve()
        CACHE = CACHE / _MODEL_DIR.name
        CACHE.mkdir(parents=True, exist_ok=True)
    if args.stage == "states":
        t = time.time()
        boundary_states("wiki", "calibration", 16, 256, 0)
        print("calib states", time.time() - t, flush=True)
        for corpus in ("wiki", "c4"):
            t = time.time()
            boundary_states(corpus, "evaluation", 16, 512)
            print(corpus, "eval states", time.time() - t, flush=True)
        print("dense wiki ppl", eval_ppl(()), "c4", eval_ppl((), "c4"))
    elif args.stage == "raw":
        raw_matrices(0)
    elif args.stage == "raw2":
        raw_matrices2(0)
    elif args.stage == "screen":
        res = screen()
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    elif args.stage == "trackb":
        res = track_b(args.cost, args.search, candidates=args.candidates)
        tag = f"{args.cost}|{args.search}|c{args.candidates}"
        path = CACHE / "trackb.json"
        allres = json.loads(path.read_text()) if path.exists() else {}
        allres[tag] = res
        path.write_text(json.dumps(allres, indent=1))
        print(tag, res, flush=True)
    elif args.stage == "table":
        res = final_table(args.rows, args.trackb, args.cost)
        Path(args.out or "benchmarks/results/mi_research.json").write_text(json.dumps(res, indent=1))
    elif args.stage == "stability":
        res = lean_stability()
        Path(args.out or "benchmarks/results/mi_research_stability.json").write_text(json.dumps(res, indent=1))
        for k, v in res.items():
            print(k, round(v["jaccard"], 3))
    elif args.stage == "stability_refined":
        res = refined_stability()
        Path(args.out or "benchmarks/results/mi_research_stability_refined.json").write_text(json.dumps(res, indent=1))
        for k, v in res.items():
            print(k, round(v["jaccard"], 3))
    elif args.stage == "stability_portfolio":
        res = portfolio_stability()
        Path(args.out or "benchmarks/results/mi_research_stability_portfolio.json").write_text(json.dumps(res, indent=1))
        for k, v in res.items():
            print(k, round(v["jaccard"], 3))
    elif args.stage == "check16":
        # ranking check on all 16 evaluation windows (wiki) for drops 8 and 12
        res = json.loads(Path(args.out or "benchmarks/results/mi_research.json").read_text())
        check = {"dense": eval_ppl((), "wiki", rows=16)}
        for drop in ("8", "12"):
            row = res["drops"][drop]
            for method in ("shortgpt", "sleb", "mi-prun (default: portfolio)"):
                check[f"{drop}|{method}"] = eval_ppl(row[method]["pruned"], "wiki", rows=16)
                print(drop, method, check[f"{drop}|{method}"], flush=True)
        res["wiki_16x512_check"] = check
        Path(args.out or "benchmarks/results/mi_research.json").write_text(json.dumps(res, indent=1))
    elif args.stage == "sleb":
        run_sleb()
    elif args.stage == "variant":
        # one configuration as objective:bound_samples:candidates:calib_samples
        o, n, c, k = args.variant.split(":")
        variant_stage(o, int(n), int(c), int(k), seeds=range(args.seeds), out=Path(args.out) if args.out else None)
    elif args.stage == "objective":
        # variants as objective:samples:candidates, e.g. "ce:4:3,kl:4:3,kl:2:3"
        variants = [(o, int(n), int(c)) for o, n, c in (v.split(":") for v in args.variants.split(","))]
        objective_stage(variants, rows=args.rows, out=Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
