"""Real nodes in separate processes over DDS (localhost only): the simulated arm driven by the policy node,
bad input, and configure-time refusals."""
import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from vdd_ros.paths import config_file, model_file  # noqa: E402
from vdd_ros.ros.episode_monitor import (  # noqa: E402
    EpisodeMonitor,
    expert_switches,
    offline_rollout,
    summarize_results,
)
from vdd_ros.ros.processes import NodeProcess, ros_environment, stop_all  # noqa: E402
from vdd_ros.runtime import load_policy  # noqa: E402
from vdd_ros.tasks import arm_avoid  # noqa: E402

JOINTS = list(arm_avoid.JOINT_NAMES)


class Probe:
    """The test's own rclpy node in the test's domain: publishes JointStates, records commands, calls services."""

    def __init__(self, domain_id):
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node("probe", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.commands = []
        self.diagnostics = []
        self._clients = {}  # service name -> client, discovered and matched once
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(m.status), 10)
        self.joint_pub = self.node.create_publisher(JointState, "joint_states", 10)
        self.node.create_subscription(Float64MultiArray, "commands", lambda m: self.commands.append(list(m.data)), 100)

    def spin(self, seconds, publish=None, rate_hz=50.0):
        end = time.monotonic() + seconds
        next_publish = time.monotonic()
        while time.monotonic() < end:
            if publish is not None and time.monotonic() >= next_publish:
                publish()
                next_publish += 1.0 / rate_hz
            self.executor.spin_once(timeout_sec=0.005)

    def wait_for_subscribers(self, publisher, count=1, timeout=30.0):
        """Spin until ``publisher`` has matched ``count`` subscriptions (discovery takes longer under load)."""
        end = time.monotonic() + timeout
        while publisher.get_subscription_count() < count and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        assert publisher.get_subscription_count() >= count, f"{publisher.topic_name}: no subscriber after {timeout} s"
        self.spin(0.2)

    def joint_state(self, names, positions, velocities):
        """A publisher of this JointState, stamped at each publish as a driver stamps its readings (a stamp
        fixed at creation would age the observation during a spin, past max_observation_age_s after 0.5 s)."""
        msg = JointState(name=list(names), position=[float(v) for v in positions],
                         velocity=[float(v) for v in velocities])

        def publish():
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.joint_pub.publish(msg)
        return publish

    def call(self, srv_type, name, request, timeout=10.0):
        client = self._clients.get(name)
        if client is None:
            client = self.node.create_client(srv_type, name)
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} did not appear"
            # the client sees the service before the service has matched the client's response reader: an
            # answer sent in that gap is dropped (seen once in CI, on a loaded machine); give the matching a
            # moment, once per client
            self.spin(0.5)
            self._clients[name] = client
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), f"service {name} did not answer"
        return future.result()

    def lifecycle_state(self, node_name):
        return self.call(GetState, f"{node_name}/get_state", GetState.Request()).current_state.label

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def start_policy(tmp_path, domain_id, name, **parameters):
    return NodeProcess("policy_node", tmp_path / f"{name}.log", ros_environment(domain_id),
                       params_files=[config_file("policy.yaml")], parameters=parameters, node_name=name)


# --- closed loop: the simulated arm driven by the student scores like the offline rollouts -------------
SEED = 11


def offline_greedy(model_path, n_episodes, seed):
    # one episode per call, as the node calls the model: the same float32 rounding, the same argmax
    return offline_rollout(load_policy(model_path), n_episodes, seed, greedy=True, batch_size=1)


def test_offline_rollouts_record_each_plans_expert_per_episode():
    student = load_policy(model_file("student.onnx"))
    experts = []
    recorded = offline_rollout(student, 3, SEED, greedy=True, experts=experts)
    plain = offline_greedy(model_file("student.onnx"), 3, SEED)
    assert recorded.to_dict() == plain.to_dict()  # the same plans as one-episode-at-a-time rollouts
    assert len(experts) == 3 and all(len(plans) >= 2 for plans in experts)
    assert all(0 <= z < student.n_experts for plans in experts for z in plans)
    assert expert_switches([[1, 1, 2, 2, 0], [3], [4, 5]]) == (3, 5)
    assert expert_switches(experts)[1] == sum(len(plans) - 1 for plans in experts)


