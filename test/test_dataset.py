"""DemoDataset: windows and their padding, minibatches, save/load round trip and every load error."""
import io
import os

import numpy as np
import pytest

from vdd_ros.data.dataset import REQUIRED_KEYS, DatasetError, DemoDataset
from vdd_ros.tasks.arm_avoid import task_spec
from vdd_ros.tasks.registry import load_dataset
from vdd_ros.validation import FieldError

SPEC = task_spec(1, 1)


def small_dataset() -> DemoDataset:
    """Two episodes (3 and 2 steps); frame i is all i, action i is all 100 + i."""
    steps = np.arange(5, dtype=np.float64)
    return DemoDataset(observations=np.repeat(steps[:, None], 6, 1), actions=np.repeat(100 + steps[:, None], 3, 1),
                       episode_ends=np.array([3, 5]), spec=SPEC, routes=np.array([4, -1]))


def arrays_of(dataset: DemoDataset) -> dict:
    return {"observations": dataset.observations, "actions": dataset.actions, "episode_ends": dataset.episode_ends,
            "routes": dataset.routes, "task": np.array(dataset.task), "spec_json": np.array(dataset.spec.to_json())}


def write_npz(path, **changes) -> str:
    arrays = arrays_of(small_dataset())
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return str(path)


# --- windows ------------------------------------------------------------------------------------
def test_window_shapes():
    obs, act = small_dataset().windows(history=2, horizon=4)
    assert obs.shape == (5, 2, 6) and act.shape == (5, 4, 3)


def test_windows_pad_inside_their_episode():
    obs, act = small_dataset().windows(history=3, horizon=3)
    assert obs[:, :, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4]]
    assert act[:, :, 0].tolist() == [[100, 101, 102], [101, 102, 102], [102, 102, 102],
                                     [103, 104, 104], [104, 104, 104]]


def test_windows_of_history_and_horizon_one_are_the_raw_steps():
    dataset = small_dataset()
    obs, act = dataset.windows(1, 1)
    np.testing.assert_array_equal(obs[:, 0], dataset.observations)
    np.testing.assert_array_equal(act[:, 0], dataset.actions)


def test_windows_reject_bad_sizes():
    with pytest.raises(FieldError, match="history: expected an integer >= 1, got 0"):
        small_dataset().windows(0, 2)
    with pytest.raises(FieldError, match="horizon: expected an integer >= 1, got 0"):
        small_dataset().windows(2, 0)


def test_minibatches_cover_every_window_once():
    dataset = small_dataset()
    batches = list(dataset.minibatches(history=2, horizon=2, batch_size=2, rng=np.random.default_rng(0)))
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    seen = sorted(float(obs[-1, 0]) for batch_obs, _ in batches for obs in batch_obs)
    assert seen == [0, 1, 2, 3, 4]
    for batch_obs, batch_act in batches:
        np.testing.assert_array_equal(batch_act[:, 0, 0] - 100, batch_obs[:, -1, 0])
    assert [len(b[0]) for b in dataset.minibatches(2, 2, 2, np.random.default_rng(0), drop_last=True)] == [2, 2]


def test_episode_accessors():
    dataset = small_dataset()
    assert (dataset.n_steps, dataset.n_episodes) == (5, 2)
    assert dataset.episode_starts.tolist() == [0, 3]
    obs, act = dataset.episode(1)
    assert obs[:, 0].tolist() == [3, 4] and act[:, 0].tolist() == [103, 104]


# --- construction errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    (dict(observations=np.zeros((5, 5))), "observations"),
    (dict(actions=np.zeros((5, 2))), "actions"),
    (dict(actions=np.zeros((4, 3))), "actions"),
    (dict(episode_ends=np.array([3, 4])), "episode_ends"),
    (dict(episode_ends=np.array([3, 3, 5])), "episode_ends"),
    (dict(episode_ends=np.array([], dtype=int)), "episode_ends"),
    (dict(routes=np.array([1, 2, 3])), "routes"),
    (dict(observations=np.full((5, 6), np.nan)), "observations"),
    (dict(task="gmm2d"), "task"),
])
def test_constructor_rejects_inconsistent_arrays(change, field):
    data = dict(observations=np.zeros((5, 6)), actions=np.zeros((5, 3)), episode_ends=np.array([3, 5]), spec=SPEC)
    data.update(change)
    with pytest.raises(DatasetError, match=f"dataset: {field}: expected ") as info:
        DemoDataset(**data)
    assert info.value.field_name == field


# --- save / load --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    dataset = small_dataset()
    path = dataset.save(str(tmp_path / "sub" / "demos.npz"))
    loaded = DemoDataset.load(path, expected_task="arm_avoid")
    np.testing.assert_array_equal(loaded.observations, dataset.observations)
    np.testing.assert_array_equal(loaded.actions, dataset.actions)
    np.testing.assert_array_equal(loaded.episode_ends, dataset.episode_ends)
    assert loaded.routes.tolist() == [4, -1]
    assert loaded.spec == dataset.spec and loaded.task == "arm_avoid"
    assert sorted(os.listdir(tmp_path / "sub")) == ["demos.npz"]


