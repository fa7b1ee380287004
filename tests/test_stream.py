"""Issue 14: prefetched block reads, the compute dtype and the resident-block budget."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from vllm_miprun.model import stream
from vllm_miprun.model.blockwise import BlockwiseModel
from vllm_miprun.options import MiprunOptions, OptionError, parse_bytes
from vllm_miprun.pipeline.calibrate import calibration_ids
from vllm_miprun.options import CalibrationSettings


class RecordingRead:
    """A read function over in-memory tensors that records which thread read what."""

    def __init__(self, groups):
        self.tensors = {name: torch.full((2, 2), float(i)) for i, names in enumerate(groups) for name in names}
        self.threads: list[tuple[str, str]] = []

    def __call__(self, names):
        self.threads.extend((name, threading.current_thread().name) for name in names)
        return {name: self.tensors[name].to(torch.float64) for name in names}


def test_stream_groups_reads_the_next_group_in_a_thread_and_casts():
    groups = [["a.w", "a.b"], ["b.w"], ["c.w"]]
    read = RecordingRead(groups)
    out = list(stream.stream_groups(read, groups, "cpu", torch.float32))
    assert [sorted(group) for group in out] == [sorted(g) for g in groups]
    assert all(t.dtype == torch.float32 for group in out for t in group.values())
    assert float(out[2]["c.w"][0, 0]) == 2.0
    by_name = dict(read.threads)
    assert by_name["a.w"] == threading.current_thread().name  # the first group: nothing to overlap
    assert by_name["b.w"].startswith("miprun-prefetch") and by_name["c.w"].startswith("miprun-prefetch")


def test_reader_drops_a_hint_that_was_not_taken():
    groups = [["a"], ["b"], ["c"]]
    read = RecordingRead(groups)
    reader = stream.PrefetchingReader(read, "cpu", torch.float32)
    reader.hint(1, ["b"])
    assert float(reader.get(2, ["c"])["c"][0, 0]) == 2.0  # not the hinted group: read now
    assert reader.prefetch_hits == 0
    reader.hint(0, ["a"])
    assert float(reader.get(0, ["a"])["a"][0, 0]) == 0.0 and reader.prefetch_hits == 1
    reader.close()


def test_the_prefetch_thread_is_a_daemon_that_answers_in_order_and_ends_on_shutdown():
    """A daemon, so that it can never hold the interpreter's exit (an interrupted start
    once waited forever for a pool's worker); failures reach the caller."""
    worker = stream.DaemonWorker("miprun-test")
    thread = next(t for t in threading.enumerate() if t.name == "miprun-test")
    assert thread.daemon
    futures = [worker.submit(pow, 2, n) for n in range(4)] + [worker.submit(int, "x")]
    assert [f.result(timeout=10) for f in futures[:4]] == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        futures[4].result(timeout=10)
    worker.shutdown()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_prefetch_thread_ends_with_the_reader_nobody_holds(tiny_llama_dir):
    """Every streamed model makes a reader; one that is dropped unclosed must not leave
    its thread behind (a long-lived server plans many times). The model is a reference
    cycle, and a prefetch still reading holds it, so it goes at a later collection."""
    import gc
    import time

    def prefetch_threads() -> set:
        return {t for t in threading.enumerate() if t.name == "miprun-prefetch"}

    before = prefetch_threads()
    for _ in range(3):
        model = BlockwiseModel(tiny_llama_dir)
        with model.block(0):  # hints block 1: a read may still run when the model is dropped
            pass
        del model
    deadline = time.monotonic() + 10
    while prefetch_threads() - before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert prefetch_threads() - before == set()


def test_budget_keeps_later_blocks_and_never_exceeds_max_memory():
    budget = stream.ResidentBudget(250)
    assert budget.admit(0, 100) == (True, [])
    assert budget.admit(1, 100) == (True, [])
    assert budget.admit(2, 100) == (True, [0])  # a later block displaces the earliest
    assert budget.used == 200 and sorted(budget.sizes) == [1, 2]
    assert budget.admit(0, 100) == (False, [])  # an earlier block displaces nothing
    assert budget.admit(5, 300) == (False, [])  # larger than the whole budget
    assert stream.ResidentBudget(0).admit(3, 1) == (False, [])
    with pytest.raises(ValueError, match="max_memory"):
        stream.ResidentBudget(-1)


def test_budget_takes_a_block_that_fits_exactly():
    assert stream.ResidentBudget(100).admit(0, 100) == (True, [])
    budget = stream.ResidentBudget(200)
    budget.admit(0, 100), budget.admit(1, 100)
    assert budget.admit(2, 100) == (True, [0])  # one block released, not two
    assert sorted(budget.sizes) == [1, 2]


def test_default_budget_on_a_gpu_is_its_free_memory_less_the_margin_and_never_negative(monkeypatch):
    """A GPU with less free memory than the margin keeps no block resident (a negative budget is refused)."""
    total = 80 << 30
    margin = stream.DEVICE_MARGIN_BYTES + stream.DEVICE_MARGIN_FRACTION * total
    for free, expected in ((1 << 30, 0), (60 << 30, int((60 << 30) - margin))):
        monkeypatch.setattr(stream.torch.cuda, "mem_get_info", lambda device=None, free=free: (free, total))
        assert stream.default_max_memory("cuda") == expected


