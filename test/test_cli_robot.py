"""``--robot robot.yaml`` on train-teacher, distill, train-em and export, with tiny fake datasets.

The robot's history and horizon sit under the user's config (each value printed with where it came
from); a dataset, teacher or checkpoint whose spec does not fit the robot is refused in one line that
lists the differences and names both files, before anything is written. Without --robot nothing changes.
"""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from vdd_ros.cli import main as cli_main
from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.robot import robot_from_dict
from vdd_ros.learn.checkpoint import load_checkpoint

TINY_EM = ["--set", "iterations=2", "--set", "n_experts=2", "--set", "backbone.hidden=8",
           "--set", "backbone.mlp_layers=1", "--set", "batch_size=32", "--quiet"]
TINY_TEACHER = ["--set", "iterations=4", "--set", "batch_size=16", "--set", "backbone.hidden=8",
                "--set", "backbone.mlp_layers=1", "--set", "n_steps=2", "--set", "checkpoint_every=0", "--quiet"]


def robot_dict(**changes) -> dict:
    data = {"name": "slider", "control_rate_hz": 10, "history": 3, "horizon": 4,
            "joints": [{"name": "a", "lower": -1.0, "upper": 1.0, "velocity": 1.0},
                       {"name": "b", "lower": -2.0, "upper": 2.0, "velocity": 1.0}],
            "observations": ["joint_position",
                             {"name": "goal", "topic": "/goal", "type": "std_msgs/Float64MultiArray", "size": 2}],
            "action": {"kind": "joint_position", "topic": "/cmd", "type": "std_msgs/Float64MultiArray"}}
    data.update(changes)
    return data


def write_robot(path, **changes) -> str:
    path.write_text(yaml.safe_dump(robot_dict(**changes)))
    return str(path)


def fake_dataset(path, seed: int = 0, **changes) -> str:
    """Three 20-step episodes of random positions and goals on the spec of ``robot_dict(**changes)``."""
    spec = robot_from_dict(robot_dict(**changes)).spec
    rng = np.random.default_rng(seed)
    n = 60
    obs = rng.uniform(-0.5, 0.5, (n, spec.obs_step_dim))
    act = obs[:, :spec.n_joints] + 0.05 * rng.standard_normal((n, spec.n_joints))
    DemoDataset(observations=obs, actions=act, episode_ends=[20, 40, 60], spec=spec).save(str(path))
    return str(path)


def vdd(*argv) -> int:
    return cli_main.main([str(a) for a in argv])


@pytest.fixture
def files(tmp_path):
    return {"robot": write_robot(tmp_path / "robot.yaml"), "data": fake_dataset(tmp_path / "demos.npz")}


def test_robot_history_and_horizon_replace_the_config_defaults(tmp_path, files, capsys):
    out = tmp_path / "em.pt"
    assert vdd("train-em", "--dataset", files["data"], "--robot", files["robot"], "--out", out, *TINY_EM) == 0
    printed = capsys.readouterr().out
    assert f"vdd train-em: history 3 from robot {files['robot']}" in printed
    assert f"vdd train-em: horizon 4 from robot {files['robot']}" in printed
    assert f"dataset {files['data']} fits robot {files['robot']}" in printed
    assert "execute_steps 2 (half the horizon)" in printed
    spec = load_checkpoint(out).spec
    assert (spec.history, spec.action_horizon) == (3, 4)
    assert robot_from_dict(robot_dict()).interface_problems(spec) == []


def test_the_users_own_values_win_over_the_robot_and_say_so(tmp_path, files, capsys):
    out = tmp_path / "em.pt"
    assert vdd("train-em", "--dataset", files["data"], "--robot", files["robot"], "--out", out, *TINY_EM,
               "--set", "horizon=2", "--history", "1") == 0
    printed = capsys.readouterr().out
    assert f"horizon 2 from --set (robot {files['robot']} says 4)" in printed
    assert f"history 1 from --history (robot {files['robot']} says 3)" in printed
    spec = load_checkpoint(out).spec
    assert (spec.history, spec.action_horizon) == (1, 2)


def test_robot_horizon_zero_leaves_the_derived_default(tmp_path, capsys):
    robot = write_robot(tmp_path / "robot.yaml", horizon=0)
    data = fake_dataset(tmp_path / "demos.npz", horizon=0)
    out = tmp_path / "em.pt"
    assert vdd("train-em", "--dataset", data, "--robot", robot, "--out", out, *TINY_EM) == 0
    printed = capsys.readouterr().out
    assert "horizon 8 actions (0.8 s at the demonstrations' 10 Hz)" in printed and "horizon 4" not in printed
    assert load_checkpoint(out).spec.action_horizon == 8


