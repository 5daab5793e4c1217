"""robot.yaml -> ModelSpec: the shipped example loads, URDF limits are read with yourdfpy, every mistake
is one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vdd_ros.data.robot import RobotError, load_robot, robot_from_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "franka_robot.yaml"

URDF = """<?xml version="1.0"?>
<robot name="two_link">
  <link name="base"/><link name="upper"/><link name="lower"/><link name="tool"/><link name="wheel"/>
  <joint name="shoulder" type="revolute">
    <parent link="base"/><child link="upper"/><axis xyz="0 0 1"/>
    <limit lower="-1.5" upper="1.25" velocity="2.0" effort="10"/>
  </joint>
  <joint name="elbow" type="prismatic">
    <parent link="upper"/><child link="lower"/><axis xyz="1 0 0"/>
    <limit lower="0.0" upper="0.3" velocity="0.5" effort="10"/>
  </joint>
  <joint name="tool_mount" type="fixed"><parent link="lower"/><child link="tool"/></joint>
  <joint name="spin" type="continuous">
    <parent link="tool"/><child link="wheel"/><axis xyz="0 0 1"/><limit velocity="6.0" effort="1"/>
  </joint>
</robot>
"""


def test_franka_example_loads_as_a_seven_joint_spec():
    robot = load_robot(str(EXAMPLE))
    spec = robot.spec
    assert spec.joint_names == tuple(f"panda_joint{i}" for i in range(1, 8))
    assert spec.joint_lower[3] == -3.0718 and spec.joint_upper[5] == 3.7525
    assert spec.joint_velocity_limits == (2.175,) * 4 + (2.61,) * 3
    assert [f.name for f in spec.observation_fields] == ["joint_position", "joint_velocity", "goal"]
    assert spec.obs_step_dim == 7 + 7 + 3 and spec.n_joints == 7
    assert spec.history == 2 and spec.action_horizon == 16 and spec.control_rate_hz == 20.0
    assert robot.command_topic == "/forward_position_controller/commands"
    assert robot.name == "franka_reach" and spec.task == "franka_reach"
    assert "7 joints" in robot.describe()


def write(tmp_path, data: dict, urdf: str | None = URDF) -> str:
    if urdf is not None:
        (tmp_path / "arm.urdf").write_text(urdf)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"urdf": "arm.urdf", "joints": ["elbow", "shoulder"], "control_rate_hz": 10,
        "action": {"kind": "joint_position"}}


def test_limits_come_from_the_urdf_and_explicit_numbers_win(tmp_path):
    robot = load_robot(write(tmp_path, BASE))
    assert robot.spec.joint_names == ("elbow", "shoulder")
    assert robot.spec.joint_lower == (0.0, -1.5) and robot.spec.joint_upper == (0.3, 1.25)
    assert robot.spec.joint_velocity_limits == (0.5, 2.0)
    assert robot.name == "robot" and robot.command_topic == ""  # name: the file's stem
    data = dict(BASE, joints=["elbow", {"name": "shoulder", "upper": 1.0},
                              {"name": "spin", "lower": -3.14, "upper": 3.14}])
    spec = load_robot(write(tmp_path, data)).spec
    assert spec.joint_upper == (0.3, 1.0, 3.14) and spec.joint_velocity_limits == (0.5, 2.0, 6.0)


@pytest.mark.parametrize("changes, message", [
    ({"joints": ["elbow", "wrist"]}, "joints[1]: expected a movable joint of the URDF ['shoulder', 'elbow', 'spin'], "
     "got 'wrist'"),
    ({"joints": ["spin"]}, "joints[0]: expected lower and upper for 'spin' (a continuous joint: the URDF has no "
     "position limits), got {'lower': None, 'upper': None}"),
    ({"joints": ["tool_mount"]}, "joints[0]: expected a revolute, continuous or prismatic joint of the URDF, got "
     "\"'tool_mount' is fixed\""),
    ({"joints": ["elbow", "elbow"]}, "joints[1]: expected unique joint names, got \"'elbow' appears twice\""),
    ({"joints": [{"name": "elbow", "lower": 0.5}]}, "joints[0].upper: expected above lower=0.5 for 'elbow', got 0.3"),
    ({"urdf": "missing.urdf"}, "urdf: expected an existing URDF file"),
    ({"control_rate_hz": 0}, "control_rate_hz: expected a number > 0, got 0"),
    ({"history": 0}, "history: expected an integer >= 1, got 0"),
    ({"action": {"kind": "torque"}}, "action.kind: expected one of ['joint_position', 'joint_delta', "
     "'joint_velocity'], got 'torque'"),
    ({"action": {"kind": "joint_position", "topic": "/cmd", "type": "std_msgs/Float32MultiArray"}},
     "action.type: expected one of ['std_msgs/Float64MultiArray', 'trajectory_msgs/JointTrajectory'], got "
     "'std_msgs/Float32MultiArray'"),
    ({"observations": ["joint_position", {"name": "goal", "topic": "/goal", "type": "std_msgs/String", "size": 2}]},
     "observations[1].type: expected one of ['std_msgs/Float64MultiArray', 'geometry_msgs/PointStamped', "
     "'geometry_msgs/PoseStamped'], got 'std_msgs/String'"),
    ({"observations": [{"name": "goal", "topic": "/goal", "type": "std_msgs/Float64MultiArray"}]},
     "observations[0].size: expected an integer >= 1, got None"),
    ({"observations": ["joint_torque"]}, "observations[0].kind: expected joint_position, joint_velocity or vector"),
    ({"hdf5_keys": {"robot0_joint_pos": "nothing"}}, "hdf5_keys.robot0_joint_pos: expected field names from "
     "observations ['joint_position', 'joint_velocity'], got 'nothing'"),
    ({"joint_state": "/js"}, "joint_state: expected one of the keys"),
])
def test_each_mistake_is_one_line_naming_the_key(tmp_path, changes, message):
    path = write(tmp_path, dict(BASE, **changes))
    with pytest.raises(RobotError) as caught:
        load_robot(path)
    text = str(caught.value)
    assert text.startswith(f"robot {path}: ") and "\n" not in text
    assert message in text


def test_without_urdf_every_limit_is_written_out(tmp_path):
    data = {"joints": [{"name": "a", "lower": -1, "upper": 1, "velocity": 1}, {"name": "b", "lower": -1, "upper": 1}],
            "control_rate_hz": 10, "action": {"kind": "joint_position"}}
    with pytest.raises(RobotError, match=r"joints\[1\]\.velocity: expected a velocity limit for 'b' from here "
                                         r"\(no urdf\), got None"):
        robot_from_dict(data)
    with pytest.raises(RobotError, match="file: expected valid YAML"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("joints: [a, b\n")
        load_robot(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_robot(str(tmp_path / "none.yaml"))
