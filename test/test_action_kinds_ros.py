"""joint_delta and joint_velocity models over real DDS, each node in its own process (localhost discovery).

Tiny mixtures of each kind are trained here from the scripted arm_avoid demonstrations converted to that kind
(``convert_action_kind``; ~20 s each). A delta model drives arm_sim_node through position commands and
trajectories, a velocity model through its velocity input (``command_interface: velocity``); the fault
injector of test_fault_injection plays the arm for the velocity model's stops (e-stop, disable, OOD and
stale holds, deactivate), each of which must command zero velocity.
"""
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from test_fault_injection import START_Q, FaultInjector, start_node  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from vdd_ros.paths import config_file  # noqa: E402
from vdd_ros.ros.episode_monitor import EpisodeMonitor  # noqa: E402
from vdd_ros.ros.processes import NodeProcess, ros_environment, stop_all  # noqa: E402
from vdd_ros.runtime import load_policy  # noqa: E402

SEED = 11
TOL = 1e-9
# lockstep: the policy answers each observation; the sim waits for it, so the time between observations is no
# control period (the pause between episodes reads as a deadline miss) and a watchdog hold would stall the run
LOCKSTEP_POLICY = {"trigger": "observation", "max_deadline_misses": -1}


@pytest.fixture(scope="module")
def arm_demonstrations():
    from vdd_ros.learn.pipeline import load_demonstrations

    return load_demonstrations(episodes=160, dataset_seed=0)


def _train(folder, demonstrations, kind):
    from conftest import clone_tiny_student

    from vdd_ros.data.dataset import convert_action_kind

    return clone_tiny_student(folder / f"{kind}.onnx", convert_action_kind(demonstrations, kind), 4, 128, 1500, 0)


@pytest.fixture(scope="module")
def delta_model(tmp_path_factory, arm_demonstrations):
    return _train(tmp_path_factory.mktemp("delta"), arm_demonstrations, "joint_delta")


@pytest.fixture(scope="module")
def velocity_model(tmp_path_factory, arm_demonstrations):
    return _train(tmp_path_factory.mktemp("velocity"), arm_demonstrations, "joint_velocity")


def limits(model):
    spec = load_policy(model).spec
    velocity = np.array(spec.joint_velocity_limits)
    return np.array(spec.joint_lower), np.array(spec.joint_upper), velocity, velocity / spec.control_rate_hz


def run_episodes(tmp_path, domain_id, model, n_episodes, sim_parameters, policy_parameters, timeout,
                 topic="commands"):
    """n episodes of the sim driven by the policy node: the episode results, every command in arrival order
    (data, or a trajectory's points) and the policy node's log. The policy node runs, and the test hears its
    commands, before the sim starts: no command of the first episode is missed."""
    monitor = EpisodeMonitor(domain_id)
    commands = []
    if topic == "commands":
        monitor.node.create_subscription(Float64MultiArray, "commands", lambda m: commands.append(list(m.data)),
                                         1000)
    else:
        monitor.node.create_subscription(
            JointTrajectory, topic, lambda m: commands.append([list(p.positions) for p in m.points]), 1000)
    env = ros_environment(domain_id)
    policy = NodeProcess("policy_node", tmp_path / "policy.log", env, params_files=[config_file("policy.yaml")],
                         parameters={"model": str(model), "expert_selection": "greedy", **policy_parameters})
    sim = None
    try:
        assert policy.wait_for_log("active: commanding", timeout=60), policy.log()
        assert monitor.spin_until(lambda: monitor.node.count_publishers(f"/{topic}") >= 1, timeout=30)
        monitor.spin_until(lambda: False, timeout=0.3)  # (matched, not only discovered)
        sim = NodeProcess("arm_sim_node", tmp_path / "sim.log", env, params_files=[config_file("arm_sim.yaml")],
                          parameters={"seed": SEED, "max_episodes": n_episodes, **sim_parameters})
        finished = monitor.spin_until(lambda: len(monitor.results) >= n_episodes, timeout=timeout)
        assert finished, f"only {len(monitor.results)} of {n_episodes} episodes finished\n{sim.log()[-2000:]}\n" \
                         f"{policy.log()[-2000:]}"
        monitor.spin_until(lambda: False, timeout=0.2)
    finally:
        codes = stop_all([policy] + ([sim] if sim else []))
        monitor.close()
    assert codes == [0, 0], f"nodes did not shut down cleanly: {codes}\n{sim.log()[-1500:]}\n{policy.log()[-1500:]}"
    results = sorted(monitor.results, key=lambda r: r["episode"])
    assert [r["episode"] for r in results] == list(range(n_episodes))
    return results, commands, policy.log()