def test_without_robot_nothing_changes(tmp_path, files, capsys):
    out = tmp_path / "em.pt"
    assert vdd("train-em", "--dataset", files["data"], "--out", out, *TINY_EM) == 0
    printed = capsys.readouterr().out
    assert "from robot" not in printed and "fits robot" not in printed
    spec = load_checkpoint(out).spec
    assert (spec.history, spec.action_horizon) == (2, 8)  # the config's history, 0.8 s at 10 Hz


@pytest.mark.parametrize("command", ["train-em", "train-teacher"])
def test_a_dataset_of_another_robot_is_refused_in_one_line_naming_both_files(tmp_path, files, capsys, command):
    other = fake_dataset(tmp_path / "other.npz", control_rate_hz=20,
                         joints=[{"name": "a", "lower": -1.0, "upper": 1.0, "velocity": 1.0},
                                 {"name": "c", "lower": -2.0, "upper": 2.0, "velocity": 1.0}])
    out = tmp_path / "model.pt"
    tiny = TINY_EM if command == "train-em" else TINY_TEACHER
    assert vdd(command, "--dataset", other, "--robot", files["robot"], "--out", out, *tiny) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith(f"vdd {command}: error: dataset {other} does not fit the interface of robot "
                            f"{files['robot']}: ")
    assert "joint_names: robot=['a', 'b'] dataset=['a', 'c']" in error
    assert "control_rate_hz: robot=10.0 dataset=20.0" in error
    assert not out.exists()


def test_a_missing_or_bad_robot_file_is_one_line(tmp_path, files, capsys):
    out = tmp_path / "em.pt"
    assert vdd("train-em", "--dataset", files["data"], "--robot", tmp_path / "none.yaml", "--out", out,
               *TINY_EM) == 2
    assert f"robot {tmp_path / 'none.yaml'}: no such file" in capsys.readouterr().err
    bad = write_robot(tmp_path / "bad.yaml", history=0)
    assert vdd("train-em", "--dataset", files["data"], "--robot", bad, "--out", out, *TINY_EM) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"robot {bad}: history: expected an integer >= 1, got 0" in error
    assert not out.exists()


def test_distill_and_export_check_the_teacher_and_checkpoint_against_the_robot(tmp_path, files, capsys):
    teacher = tmp_path / "teacher.pt"
    assert vdd("train-teacher", "--dataset", files["data"], "--robot", files["robot"], "--out", teacher,
               *TINY_TEACHER) == 0
    assert (load_checkpoint(teacher).spec.history, load_checkpoint(teacher).spec.action_horizon) == (3, 4)
    capsys.readouterr()
    # another robot: the teacher is refused by distill, the checkpoint by export; nothing is written
    other = write_robot(tmp_path / "other.yaml", control_rate_hz=25, horizon=6)
    student = tmp_path / "student.pt"
    assert vdd("distill", "--teacher", teacher, "--robot", other, "--out", student, "--quiet") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"--teacher {teacher} does not fit the interface of robot {other}: " \
           "control_rate_hz: robot=25.0 teacher=10.0" in error
    assert not student.exists()
    onnx = tmp_path / "teacher.onnx"
    assert vdd("export", teacher, "--out", onnx, "--robot", other) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"vdd export: error: checkpoint {teacher} does not fit the interface of robot {other}: "
                     "control_rate_hz: robot=25.0 checkpoint=10.0")
    assert not onnx.exists() and not (tmp_path / "teacher_denoiser.onnx").exists()
    # the teacher's robot: distill says the teacher fixes window and chunk, and where the robot differs
    same_but_horizon = write_robot(tmp_path / "same.yaml", horizon=6)
    assert vdd("distill", "--teacher", teacher, "--robot", same_but_horizon, "--out", student, "--set",
               "iterations=2", "--set", "n_experts=2", "--set", "samples_per_expert=2", "--set", "batch_size=4",
               "--set", "gating_batch_size=8", "--set", "backbone.hidden=8", "--set", "backbone.mlp_layers=1",
               "--set", "warm_start_iterations=1", "--set", "validation_every=0", "--quiet") == 0
    printed = capsys.readouterr().out
    assert f"--teacher {teacher} fits robot {same_but_horizon}" in printed
    assert f"dataset {files['data']} fits robot {same_but_horizon}" in printed
    assert f"history 3 from the teacher {teacher}\n" in printed
    assert f"horizon 4 from the teacher {teacher} (robot {same_but_horizon} says 6)" in printed
    assert load_checkpoint(student).spec.action_horizon == 4
