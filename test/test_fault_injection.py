"""Faults injected into a running policy_node (its own process, real DDS, localhost discovery).

``FaultInjector`` plays the arm: it publishes stamped JointStates, listens to every command (with its
arrival time), publishes the e-stop, calls ``~/enable`` and reads ``/diagnostics``. The node runs the
shipped student at 100 Hz (timer trigger) unless a case needs otherwise.
"""
import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, Float64MultiArray  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from vdd_ros.paths import config_file  # noqa: E402
from vdd_ros.ros.processes import NodeProcess, ros_environment  # noqa: E402
from vdd_ros.runtime import load_policy  # noqa: E402
from vdd_ros.tasks import arm_avoid  # noqa: E402

JOINTS = list(arm_avoid.JOINT_NAMES)
START_Q = [0.21, 1.86, 1.75]
RATE_HZ = 100.0


class FaultInjector:
    """The arm, seen from the policy node: JointStates out, commands in, e-stop, enable, diagnostics."""

    def __init__(self, domain_id):
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node("fault_injector", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.commands: list[tuple[float, list[float]]] = []  # (arrival time.monotonic(), data)
        self.diagnostics: list[dict] = []
        self.node.create_subscription(Float64MultiArray, "commands", self._on_command, 1000)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)
        self.estop_pub = self.node.create_publisher(Bool, "estop", 10)
        self.joint_pub = None
        self.start_publisher()
        self.q = np.array(START_Q)
        self._clients = {}

    def _on_command(self, msg):
        self.commands.append((time.monotonic(), list(msg.data)))

    def _on_diagnostics(self, msg):
        self.diagnostics.extend({kv.key: kv.value for kv in status.values} | {"_message": status.message}
                                for status in msg.status)

    # --- the observation publisher: it can die and come back -------------------------------------
    def start_publisher(self):
        self.joint_pub = self.node.create_publisher(JointState, "joint_states", 10)

    def kill_publisher(self):
        self.node.destroy_publisher(self.joint_pub)
        self.joint_pub = None

    def wait_for(self, predicate, timeout, what):
        end = time.monotonic() + timeout
        while not predicate() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.01)
        assert predicate(), f"timed out after {timeout} s waiting for {what}"

    def wait_until_matched(self, timeout=30.0):
        self.wait_for(lambda: self.joint_pub.get_subscription_count() >= 1
                      and self.estop_pub.get_subscription_count() >= 1, timeout, "the node's subscriptions")
        self.spin(0.2)

    def publish_state(self, positions=None, stamp=None, names=None, velocities=None):
        msg = JointState(name=list(names or JOINTS))
        msg.position = [float(v) for v in (self.q if positions is None else positions)]
        msg.velocity = [float(v) for v in (velocities if velocities is not None else [0.0] * len(msg.position))]
        msg.header.stamp = stamp if stamp is not None else self.node.get_clock().now().to_msg()
        self.joint_pub.publish(msg)

    def spin(self, seconds, publish=True, rate_hz=RATE_HZ, follow=False):
        """Spin ``seconds``, publishing the arm's state at ``rate_hz``; ``follow``: the arm moves to each command."""
        end = time.monotonic() + seconds
        next_publish = time.monotonic()
        while time.monotonic() < end:
            if publish and self.joint_pub is not None and time.monotonic() >= next_publish:
                if follow and self.commands:
                    self.q = np.array(self.commands[-1][1])
                self.publish_state()
                next_publish += 1.0 / rate_hz
            self.executor.spin_once(timeout_sec=0.002)

    def estop(self, active: bool):
        self.estop_pub.publish(Bool(data=active))

    def call(self, srv_type, name, request, timeout=10.0):
        client = self._clients.get(name)
        if client is None:
            client = self.node.create_client(srv_type, name)
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} did not appear"
            self.spin(0.5, publish=False)
            self._clients[name] = client
        future = client.call_async(request)
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            self.spin(0.005)  # keep the arm's state flowing while the service answers
        assert future.done(), f"service {name} did not answer"
        return future.result()

    def enable(self, node_name, on=True):
        return self.call(SetBool, f"/{node_name}/enable", SetBool.Request(data=on))

    def latest_diagnostics(self, timeout=5.0):
        count = len(self.diagnostics)
        self.wait_for(lambda: len(self.diagnostics) > count, timeout, "a /diagnostics message")
        return self.diagnostics[-1]

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def start_node(tmp_path, domain_id, name="policy_node", **parameters):
    params = {"control_rate_hz": RATE_HZ, "allow_rate_override": True, "diagnostics_period_s": 0.2, **parameters}
    return NodeProcess("policy_node", tmp_path / f"{name}.log", ros_environment(domain_id),
                       params_files=[config_file("policy.yaml")], parameters=params, node_name=name)