def run_episodes_over_ros(tmp_path, domain_id, model, n_episodes, sim_parameters, policy_parameters, timeout):
    monitor = EpisodeMonitor(domain_id)  # listening before the sim starts
    env = ros_environment(domain_id)
    sim = NodeProcess("arm_sim_node", tmp_path / "sim.log", env, params_files=[config_file("arm_sim.yaml")],
                      parameters={"seed": SEED, "max_episodes": n_episodes, **sim_parameters})
    policy = start_policy(tmp_path, domain_id, "policy_node", model=str(model), **policy_parameters)
    try:
        finished = monitor.spin_until(lambda: len(monitor.results) >= n_episodes, timeout=timeout)
        assert finished, f"only {len(monitor.results)} of {n_episodes} episodes finished\n{sim.log()[-2000:]}\n" \
                         f"{policy.log()[-2000:]}"
    finally:
        codes = stop_all([policy, sim])
        monitor.close()
    assert codes == [0, 0], f"nodes did not shut down cleanly: {codes}\n{sim.log()[-1500:]}\n{policy.log()[-1500:]}"
    results = sorted(monitor.results, key=lambda r: r["episode"])
    assert [r["episode"] for r in results] == list(range(n_episodes))
    return results


def compare_with_offline(results, model):
    """Success rates over ROS and offline on the same start poses, and the share of episodes ending alike."""
    ros = summarize_results(results)
    offline = offline_greedy(model, len(results), SEED)
    offline_starts = [path[0] for path in offline.ee_paths]
    ros_starts = [arm_avoid.forward_kinematics(np.array(r["start_q"])) for r in results]
    np.testing.assert_allclose(ros_starts, offline_starts, atol=1e-5)
    agree = float(np.mean([r["success"] == s for r, s in zip(results, offline.success)]))
    print(f"over ROS: {ros}\noffline (same starts): {offline.to_dict()}\nepisodes ending alike: {agree:.0%}")
    return ros, offline, agree


@pytest.mark.slow
def test_sim_in_lockstep_scores_exactly_like_offline_rollouts(tmp_path, domain_id, arm_student):
    """Lockstep (one control period per command) removes ROS timing: same starts, same greedy policy,
    so every episode ends as its offline twin and the end-effector paths agree to float precision."""
    n = 20
    results = run_episodes_over_ros(tmp_path, domain_id, arm_student, n, {"lockstep": True},
                                    {"expert_selection": "greedy", "trigger": "observation"}, timeout=120)
    ros, offline, agree = compare_with_offline(results, arm_student)
    assert abs(ros["success_rate"] - offline.success_rate) <= 0.05
    assert agree == 1.0
    for result, offline_path in zip(results, offline.ee_paths):
        ros_path = np.asarray(result["ee_path"])
        assert ros_path.shape == offline_path[::10].shape or len(ros_path) == len(offline_path[::10]) + 1
        np.testing.assert_allclose(ros_path[:len(offline_path[::10])], offline_path[::10], atol=1e-4)
        assert result["duration_s"] == pytest.approx((len(offline_path) - 1) / arm_avoid.PHYSICS_RATE_HZ, abs=1e-6)


@pytest.mark.slow
def test_sim_in_real_time_scores_like_offline_rollouts(tmp_path, domain_id, arm_student):
    """Real time, as on a robot: the timer-driven policy node at 20 Hz, the sim at 200 Hz. Commands now land
    a few milliseconds after the observation they answer (offline: at once), which can tip an episode that
    grazes an obstacle; the lockstep test above pins the exact equality."""
    if not model_file("student.onnx").is_file():
        pytest.skip("needs the shipped models/student.onnx: the tiny stand-in is too unstable for timing "
                    "differences to leave its outcomes unchanged")
    n = 20
    results = run_episodes_over_ros(tmp_path, domain_id, arm_student, n, {}, {"expert_selection": "greedy"},
                                    timeout=240)
    ros, offline, agree = compare_with_offline(results, arm_student)
    # measured: 20 of 20 episodes alike (0.65 vs 0.65); in another run 11 of 12 (0.58 vs 0.67)
    assert abs(ros["success_rate"] - offline.success_rate) <= 0.10 + 1e-9
    assert agree >= 0.85


def train_tiny_sort_student(path, steps: int = 600, seed: int = 0):
    """A small arm_sort mixture (3 experts, 64x2) cloned from its scripted demonstrations: it reads joint
    positions and the ``visited`` flags the sim publishes on ``task_state``."""
    from conftest import clone_tiny_student

    from vdd_ros.tasks import arm_sort

    return clone_tiny_student(path, arm_sort.generate_demonstrations(60, seed), 3, 64, steps, seed)


