"""vdd import-lerobot: LeRobotDataset v3 folders written here with pyarrow (never committed) -> the dataset they
came from.

The built-in arm_avoid demonstrations are written as LeRobot writes them: meta/info.json (fps, features,
a video feature beside them) and parquet files data/chunk-*/file-*.parquet holding several episodes
each (observation.state = joint positions and velocities, action, episode_index, frame_index, timestamp,
index, task_index; list and fixed-size-list columns; rows of one file out of order); importing gives the
generated dataset back exactly. Each kind of bad folder gets its one-line error, and a failed import
writes nothing.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_import_bag import JOINTS, robot_dict, write_yaml

from vdd_ros.cli.main import main
from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.lerobot_import import LeRobotError, import_lerobot
from vdd_ros.data.robot import robot_from_dict
from vdd_ros.tasks import arm_avoid

KEYS = {"observation.state": ["joint_position", "joint_velocity"]}
FILES = {"data/chunk-000/file-000.parquet": [0, 1], "data/chunk-000/file-001.parquet": [2, 3],
         "data/chunk-001/file-000.parquet": [4]}


@pytest.fixture(scope="module")
def demos():
    return arm_avoid.generate_demonstrations(5, seed=3)


def robot(**changes):
    return robot_from_dict(robot_dict(action={"kind": "joint_position"}, **changes))


def info(dataset: DemoDataset, fps=20) -> dict:
    return {"codebase_version": "v3.0", "robot_type": "arm3", "total_episodes": dataset.n_episodes,
            "total_frames": dataset.n_steps, "total_tasks": 1, "chunks_size": 1000, "fps": fps,
            "splits": {"train": f"0:{dataset.n_episodes}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {
                "observation.state": {"dtype": "float64", "shape": [6],
                                      "names": [f"{j}.pos" for j in JOINTS] + [f"{j}.vel" for j in JOINTS]},
                "action": {"dtype": "float64", "shape": [3], "names": list(JOINTS)},
                "observation.images.front": {"dtype": "video", "shape": [64, 64, 3],
                                             "names": ["height", "width", "channels"]},
                "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                "frame_index": {"dtype": "int64", "shape": [1], "names": None},
                "episode_index": {"dtype": "int64", "shape": [1], "names": None},
                "index": {"dtype": "int64", "shape": [1], "names": None},
                "task_index": {"dtype": "int64", "shape": [1], "names": None}}}


def columns_of(dataset: DemoDataset, episodes, fps=20) -> dict:
    """The rows of ``episodes`` as LeRobot's columns (numpy; lists as [rows, width])."""
    rows = {"observation.state": [], "action": [], "timestamp": [], "frame_index": [], "episode_index": [],
            "index": []}
    for e in episodes:
        obs, act = dataset.episode(e)
        frames = np.arange(len(obs))
        rows["observation.state"].append(obs)
        rows["action"].append(act)
        rows["timestamp"].append((frames / fps).astype(np.float32))
        rows["frame_index"].append(frames)
        rows["episode_index"].append(np.full(len(obs), e))
        rows["index"].append(dataset.episode_starts[e] + frames)
    return {name: np.concatenate(values) for name, values in rows.items()}


def write_parquet(path, columns: dict, fixed: bool = False) -> None:
    def vectors(values):
        width = values.shape[1]
        flat = pa.array(values.reshape(-1), type=pa.float64())
        return (pa.FixedSizeListArray.from_arrays(flat, width) if fixed
                else pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1) * width, pa.int32()), flat))

    arrays = {name: vectors(v) if v.ndim == 2 else pa.array(v) for name, v in columns.items()}
    arrays["task_index"] = pa.array(np.zeros(len(columns["frame_index"]), dtype=np.int64))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(arrays), path)


def write_lerobot(folder, dataset: DemoDataset, fps=20, meta=None, edit=None) -> str:
    """The folder; ``meta(info)`` edits meta/info.json, ``edit(rel, columns)`` a file's columns before writing."""
    os.makedirs(folder / "meta")
    data = info(dataset, fps)
    if meta is not None:
        meta(data)
    (folder / "meta" / "info.json").write_text(json.dumps(data, indent=2))
    for i, (rel, episodes) in enumerate(FILES.items()):
        columns = columns_of(dataset, episodes, fps)
        if i == 1:  # rows of this file in reverse order
            columns = {name: values[::-1] for name, values in columns.items()}
        if edit is not None:
            edit(rel, columns)
        write_parquet(str(folder / rel), columns, fixed=(i == 2))
    return str(folder)


