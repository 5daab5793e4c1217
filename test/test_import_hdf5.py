"""vdd import-hdf5: robomimic-layout files written here with h5py (never committed) -> the dataset they came from.

The built-in arm_avoid demonstrations are written one demo_N group each (joint positions and velocities
as two obs keys, or as one key filling both fields; extra keys, images, rewards and a filter mask beside
them, demo numbers past 9 to check the numeric order); importing gives the generated dataset back
exactly. Each kind of bad file gets its one-line error, and a failed import writes nothing.
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from test_import_bag import robot_dict, write_yaml

from vdd_ros.cli.main import main
from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.hdf5_import import Hdf5Error, import_hdf5
from vdd_ros.data.robot import robot_from_dict
from vdd_ros.tasks import arm_avoid

NUMBERS = [0, 1, 2, 10, 11]  # demo_10 comes after demo_2
KEYS = {"robot0_joint_pos": "joint_position", "robot0_joint_vel": "joint_velocity"}


@pytest.fixture(scope="module")
def demos():
    return arm_avoid.generate_demonstrations(5, seed=3)


def robot(**changes):
    return robot_from_dict(robot_dict(action={"kind": "joint_position"}, **changes))


def write_robomimic(path, dataset: DemoDataset, proprio: bool = False, control_freq=20, edit=None) -> str:
    """One demo_N per episode: obs/robot0_joint_pos + obs/robot0_joint_vel (or one obs/robot0_proprio)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "ArmAvoid", "type": 1,
                                             "env_kwargs": {"control_freq": control_freq, "robots": ["Arm3"]}})
        data.attrs["total"] = dataset.n_steps
        for number, i in zip(NUMBERS, range(dataset.n_episodes)):
            obs, act = dataset.episode(i)
            demo = data.create_group(f"demo_{number}")
            demo.attrs["num_samples"] = len(act)
            if proprio:
                demo.create_dataset("obs/robot0_proprio", data=obs)
            else:
                demo.create_dataset("obs/robot0_joint_pos", data=obs[:, :3])
                demo.create_dataset("obs/robot0_joint_vel", data=obs[:, 3:])
            demo.create_dataset("obs/object", data=rng.normal(size=(len(obs), 10)))
            demo.create_dataset("obs/agentview_image", data=np.zeros((len(obs), 4, 4, 3), dtype=np.uint8))
            demo.create_dataset("next_obs/robot0_joint_pos", data=obs[:, :3])
            demo.create_dataset("actions", data=act)
            demo.create_dataset("rewards", data=np.zeros(len(act)))
            demo.create_dataset("dones", data=np.zeros(len(act), dtype=np.int64))
        f.create_dataset("mask/train", data=np.array([f"demo_{n}".encode() for n in NUMBERS[:4]]))
        if edit is not None:
            edit(f)
    return str(path)


def test_round_trip_gives_the_generated_dataset_back(tmp_path, demos):
    path = write_robomimic(tmp_path / "demos.hdf5", demos)
    dataset, report = import_hdf5(path, robot(hdf5_keys=KEYS), min_steps=5)
    np.testing.assert_array_equal(dataset.episode_ends, demos.episode_ends)
    np.testing.assert_array_equal(dataset.observations, demos.observations)
    np.testing.assert_array_equal(dataset.actions, demos.actions)
    assert dataset.spec.interface_differences(demos.spec.replace(history=2, action_horizon=16)) == []
    assert [e.index for e in report.episodes] == NUMBERS
    stats = report.episodes[0].streams["obs/robot0_joint_pos"]
    assert stats["messages"] == 66 and stats["rate_hz"] == pytest.approx(20.0) and stats["dropped"] == 0
    assert set(report.episodes[0].streams) == {"obs/robot0_joint_pos", "obs/robot0_joint_vel", "actions"}
    assert any("obs keys not read: ['agentview_image', 'object']" in note for note in report.notes)
    assert any("recorded in env ArmAvoid (type 1)" in note for note in report.notes)
    assert not any("not demonstrations" in note for note in report.notes)  # data holds demo_N groups only

    # one key filling both fields, in order; a field named like a key needs no mapping
    proprio = write_robomimic(tmp_path / "proprio.hdf5", demos, proprio=True)
    dataset, _ = import_hdf5(proprio, robot(), keys={"robot0_proprio": ["joint_position", "joint_velocity"]},
                             min_steps=5)
    np.testing.assert_array_equal(dataset.observations, demos.observations)

    def rename(f):
        for number in NUMBERS:
            f.move(f"data/demo_{number}/obs/robot0_joint_vel", f"data/demo_{number}/obs/joint_velocity")

    named = write_robomimic(tmp_path / "named.hdf5", demos, edit=rename)
    dataset, _ = import_hdf5(named, robot(), keys={"robot0_joint_pos": "joint_position"}, min_steps=5)
    np.testing.assert_array_equal(dataset.observations, demos.observations)