def lockstep_episodes(results, commands):
    """Lockstep: one command per control period, so each episode's commands are the next len(ee_path) - 1."""
    lengths = [len(r["ee_path"]) - 1 for r in results]
    assert len(commands) == sum(lengths), f"{len(commands)} commands for episodes of {lengths} control periods"
    bounds = np.cumsum([0] + lengths)
    return [np.array(commands[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def progress(result):
    """How far the end effector got toward the finish line (m, in y)."""
    path = np.asarray(result["ee_path"])
    return float(path[-1, 1] - path[0, 1])


def report(kind, results):
    success = np.mean([r["success"] for r in results])
    gains = [round(progress(r), 3) for r in results]
    print(f"{kind}: success {success:.2f} over {len(results)} episodes, ee progress {gains} m, "
          f"durations {[r['duration_s'] for r in results]} s")
    return success, gains


# --- joint_delta -------------------------------------------------------------------------------------------
def test_a_delta_model_drives_the_sim_in_lockstep_within_the_position_and_step_limits(
        tmp_path, domain_id, delta_model):
    n = 4
    results, received, log = run_episodes(tmp_path, domain_id, delta_model, n, {"lockstep": True},
                                          LOCKSTEP_POLICY, timeout=60)
    lower, upper, _, step = limits(delta_model)
    for result, commands in zip(results, lockstep_episodes(results, received)):
        assert np.all(commands >= lower - TOL) and np.all(commands <= upper + TOL)
        # the first command ramps from the measured start pose, each next one from the one before
        steps = np.abs(np.diff(np.vstack([result["start_q"], commands]), axis=0))
        assert np.all(steps <= step + 1e-6), (steps.max(0), step)
    success, gains = report("joint_delta", results)
    assert success > 0 and min(gains) > 0.2, results
    assert "joint_delta: increments integrated" in log


def test_a_delta_model_drives_the_sim_with_joint_trajectories(tmp_path, domain_id, delta_model):
    n = 1
    results, commands, log = run_episodes(tmp_path, domain_id, delta_model, n, {},
                                          {"output": "joint_trajectory"}, timeout=60, topic="joint_trajectory")
    lower, upper, _, step = limits(delta_model)
    trajectories = [np.array(points) for points in commands]
    assert len(trajectories) >= 10
    for points in trajectories:
        assert np.all(points >= lower - TOL) and np.all(points <= upper + TOL)
        assert np.all(np.abs(np.diff(points, axis=0)) <= step + TOL)
    _, gains = report("joint_delta (joint_trajectory)", results)
    assert gains[0] > 0.2, results


# --- joint_velocity ------------------------------------------------------------------------------------------
def test_a_velocity_model_drives_the_velocity_input_of_the_sim_within_the_velocity_limits(
        tmp_path, domain_id, velocity_model):
    n = 4
    results, received, log = run_episodes(tmp_path, domain_id, velocity_model, n,
                                          {"lockstep": True, "command_interface": "velocity"},
                                          LOCKSTEP_POLICY, timeout=60)
    _, _, velocity, _ = limits(velocity_model)
    for commands in lockstep_episodes(results, received):
        assert np.all(np.abs(commands) <= velocity + TOL), np.abs(commands).max(0)
    success, gains = report("joint_velocity", results)
    assert success > 0 and min(gains) > 0.1, results
    assert "joint_velocity: velocities within" in log


def test_joint_trajectory_output_refuses_a_velocity_model(tmp_path, domain_id, velocity_model):
    node = start_node(tmp_path, domain_id, model=str(velocity_model), output="joint_trajectory")
    try:
        assert node.wait_for_log("configure failed", timeout=60), node.log()
        assert node.alive
    finally:
        assert node.stop() == 0
    assert "a joint_velocity model needs output 'commands'" in node.log()


def _is_zero(command):
    return not np.any(command)


@pytest.mark.parametrize("on_stale", ["hold", "stop"])
def test_a_velocity_model_commands_zero_velocity_on_every_stop(tmp_path, domain_id, velocity_model, on_stale):
    """E-stop, ~/enable false, an out-of-distribution observation, stale data (both on_stale modes) and
    deactivate each give a zero-velocity command, and nothing non-zero follows until commanding resumes."""
    _, _, velocity, _ = limits(velocity_model)
    injector = FaultInjector(domain_id)
    max_age = 0.2
    node = start_node(tmp_path, domain_id, model=str(velocity_model), on_stale=on_stale,
                      max_observation_age_s=max_age)

    def commands_since(t0):
        return [np.array(c) for t, c in injector.commands if t > t0]

    def resumes(what):
        t0 = time.monotonic()
        while not any(not _is_zero(c) for c in commands_since(t0)) and time.monotonic() < t0 + 5.0:
            injector.spin(0.05)  # (the arm's state keeps flowing)
        assert any(not _is_zero(c) for c in commands_since(t0)), f"no motion commanded within 5 s of {what}"

    def stops(what, act, settle=0.4):
        """``act`` stops commanding: a zero arrives and nothing non-zero after it."""
        t0 = time.monotonic()
        act()
        injector.spin(settle)
        after = commands_since(t0)
        zeros = [i for i, c in enumerate(after) if _is_zero(c)]
        assert zeros, f"{what}: no zero-velocity command in {settle} s ({len(after)} commands)"
        assert all(_is_zero(c) for c in after[zeros[0]:]), f"{what}: non-zero velocity after the zero"
        return time.monotonic()

    try:
        assert node.wait_for_log("active: commanding", timeout=60), node.log()
        injector.wait_until_matched()
        injector.spin(0.5)
        assert any(not _is_zero(c) for _, c in injector.commands), "the model commanded no motion"

        pressed = stops("e-stop", lambda: injector.estop(True))
        injector.estop(False)
        injector.spin(0.3)
        assert all(_is_zero(c) for c in commands_since(pressed)), "non-zero velocity before ~/enable"
        assert injector.enable("policy_node", True).success
        resumes("re-enable")

        stops("~/enable false", lambda: injector.enable("policy_node", False))
        assert injector.enable("policy_node", True).success
        resumes("enable")

        def far():
            injector.q = np.array([1.8, 1.86, 1.75])  # joint_1 at its limit: far outside the demonstrations
        stops("an out-of-distribution observation", far)
        injector.q = np.array(START_Q)
        resumes("the observation's return")

        stops("stale data", injector.kill_publisher, settle=max_age + 0.4)
        injector.start_publisher()
        injector.wait_until_matched()
        resumes("the publisher's return")

        diagnostics = injector.latest_diagnostics()
        assert diagnostics["action_kind"] == "joint_velocity"
        assert int(diagnostics["zero_velocity_commands"]) >= 4, diagnostics
        stops("deactivate", lambda: injector.call(ChangeState, "/policy_node/change_state", ChangeState.Request(
            transition=Transition(id=Transition.TRANSITION_DEACTIVATE))))
        commands = np.array([c for _, c in injector.commands])
        assert np.all(np.abs(commands) <= velocity + TOL), np.abs(commands).max(0)
        print(f"on_stale {on_stale}: {len(commands)} commands, {int(np.sum(~commands.any(1)))} zero; "
              f"diagnostics {diagnostics}")
        assert node.alive
    finally:
        code = node.stop()
        injector.close()
    assert code == 0, node.log()[-3000:]