@pytest.fixture
def injector(domain_id):
    arm = FaultInjector(domain_id)
    yield arm
    arm.close()


def running(tmp_path, domain_id, injector, **parameters):
    node = start_node(tmp_path, domain_id, **parameters)
    assert node.wait_for_log("active: commanding", timeout=60), node.log()
    injector.wait_until_matched()
    return node


def stop(node):
    code = node.stop()
    assert code == 0, f"policy_node did not shut down cleanly ({code}):\n{node.log()[-3000:]}"


def spec_limits(model):
    spec = load_policy(model).spec
    return np.array(spec.joint_lower), np.array(spec.joint_upper), np.array(spec.joint_velocity_limits) / RATE_HZ


# --- the observation publisher dies ----------------------------------------------------------------
@pytest.mark.parametrize("on_stale", ["hold", "stop"])
def test_commands_stop_when_the_observation_publisher_dies_and_resume_when_it_returns(
        tmp_path, domain_id, arm_student, injector, on_stale):
    max_age = 0.2
    node = running(tmp_path, domain_id, injector, model=str(arm_student), on_stale=on_stale,
                   max_observation_age_s=max_age)
    try:
        injector.spin(1.0, follow=True)
        assert len(injector.commands) >= 50, f"{len(injector.commands)} commands in 1 s at 100 Hz"
        last_state = injector.q.copy()
        injector.kill_publisher()
        died = time.monotonic()
        injector.spin(1.5)
        after = [(t, c) for t, c in injector.commands if t > died]
        assert after, "no command between the last observation and its going stale"
        deadline = max_age + 1.0 / RATE_HZ + 0.1  # the data goes stale, the next tick sees it (+ DDS, stalls)
        assert all(t - died <= deadline for t, _ in after), \
            f"commands {[round(t - died, 3) for t, _ in after if t - died > deadline]} s after the publisher died"
        if on_stale == "hold":  # the last command goes to the last measured position (within one step), once
            _, _, step = spec_limits(arm_student)
            previous = np.array(injector.commands[-2][1])
            np.testing.assert_allclose(after[-1][1], previous + np.clip(last_state - previous, -step, step),
                                       atol=1e-12)
        injector.start_publisher()
        injector.wait_until_matched()
        count = len(injector.commands)
        injector.spin(1.0, follow=True)
        assert len(injector.commands) - count >= 50, "commands did not resume when the publisher returned"
        assert node.alive
    finally:
        stop(node)
    assert f"max_observation_age_s {max_age}" in node.log()


# --- bad messages -----------------------------------------------------------------------------------
def test_bursts_bad_stamps_missing_joints_and_non_finite_values_give_no_invalid_command(
        tmp_path, domain_id, arm_student, injector):
    lower, upper, step = spec_limits(arm_student)
    node = running(tmp_path, domain_id, injector, model=str(arm_student))
    try:
        injector.spin(0.5, follow=True)
        # a burst: 200 messages at once give at most one command per tick (timer trigger)
        count, t0 = len(injector.commands), time.monotonic()
        for _ in range(200):
            injector.publish_state()
        injector.spin(0.5, publish=False)
        ticks = (time.monotonic() - t0) * RATE_HZ
        assert len(injector.commands) - count <= ticks + 2, \
            f"{len(injector.commands) - count} commands for about {ticks:.0f} ticks after a burst"
        # duplicated and backwards stamps are dropped and counted
        now = injector.node.get_clock().now()
        stamp = now.to_msg()
        older = (now - rclpy.duration.Duration(seconds=0.05)).to_msg()
        bad = [{"stamp": stamp}] * 5 + [{"stamp": older}] * 5 + [  # duplicated, then backwards stamps
            {"names": JOINTS[:2], "positions": injector.q[:2]},  # a joint missing
            {"positions": [0.2, math.nan, 1.7]}, {"positions": [0.2, 1.8, 1.7], "velocities": [0.0, math.inf, 0.0]}]
        for fields in bad:  # one at a time: the node's sensor-data QoS keeps only the latest few of a burst
            injector.publish_state(**fields)
            injector.spin(0.03, publish=False)
        injector.spin(0.6, follow=True)
        diagnostics = injector.latest_diagnostics()
        assert int(diagnostics["duplicate_stamps"]) >= 4, diagnostics
        assert int(diagnostics["backwards_stamps"]) >= 5, diagnostics
        assert int(diagnostics["invalid_inputs"]) >= 3, diagnostics
        assert node.alive
        commands = np.array([c for _, c in injector.commands])
        assert np.all(np.isfinite(commands))
        assert np.all(commands >= lower - 1e-9) and np.all(commands <= upper + 1e-9)
        assert np.all(np.abs(np.diff(commands, axis=0)) <= step + 1e-9)
    finally:
        stop(node)
    assert "stamp" in node.log() and "is not finite" in node.log() and "lacks joints ['joint_3']" in node.log()


