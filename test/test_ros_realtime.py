"""The policy node's real-time settings, in this process: frozen heap and locked memory follow the lifecycle."""
import gc

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from vdd_ros.paths import model_file  # noqa: E402
from vdd_ros.ros.policy_node import PolicyNode  # noqa: E402


@pytest.fixture
def make_node(domain_id):
    made = []

    def make(**parameters):
        context = Context()
        rclpy.init(context=context, domain_id=domain_id)
        overrides = [Parameter("model", value=str(model_file("student.onnx"))), Parameter("device", value="cpu")]
        overrides += [Parameter(name, value=value) for name, value in parameters.items()]
        node = PolicyNode("realtime_test", context=context, parameter_overrides=overrides)
        made.append((node, context))
        return node

    yield make
    for node, context in made:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    gc.unfreeze()


def locked_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


def test_active_node_freezes_the_heap_and_deactivate_unfreezes_it(make_node):
    if not model_file("student.onnx").is_file():
        pytest.skip("no shipped student")
    gc.unfreeze()
    node = make_node()
    node.start()  # autostart: configure + activate
    assert node._active and node.gc_frozen and not node.memory_locked
    # the model's session and the node's entities are in the permanent generation, out of every collection
    assert gc.get_freeze_count() > 10000
    assert not any(obj is node for obj in gc.get_objects())
    node.trigger_deactivate()
    assert not node.gc_frozen and gc.get_freeze_count() == 0


def test_gc_freeze_false_leaves_the_collector_alone(make_node):
    gc.unfreeze()
    node = make_node(gc_freeze=False)
    node.start()
    assert node._active and not node.gc_frozen and gc.get_freeze_count() == 0


def test_lock_memory_locks_while_active(make_node):
    node = make_node(lock_memory=True, gc_freeze=False)
    node.start()
    assert node._active
    if not node.memory_locked:
        pytest.skip("mlockall is not permitted here (the node warned and runs unlocked)")
    assert locked_kib() > 0
    node.trigger_deactivate()
    assert not node.memory_locked and locked_kib() == 0


def spin_for(node, seconds):
    import time

    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.01)
    executor.remove_node(node)
    executor.shutdown()


def test_diagnostics_ride_on_the_control_tick_while_active_and_on_their_timer_otherwise(make_node):
    from diagnostic_msgs.msg import DiagnosticArray

    node = make_node(diagnostics_period_s=0.1, control_rate_hz=200.0, allow_rate_override=True, gc_freeze=False)
    received = []
    node.create_subscription(DiagnosticArray, "/diagnostics", received.append, 10)
    node.start()
    assert node._active and node._diag_timer.is_canceled()  # no timer of their own next to the control timer
    spin_for(node, 0.75)
    active = [{kv.key: kv.value for kv in msg.status[0].values} for msg in received]
    assert 5 <= len(active) <= 8 and all(values["active"] == "True" for values in active)
    node.trigger_deactivate()
    assert not node._diag_timer.is_canceled()
    received.clear()
    spin_for(node, 0.55)
    inactive = [{kv.key: kv.value for kv in msg.status[0].values} for msg in received]
    assert 3 <= len(inactive) <= 6 and all(values["active"] == "False" for values in inactive)


@pytest.mark.parametrize("argv, message", [(["--realtime", "1"], "2..99"), (["--realtime", "100"], "2..99"),
                                           (["--sim-priority", "100"], "--sim-priority"),
                                           (["--realtime", "50", "--sim-priority", "-1"], "--sim-priority")])
def test_bench_node_refuses_bad_priorities_before_starting_anything(argv, message):
    import argparse

    from vdd_ros.ros import node_bench

    parser = argparse.ArgumentParser()
    node_bench.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        node_bench.run(parser.parse_args(argv + ["--seconds", "1"]))


def test_destroying_an_active_node_unfreezes_the_heap(domain_id):
    gc.unfreeze()
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        node = PolicyNode("realtime_destroy", context=context, parameter_overrides=[Parameter("device", value="cpu")])
        node.start()
        assert node._active and gc.get_freeze_count() > 0
        node.destroy_node()
        assert gc.get_freeze_count() == 0
    finally:
        rclpy.try_shutdown(context=context)
