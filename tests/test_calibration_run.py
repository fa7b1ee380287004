"""``python -m calibration.run``: two tiny-model recipes as Ray tasks on a local cluster
(127.0.0.1) write the score caches ``vllm serve --load-format miprun`` writes and reuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration import run
from calibration.recipe import read_recipe
from vllm_miprun.options import OptionError

SMALL = {"samples": 4, "seq_len": 32}


def _recipe(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"model": "m", "targets": []}, "at least one target"),
    ({"model": "m", "targets": [{"keep": 2}]}, 'keep must be a number in (0, 1], got 2; e.g. {"keep": 0.75}'),
    ({"model": "m", "targets": [{"keep": 0.5, "drop": "1"}]}, "each target is"),
    ({"model": "m", "targets": [{"keep": 0.5}], "options": {"keep": 0.5}}, "may not hold ['keep']"),
    ({"model": "m", "targets": [{"keep": 0.5}], "colour": 1}, "unknown keys ['colour']"),
    ({"model": "m", "targets": [{"keep": 0.5}], "heal": "yes"}, "heal must be true, false or one of none, linear, distill"),
    # wrong types used to escape as TypeError/ValueError, or pass unchecked to the runner
    ({"model": "m", "targets": 5}, "targets must be a list such as"),
    ({"model": "m", "targets": [{"keep": 0.5}, {"keep": 0.75}, {"keep": 0.5}]},
     "gives the target {'keep': 0.5} more than once"),
    ({"model": "m", "targets": True}, "targets must be a list such as"),
    ({"model": "m", "targets": [{"keep": 0.5}], "options": "ab"}, "options must be a table such as"),
    ({"model": "m", "targets": [{"keep": 0.5}], "options": [["method", "sleb"]]}, "options must be a table such as"),
    ({"model": "m", "targets": [{"keep": 0.5}], "revision": 5}, "revision must be a non-empty text"),
    ({"model": "m", "targets": [{"keep": 0.5}], "download_dir": ["d"]}, "download_dir must be a non-empty text"),
    ({"model": "", "targets": [{"keep": 0.5}]}, "with a model name or folder"),
    ({"model": "m\0", "targets": [{"keep": 0.5}]}, "with a model name or folder"),
    ({"model": "m", "targets": [{"latency_budget": "x" * 100_000}]}, "latency_budget"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, data, message):
    """Each refusal names the recipe's key, and its hint is a recipe entry, not a flag."""
    with pytest.raises(OptionError) as err:
        read_recipe(_recipe(tmp_path, "bad", data))
    assert message in str(err.value) and "--miprun-" not in str(err.value), str(err.value)
    assert len(str(err.value)) < 1000  # values are shown cut, never whole


@pytest.mark.parametrize("kind", ["fifo", "device", "oversized"])
def test_a_recipe_path_that_is_not_a_recipe_file_is_refused_before_reading(tmp_path, kind):
    """A FIFO used to block the read forever, /dev/zero to read until memory ran out."""
    import os

    path = tmp_path / "r.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path.write_text(json.dumps({"model": "m", "targets": [{"keep": 0.5}], "revision": "x" * (1 << 20)}))
    what = "bytes long" if kind == "oversized" else "not a regular file"
    with pytest.raises(OptionError, match=f"it is {'[0-9]+ ' if kind == 'oversized' else ''}{what}, not a recipe "
                                          "file of at most 1 MiB"):
        read_recipe(path)


@pytest.mark.parametrize("name, text", [("deep.json", "[" * 100_000 + "]" * 100_000),
                                        ("deep.toml", "model = " + "[" * 100_000 + "]" * 100_000),
                                        ("deep_table.toml", "model = " + "{a = " * 10_000 + "1" + "}" * 10_000)])
def test_a_deeply_nested_recipe_is_refused_in_one_line(tmp_path, name, text):
    """The parsers raise RecursionError, which is not a ValueError."""
    (tmp_path / name).write_text(text)
    with pytest.raises(OptionError, match="must be a readable JSON or TOML file"):
        read_recipe(tmp_path / name)


