"""Real-time hygiene helpers of the policy node (no rclpy): frozen heap, locked memory, cheap quantiles."""
import errno
import gc

import numpy as np
import pytest

from vdd_ros.ros.realtime import MCL_CURRENT, MCL_FUTURE, freeze_gc, lock_memory, quantiles, unfreeze_gc


class Cycle:
    def __init__(self):
        self.me = self


def test_freeze_keeps_live_objects_out_of_later_collections():
    keep = [Cycle() for _ in range(2000)]  # alive, tracked by the collector
    try:
        frozen, seconds = freeze_gc()
        assert frozen >= len(keep) and frozen == gc.get_freeze_count() and seconds >= 0
        # a full collection now walks only objects made after the freeze: none of ours is in generation 2
        gc.collect()
        ids = {id(obj) for obj in keep}
        assert not any(id(obj) in ids for obj in gc.get_objects(generation=2))
    finally:
        unfreeze_gc()
    assert gc.get_freeze_count() == 0
    gc.collect()
    ids = {id(obj) for obj in keep}
    assert sum(id(obj) in ids for obj in gc.get_objects(generation=2)) == len(keep)


def test_lock_memory_asks_for_current_and_future_pages():
    calls = []
    locked, line = lock_memory(mlockall=lambda flags: calls.append(flags) or (0, 0))
    assert locked and calls == [MCL_CURRENT | MCL_FUTURE] and "locked" in line


@pytest.mark.parametrize("err, words", [(errno.EPERM, "CAP_IPC_LOCK"), (errno.ENOMEM, "RLIMIT_MEMLOCK")])
def test_lock_memory_failure_is_one_line_and_not_fatal(err, words):
    locked, line = lock_memory(mlockall=lambda flags: (-1, err))
    assert not locked
    assert errno.errorcode[err] in line and words in line and "unlocked" in line and "\n" not in line


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 1001])
def test_quantiles_equal_nearest_rank_percentiles(n):
    values = np.random.default_rng(n).exponential(size=n)
    qs = (0.0, 0.5, 0.99, 1.0)
    expected = np.percentile(values, [q * 100 for q in qs], method="nearest")
    assert quantiles(values, qs) == pytest.approx(expected.tolist(), abs=0)


def test_quantiles_of_nothing_are_nan():
    assert all(np.isnan(quantiles(np.zeros(0), (0.5, 0.99))))