def test_arm_sort_sim_in_lockstep_scores_exactly_like_offline_rollouts(tmp_path, domain_id):
    """task:=arm_sort: the sim publishes the visited flags on task_state beside joint_states, the policy node
    reads both; in lockstep every episode ends as its offline twin (outcome, route, path, duration)."""
    from vdd_ros.tasks import arm_sort

    model = train_tiny_sort_student(tmp_path / "sort_student.onnx")
    n = 3
    results = run_episodes_over_ros(tmp_path, domain_id, model, n, {"lockstep": True, "task": "arm_sort"},
                                    {"expert_selection": "greedy", "trigger": "observation"}, timeout=120)
    offline = offline_greedy(model, n, SEED)
    ros = summarize_results(results, "arm_sort")
    print(f"over ROS: {ros}\noffline: {offline.to_dict()}")
    assert ros["n_routes"] == 6
    assert [r["success"] for r in results] == offline.success.tolist()
    assert [r["timeout"] for r in results] == offline.timeout.tolist()
    assert [r["route"] for r in results] == offline.routes
    ticks = arm_sort.TICKS_PER_CONTROL
    for result, offline_path in zip(results, offline.ee_paths):
        ros_path = np.asarray(result["ee_path"])
        np.testing.assert_allclose(ros_path[:len(offline_path[::ticks])], offline_path[::ticks], atol=1e-4)
        assert result["duration_s"] == pytest.approx((len(offline_path) - 1) / arm_sort.PHYSICS_RATE_HZ, abs=1e-6)
    np.testing.assert_allclose([arm_sort.forward_kinematics(np.array(r["start_q"])) for r in results],
                               [path[0] for path in offline.ee_paths], atol=1e-5)


@pytest.mark.xfail(strict=False, reason="timing under CI load: a late trajectory is joined further along (0.02 m by "
                   "the 3rd period seen twice in CI); to be fixed by stamping the trajectory with its observation")
def test_joint_trajectory_output_drives_the_sim(tmp_path, domain_id, arm_student):
    """The chunk as a JointTrajectory (joint_trajectory_controller input): the sim follows it in time."""
    n = 2
    results = run_episodes_over_ros(tmp_path, domain_id, arm_student, n, {},
                                    {"expert_selection": "greedy", "output": "joint_trajectory"}, timeout=90)
    offline = offline_greedy(arm_student, n, SEED)
    for result, offline_path in zip(results, offline.ee_paths):
        ros_path = np.asarray(result["ee_path"])
        # the first control periods follow the same targets as offline (timing decides later ones: a trajectory
        # that arrives late under load is joined further along, seen once in CI at 0.02 m by the 3rd period)
        np.testing.assert_allclose(ros_path[:2], offline_path[::10][:2], atol=0.01)
        np.testing.assert_allclose(ros_path[:4], offline_path[::10][:4], atol=0.04)


def test_first_episode_waits_for_the_asked_number_of_joint_state_subscribers(tmp_path, domain_id):
    """wait_for_subscribers: no episode starts until joint_states has that many subscribers (a slow shadow
    node would otherwise miss the first, fast lockstep episodes); one subscriber more and it starts."""
    from std_msgs.msg import Int32

    monitor = EpisodeMonitor(domain_id)
    starts = []
    monitor.node.create_subscription(Int32, "episode_start", lambda m: starts.append(m.data), 10)
    sim = NodeProcess("arm_sim_node", tmp_path / "sim.log", ros_environment(domain_id),
                      params_files=[config_file("arm_sim.yaml")],
                      parameters={"lockstep": True, "settle_s": 0.05, "wait_for_subscribers": 1})
    try:
        monitor.spin_until(lambda: False, 3.0)  # settle_s is over long before: only the missing subscriber holds it
        assert starts == [], sim.log()[-1500:]
        monitor.node.create_subscription(JointState, "joint_states", lambda m: None, 10)
        assert monitor.spin_until(lambda: starts, timeout=10), sim.log()[-1500:]
        assert starts[0] == 0
    finally:
        codes = stop_all([sim])
        monitor.close()
    assert codes == [0]
    assert "waits for 1 subscribers on /joint_states, 0 so far" in sim.log()