def _serve_plan(model_dir: Path, cache_dir: Path, *flags: str) -> dict:
    """What `vllm serve MODEL --load-format miprun FLAGS` plans in its front process (no engine)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    import vllm_miprun
    from vllm_miprun.vllm import compat
    from vllm_miprun.vllm.loader import last_load_report

    vllm_miprun.register()
    argv = ["--model", str(model_dir), "--load-format", "miprun", "--miprun-cache-dir", str(cache_dir),
            "--miprun-samples", "4", "--miprun-seq-len", "32", *flags]
    AsyncEngineArgs.from_cli_args(compat.serve_parser().parse_args(argv))
    return last_load_report()


def _close(a, b) -> bool:
    """Equal JSON, floats to 1e-5 relative (Ray's workers run torch on other thread counts)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-9)
    return a == b


@pytest.mark.slow
def test_two_recipes_on_local_ray_write_the_caches_serve_reuses(tmp_path, tiny_llama_dir, tiny_qwen2_dir):
    ray = pytest.importorskip("ray")
    recipes = [read_recipe(_recipe(tmp_path, "llama", {
                   "model": str(tiny_llama_dir), "options": SMALL, "targets": [{"keep": 0.75}, {"keep": 0.5}]})),
               read_recipe(_recipe(tmp_path, "qwen2", {
                   "model": str(tiny_qwen2_dir), "options": SMALL, "targets": [{"keep": 0.75}], "heal": True}))]
    cache_dir = tmp_path / "scores"
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        rows = run.run_all(recipes, str(cache_dir), use_ray=True)
    finally:
        ray.shutdown()
    assert [(r["recipe"], r["target"], r["scores"]) for r in rows] == [
        ("llama", {"keep": 0.75}, "computed"), ("llama", {"keep": 0.5}, "cache-hit"),
        ("qwen2", {"keep": 0.75}, "computed")]
    assert [len(r["kept"]) for r in rows] == [6, 4, 6]
    table = run.format_table(rows)
    assert table.splitlines()[0].split() == list(run.COLUMNS) and "4/8" in table

    # the server, given the recipe's options, finds the cache and plans the same blocks
    served = _serve_plan(tiny_llama_dir, cache_dir, "--miprun-keep", "0.5")
    assert served["scores_source"] == "cache-hit" and served["kept"] == rows[1]["kept"]
    (maps,) = cache_dir.glob("tiny-qwen2*-heal-*.safetensors")  # the recipe's heal maps, fitted once
    fitted = maps.stat().st_mtime_ns
    healed = _serve_plan(tiny_qwen2_dir, cache_dir, "--miprun-keep", "0.75", "--miprun-heal", "linear")
    assert healed["scores_source"] == "cache-hit" and healed["kept"] == rows[2]["kept"]
    assert maps.stat().st_mtime_ns == fitted  # the server read them, it did not fit again

    # and a server calibrating on its own writes the same file: same name, same content but timings
    own = tmp_path / "serve_scores"
    served_alone = _serve_plan(tiny_llama_dir, own, "--miprun-keep", "0.75")
    assert served_alone["scores_source"] == "computed" and served_alone["kept"] == rows[0]["kept"]
    assert _serve_plan(tiny_llama_dir, own, "--miprun-keep", "0.5")["kept"] == rows[1]["kept"]
    ours, theirs = Path(rows[0]["cache"]), Path(served_alone["cache_path"])
    assert ours.name == theirs.name
    a, b = (json.loads(p.read_text()) for p in (ours, theirs))
    a.pop("timings"), b.pop("timings")
    assert _close(a, b)


def test_without_ray_the_command_runs_recipes_here_and_prints_the_table(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, "llama", {"model": str(tiny_llama_dir), "options": SMALL,
                                         "targets": [{"keep": 0.75}, {"latency_budget": "0.98"}]})
    out = tmp_path / "summary.json"
    assert run.main([str(recipe), "--no-ray", "--cache-dir", str(tmp_path / "scores"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["scores"] for r in rows] == ["computed", "cache-hit"]
    assert Path(rows[0]["cache"]).parent == tmp_path / "scores"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == list(run.COLUMNS)
    assert printed[1].split()[:4] == ["llama", "keep=0.75", "6/8", "computed"]
