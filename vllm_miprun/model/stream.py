"""Streamed block weights: prefetched reads, the compute dtype, and a memory budget for
blocks kept resident between passes (issue 14).

* :class:`PrefetchingReader` reads named groups of tensors (one block's weights) from
  the safetensors files; while the caller runs one group, the next is read, cast and
  placed on the device in a background thread.
* :func:`compute_dtype` keeps the checkpoint's dtype on accelerators and uses float32 on
  the CPU, where half-precision matmuls are slow and today's score caches were computed.
* :class:`ResidentBudget` decides which blocks stay loaded between passes of a forward
  search, within ``max_memory`` bytes, so memory does not grow with depth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import torch

logger = logging.getLogger(__name__)

# Left free on an accelerator when the budget is derived from its free memory: activations,
# the stored boundary states and the allocator's own slack live there.
DEVICE_MARGIN_BYTES = 4 << 30
DEVICE_MARGIN_FRACTION = 0.10
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

ReadFn = Callable[[list[str]], dict[str, torch.Tensor]]


def checkpoint_dtype(dtypes: Iterable[str]) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in (safetensors names)."""
    counts: dict[torch.dtype, int] = {}
    for name in dtypes:
        if name in SAFETENSORS_DTYPES:
            counts[SAFETENSORS_DTYPES[name]] = counts.get(SAFETENSORS_DTYPES[name], 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def compute_dtype(device: str | torch.device, stored: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """``requested`` when given; else the stored dtype on an accelerator and float32 on the CPU.

    On the CPU the weights are cast once per read either way, and float32 keeps the
    scores identical to the caches computed before this option existed. A float16
    checkpoint runs in bfloat16 on an accelerator: Gemma-like activations exceed float16's
    range (inf, then NaN scores). The device is not asked: torch runs bfloat16 on every CUDA
    GPU vLLM supports (emulated before Ampere, which ``torch.cuda.is_bf16_supported()``
    counts as supported), and asking would start CUDA in vLLM's front process, which
    decides from this where the score cache is before any child process plans.
    """
    if requested is not None:
        return requested
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.bfloat16 if stored == torch.float16 else stored


def default_max_memory(device: str | torch.device) -> int:
    """Bytes that blocks may stay resident in by default.

    An accelerator: its free memory minus a margin (``DEVICE_MARGIN_BYTES`` plus
    ``DEVICE_MARGIN_FRACTION`` of the total). The CPU: 0. The operating system's page
    cache already holds the checkpoint's recently read pages, so streaming a block
    again costs one copy and cast, while a resident float32 copy would double memory
    that grows with depth (``benchmarks/bench_scale.py`` measures both).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - DEVICE_MARGIN_BYTES - DEVICE_MARGIN_FRACTION * total))


class DaemonWorker:
    """One daemon thread that runs submitted calls in order, each answered by a ``Future``.

    Not a ``ThreadPoolExecutor``: its worker is no daemon, and the executor registers it
    for the exit-time wake-up only after ``Thread.start`` returns. A Ctrl-C landing inside
    that start (it waits for the thread) left a live worker nobody wakes, and the
    interpreter waited for it forever at exit. A daemon thread never holds the exit. The
    thread holds the queue, not the worker, so a worker nobody holds any more lets it end."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_run_jobs, args=(self._jobs,), name=name, daemon=True).start()
        weakref.finalize(self, self._jobs.put, None)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let the thread end after the calls already submitted."""
        self._jobs.put(None)


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        future, fn, args = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 - the caller's result() raises it
            future.set_exception(error)
        del job, future, fn, args  # hold no call's objects while waiting for the next


class PrefetchingReader:
    """Read tensor groups by key; ``hint`` starts reading the next one in a thread.

    ``read`` maps a list of tensor names to tensors on the host. The thread also casts
    them to ``dtype`` and places them on ``device`` (on CUDA from pinned memory on a
    side stream, so the copy overlaps the running block); :meth:`get` makes the
    caller's stream wait for that copy before it hands the tensors out.
    """

    def __init__(self, read: ReadFn, device: str | torch.device, dtype: torch.dtype):
        self._read, self.device, self.dtype = read, torch.device(device), dtype
        self._pool = DaemonWorker("miprun-prefetch")
        self._pending: tuple[object, Future] | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetch_hits = 0
        self.reads = 0

    def _load(self, names: list[str]):
        tensors = self._read(names)
        if self._stream is None:
            return {n: t.to(device=self.device, dtype=self.dtype) for n, t in tensors.items()}, None
        with torch.cuda.stream(self._stream):
            placed = {n: t.to(dtype=self.dtype).pin_memory().to(self.device, non_blocking=True)
                      for n, t in tensors.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return placed, event

    def hint(self, key, names: list[str]) -> None:
        """Start reading ``names`` (group ``key``) in the background, unless it already is."""
        if self._pending is not None and self._pending[0] == key:
            return
        self._drop_pending()
        self._pending = (key, self._pool.submit(self._load, list(names)))

    def get(self, key, names: list[str]) -> dict[str, torch.Tensor]:
        """Group ``key``'s tensors: the prefetched ones if ``key`` was hinted, else read now."""
        self.reads += 1
        if self._pending is not None and self._pending[0] == key:
            tensors, event = self._pending[1].result()
            self._pending = None
            self.prefetch_hits += 1
        else:
            self._drop_pending()
            tensors, event = self._load(list(names))
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in tensors.values():
                tensor.record_stream(current)  # freed memory is not reused before the caller is done
        return tensors

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].result()  # finish (and free) a read nobody asked for
            self._pending = None

    def close(self) -> None:
        self._drop_pending()
        self._pool.shutdown()


def stream_groups(read: ReadFn, groups: Iterable[list[str]], device: str | torch.device,
                  dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Yield each group's tensors in order, reading the next group while the caller works."""
    reader = PrefetchingReader(read, device, dtype)
    try:
        groups = list(groups)
        for position, names in enumerate(groups):
            tensors = reader.get(position, names)
            if position + 1 < len(groups):
                reader.hint(position + 1, groups[position + 1])
            yield tensors
    finally:
        reader.close()


class ResidentBudget:
    """Which blocks stay loaded between passes, within ``max_memory`` bytes.

    Forward searches resume from stored boundary states, so later blocks run more often
    than earlier ones: when the budget is full, a later block displaces the earliest
    resident block.
    """

    def __init__(self, max_memory: int):
        if max_memory < 0:
            raise ValueError(f"max_memory must be >= 0 bytes, got {max_memory}")
        self.max_memory = int(max_memory)
        self.sizes: dict[int, int] = {}

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def admit(self, index: int, size: int) -> tuple[bool, list[int]]:
        """(keep block ``index`` resident?, the resident blocks to release first)."""
        if size > self.max_memory:
            return False, []
        evicted = []
        for other in sorted(self.sizes):
            if self.used + size <= self.max_memory or other >= index:
                break
            evicted.append(other)
            del self.sizes[other]
        if self.used + size > self.max_memory:
            return False, evicted
        self.sizes[index] = size
        return True, evicted


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def return_freed_host_memory() -> None:
    """Give the pages of freed block weights back to the operating system (glibc).

    Block tensors are allocated by the prefetch thread and freed by the caller, so they
    come from a per-thread malloc arena that glibc does not shrink on its own: without
    this, resident memory creeps up by a few blocks' worth over a long search.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