def test_failed_save_leaves_nothing_behind(tmp_path):
    (tmp_path / "taken.npz").mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        small_dataset().save(str(tmp_path / "taken.npz"))
    assert sorted(os.listdir(tmp_path)) == ["taken.npz"]
    assert os.listdir(tmp_path / "taken.npz") == []


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        DemoDataset.load(str(tmp_path / "nothing.npz"))


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    with pytest.raises(DatasetError, match="file: expected a readable .npz archive"):
        DemoDataset.load(str(path))
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="file: expected a readable .npz archive"):
        DemoDataset.load(str(text))


def test_load_truncated_file(tmp_path):
    good = small_dataset().save(str(tmp_path / "good.npz"))
    data = open(good, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="file: expected a readable .npz archive"):
        DemoDataset.load(str(cut))


def test_load_single_array_file(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DatasetError, match="file: expected an .npz archive"):
        DemoDataset.load(str(path))


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_load_missing_key(tmp_path, key):
    path = write_npz(tmp_path / "d.npz", **{key: None})
    with pytest.raises(DatasetError, match=rf"keys: expected all of .*, got \"missing \['{key}'\]\""):
        DemoDataset.load(path)


@pytest.mark.parametrize("change,message", [
    (dict(observations=np.zeros((5, 5))), r"observations: expected shape \[N, 6\]"),
    (dict(actions=np.zeros((5, 4))), r"actions: expected shape \[N, 3\]"),
    (dict(actions=np.zeros((6, 3))), "actions: expected 5 rows .*, got 6"),
    (dict(actions=np.full((5, 3), np.inf)), "actions: expected finite numbers, got inf"),
    (dict(episode_ends=np.array([3, 6])), "episode_ends: expected the last end to be 5"),
    (dict(episode_ends=np.array([3.0, 5.0])), "episode_ends: expected a 1-d integer array"),
    (dict(routes=np.array([[4, -1]])), "routes: expected a 1-d integer array"),
    (dict(routes=np.array([4])), "routes: expected 2 entries"),
    (dict(observations=np.array([["a"] * 6] * 5)), "observations: expected numbers"),
    (dict(task=np.array(3)), "task: expected a text scalar"),
    (dict(spec_json=np.array(["{}", "{}"])), "spec_json: expected a text scalar"),
    (dict(spec_json=np.array("{broken")), "spec_json.spec: expected valid JSON"),
    (dict(spec_json=np.array(SPEC.replace(history=3).to_json().replace('"history": 3', '"history": 0'))),
     "spec_json.history: expected an integer >= 1, got 0"),
])
def test_load_rejects_bad_contents(tmp_path, change, message):
    path = write_npz(tmp_path / "d.npz", **change)
    with pytest.raises(DatasetError, match=message) as info:
        DemoDataset.load(path)
    assert str(info.value).startswith(f"dataset {path}: ")
    assert "\n" not in str(info.value)


def test_load_rejects_other_task(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="task: expected 'gmm2d', got 'arm_avoid'"):
        DemoDataset.load(path, expected_task="gmm2d")


def test_loading_by_task_rejects_a_spec_that_disagrees_with_the_task(tmp_path):
    spec = SPEC.replace(control_rate_hz=10.0, joint_upper=(9.0, 9.0, 9.0))
    path = write_npz(tmp_path / "d.npz", spec_json=np.array(spec.to_json()))
    assert DemoDataset.load(path).spec == spec  # the data layer checks the file against itself only
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert message.startswith(f"dataset {path}: spec: expected the interface of task 'arm_avoid', got ")
    assert "control_rate_hz: dataset=10.0 task=20.0" in message
    assert "joint_upper: dataset=[9.0, 9.0, 9.0]" in message
    assert "\n" not in message
    with pytest.raises(DatasetError, match="task: expected 'gmm2d', got 'arm_avoid'"):
        load_dataset(path, expected_task="gmm2d")


def test_loading_by_task_returns_a_matching_dataset(tmp_path):
    path = small_dataset().save(str(tmp_path / "d.npz"))
    loaded = load_dataset(path, expected_task="arm_avoid")
    assert loaded.spec == SPEC and loaded.n_episodes == 2


def test_dataset_of_an_unknown_task_loads_with_its_own_spec(tmp_path):
    spec = SPEC.replace(task="my_robot", control_rate_hz=10.0)
    path = write_npz(tmp_path / "d.npz", spec_json=np.array(spec.to_json()), task=np.array("my_robot"))
    for load in (DemoDataset.load, load_dataset):
        loaded = load(path)
        assert loaded.task == "my_robot" and loaded.spec.control_rate_hz == 10.0


def test_saved_file_is_compressed(tmp_path):
    dataset = small_dataset()
    path = dataset.save(str(tmp_path / "d.npz"))
    plain = io.BytesIO()
    np.savez(plain, **arrays_of(dataset))
    assert os.path.getsize(path) < len(plain.getvalue())
