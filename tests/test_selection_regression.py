"""The selection code's answers, pinned: every solver, baseline and the latency-budget
walk on seeded random DPI cost matrices, and ``make_plan`` for every method on a tiny
model, must match ``tests/data/selection_regression.json``.

The fixture was first written by ``python tests/test_selection_regression.py`` on the code
before ``core/selection.py`` became a package (commit 98de7a3), so any change in a plan or a
selection -- the blocks, the runs, the number of cost reads, the objective -- fails here.
Decisions and counts compare exactly; floats with the cross-CPU tolerances of
``tests/cross_cpu.py``, because the fixture was recorded on another CPU than the one that
runs it. Regenerate it only for an intended change of behaviour, and say so.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cross_cpu import FLOAT32_STATS_RTOL, FLOAT64_RTOL, floats_close, split_floats

from vllm_miprun.core import selection
from vllm_miprun.core.latency import LatencyModel

FIXTURE = Path(__file__).parent / "data" / "selection_regression.json"
SEEDS = range(21)
SIZES = (8, 12, 16, 24, 30)
PLAN_ARCHS = ("llama", "qwen2")
PLAN_METHODS = ("mi-prun", "shortgpt", "angular", "sleb", "last", "random")
PLAN_TARGETS = ({"keep": 0.75}, {"keep": 0.5}, {"latency_budget": "0.97"})
PLAN_CALIBRATION = {"samples": 4, "seq_len": 32}


def _instance(seed: int):
    rng = np.random.default_rng(seed)
    num_blocks = SIZES[seed % len(SIZES)]
    kind = selection.INSTANCE_KINDS[seed % len(selection.INSTANCE_KINDS)]
    cost = selection.random_dpi_cost(num_blocks, rng, kind)
    latency = LatencyModel(fixed_s=float(rng.uniform(0.1, 1.0)), block_s=tuple(rng.uniform(0.5, 2.0, num_blocks)))
    return cost, latency


def _counts(num_blocks: int) -> tuple[int, ...]:
    return tuple(sorted({num_blocks // 4, num_blocks // 2}))


def _summary(result: selection.Selection) -> dict:
    """The pruned blocks, readable; a digest of everything in ``to_json()`` but its floats
    (runs, cost reads, iterations, details), so the fixture stays small but misses nothing;
    and the floats (objective, ...), which another CPU may round differently."""
    skeleton, floats = split_floats(_roundtrip(result.to_json()))
    digest = hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode()).hexdigest()[:16]
    return {"pruned": ",".join(map(str, result.pruned)), "digest": digest, "floats": floats}


def _same_selection(got: dict, expected: dict) -> bool:
    return (got["pruned"], got["digest"]) == (expected["pruned"], expected["digest"]) and floats_close(
        got["floats"], expected["floats"], FLOAT64_RTOL)


def record_instances() -> dict:
    """Every selector's answer on the seeded instances, keyed by seed/count/protect/solver."""
    out = {}
    for seed in SEEDS:
        cost, latency = _instance(seed)
        num_blocks = cost.shape[0] - 1
        inputs = {"cost": cost, "block_influence": np.diag(cost, 1).copy(), "angular": cost}

        def evaluate(pruned, cost=cost):
            return selection.objective_value(cost, pruned)

        for k in _counts(num_blocks):
            for protect in ((), (0, num_blocks - 1)):
                key = f"seed{seed}/k{k}/protect{','.join(map(str, protect))}"
                out[f"{key}/exact"] = _summary(selection.exact_select(cost, k, protect))
                out[f"{key}/fbs"] = _summary(selection.fast_block_select(cost, k, protect))
                out[f"{key}/fbs-uncertified"] = _summary(selection.fast_block_select(cost, k, protect, certify=False))
                for method in selection.METHODS:
                    out[f"{key}/select-{method}"] = _summary(selection.select(
                        method, num_blocks, k, protect=protect, seed=seed, evaluate=evaluate, **inputs))
        for budget in ("0.8", "0.6"):
            for method in ("mi-prun", "shortgpt", "last"):
                out[f"seed{seed}/latency{budget}/{method}"] = _summary(selection.select_for_latency(
                    method, budget, latency, **inputs))
    return out


def record_plans(model_dir: Path, cache_dir: Path) -> dict:
    """``make_plan``'s kept blocks, objective and predicted speed-up for every method and target."""
    from vllm_miprun.options import MiprunOptions
    from vllm_miprun.pipeline.plan import make_plan

    out = {}
    for method in PLAN_METHODS:
        for target in PLAN_TARGETS:
            options = MiprunOptions.from_dict({"method": method, "cache_dir": str(cache_dir), **target,
                                               **PLAN_CALIBRATION})
            plan = make_plan(model_dir, options, progress=False)
            key = f"{method}/{','.join(f'{k}={v}' for k, v in target.items())}"
            out[key] = {"kept": list(plan.kept), "objective": plan.objective,
                        "predicted_speedup": plan.predicted_speedup}
    return out


def _load_fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _roundtrip(data: dict) -> dict:
    return json.loads(json.dumps(data))  # tuples -> lists, as in the fixture


def test_selectors_give_the_recorded_answers():
    expected = _load_fixture()["instances"]
    got = _roundtrip(record_instances())
    assert sorted(got) == sorted(expected)
    differing = [key for key in expected if not _same_selection(got[key], expected[key])]
    assert not differing, f"{len(differing)} selections changed, e.g. {differing[:3]}"


@pytest.mark.parametrize("arch", PLAN_ARCHS)
def test_plans_for_every_method_are_the_recorded_ones(arch, request, tmp_path):
    expected = _load_fixture()["plans"][arch]
    got = _roundtrip(record_plans(request.getfixturevalue(f"tiny_{arch}_dir"), tmp_path))
    assert sorted(got) == sorted(expected)
    for key, plan in expected.items():
        assert got[key]["kept"] == plan["kept"], key
        assert got[key]["predicted_speedup"] == pytest.approx(plan["predicted_speedup"], rel=FLOAT64_RTOL), key
        # The objective sums span statistics of float32 forward passes, recorded on another CPU.
        if plan["objective"] is None:
            assert got[key]["objective"] is None, key
        else:
            assert got[key]["objective"] == pytest.approx(plan["objective"], rel=FLOAT32_STATS_RTOL, abs=0), key


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_tiny_model

    data = {"instances": record_instances(), "plans": {}}
    for arch in PLAN_ARCHS:  # built as tests/conftest.py builds them
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = make_tiny_model(Path(tmp) / f"tiny-{arch}", arch=arch)
            data["plans"][arch] = record_plans(model_dir, Path(tmp) / "scores")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}: {len(data['instances'])} selections, {len(data['plans'])} plans")