# --- e-stop -----------------------------------------------------------------------------------------
def test_estop_stops_commands_latches_and_re_enable_ramps_from_the_measured_position(
        tmp_path, domain_id, arm_student, injector):
    _, _, step = spec_limits(arm_student)
    node = running(tmp_path, domain_id, injector, model=str(arm_student))
    delays = []
    try:
        injector.spin(0.5, follow=True)
        for trial in range(50):
            assert injector.commands, "no commands before the e-stop"
            injector.estop(True)
            pressed = time.monotonic()
            injector.spin(0.15, follow=True)
            after = [t for t, _ in injector.commands if t > pressed]
            delays.append(max(after) - pressed if after else 0.0)
            # nothing once the node has handled the stop (well inside 0.15 s), nothing after release alone
            count = len(injector.commands)
            injector.estop(False)
            injector.spin(0.1, follow=True)
            assert len(injector.commands) == count, f"trial {trial}: commands after the e-stop was released " \
                                                    "without ~/enable"
            measured = injector.q.copy()
            response = injector.enable("policy_node", True)
            assert response.success, response.message
            injector.wait_for(lambda n=count: len(injector.commands) > n, 5.0, "a command after re-enable")
            first = np.array(injector.commands[count][1])
            assert np.all(np.abs(first - measured) <= step + 1e-9), \
                f"trial {trial}: first command {first} is more than max_joint_step {step} from {measured}"
            injector.spin(0.1, follow=True)
        assert node.alive
    finally:
        stop(node)
    delays = np.array(delays) * 1e3
    print(f"e-stop to last command, {len(delays)} trials: p50 {np.percentile(delays, 50):.2f} ms, "
          f"p99 {np.percentile(delays, 99):.2f} ms, max {delays.max():.2f} ms")
    assert delays.max() < 100.0
    assert "e-stop: commanding disabled" in node.log()


def test_enable_is_refused_while_the_estop_is_active_and_start_enabled_false_waits(
        tmp_path, domain_id, arm_student, injector):
    node = running(tmp_path, domain_id, injector, model=str(arm_student), start_enabled=False)
    try:
        injector.spin(0.5)
        assert injector.commands == [], "commands before ~/enable with start_enabled false"
        assert "start_enabled is false" in injector.latest_diagnostics()["safety_state"]
        injector.estop(True)
        injector.spin(0.2)
        response = injector.enable("policy_node", True)
        assert not response.success and "e-stop is active" in response.message
        injector.estop(False)
        injector.spin(0.2)
        assert injector.enable("policy_node", True).success
        injector.spin(0.5, follow=True)
        assert len(injector.commands) >= 20
        assert injector.enable("policy_node", False).success
        count = len(injector.commands)
        injector.spin(0.3)
        assert len(injector.commands) <= count + 1
    finally:
        stop(node)


# --- model outputs out of range, non-finite ----------------------------------------------------------
def _broken_student(path, bias):
    import torch

    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.learn.export import export_student
    from vdd_ros.paths import model_file

    checkpoint = load_checkpoint(model_file("student.pt"))
    with torch.no_grad():
        checkpoint.model.mean_head.bias.add_(bias)
    export_student(checkpoint.model, checkpoint.spec, path)
    return path


def test_an_absurd_model_output_is_clipped_to_the_limits_and_the_step_limit(tmp_path, domain_id, injector):
    model = _broken_student(tmp_path / "offset.onnx", 100.0)  # +100 std: tens of radians past the limits
    lower, upper, step = spec_limits(model)
    # (the OOD guard off: the arm driven to its limits leaves the demonstrations' envelope, and would hold)
    node = running(tmp_path, domain_id, injector, model=str(model), ood_threshold=0.0)
    try:
        injector.spin(3.0, follow=True)
        commands = np.array([c for _, c in injector.commands])
        assert len(commands) >= 100
        assert np.all(commands >= lower - 1e-9) and np.all(commands <= upper + 1e-9)
        steps = np.abs(np.diff(np.vstack([START_Q, commands]), axis=0))
        assert np.all(steps <= step + 1e-9), steps.max(0)
        np.testing.assert_allclose(commands[-1], upper, atol=1e-9)  # clipped at the limits, not beyond
        diagnostics = injector.latest_diagnostics()
        assert int(diagnostics["limit_clips"]) >= 100 and int(diagnostics["step_clips"]) >= 1, diagnostics
    finally:
        stop(node)


