"""A tensor-parallel worker SIGKILLed under TP=2: the server ends by itself, leaves no
process behind and no damaged score cache, and a restart serves the same plan from it.

Runs benchmarks/load_and_faults.py's ``fault_kill_tp_worker`` on the tests' tiny Llama
(4 query / 2 KV heads split over two workers, one core each): two TP=2 server starts,
the first calibrating 8 x 128 tokens at load, about 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json

import pytest
from benchmark_module import load_benchmark  # tests/ is on sys.path (conftest)

pytestmark = [pytest.mark.engine]


@pytest.mark.timeout(1800)
def test_sigkilled_tp_worker_ends_the_server_cleanly_and_keeps_the_cache(tmp_path, tiny_llama_dir):
    fault = load_benchmark("load_and_faults").fault_kill_tp_worker(tiny_llama_dir, tmp_path)
    (tmp_path / "fault.json").write_text(json.dumps(fault, indent=1))  # for a failing test's reader
    brief = json.dumps(fault, indent=1)[:4000]
    assert fault["answer"]["tokens"] >= 1 and fault["plan"] is not None, brief  # served at TP=2 first
    assert fault["worker_pid"] is not None and fault["worker_death_logged"], brief
    assert fault["exited_by_itself"] and fault["exit_seconds"] <= 120, brief
    assert fault["orphans"] == [] and fault["processes_left"] == [], brief
    assert fault["cache_before"] is not None and fault["cache_after_kill"] == fault["cache_before"], brief
    assert fault["audit_after_kill"]["ok"] and fault["audit_after_kill"]["temporary"] == [], brief
    restart = fault["restart"]
    assert restart["answer"]["tokens"] >= 1 and restart["plan"] == fault["plan"], brief
    assert not restart["calibrated"] and restart["processes_left"] == [], brief
    assert fault["ok"], fault["checks"]
