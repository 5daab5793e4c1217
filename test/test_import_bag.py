"""vdd import-bag: bags written here with rosbags' writer (never committed) -> the dataset they came from.

The built-in arm_avoid demonstrations are replayed through its simulator; every physics tick becomes a
200 Hz JointState (header stamp = tick time) and every control step a 20 Hz Float64MultiArray command,
in MCAP and in SQLite3 storage; importing gives the generated dataset back. Each kind of bad bag gets
its one-line error, and a failed import writes nothing.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vdd_ros.cli.main import main
from vdd_ros.data.bag_import import BagError, import_bags
from vdd_ros.data.bag_write import BagRecorder
from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.robot import robot_from_dict
from vdd_ros.tasks import arm_avoid

JOINTS = list(arm_avoid.JOINT_NAMES)
CMD = "/arm/command"


def robot_dict(**changes) -> dict:
    cfg = arm_avoid.DEFAULT_CONFIG
    data = {"name": "arm_avoid", "control_rate_hz": 20, "history": 2, "horizon": 16,
            "joints": [{"name": n, "lower": lo, "upper": up, "velocity": v} for n, lo, up, v in
                       zip(JOINTS, cfg.joint_lower, cfg.joint_upper, cfg.joint_velocity_limits)],
            "observations": ["joint_position", "joint_velocity"],
            "action": {"kind": "joint_position", "topic": CMD, "type": "std_msgs/Float64MultiArray"}}
    data.update(changes)
    return data


def write_yaml(path, data) -> str:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def demos():
    return arm_avoid.generate_demonstrations(5, seed=3)


def ticks_of_episode(dataset: DemoDataset, i: int):
    """Replay episode ``i``'s commands: (q, qdot) at every 200 Hz tick of its control steps."""
    obs, act = dataset.episode(i)
    sim = arm_avoid.ArmSim(batch=1)
    sim.reset(np.random.default_rng(0), obs[:1, :3])
    q, qdot = [], []
    for target in act:
        for _ in range(arm_avoid.TICKS_PER_CONTROL):
            q.append(sim.q[0].copy())
            qdot.append(sim.qdot[0].copy())
            sim.step_physics(target[None])
    return np.array(q), np.array(qdot), act