def test_non_finite_model_outputs_are_never_published_and_latch_the_node_off(tmp_path, domain_id, injector):
    model = _broken_student(tmp_path / "nan.onnx", float("nan"))
    node = running(tmp_path, domain_id, injector, model=str(model), max_consecutive_faults=3)
    try:
        injector.spin(1.0)
        assert injector.commands == []
        diagnostics = injector.latest_diagnostics()
        assert diagnostics["enabled"] == "False" and "max_consecutive_faults" in diagnostics["safety_state"]
        assert int(diagnostics["invalid_outputs"]) == 3, diagnostics
        assert node.alive
    finally:
        stop(node)
    assert "model output is not finite" in node.log() and "observation window" in node.log()


# --- broken model files at configure ----------------------------------------------------------------
def test_corrupted_or_truncated_model_files_are_refused_at_configure(tmp_path, domain_id, arm_student, injector):
    blob = arm_student.read_bytes()
    broken = {"truncated": blob[: len(blob) // 2], "corrupted": bytes(b ^ 0x5A for b in blob[:4096]) + blob[4096:],
              "empty": b""}
    nodes = {}
    for name, data in broken.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        nodes[name] = start_node(tmp_path, domain_id, name=name, model=str(path))
    try:
        for name, node in nodes.items():
            assert node.wait_for_log("configure failed", timeout=60), node.log()
            assert f"cannot load model '{tmp_path / name}.onnx'" in node.log(), node.log()
            assert node.alive
            state = injector.call(GetState, f"/{name}/get_state", GetState.Request()).current_state.label
            assert state == "unconfigured"
        injector.spin(0.5)
        assert injector.commands == []
    finally:
        codes = [node.stop() for node in nodes.values()]
    assert codes == [0] * len(nodes)


# --- out-of-distribution observations, deadline overruns ---------------------------------------------
def test_an_observation_far_outside_the_training_data_holds_until_it_returns(tmp_path, domain_id, arm_student,
                                                                            injector):
    node = running(tmp_path, domain_id, injector, model=str(arm_student), ood_threshold=3.0)
    try:
        injector.spin(0.5, follow=True)
        injector.q = np.array([1.8, 1.86, 1.75])  # joint_1 at its limit: > 7 std from the demonstrations' mean
        count, moved = len(injector.commands), time.monotonic()
        injector.spin(0.8)
        late = [c for t, c in injector.commands[count:] if t - moved > 0.05]
        assert len(late) <= 1, f"{len(late)} commands while the observation was out of distribution"
        if late:  # the hold: toward the measured position, within the step limit
            _, _, step = spec_limits(arm_student)
            assert np.all(np.abs(np.array(late[0]) - injector.commands[count - 1][1]) <= step + 1e-9)
        diagnostics = injector.latest_diagnostics()
        assert int(diagnostics["ood_holds"]) >= 1 and float(diagnostics["ood_distance"]) > 3.0, diagnostics
        assert "outside the training data" in diagnostics["_message"]
        injector.q = np.array(START_Q)  # (not following the commands: the last one held the far position)
        count = len(injector.commands)
        injector.spin(0.5)
        assert len(injector.commands) - count >= 20, "commands did not resume in distribution"
    finally:
        stop(node)
    assert "std outside the training data > ood_threshold 3" in node.log()


def test_repeated_deadline_misses_raise_the_diagnostics_level_and_hold(tmp_path, domain_id, arm_student, injector):
    # 5 kHz: a Python tick and a model call cannot keep a 0.2 ms period on this machine
    node = running(tmp_path, domain_id, injector, model=str(arm_student), control_rate_hz=5000.0,
                   max_deadline_misses=5, deadline_window_s=1.0)
    try:
        injector.spin(1.5)
        statuses = injector.diagnostics[-5:]
        assert any("deadline misses" in s["_message"] for s in statuses), statuses
        assert int(injector.latest_diagnostics()["watchdog_holds"]) >= 1
        assert node.alive
    finally:
        stop(node)
    assert "max_deadline_misses 5" in node.log()
