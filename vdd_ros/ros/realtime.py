"""Real-time hygiene of a control process: the garbage collector, locked memory, cheap quantiles.

No rclpy here (tested without ROS). Measured on the 2-core development machine (``vdd bench
node --rate 500 --realtime 50``): a full (generation 2) collection of the policy node's process
takes 14-19 ms, eight control periods at 500 Hz; one arrived 9 s after start-up in a node that
does not freeze its heap. ``freeze_gc`` moves everything alive into the permanent generation,
so later collections walk only what was allocated since: the control loop's few survivors.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import os
import time

import numpy as np

# <sys/mman.h>
MCL_CURRENT, MCL_FUTURE = 1, 2


def freeze_gc() -> tuple[int, float]:
    """Collect once, then freeze every surviving object (gc.freeze). Returns (frozen objects, seconds)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - started


def unfreeze_gc() -> None:
    """Give frozen objects back to the collector (a released model's reference cycles can go)."""
    gc.unfreeze()


def _mlockall(flags: int) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.mlockall(flags), ctypes.get_errno()


def _munlockall() -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.munlockall(), ctypes.get_errno()


def lock_memory(mlockall=_mlockall) -> tuple[bool, str]:
    """mlockall(MCL_CURRENT | MCL_FUTURE): every page of the process resident now and later, no page
    faults on first touch or after reclaim. Returns (locked, one line for the log)."""
    rc, err = mlockall(MCL_CURRENT | MCL_FUTURE)
    if rc == 0:
        return True, "memory locked (mlockall MCL_CURRENT|MCL_FUTURE)"
    name = errno.errorcode.get(err, str(err))
    hint = {errno.EPERM: "needs CAP_IPC_LOCK or root", errno.ENOMEM: "RLIMIT_MEMLOCK too small (ulimit -l; "
            "limits.conf memlock)"}.get(err, os.strerror(err) if err else "unknown error")
    return False, f"mlockall failed ({name}: {hint}); running with unlocked memory"


def unlock_memory(munlockall=_munlockall) -> bool:
    return munlockall()[0] == 0


def quantiles(values: np.ndarray, qs) -> list[float]:
    """Nearest-rank quantiles (np.percentile(..., method='nearest') for qs in [0, 1]) with one
    np.partition: about a fifth of np.percentile's cost, which matters inside a control process."""
    n = values.size
    if n == 0:
        return [float("nan")] * len(qs)
    ranks = [int(np.around(q * (n - 1))) for q in qs]
    part = np.partition(values, sorted(set(ranks)))
    return [float(part[k]) for k in ranks]
