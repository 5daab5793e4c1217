"""A user's own robot, bag to robot, through the ``vdd`` command line (docs/own_robot.md walks the same path).

The robot is not the built-in arm: a 3-joint turret (``base_yaw``, ``lift``, ``wrist``) that points at a
goal read from a ``geometry_msgs/PointStamped`` topic. A scripted bimodal demonstrator (the wrist swings
up or down around an obstacle on the way, each half of the episodes) is recorded into an MCAP bag the way
``ros2 bag record`` would (50 Hz JointState with an extra joint, 10 Hz goal and commands), then:
``vdd import-bag`` -> ``train-teacher`` -> ``distill`` -> ``export`` (student and teacher), every step
with ``--robot robot.yaml``; the ONNX files carry the robot's joints and observation fields, act through
``vdd_ros.runtime.load_policy``, and the policy node on them refuses a JointState that lacks a joint.
"""
from __future__ import annotations

import contextlib
import io
import math
import time

import numpy as np
import pytest
import yaml

from vdd_ros.cli.main import main
from vdd_ros.data.bag_write import BagRecorder
from vdd_ros.data.dataset import DemoDataset

JOINTS = ["base_yaw", "lift", "wrist"]
LOWER, UPPER = [-2.0, 0.0, -1.5], [2.0, 1.0, 1.5]
RATE_HZ, STATE_HZ = 10, 50
GOAL_TOPIC, COMMAND_TOPIC = "/goal_point", "/turret/command"
EPISODES, EPISODE_S, GAP_S = 24, 2.5, 1.0

ROBOT = {
    "name": "turret",
    "joints": [{"name": n, "lower": lo, "upper": up, "velocity": 2.0} for n, lo, up in zip(JOINTS, LOWER, UPPER)],
    "control_rate_hz": RATE_HZ,
    "history": 2,
    "horizon": 4,
    "joint_states": "/joint_states",
    "observations": ["joint_position", "joint_velocity",
                     {"name": "goal", "topic": GOAL_TOPIC, "type": "geometry_msgs/PointStamped"}],
    "action": {"kind": "joint_position", "topic": COMMAND_TOPIC, "type": "std_msgs/Float64MultiArray"},
}

TINY_TEACHER = ["--set", "iterations=30", "--set", "batch_size=64", "--set", "backbone.hidden=32",
                "--set", "backbone.mlp_layers=2", "--set", "n_steps=3", "--set", "checkpoint_every=0", "--quiet"]
TINY_DISTILL = ["--set", "iterations=4", "--set", "n_experts=2", "--set", "samples_per_expert=4",
                "--set", "batch_size=8", "--set", "gating_batch_size=32", "--set", "backbone.hidden=32",
                "--set", "backbone.mlp_layers=2", "--set", "warm_start_iterations=4", "--set", "validation_every=0",
                "--quiet"]


