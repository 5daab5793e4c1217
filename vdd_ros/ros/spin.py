"""Running one node in its own process: init, spin, clean shutdown on SIGINT/SIGTERM."""
from __future__ import annotations

import faulthandler
import gc
import math
import os
import signal
import sys
import time

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy_impl
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import get_default_context

# joint_states as sensor data (best effort), with only the newest message kept: at depth 5 a node that falls
# behind works through a queue of older observations instead of answering the freshest one
JOINT_STATES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


class ThrottledWarnings:
    """``warn(key, text)``: a warning at most every ``period_s`` per key (wall clock), so a stream of bad
    messages does not flood the log."""

    def __init__(self, logger, period_s: float = 2.0):
        self._logger = logger
        self._period_s = period_s
        self._warned_at: dict[str, float] = {}

    def __call__(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._warned_at.get(key, -math.inf) >= self._period_s:
            self._warned_at[key] = now
            self._logger.warning(text)


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def run_node(node_class, node_name: str, args=None) -> int:
    """rclpy.init, spin, clean shutdown on SIGINT/SIGTERM.

    rclpy's own signal handler shuts the context down and wakes the executor; it then calls
    the handler that was installed before it. That one is a no-op here, so no KeyboardInterrupt
    can land in the middle of the clean-up.

    After the clean shutdown (node destroyed, context shut down: no DDS files left) the process ends
    with ``os._exit``: a stop under load once hung in the interpreter's own finalisation for over 10 s,
    until a SIGTERM killed it. SIGUSR1 dumps every thread's stack to stderr (``NodeProcess.stop`` sends it
    before escalating), so a hang names its place in the node's log.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rclpy.init(args=args)
    node = node_class(node_name)
    executor = make_executor(getattr(node, "executor_kind", "single_threaded"))
    executor.add_node(node)
    try:
        if hasattr(node, "start"):
            node.start()
        if isinstance(executor, SingleThreadedExecutor):
            executor.spin()
        else:  # the EventsExecutor's spin() does not return when the signal shuts the context down
            while rclpy.ok():
                executor.spin_once(timeout_sec=0.1)
    except ExternalShutdownException:
        pass
    except _rclpy_impl.RCLError:
        if rclpy.ok():
            raise
        # a callback that was running when the signal shut the context down: nothing to report
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    # the DDS participant goes with the context (its /dev/shm files too) once nothing holds it: destroyed
    # here, not left to a finalisation that os._exit skips
    del node, executor
    gc.collect()
    get_default_context().destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


EXECUTORS = ("single_threaded", "events")


def make_executor(kind: str):
    """``single_threaded``: rclpy's SingleThreadedExecutor; ``events``: rclpy's EventsExecutor (C++ event queue,
    rclpy.experimental), which wakes on each message without rebuilding a wait set."""
    if kind == "events":
        from rclpy.experimental import EventsExecutor
        return EventsExecutor()
    if kind != "single_threaded":
        raise ValueError(f"executor: expected one of {list(EXECUTORS)}, got '{kind}'")
    return SingleThreadedExecutor()


def parameter_descriptor(kind: int, description: str, *, choices=None, float_range=None,
                         int_range=None) -> ParameterDescriptor:
    """A ParameterDescriptor with its type, description (listing ``choices``) and numeric range."""
    if choices:
        description = f"{description} One of {list(choices)}."
    descriptor = ParameterDescriptor(type=kind, description=description)
    if float_range:
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(float_range[0]),
                                                              to_value=float(float_range[1]), step=0.0)]
    if int_range:
        descriptor.integer_range = [IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=0)]
    return descriptor
