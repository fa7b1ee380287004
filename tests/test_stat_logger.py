"""MiprunStatLogger: an error stops the miprun gauges but says so once, with the traceback."""

from __future__ import annotations

import logging

import pytest

from vllm_miprun.vllm import metrics


class _Records(logging.Handler):
    """Collects the metrics logger's records; vLLM's "vllm" logger may not propagate to root."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def records(monkeypatch, tmp_path):
    monkeypatch.setenv("MIPRUN_RUN_DIR", str(tmp_path))  # no stale plan report from another run
    handler = _Records()
    metrics.logger.addHandler(handler)
    previous = metrics.logger.level
    metrics.logger.setLevel(logging.DEBUG)
    yield handler.records
    metrics.logger.removeHandler(handler)
    metrics.logger.setLevel(previous)


def _stats(tokens, running: int):
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    iteration = IterationStats()
    iteration.num_generation_tokens = tokens
    return SchedulerStats(num_running_reqs=running), iteration


def _warnings(records):
    return [r for r in records if r.levelno >= logging.WARNING]


def test_error_at_start_is_logged_once_as_a_warning_with_traceback(records):
    stat_logger = metrics.MiprunStatLogger(object())  # not a VllmConfig: exporter_for fails
    assert stat_logger.exporter is None
    (warning,) = _warnings(records)
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is not None and warning.exc_info[0] is AttributeError
    assert "disabled after an error in start" in warning.getMessage()
    stat_logger.record(*_stats(4, 1))
    stat_logger.log()
    assert len(_warnings(records)) == 1  # disabled: nothing runs, nothing more is logged


def test_error_while_recording_is_logged_once_then_the_logger_is_a_no_op(records, tmp_path):
    stat_logger = metrics.MiprunStatLogger(object())
    records.clear()
    stat_logger.exporter = metrics.Exporter("tiny", tmp_path, {}, kept=[0, 1, 3], num_blocks=4, kv_dtype_bytes=2)
    stat_logger.record(*_stats(4, 1))  # a well-formed step: exported
    assert stat_logger.exporter is not None and not _warnings(records)
    for _ in range(3):
        stat_logger.record(*_stats("four", 1))  # corrupt stats: the first one disables
    assert stat_logger.exporter is None
    (warning,) = _warnings(records)
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is not None and warning.exc_info[0] is ValueError
    assert "disabled after an error in record" in warning.getMessage()
    assert "gauges keep their last values" in warning.getMessage()


def test_a_scheduler_report_without_a_step_says_whether_the_engine_is_busy(records, tmp_path):
    """An idle scheduler report (0 running) marks the engine idle, so the gap before the next
    step is not counted as busy decode time."""
    stat_logger = metrics.MiprunStatLogger(object())
    stat_logger.exporter = metrics.Exporter("idle", tmp_path, {}, kept=[0, 1, 3], num_blocks=4, kv_dtype_bytes=2)
    scheduler, _ = _stats(0, 2)
    stat_logger.record(scheduler, None, engine_idx=1)
    assert stat_logger.exporter.running == {1: True}
    scheduler, _ = _stats(0, 0)
    stat_logger.record(scheduler, None, engine_idx=1)
    assert stat_logger.exporter.running == {1: False}
