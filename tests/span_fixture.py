"""Reference span statistics and plans on tiny seeded models, recorded from the CPU code
that existed before the span statistics moved to the calibration device (issue 14).

``python tests/span_fixture.py`` (from the repository root, with ``PYTHONPATH=.``) writes
``tests/data/span_reference.json``; ``tests/test_scale.py`` recomputes every case with the
current code and compares. The cases cover the three Gaussian paths: no PCA (N < d = 128),
PCA with fewer rows than dimensions (N = 252 < d = 256) and PCA with more (N = 504 > 256),
plus the Renyi estimator.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

REFERENCE = Path(__file__).parent / "data" / "span_reference.json"
# name: (model kwargs for make_tiny_model, calibration settings)
CASES = {
    "d128_n62": ({"hidden_size": 128}, {"samples": 4, "seq_len": 32}),
    "d256_n252": ({"hidden_size": 256}, {"samples": 8, "seq_len": 64}),
    "d256_n504": ({"hidden_size": 256}, {"samples": 16, "seq_len": 64}),
    "d128_renyi": ({"hidden_size": 128}, {"samples": 4, "seq_len": 32, "estimator": "renyi"}),
}
PLAN_METHODS = ("mi-prun", "shortgpt", "angular")
KEEP = 0.75


def build_models(root: Path) -> dict[str, Path]:
    from tiny_models import make_tiny_model

    models = {}
    for hidden in sorted({kwargs["hidden_size"] for kwargs, _ in CASES.values()}):
        models[f"d{hidden}"] = make_tiny_model(root / f"d{hidden}", arch="llama", hidden_size=hidden)
    return models


def compute_case(name: str, model_dir: Path, cache_dir: Path) -> dict:
    """Scores and plans of one case with the code on the path now."""
    from vllm_miprun.options import CalibrationSettings, MiprunOptions
    from vllm_miprun.pipeline.calibrate import calibrate
    from vllm_miprun.pipeline.plan import make_plan

    _, settings = CASES[name]
    calibration = CalibrationSettings(**settings)
    cache = calibrate(model_dir, calibration, cache_dir=cache_dir, force=True, progress=False).cache
    plans = {}
    for method in PLAN_METHODS:
        options = MiprunOptions(keep=KEEP, method=method, cache_dir=str(cache_dir), calibration=calibration)
        plans[method] = list(make_plan(model_dir, options, progress=False).pruned)
    return {
        "span_scores": cache.span_scores,
        "skip_mi_iso": cache.baselines["skip_mi_iso"],
        "angular": cache.baselines["angular"],
        "block_influence": cache.baselines["block_influence"],
        "plans": plans,
    }


def model_for(name: str, models: dict[str, Path]) -> Path:
    return models[f"d{CASES[name][0]['hidden_size']}"]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="miprun-span-ref-") as tmp:
        root = Path(tmp)
        models = build_models(root)
        data = {name: compute_case(name, model_for(name, models), root / f"cache-{name}") for name in CASES}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