# --- the demonstrator ------------------------------------------------------------------------------------
def demonstration(rng: np.random.Generator, side: float):
    """One episode: the goal, and the commanded joint targets at each control step (10 Hz).

    The turret yaws towards the goal's bearing and lifts to its height along a smoothstep; the wrist ends
    level with the goal's elevation but swings ``side`` (+1 over, -1 under) an obstacle in between."""
    goal = np.array([rng.uniform(0.4, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(0.2, 0.8)])
    start = np.array([rng.uniform(-0.3, 0.3), rng.uniform(0.1, 0.3), 0.0])
    final = np.array([math.atan2(goal[1], goal[0]), goal[2], 0.6 * math.atan2(goal[2], np.hypot(*goal[:2]))])
    steps = int(EPISODE_S * RATE_HZ)
    s = np.clip(np.arange(1, steps + 1) / (0.8 * steps), 0.0, 1.0)
    smooth = s * s * (3 - 2 * s)
    targets = start + smooth[:, None] * (final - start)
    targets[:, 2] += side * 0.8 * np.sin(np.pi * smooth)
    return goal, start, np.clip(targets, LOWER, UPPER)


def record_demonstrations(path, seed: int = 0) -> None:
    """Episodes one after another, ``GAP_S`` apart (import-bag splits them there). The joints follow each
    command with a first-order lag at 50 Hz; the JointState lists them in another order with a gripper."""
    rng = np.random.default_rng(seed)
    order = [2, 0, 1]
    t = 1_700_000_000.0
    with BagRecorder(path, "mcap") as bag:
        for episode in range(EPISODES):
            goal, q, targets = demonstration(rng, 1.0 if episode % 2 else -1.0)
            per_step = STATE_HZ // RATE_HZ
            velocity = np.zeros(3)
            for k, target in enumerate(targets):
                for tick in range(per_step):
                    stamp = t + (k * per_step + tick) / STATE_HZ
                    if tick == 0:
                        bag.point(stamp + 0.001, goal, GOAL_TOPIC)
                    bag.joint_state(stamp, [JOINTS[j] for j in order] + ["gripper"], np.append(q[order], 0.02),
                                    np.append(velocity[order], 0.0))
                    if tick == 0:  # the command answers the state just published
                        bag.float_array(stamp + 0.002, target, COMMAND_TOPIC)
                    moved = q + 0.4 * (target - q)
                    velocity, q = (moved - q) * STATE_HZ, moved
            t += EPISODE_S + GAP_S


# --- the pipeline (once per module: the node test reuses its student) -------------------------------------
def vdd(*argv) -> str:
    """Run one ``vdd`` command; what it printed (its exit status asserted 0)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, f"vdd {argv[0]} failed:\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own_robot")
    robot = folder / "robot.yaml"
    robot.write_text(yaml.safe_dump(ROBOT, sort_keys=False))
    bag = folder / "demos"
    record_demonstrations(bag)
    files = {name: folder / name for name in ("demos.npz", "teacher.pt", "student.pt", "student.onnx",
                                               "teacher.onnx", "teacher_denoiser.onnx")}
    printed = {}
    timings = {}
    steps = [
        ("import-bag", ["import-bag", bag, "--robot", robot, "--out", files["demos.npz"]]),
        ("train-teacher", ["train-teacher", "--dataset", files["demos.npz"], "--robot", robot,
                           "--out", files["teacher.pt"], *TINY_TEACHER]),
        ("distill", ["distill", "--teacher", files["teacher.pt"], "--robot", robot, "--out", files["student.pt"],
                     *TINY_DISTILL]),
        ("export-student", ["export", files["student.pt"], "--robot", robot, "--out", files["student.onnx"]]),
        ("export-teacher", ["export", files["teacher.pt"], "--robot", robot, "--out", files["teacher.onnx"]]),
    ]
    for name, argv in steps:
        started = time.perf_counter()
        printed[name] = vdd(*argv)
        timings[name] = time.perf_counter() - started
    for name, argv in steps:  # shown by pytest -s (docs/own_robot.md quotes these lines)
        print(f"$ vdd {' '.join(str(a) for a in argv)}\n{printed[name]}({timings[name]:.1f} s)")
    return {"folder": folder, "robot": robot, "files": files, "printed": printed}


def test_bags_of_another_robot_become_a_distilled_policy_with_its_interface(pipeline):
    files, printed, robot = pipeline["files"], pipeline["printed"], pipeline["robot"]
    # import-bag: every episode, on the robot's control grid
    dataset = DemoDataset.load(str(files["demos.npz"]))
    assert dataset.n_episodes == EPISODES
    assert dataset.spec.joint_names == tuple(JOINTS)
    assert [f.name for f in dataset.spec.observation_fields] == ["joint_position", "joint_velocity", "goal"]
    assert dataset.observations.shape[1] == 3 + 3 + 3 and dataset.actions.shape[1] == 3
    # the recorded demonstrator's two modes are in the data: the wrist swings both ways mid-episode
    middles = [dataset.episode(i)[1][len(dataset.episode(i)[1]) // 3, 2] for i in range(EPISODES)]
    assert min(middles) < -0.3 and max(middles) > 0.3
    assert "wrote" in printed["import-bag"] and f"{EPISODES} episodes" in printed["import-bag"]

    # --robot: the robot's window and chunk, said where they came from; the data fits the robot
    teacher_lines = printed["train-teacher"]
    assert f"vdd train-teacher: history 2 from robot {robot}" in teacher_lines
    assert f"vdd train-teacher: horizon 4 from robot {robot}" in teacher_lines
    assert f"dataset {files['demos.npz']} fits robot {robot}" in teacher_lines
    assert f"--teacher {files['teacher.pt']} fits robot {robot}" in printed["distill"]
    assert "wrote" in printed["export-student"] and "wrote" in printed["export-teacher"]
    assert files["teacher_denoiser.onnx"].is_file()

    from vdd_ros.runtime import load_policy

    student, teacher = load_policy(files["student.onnx"], device="cpu"), load_policy(files["teacher.onnx"],
                                                                                      device="cpu")
    assert (student.kind, student.n_experts, teacher.kind) == ("vdd_mixture", 2, "diffusion_teacher")
    frame = dataset.observations[5]
    for policy in (student, teacher):
        spec = policy.spec
        assert spec.joint_names == tuple(JOINTS) and spec.task == "turret"
        assert spec.joint_lower == tuple(LOWER) and spec.joint_upper == tuple(UPPER)
        assert spec.control_rate_hz == RATE_HZ and (spec.history, spec.action_horizon) == (2, 4)
        # the frame the model reads: positions and the goal (velocities left out by default)
        fields = {f.name: f for f in spec.observation_fields}
        assert list(fields) == ["joint_position", "goal"]
        assert (fields["goal"].kind, fields["goal"].topic, fields["goal"].msg_type, fields["goal"].size) == (
            "vector", GOAL_TOPIC, "geometry_msgs/PointStamped", 3)
        window = np.stack([frame[[0, 1, 2, 6, 7, 8]]] * spec.history)
        actions = policy.act(window, np.random.default_rng(0))
        assert actions.shape == (4, 3) and np.all(np.isfinite(actions))
        assert policy.act_batch(np.stack([window] * 5), np.random.default_rng(1)).shape == (5, 4, 3)


def test_export_for_another_robot_is_refused_naming_the_joint(pipeline, capsys, tmp_path):
    other = dict(ROBOT, joints=[dict(j, name="elbow") if j["name"] == "wrist" else j for j in ROBOT["joints"]])
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    out = tmp_path / "student.onnx"
    assert main(["export", str(pipeline["files"]["student.pt"]), "--robot", str(path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "joint_names: robot=['base_yaw', 'lift', 'elbow'] checkpoint=['base_yaw', 'lift', 'wrist']" in error
    assert str(path) in error and str(pipeline["files"]["student.pt"]) in error and not out.exists()


# --- on the robot: the policy node ---------------------------------------------------------------------
def test_policy_node_refuses_a_joint_state_lacking_a_joint(pipeline, tmp_path, domain_id, ros_env):
    rclpy = pytest.importorskip("rclpy")
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PointStamped
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from vdd_ros.paths import config_file
    from vdd_ros.ros.processes import NodeProcess

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    probe = Node("turret_probe", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    commands, diagnostics = [], []
    probe.create_subscription(Float64MultiArray, "commands", lambda m: commands.append(list(m.data)), 100)
    probe.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diagnostics.extend(m.status), 10)
    joint_pub = probe.create_publisher(JointState, "joint_states", 10)
    goal_pub = probe.create_publisher(PointStamped, GOAL_TOPIC, 10)

    def publish(names, positions):
        now = probe.get_clock().now().to_msg()
        msg = JointState(name=names, position=[float(v) for v in positions], velocity=[0.0] * len(names))
        msg.header.stamp = now
        joint_pub.publish(msg)
        goal = PointStamped()
        goal.header.stamp = now
        goal.point.x, goal.point.y, goal.point.z = 0.7, 0.2, 0.5
        goal_pub.publish(goal)

    def spin(seconds, names=None, positions=None, until=lambda: False):
        """Spin (publishing this JointState and the goal at 25 Hz) for ``seconds`` or until ``until()``."""
        end, next_publish = time.monotonic() + seconds, time.monotonic()
        while time.monotonic() < end and not until():
            if names is not None and time.monotonic() >= next_publish:
                publish(names, positions)
                next_publish += 1.0 / 25
            executor.spin_once(timeout_sec=0.005)

    def refusals() -> int:
        latest = {kv.key: kv.value for kv in diagnostics[-1].values} if diagnostics else {}
        assert latest.get("commands_sent", "0") == "0", latest
        return int(latest.get("invalid_inputs", 0))

    node = NodeProcess("policy_node", tmp_path / "policy.log", ros_env, params_files=[config_file("policy.yaml")],
                       parameters={"model": str(pipeline["files"]["student.onnx"]), "diagnostics_period_s": 0.5})
    try:
        assert node.wait_for_log("active: commanding", timeout=60), node.log()
        assert "joints ['base_yaw', 'lift', 'wrist'], 10 Hz, history 2, horizon 4" in node.log()
        spin(1.0)  # discovery
        # the wrist is missing: no command, the log names the joint, the diagnostics count the refusals
        spin(10.0, ["base_yaw", "lift", "gripper"], [0.1, 0.3, 0.0], until=lambda: refusals() >= 10)
        assert refusals() >= 10, f"diagnostics: {diagnostics[-1:]}\n{node.log()}"
        spin(0.3, ["base_yaw", "lift", "gripper"], [0.1, 0.3, 0.0])
        assert commands == [], "a command was published for a JointState lacking 'wrist'"
        assert "ignored JointState on /joint_states: JointState.name lacks joints ['wrist']" in node.log(), \
            node.log()
        assert node.alive
        # every joint (in another order, with an extra one): the same node commands the turret's 3 joints
        spin(10.0, ["wrist", "gripper", "base_yaw", "lift"], [0.0, 0.0, 0.1, 0.3], until=lambda: len(commands) >= 5)
        assert len(commands) >= 5 and all(len(c) == 3 and all(math.isfinite(v) for v in c) for c in commands)
    finally:
        code = node.stop()
        executor.shutdown()
        probe.destroy_node()
        rclpy.try_shutdown(context=context)
    assert code == 0, node.log()