def test_cli_writes_the_dataset_and_the_report_and_drops_short_demos(tmp_path, demos, capsys):
    def short_demo(f):
        demo = f.create_group("data/demo_12")
        demo.attrs["num_samples"] = 3
        demo.create_dataset("obs/robot0_joint_pos", data=np.zeros((3, 3)))
        demo.create_dataset("obs/robot0_joint_vel", data=np.zeros((3, 3)))
        demo.create_dataset("actions", data=np.zeros((3, 3)))

    path = write_robomimic(tmp_path / "demos.hdf5", demos, edit=short_demo)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(action={"kind": "joint_position"}))
    out, report_file = tmp_path / "imported.npz", tmp_path / "report.json"
    assert main(["import-hdf5", path, "--robot", robot_file, "--out", str(out), "--json", str(report_file),
                 "--key", "robot0_joint_pos=joint_position", "--key", "robot0_joint_vel=joint_velocity",
                 "--min-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "robot arm_avoid: 3 joints" in printed
    lines = printed.splitlines()
    assert lines[1].split()[:7] == ["file", "ep", "start", "s", "steps", "dur", "s"] and lines[1].split()[7] == "key"
    assert lines[2].split()[:6] == ["demos.hdf5", "0", "0.00", "66", "3.30", "obs/robot0_joint_pos"]
    assert "DROPPED: 3 steps < min_steps 5" in printed
    assert "kept 5 episodes (365 steps, 18.2 s), dropped 1" in printed
    assert f"wrote {out}: 5 episodes, 365 steps, report {report_file}" in printed
    imported = DemoDataset.load(str(out))
    np.testing.assert_array_equal(imported.observations, demos.observations)
    np.testing.assert_array_equal(imported.actions, demos.actions)
    report = json.loads(report_file.read_text())
    assert report["summary"]["episodes"] == 5 and report["summary"]["dropped_episodes"] == 1
    assert report["episodes"][0]["file"] == path and "obs/robot0_joint_vel" in report["episodes"][0]["keys"]
    assert report["episodes"][-1]["dropped"] == "3 steps < min_steps 5"
    assert report["out"] == str(out) and report["robot"] == robot_file


def _delete(name):
    return lambda f: f.__delitem__(name)


def _replace(name, values):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=values)
    return edit


def _nan(f):
    values = f["data/demo_1/obs/robot0_joint_vel"][()]
    values[7, 1] = np.nan
    _replace("data/demo_1/obs/robot0_joint_vel", values)(f)


BAD_FILES = {
    "missing_data_group": (lambda f: f.move("data", "demos"), {},
                           "data: expected the robomimic group data (data/demo_N/obs/<key>, data/demo_N/actions), "
                           "got ['demos', 'mask']"),
    "missing_obs_key": (_delete("data/demo_2/obs/robot0_joint_vel"), {},
                        "data/demo_2/obs/robot0_joint_vel: expected an obs dataset named robot0_joint_vel (for "
                        "joint_velocity[3]) among the obs keys, got ['agentview_image', 'object', "
                        "'robot0_joint_pos']"),
    "action_width": (lambda f: _replace("data/demo_0/actions", np.zeros((66, 4)))(f), {},
                     "data/demo_0/actions: expected shape [T, 3] (one column per joint ['joint_1', 'joint_2', "
                     "'joint_3']), got [66, 4]"),
    "nan": (_nan, {}, "data/demo_1/obs/robot0_joint_vel[7]: expected finite numbers, got ["),
    "lengths": (lambda f: _replace("data/demo_10/obs/robot0_joint_pos",
                                   f["data/demo_10/obs/robot0_joint_pos"][:-1])(f), {},
                "data/demo_10/obs/robot0_joint_pos: expected 76 rows (as data/demo_10/actions), got 75"),
    "num_samples": (lambda f: f["data/demo_0"].attrs.__setitem__("num_samples", 65), {},
                    "data/demo_0.attrs['num_samples']: expected 66 (the rows of data/demo_0/actions), got 65"),
    "obs_width": (lambda f: _replace("data/demo_0/obs/robot0_joint_pos", np.zeros((66, 7)))(f), {},
                  "data/demo_0/obs/robot0_joint_pos: expected shape [T, 3] (joint_position[3]), got [66, 7]"),
    "control_freq": (None, {"control_rate_hz": 10},
                     "data.attrs['env_args'].env_kwargs.control_freq: expected 10 (control_rate_hz of robot "),
    "unmapped_field": (None, {"hdf5_keys": {"robot0_joint_pos": "joint_position"}},
                       "joint_velocity: expected a source mapped to this observation field (--key "
                       "SOURCE=joint_velocity or hdf5_keys in robot.yaml; sources present: ['agentview_image', "
                       "'object', 'robot0_joint_pos', 'robot0_joint_vel']), got None"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_get_one_line_errors_and_nothing_is_written(tmp_path, demos, kind, capsys):
    edit, changes, message = BAD_FILES[kind]
    path = write_robomimic(tmp_path / f"{kind}.hdf5", demos, edit=edit)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(**{"action": {"kind": "joint_position"},
                                                                   "hdf5_keys": KEYS, **changes}))
    out = tmp_path / "out.npz"
    assert main(["import-hdf5", path, "--robot", robot_file, "--out", str(out), "--json", str(tmp_path / "r.json"),
                 "--min-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"vdd import-hdf5: error: hdf5 {path}: " in err
    assert message in err
    assert sorted(os.listdir(tmp_path)) == sorted([f"{kind}.hdf5", "robot.yaml"])  # no output, no temporary file


def test_not_hdf5_bad_keys_and_no_long_demo(tmp_path, demos, capsys):
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(action={"kind": "joint_position"}, hdf5_keys=KEYS))
    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5")
    assert main(["import-hdf5", str(junk), "--robot", robot_file, "--out", str(tmp_path / "o.npz")]) == 2
    assert f"hdf5 {junk}: file: expected an HDF5 file, got" in capsys.readouterr().err
    path = write_robomimic(tmp_path / "demos.hdf5", demos)
    assert main(["import-hdf5", path, "--robot", robot_file, "--out", str(tmp_path / "o.npz"),
                 "--key", "robot0_joint_pos"]) == 2
    assert "--key: expected SOURCE=FIELD[,FIELD], got 'robot0_joint_pos'" in capsys.readouterr().err
    assert main(["import-hdf5", path, "--robot", robot_file, "--out", str(tmp_path / "o.npz"),
                 "--key", "robot0_joint_pos=position"]) == 2
    assert "--key.robot0_joint_pos: expected field names from observations ['joint_position', 'joint_velocity'], " \
           "got ['position']" in capsys.readouterr().err
    with pytest.raises(Hdf5Error, match=r"data: expected at least one episode of >= 100 steps \(5 shorter ones "
                       r"dropped\), got 0"):
        import_hdf5(path, robot(hdf5_keys=KEYS), min_steps=100)
    assert not (tmp_path / "o.npz").exists()
