"""Running one node in its own process: init, spin, clean shutdown on SIGINT/SIGTERM."""
from __future__ import annotations

import signal

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy_impl


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def run_node(node_class, node_name: str, args=None) -> int:
    """rclpy.init, spin, clean shutdown on SIGINT/SIGTERM.

    rclpy's own signal handler shuts the context down and wakes the executor; it then calls
    the handler that was installed before it. That one is a no-op here, so no KeyboardInterrupt
    can land in the middle of the clean-up.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    rclpy.init(args=args)
    node = node_class(node_name)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if hasattr(node, "start"):
            node.start()
        executor.spin()
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
    return 0
