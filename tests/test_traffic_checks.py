"""The hostile-traffic checks of benchmarks/load_and_faults.py on recorded client and
scraper data (pure logic, no server): each check must catch the failure it names."""

from __future__ import annotations

import copy

import pytest
from benchmark_module import load_benchmark  # tests/ is on sys.path (conftest)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("load_and_faults")


MIPRUN = {'miprun_blocks_kept{model_name="m"}': 23.0, 'miprun_throughput_gain{baseline="estimated",model_name="m"}': 1.2,
          'miprun_generation_tokens_per_second{model_name="m"}': 0.0}
GIB = 2**30


def _healthy_run():
    results = [
        {"kind": "normal", "ok": True, "tokens": 40, "status": None},
        {"kind": "normal", "ok": True, "tokens": 10},
        {"kind": "disconnect", "ok": True, "tokens": 0, "chunks": 2, "max_tokens": 96, "disconnected": True},
        {"kind": "disconnect", "ok": True, "tokens": 3, "chunks": 3, "max_tokens": 96, "disconnected": False},
        {"kind": "malformed", "malformed": "invalid-json", "ok": True, "tokens": 0, "status": 400},
        {"kind": "overlong", "ok": True, "tokens": 0, "status": 400},
    ]
    live = {**MIPRUN, 'miprun_generation_tokens_per_second{model_name="m"}': 80.0,
            'miprun_throughput_gain{baseline="estimated",model_name="m"}': 1.3}
    samples = [{"t": 0.0, "rss": GIB, "miprun": dict(MIPRUN)}, {"t": 1.0, "rss": int(1.05 * GIB), "miprun": live}]
    before = {"vllm:generation_tokens_total": 100.0, "vllm:request_success_total": 7.0}
    after = {"vllm:generation_tokens_total": 100.0 + 53 + 5, "vllm:request_success_total": 10.0,
             "vllm:num_requests_running": 0.0, "vllm:kv_cache_usage_perc": 0.0}
    return {"results": results, "samples": samples, "totals_before": before, "totals_after": after,
            "miprun_before": dict(MIPRUN), "rss": (GIB, int(1.02 * GIB)), "alive": True, "health": 200}


def _failed(bench, run) -> set[str]:
    summary = bench.hostile_summary(**run)
    return {name for name, passed in summary["checks"].items() if not passed}


def test_a_healthy_run_meets_every_check(bench):
    summary = bench.hostile_summary(**_healthy_run())
    assert summary["ok"], summary["checks"]
    tokens = summary["tokens"]  # 53 completed + 2 chunks of the aborted stream <= 58 <= 53 + 96
    assert (tokens["completed_tokens"], tokens["delivered_at_least"], tokens["ceiling"]) == (53, 55, 149)
    assert summary["request_success_expected"] == [3, 4] and summary["request_success_delta"] == 3


@pytest.mark.parametrize("break_it, check", [
    (lambda r: r["results"][0].update(ok=False, status=500), "no_5xx"),
    (lambda r: r["results"][4].update(ok=False, status=200), "every_bad_request_4xx"),
    (lambda r: r["totals_after"].update({"vllm:generation_tokens_total": 150.0}), "generation_tokens_consistent"),
    (lambda r: r["totals_after"].update({"vllm:generation_tokens_total": 300.0}), "generation_tokens_consistent"),
    (lambda r: r["samples"][1]["miprun"].update({'miprun_blocks_kept{model_name="m"}': 30.0}),
     "miprun_gauges_present_and_constant"),
    (lambda r: r["samples"][1]["miprun"].pop('miprun_blocks_kept{model_name="m"}'),
     "miprun_gauges_present_and_constant"),
    (lambda r: r["samples"][1]["miprun"].update({'miprun_generation_tokens_per_second{model_name="m"}': 0.0}),
     "stat_logger_live"),
    (lambda r: r["samples"][0]["miprun"].update({'miprun_generation_tokens_per_second{model_name="m"}': 80.0}),
     "stat_logger_live"),  # frozen at its last value
    (lambda r: r["totals_after"].update({"vllm:kv_cache_usage_perc": 0.02}), "no_request_left"),
    (lambda r: r["samples"][1].update(rss=int(1.2 * GIB)), "rss_within_10pct"),
    (lambda r: r.update(alive=False, health="ConnectionRefusedError"), "server_alive_and_healthy"),
])
def test_each_check_catches_its_failure(bench, break_it, check):
    run = copy.deepcopy(_healthy_run())
    break_it(run)
    assert check in _failed(bench, run)


def test_hostile_mix_counts_and_kinds(bench):
    specs = bench.hostile_specs(120, seed=2)
    kinds = [s["kind"] for s in specs]
    assert [kinds.count(k) for k in ("normal", "disconnect", "malformed", "overlong")] == [100, 12, 6, 2]
    assert {s["malformed"] for s in specs if s["kind"] == "malformed"} == set(bench.MALFORMED_KINDS)
    assert all(s["prompt_words"] > bench.MAX_MODEL_LEN for s in specs if s["kind"] == "overlong")
    assert all(s["stream"] and s["max_tokens"] == bench.MAX_OUTPUT for s in specs if s["kind"] == "disconnect")
    assert bench.hostile_specs(120, seed=2) == specs  # seeded


def test_the_client_lets_go_of_a_connection_before_the_server_closes_it(bench, tmp_path):
    """The keep-alive race (a request sent on a connection the server is closing is lost
    without a response) needs the client's expiry below the server's timeout, by a margin."""
    env = bench.server_env(tmp_path)
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) == bench.SERVER_KEEPALIVE_S
    assert bench.SERVER_KEEPALIVE_S >= 10 * bench.CLIENT_KEEPALIVE_S
    assert bench.CLIENT_KEEPALIVE_S <= 5 / 2  # also safe against vLLM's default 5 s (a server started without server_env)


def test_a_failed_request_comes_with_the_server_logs_trouble(bench, tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        'INFO:     127.0.0.1:1 - "POST /v1/completions HTTP/1.1" 200 OK\n'
        '(APIServer pid=1) INFO 12-05 09:31:08 [loggers.py:335] Engine 000: Running: 16 reqs\n'
        'INFO:     127.0.0.1:2 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error\n'
        '(EngineCore pid=2) ERROR 12-05 09:31:09 [core.py:1] EngineCore failed\n'
        'Traceback (most recent call last):\n'
        'INFO:     127.0.0.1:3 - "GET /metrics HTTP/1.1" 200 OK\n')
    server = bench.Server(proc=None, port=0, log=log, cache_dir=tmp_path)
    trouble = bench.server_trouble(server)
    assert [line.split()[-1] for line in trouble] == ["Error", "failed", "last):"]
    assert bench.server_trouble(server, limit=1) == ["Traceback (most recent call last):"]
