"""Accounting, handles and buffer reuse: the small pieces every transport shares."""

import time

import torch

from hecate.collectives import CommStats, Handle, OpStats, delta
from hecate.collectives.buffers import BufferPool

BLOCK_S = 0.05
TIMER_SLACK_S = 0.01  # perf_counter around a sleep can read slightly short of the sleep on a loaded machine


def test_stats_sum_calls_bytes_and_wait_per_operation_name():
    stats = CommStats()
    stats.record("a", 10, 20)
    stats.record("a", 1, 2)
    stats.record("b", 5, 0)
    stats.record_wait("a", 0.5)
    before = stats.snapshot()
    stats.record("a", 100, 0)
    assert before["a"] == OpStats(calls=2, bytes_sent=11, bytes_received=22, wait_s=0.5)
    assert delta(stats.snapshot(), before) == {"a": OpStats(1, 100, 0, 0.0), "b": OpStats()}
    stats.reset()
    assert stats.snapshot() == {}


def test_handle_waits_once_records_time_blocked_and_chains():
    stats, calls = CommStats(), []
    handle = Handle(
        lambda: (calls.append("block"), time.sleep(BLOCK_S)),
        lambda: 7,
        lambda seconds: stats.record_wait("op", seconds),
    )
    chained = handle.then(lambda value: value * 2)
    assert chained.wait() == 14
    assert handle.wait() == 7
    assert calls == ["block"]
    assert stats.snapshot()["op"].wait_s >= BLOCK_S - TIMER_SLACK_S


def test_buffer_pool_hands_back_a_returned_buffer_that_fits():
    pool = BufferPool()
    first = pool.take(100)
    pool.give(first)
    assert pool.take(80).data_ptr() == first.data_ptr()
    assert pool.take(80).data_ptr() != first.data_ptr()
    assert pool.take(5).dtype == torch.uint8