def test_compute_dtype_keeps_the_checkpoint_dtype_off_the_cpu(monkeypatch):
    def starts_cuda(*_args, **_kwargs):
        raise AssertionError("compute_dtype asked the GPU, which starts CUDA in vLLM's front process")

    for name in ("is_bf16_supported", "current_device", "get_device_properties", "init"):
        monkeypatch.setattr(torch.cuda, name, starts_cuda)
    assert stream.checkpoint_dtype(["BF16", "BF16", "F32"]) == torch.bfloat16
    assert stream.compute_dtype("cpu", torch.bfloat16) == torch.float32
    assert stream.compute_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert stream.compute_dtype("cuda:1", torch.bfloat16, torch.float32) == torch.float32
    # float16 checkpoints overflow in Gemma-like families: calibrate in bfloat16
    assert stream.compute_dtype("cuda", torch.float16) == torch.bfloat16
    assert stream.compute_dtype("cuda", torch.float16, torch.float16) == torch.float16  # asked for
    assert stream.default_max_memory("cpu") == 0


def _loaded_blocks(model) -> int:
    return sum(any(not p.is_meta for p in layer.parameters()) for layer in model.skeleton.model.layers)


def test_forward_search_stays_within_the_block_budget(tiny_llama_dir):
    from vllm_miprun.pipeline.refine import CalibrationKL

    ids = calibration_ids(tiny_llama_dir, CalibrationSettings(samples=4, seq_len=32))[:2]
    everything = BlockwiseModel(tiny_llama_dir, resident_blocks=True, max_memory=1 << 40)
    block_bytes = everything.index.bytes_with_prefix("model.layers.0.")
    bounded = BlockwiseModel(tiny_llama_dir, resident_blocks=True, max_memory=2 * block_bytes)
    peak = [0]
    original = bounded.run_block

    def run_and_count(layer, hidden, batch_size=8):
        peak[0] = max(peak[0], _loaded_blocks(bounded))
        return original(layer, hidden, batch_size)

    bounded.run_block = run_and_count
    sets = [frozenset(), frozenset({2}), frozenset({2, 5}), frozenset({6}), frozenset({1, 7})]
    full, small = CalibrationKL(everything, ids), CalibrationKL(bounded, ids)
    for pruned in sets:
        assert small(pruned) == pytest.approx(full(pruned), rel=1e-6)
    assert _loaded_blocks(everything) == 8
    assert 1 <= peak[0] <= 3 and _loaded_blocks(bounded) <= 2  # two resident + the one running
    assert sorted(bounded._resident) == [6, 7]  # the later blocks, which resumed passes re-run


def test_a_streaming_pass_reads_each_next_block_while_the_current_one_runs(tiny_llama_dir):
    model = BlockwiseModel(tiny_llama_dir)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    model.forward_from(model.embed_tokens(ids), 0)
    assert (model.reader.reads, model.reader.prefetch_hits) == (8, 7)  # block 0 read when asked, 1..7 ahead


def test_max_memory_option_is_parsed_and_checked():
    assert parse_bytes("8GiB") == 8 << 30 and parse_bytes("500MB") == 500_000_000 and parse_bytes(1024) == 1024
    assert MiprunOptions(keep=0.5, max_memory="1.5g").max_memory == int(1.5 * (1 << 30))
    with pytest.raises(OptionError, match="max_memory: expected a size such as 8GiB"):
        MiprunOptions(keep=0.5, max_memory="lots")


def test_blocks_load_frozen_streamed_and_resident(tiny_llama_dir):
    """A heal fit trains only its maps through the blocks: every block comes out of
    ``block()`` with no weight that would take a gradient, whether read now or kept resident."""
    for resident in (False, True):
        model = BlockwiseModel(tiny_llama_dir, resident_blocks=resident, max_memory=1 << 40)
        for _ in range(2):  # the second time a resident block comes from memory
            with model.block(3) as layer:
                assert not any(p.requires_grad for p in layer.parameters())
        # max_memory is a budget for resident blocks only: a streaming model keeps none
        assert sorted(model._resident) == ([3] if resident else []) and model.blocks_loaded == (1 if resident else 2)


def test_loading_a_block_starts_no_thread_pool(tiny_llama_dir, monkeypatch):
    """transformers' loader starts a pool of non-daemon threads per call unless told not
    to; a Ctrl-C landing in one of their starts left a thread that held the interpreter's
    exit forever. A block is already in memory when it loads: no pool."""
    import transformers.core_model_loading as hf_loading

    pools = []
    monkeypatch.setattr(hf_loading, "ThreadPoolExecutor", lambda *a, **k: pools.append(a) or pytest.fail("a pool"))
    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    model = BlockwiseModel(tiny_llama_dir)
    with model.block(0) as layer:
        assert not any(p.is_meta for p in layer.parameters())
    assert pools == [] and model.blocks_assigned == 0  # transformers' loader ran, without a pool
    assert "HF_DEACTIVATE_ASYNC_LOAD" not in os.environ  # put back as it was