# --- bad input over DDS ----------------------------------------------------------------------------------
def test_bad_joint_states_give_no_command_and_the_node_stays_up(tmp_path, domain_id, arm_student):
    probe = Probe(domain_id)
    policy = start_policy(tmp_path, domain_id, "policy_node", model=str(arm_student))
    try:
        assert policy.wait_for_log("active: commanding", timeout=60), policy.log()
        probe.wait_for_subscribers(probe.joint_pub)
        q, zeros = [0.21, 1.86, 1.75], [0.0, 0.0, 0.0]
        bad_inputs = {
            "lacks joints ['joint_2']": probe.joint_state(["joint_1", "joint_3"], q[:2], zeros[:2]),
            "position has 2 entries but JointState.name has 3": probe.joint_state(JOINTS, q[:2], zeros),
            "position is not finite for joints ['joint_2']": probe.joint_state(JOINTS, [0.2, math.nan, 1.7], zeros),
            "velocity is not finite for joints ['joint_3']": probe.joint_state(JOINTS, q, [0.0, 0.0, math.inf]),
        }
        for expected, publish in bad_inputs.items():
            probe.spin(0.6, publish)
            assert probe.commands == [], f"a command was published after a bad JointState ({expected})"
            assert expected in policy.log(), f"no log line naming '{expected}':\n{policy.log()}"
        assert policy.alive
        # the same node commands as soon as a valid JointState arrives (joints in another order, plus extras)
        probe.spin(1.0, probe.joint_state(["gripper", "joint_3", "joint_1", "joint_2"], [0.0, q[2], q[0], q[1]],
                                          [0.0] * 4))
        assert len(probe.commands) >= 5
        assert all(len(c) == 3 and all(math.isfinite(v) for v in c) for c in probe.commands)
        # diagnostics (1 Hz) count what was refused and say what runs
        probe.spin(1.2, probe.joint_state(JOINTS, q, zeros))
        status = {kv.key: kv.value for kv in probe.diagnostics[-1].values}
        assert status["model_kind"] == load_policy(arm_student).kind and status["provider"] == "CPUExecutionProvider"
        assert int(status["invalid_inputs"]) >= 4 * 10 and int(status["commands_sent"]) >= 5
        assert float(status["inference_p50_ms"]) > 0 and float(status["observation_age_s"]) < 0.5
        assert probe.call(Trigger, "/policy_node/reset", Trigger.Request()).success
        # stale: no new JointState for longer than max_observation_age_s (0.5 s) -> commands stop
        probe.spin(0.7)
        count = len(probe.commands)
        probe.spin(0.5)
        assert len(probe.commands) == count
        assert "observation is" in policy.log() and "max_observation_age_s" in policy.log()

        # deactivate stops the commands (after one hold command), activate resumes them
        request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_DEACTIVATE))
        assert probe.call(ChangeState, "/policy_node/change_state", request).success
        assert probe.lifecycle_state("/policy_node") == "inactive"
        probe.commands.clear()
        probe.spin(0.8, probe.joint_state(JOINTS, q, zeros))
        assert len(probe.commands) <= 1
        request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_ACTIVATE))
        assert probe.call(ChangeState, "/policy_node/change_state", request).success
        probe.spin(0.8, probe.joint_state(JOINTS, q, zeros))
        assert len(probe.commands) >= 5
    finally:
        code = policy.stop()
        probe.close()
    assert code == 0


def test_configure_refuses_a_mismatching_or_missing_model(tmp_path, domain_id, arm_student):
    probe = Probe(domain_id)
    refusals = {
        "wrong_joints": ({"model": str(arm_student), "joint_names": ["joint_1", "joint_2", "wrist"]},
                         "joint_names: parameter ['joint_1', 'joint_2', 'wrist'] != model spec "
                         "['joint_1', 'joint_2', 'joint_3']"),
        "wrong_rate": ({"model": str(arm_student), "control_rate_hz": 50.0},
                       "control_rate_hz: parameter 50.0 != model spec 20.0"),
        "missing_model": ({"model": str(tmp_path / "nowhere.onnx")}, "cannot load model"),
        "bad_choice": ({"model": str(arm_student), "output": "torques"},
                       "parameter output: expected one of ['commands', 'joint_trajectory'], got 'torques'"),
    }
    nodes = {name: start_policy(tmp_path, domain_id, name, **params) for name, (params, _) in refusals.items()}
    try:
        for name, (_, expected) in refusals.items():
            assert nodes[name].wait_for_log("configure failed", timeout=60), nodes[name].log()
            assert expected in nodes[name].log(), nodes[name].log()
            assert nodes[name].alive
            assert probe.lifecycle_state(f"/{name}") == "unconfigured"
        probe.spin(0.5, probe.joint_state(JOINTS, [0.21, 1.86, 1.75], [0.0] * 3))
        assert probe.commands == []
    finally:
        codes = stop_all(list(nodes.values()))
        probe.close()
    assert codes == [0] * len(refusals)


# --- vdd demo -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vdd_demo_runs_student_and_shadow_teacher_and_reports(tmp_path, domain_id, arm_student, arm_teacher, capsys):
    import argparse
    import json

    from vdd_ros.cli import demo

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--student", str(arm_student), "--teacher", str(arm_teacher), "--episodes", "3",
                              "--offline-episodes", "6", "--lockstep", "--out-dir", str(tmp_path / "demo"),
                              "--domain-id", str(domain_id), "--timeout", "120"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "student over ROS (drives)" in printed and "teacher over ROS (shadow)" in printed
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["ros"]["episodes"] == 3 and summary["exit_codes"] == [0, 0, 0]
    assert summary["latency_over_ros"]["student"]["calls"] > 0
    assert summary["latency_over_ros"]["teacher"]["calls"] > 0  # the shadow saw the same observations
    assert summary["offline"]["teacher"]["metrics"]["episodes"] == 6
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