def test_round_trip_gives_the_generated_dataset_back(tmp_path, demos):
    folder = write_lerobot(tmp_path / "demos", demos)
    dataset, report = import_lerobot(folder, robot(lerobot_keys=KEYS), min_steps=5)
    np.testing.assert_array_equal(dataset.episode_ends, demos.episode_ends)
    np.testing.assert_array_equal(dataset.observations, demos.observations)
    np.testing.assert_array_equal(dataset.actions, demos.actions)
    assert dataset.spec.interface_differences(demos.spec.replace(history=2, action_horizon=16)) == []
    assert [e.index for e in report.episodes] == [0, 1, 2, 3, 4]
    assert report.episodes[4].source == os.path.join(folder, "data/chunk-001/file-000.parquet")
    stats = report.episodes[2].streams["observation.state"]
    assert stats["messages"] == 79 and stats["rate_hz"] == pytest.approx(20.0, rel=1e-4) and stats["dropped"] == 0
    assert set(report.episodes[0].streams) == {"observation.state", "action"}
    assert any("images and videos not read: ['observation.images.front']" in note for note in report.notes)

    # one column per field, given by --key, and a field named like a column needs no mapping
    def split(rel, columns):
        state = columns.pop("observation.state")
        columns["observation.joint_pos"], columns["joint_velocity"] = state[:, :3], state[:, 3:]

    def split_meta(data):
        del data["features"]["observation.state"]
        data["features"]["observation.joint_pos"] = {"dtype": "float64", "shape": [3], "names": list(JOINTS)}
        data["features"]["joint_velocity"] = {"dtype": "float64", "shape": [3], "names": list(JOINTS)}

    folder = write_lerobot(tmp_path / "split", demos, meta=split_meta, edit=split)
    dataset, _ = import_lerobot(folder, robot(), keys={"observation.joint_pos": "joint_position"}, min_steps=5)
    np.testing.assert_array_equal(dataset.observations, demos.observations)