def record(bag: BagRecorder, dataset: DemoDataset, episodes, t0: float, gap: float = 2.0, marker: str = "",
           shuffle_names: bool = True) -> None:
    """Episodes one after another, ``gap`` seconds apart; JointState lists an extra joint, in another order."""
    t = t0
    for i in episodes:
        q, qdot, act = ticks_of_episode(dataset, i)
        if marker:
            bag.marker(t - 0.01, True, marker)
        order = [2, 0, 1] if shuffle_names else [0, 1, 2]
        for k in range(len(q)):
            stamp = t + k / 200.0
            names = [JOINTS[j] for j in order] + ["gripper"]
            bag.joint_state(stamp, names, np.append(q[k, order], 0.04), np.append(qdot[k, order], 0.0),
                            receive=stamp + 0.0004)
            if k % 10 == 0:
                bag.float_array(stamp + 0.002, act[k // 10], CMD)  # published 2 ms after the state it answers
        if marker:
            bag.marker(t + len(q) / 200.0, False, marker)
        t += len(q) / 200.0 + gap


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip_gives_the_generated_dataset_back(tmp_path, demos, storage):
    bag_path = tmp_path / f"demos_{storage}"
    with BagRecorder(bag_path, storage) as bag:
        record(bag, demos, range(demos.n_episodes), t0=1_700_000_000.0)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict())
    out, report_file = tmp_path / "imported.npz", tmp_path / "report.json"
    assert main(["import-bag", str(bag_path), "--robot", robot_file, "--out", str(out), "--json",
                 str(report_file), "--min-steps", "5"]) == 0
    imported = DemoDataset.load(str(out))
    assert imported.n_episodes == demos.n_episodes  # split at the 2 s gaps
    np.testing.assert_array_equal(imported.episode_ends, demos.episode_ends)
    np.testing.assert_allclose(imported.observations, demos.observations, atol=1e-9)
    np.testing.assert_allclose(imported.actions, demos.actions, atol=1e-12)
    # the robot.yaml written out as the built-in task's interface: the same spec
    assert imported.spec.interface_differences(demos.spec.replace(history=2, action_horizon=16)) == []
    report = json.loads(report_file.read_text())
    assert report["summary"]["episodes"] == demos.n_episodes
    first = report["episodes"][0]["topics"]
    assert first["/joint_states"]["rate_hz"] == pytest.approx(200.0, rel=1e-3)
    assert first[CMD]["rate_hz"] == pytest.approx(20.0, rel=1e-3)
    assert first["/joint_states"]["dropped"] == 0 and first["/joint_states"]["duplicated"] == 0


def test_marker_topic_bags_per_episode_zero_stamps_trajectory_and_no_command(tmp_path, demos):
    # Bool marker, episodes 0.1 s apart (no gap split): the marker alone separates them
    marked = tmp_path / "marked"
    with BagRecorder(marked, "sqlite3") as bag:
        record(bag, demos, [0, 1], t0=100.0, gap=0.1, marker="/recording")
    robot = robot_from_dict(robot_dict())
    dataset, report = import_bags([str(marked)], robot, marker_topic="/recording", min_steps=5)
    assert dataset.n_episodes == 2
    np.testing.assert_allclose(dataset.observations, demos.observations[:demos.episode_ends[1]], atol=1e-9)

    # one bag per episode, header stamps all zero: receive time is used and the report says so
    bags = []
    for i in (2, 3):
        path = tmp_path / f"episode_{i}"
        q, qdot, act = ticks_of_episode(demos, i)
        with BagRecorder(path, "mcap") as bag:
            for k in range(len(q)):
                bag.joint_state(0.0, JOINTS, q[k], qdot[k], receive=50.0 + k / 200.0)
                if k % 10 == 0:
                    bag.trajectory(0.0, JOINTS[::-1], act[k // 10][::-1], CMD, receive=50.0 + k / 200.0 + 0.001)
        bags.append(str(path))
    trajectory_robot = robot_from_dict(robot_dict(action={"kind": "joint_position", "topic": CMD,
                                                          "type": "trajectory_msgs/JointTrajectory"}))
    dataset, report = import_bags(bags, trajectory_robot, min_steps=5)
    start, end = demos.episode_ends[1], demos.episode_ends[3]
    np.testing.assert_allclose(dataset.observations, demos.observations[start:end], atol=1e-9)
    np.testing.assert_allclose(dataset.actions, demos.actions[start:end], atol=1e-12)
    assert any("header stamps are all zero, using receive time" in note for note in report.notes)

    # no command topic: the action is the next measured joint positions (the servo lags its target)
    teleop = robot_from_dict(robot_dict(action={"kind": "joint_position"}))
    dataset, _ = import_bags([bags[0]], teleop, min_steps=5)
    obs, _ = demos.episode(2)
    n = dataset.n_steps
    assert n == len(obs) - 1
    np.testing.assert_allclose(dataset.actions[:-1], obs[1:n, :3], atol=1e-9)


def test_gaps_duplicates_and_short_episodes_are_reported(tmp_path, demos):
    path = tmp_path / "flaky"
    q, qdot, act = ticks_of_episode(demos, 0)
    with BagRecorder(path, "mcap") as bag:
        for k in range(len(q)):
            if 100 <= k < 110:
                continue  # 10 JointState messages lost: a 55 ms gap
            bag.joint_state(5 + k / 200.0, JOINTS, q[k], qdot[k])
            if k == 200:
                bag.joint_state(5 + k / 200.0, JOINTS, q[k], qdot[k])  # the same stamp twice
            if k % 10 == 0:
                bag.float_array(5 + k / 200.0, act[k // 10], CMD)
        # a 0.2 s tail after a 1 s pause: its own episode, too short, dropped
        for k in range(40):
            t = 5 + len(q) / 200.0 + 1.0 + k / 200.0
            bag.joint_state(t, JOINTS, q[-1], qdot[-1])
            if k % 10 == 0:
                bag.float_array(t, act[-1], CMD)
    dataset, report = import_bags([str(path)], robot_from_dict(robot_dict()), min_steps=10)
    assert dataset.n_episodes == 1 and len(report.episodes) == 2
    stats = report.episodes[0].topics["/joint_states"]
    assert stats["dropped"] == 10 and stats["duplicated"] == 1
    assert stats["largest_gap_ms"] == pytest.approx(55.0)
    assert report.episodes[1].dropped_reason == "4 steps < min_steps 10"
    text = report.format()
    assert "DROPPED: 4 steps < min_steps 10" in text and "kept 1 episodes" in text


def _bad_bag(tmp_path, name: str, edit) -> str:
    """A short healthy bag with one thing made wrong by ``edit(bag, k, t)`` (returns False to skip the tick)."""
    path = tmp_path / name
    with BagRecorder(path, "mcap") as bag:
        for k in range(60):
            t = 10.0 + k / 200.0
            if edit(bag, k, t) is False:
                continue
            bag.joint_state(t, JOINTS, [0.1, 0.5, 0.3], [0.0, 0.0, 0.0])
            if k % 10 == 0:
                bag.float_array(t, [0.1, 0.5, 0.3], CMD)
    return str(path)


BAD_BAGS = {
    "missing_topic": (lambda bag, k, t: None, {"action": {"kind": "joint_position", "topic": "/other/command",
                                                          "type": "std_msgs/Float64MultiArray"}},
                      "topic /other/command: expected this command topic (std_msgs/Float64MultiArray), got only "
                      "topics ['/arm/command', '/joint_states']"),
    "unknown_type": (lambda bag, k, t: bag.write("/goal", "std_msgs/msg/String", bag.types["std_msgs/msg/String"](
        data="hello"), t) if k == 0 else None,
        {"observations": ["joint_position", {"name": "goal", "topic": "/goal", "type": "geometry_msgs/PointStamped"}]},
        "topic /goal: expected message type geometry_msgs/PointStamped, got std_msgs/msg/String"),
    "missing_joint": (lambda bag, k, t: (bag.joint_state(t, JOINTS[:2], [0.1, 0.5], [0.0, 0.0]), False)[1]
                      if k == 30 else None, {},
                      "topic /joint_states at 0.150 s (bag time 10.150000000): JointState.name lacks joints "
                      "['joint_3']"),
    "backwards": (lambda bag, k, t: (bag.joint_state(t - 0.1, JOINTS, [0.1, 0.5, 0.3], [0, 0, 0], receive=t), False)[1]
                  if k == 40 else None, {},
                  "topic /joint_states at 0.200 s (bag time 10.200000000): header stamps go backwards"),
    "nan": (lambda bag, k, t: (bag.joint_state(t, JOINTS, [0.1, float("nan"), 0.3], [0, 0, 0]), False)[1]
            if k == 20 else None, {},
            "topic /joint_states at 0.100 s (bag time 10.100000000): expected finite values, got [0.1, nan, 0.3"),
    "empty_episode": (lambda bag, k, t: bag.marker(t, int(k // 30), "/episode") if k in (0, 30) else
                      (bag.marker(t + 1.0, 2, "/episode") if k == 59 else None), {},
                      "episode 2 (1.295 s to 1.295 s): empty episode: no message in it"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BAGS))
def test_bad_bags_get_one_line_errors_and_nothing_is_written(tmp_path, kind, capsys):
    edit, changes, message = BAD_BAGS[kind]
    bag = _bad_bag(tmp_path, kind, edit)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(**changes))
    out = tmp_path / "out.npz"
    args = ["import-bag", bag, "--robot", robot_file, "--out", str(out), "--json", str(tmp_path / "r.json"),
            "--min-steps", "1"]
    if kind == "empty_episode":
        args += ["--episode-topic", "/episode"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"vdd import-bag: error: bag {bag}: " in err
    assert message in err
    assert sorted(os.listdir(tmp_path)) == sorted([kind, "robot.yaml"])  # no output, no temporary file


def test_not_a_bag_and_bad_arguments(tmp_path, capsys):
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict())
    (tmp_path / "junk").mkdir()
    assert main(["import-bag", str(tmp_path / "junk"), "--robot", robot_file, "--out", str(tmp_path / "o.npz")]) == 2
    assert "expected a rosbag2 folder or file (MCAP or SQLite3)" in capsys.readouterr().err
    assert main(["import-bag", str(tmp_path / "junk"), "--robot", robot_file, "--out", "o.csv"]) == 2
    assert "--out: expected a path ending in .npz, got 'o.csv'" in capsys.readouterr().err
    with pytest.raises(BagError, match="max_gap_s: expected a number > 0"):
        import_bags([str(tmp_path)], robot_from_dict(robot_dict()), max_gap_s=0)