def test_cli_writes_the_dataset_and_the_report(tmp_path, demos, capsys):
    folder = write_lerobot(tmp_path / "demos", demos)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(action={"kind": "joint_position"}))
    out, report_file = tmp_path / "imported.npz", tmp_path / "report.json"
    assert main(["import-lerobot", folder, "--robot", robot_file, "--out", str(out), "--json", str(report_file),
                 "--key", "observation.state=joint_position,joint_velocity", "--min-steps", "70"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[1].split()[:8] == ["file", "ep", "start", "s", "steps", "dur", "s", "column"]
    assert lines[2].split()[:6] == ["chunk-000/file-000.parquet", "0", "0.00", "66", "3.30", "observation.state"]
    assert "DROPPED: 66 steps < min_steps 70" in printed
    assert "kept 4 episodes (299 steps, 14.9 s), dropped 1" in printed
    assert f"wrote {out}: 4 episodes, 299 steps, report {report_file}" in printed
    imported = DemoDataset.load(str(out))
    start = demos.episode_ends[0]
    np.testing.assert_array_equal(imported.observations, demos.observations[start:])
    np.testing.assert_array_equal(imported.actions, demos.actions[start:])
    report = json.loads(report_file.read_text())
    assert report["summary"]["episodes"] == 4 and report["summary"]["dropped_episodes"] == 1
    assert report["episodes"][0]["file"].endswith("data/chunk-000/file-000.parquet")
    assert set(report["episodes"][0]["columns"]) == {"observation.state", "action"}
    assert report["out"] == str(out) and report["robot"] == robot_file


def _in_file(rel, change):
    """An edit of the file ``rel``'s columns only."""
    return lambda name, columns: change(columns) if name == rel else None


def _nan(columns):
    columns["action"] = columns["action"].copy()
    columns["action"][10, 2] = np.nan


def _frame_gap(columns):
    keep = columns["frame_index"] != 30
    for name in list(columns):
        columns[name] = columns[name][keep]


def _late_timestamp(columns):
    columns["timestamp"] = columns["timestamp"].copy()
    columns["timestamp"][columns["episode_index"] == 4] += np.where(np.arange(70) >= 20, 0.05, 0).astype(np.float32)


FIRST = "data/chunk-000/file-000.parquet"
BAD_FOLDERS = {
    "fps": ({"fps": 30}, None, {}, "meta/info.json: fps: expected 20 (control_rate_hz of robot "),
    "missing_column": (None, _in_file(FIRST, lambda c: c.pop("observation.state")), {},
                       f"{FIRST}: observation.state: expected this column, got ['action', 'episode_index', "
                       "'frame_index', 'index', 'task_index', 'timestamp']"),
    "action_width": (None, _in_file(FIRST, lambda c: c.__setitem__("action", np.zeros((len(c["action"]), 4)))), {},
                     f"{FIRST}: action (row 0): expected 3 numbers, got 4"),
    "action_shape": ({"features.action.shape": [4]}, None, {},
                     "meta/info.json: features.action.shape: expected [3] (one number per joint ['joint_1', "
                     "'joint_2', 'joint_3']), got [4]"),
    "nan": (None, _in_file(FIRST, _nan), {}, f"{FIRST}: episode 0: action (frame 10): expected finite numbers, "
            "got [0."),
    "unmapped_field": (None, None, {"lerobot_keys": {"observation.state": ["joint_position"]}},
                       "joint_velocity: expected a source mapped to this observation field (--key "
                       "SOURCE=joint_velocity or lerobot_keys in robot.yaml; sources present: ['observation.state']), "
                       "got None"),
    "state_shape": ({"features.observation.state.shape": [7]}, None, {},
                    "meta/info.json: features.observation.state.shape: expected [6] (joint_position[3] + "
                    "joint_velocity[3]), got [7]"),
    "frame_gap": (None, _in_file("data/chunk-000/file-001.parquet", _frame_gap), {},
                  "data/chunk-000/file-001.parquet: episode 2: frame_index: expected frames 0..77 once each (one per "
                  "control step), got '31 at position 30 after 29'"),
    "timestamp": (None, _in_file("data/chunk-001/file-000.parquet", _late_timestamp), {},
                  "data/chunk-001/file-000.parquet: episode 4: timestamp: expected frames 1/fps = 0.0500 s apart, "
                  "got '0.1000 s from frame 19 to 20'"),
    "action_order": ({"features.action.names": JOINTS[::-1]}, None, {},
                     "meta/info.json: features.action.names: expected the joints in the order of robot.yaml "
                     "['joint_1', 'joint_2', 'joint_3'], got ['joint_3', 'joint_2', 'joint_1']"),
    "version": ({"codebase_version": "v2.1"}, None, {},
                "meta/info.json: codebase_version: expected v3.x (a LeRobotDataset v3 folder), got 'v2.1'"),
}


def _meta_edit(changes):
    def edit(data):
        for key, value in (changes or {}).items():
            target, *path = key.split(".")
            if path:  # features.<column>.<entry>: column names hold dots, the entry is the last part
                data[target][".".join(path[:-1])][path[-1]] = value
            else:
                data[key] = value
    return edit


@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_bad_folders_get_one_line_errors_and_nothing_is_written(tmp_path, demos, kind, capsys):
    meta, edit, changes, message = BAD_FOLDERS[kind]
    folder = write_lerobot(tmp_path / kind, demos, meta=_meta_edit(meta), edit=edit)
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(**{"action": {"kind": "joint_position"},
                                                                   "lerobot_keys": KEYS, **changes}))
    out = tmp_path / "out.npz"
    assert main(["import-lerobot", folder, "--robot", robot_file, "--out", str(out), "--json",
                 str(tmp_path / "r.json"), "--min-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"vdd import-lerobot: error: lerobot {folder}: " in err
    assert message in err
    assert sorted(os.listdir(tmp_path)) == sorted([kind, "robot.yaml"])  # no output, no temporary file


def test_not_a_lerobot_folder_and_no_long_episode(tmp_path, demos, capsys):
    robot_file = write_yaml(tmp_path / "robot.yaml", robot_dict(action={"kind": "joint_position"}, lerobot_keys=KEYS))
    (tmp_path / "empty").mkdir()
    assert main(["import-lerobot", str(tmp_path / "empty"), "--robot", robot_file, "--out",
                 str(tmp_path / "o.npz")]) == 2
    assert (f"lerobot {tmp_path / 'empty'}: meta/info.json: expected a LeRobotDataset v3 folder's metadata file, "
            "got 'missing'") in capsys.readouterr().err
    assert main(["import-lerobot", str(tmp_path / "nowhere"), "--robot", robot_file, "--out",
                 str(tmp_path / "o.npz")]) == 2
    assert "no such folder" in capsys.readouterr().err
    folder = write_lerobot(tmp_path / "demos", demos)
    with pytest.raises(LeRobotError, match=r"data: expected at least one episode of >= 100 steps \(5 shorter ones "
                       r"dropped\), got 0"):
        import_lerobot(folder, robot(lerobot_keys=KEYS), min_steps=100)
    assert not (tmp_path / "o.npz").exists()
