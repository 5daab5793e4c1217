"""Demonstration datasets: per-control-step observation frames and commanded actions.

Stored as a compressed ``.npz`` holding ``observations [N, D]``, ``actions [N, J]``,
``episode_ends [E]`` (exclusive end index of each episode), ``routes [E]`` (-1: unknown),
``task`` and ``spec_json`` (the task's ModelSpec; its history and horizon do not matter).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from vdd_ros.files import atomic_path
from vdd_ros.spec import ModelSpec, SpecError
from vdd_ros.validation import FieldError, check_int

REQUIRED_KEYS = ("observations", "actions", "episode_ends", "routes", "task", "spec_json")


class DatasetError(FieldError):
    """A dataset field holds what it must not: ``dataset <path>: <field>: expected ..., got ...``."""

    def __init__(self, field_name: str, expected: str, actual: Any, where: str = "dataset"):
        super().__init__(field_name, expected, actual)
        self.where = where
        self.args = (f"{where}: {self.args[0]}",)


def _fail(path, field_name: str, expected: str, actual: Any) -> NoReturn:
    raise DatasetError(field_name, expected, actual, where=f"dataset {path}")


@dataclass
class DemoDataset:
    observations: np.ndarray  # [N, obs_step_dim] float64
    actions: np.ndarray  # [N, n_joints] float64
    episode_ends: np.ndarray  # [E] int64, strictly increasing, last == N
    spec: ModelSpec
    routes: np.ndarray | None = None  # [E] int64, -1 unknown
    task: str | None = None

    def __post_init__(self):
        self.observations = np.asarray(self.observations, dtype=np.float64)
        self.actions = np.asarray(self.actions, dtype=np.float64)
        self.episode_ends = np.asarray(self.episode_ends, dtype=np.int64).reshape(-1)
        if self.routes is None:
            self.routes = np.full(len(self.episode_ends), -1, dtype=np.int64)
        self.routes = np.asarray(self.routes, dtype=np.int64).reshape(-1)
        if self.task is None:
            self.task = self.spec.task
        self.validate()

    def validate(self, where: str = "dataset") -> None:
        """Raise DatasetError naming the field, expected and actual value when the arrays disagree."""
        spec = self.spec
        obs, act, ends = self.observations, self.actions, self.episode_ends

        def fail(field_name, expected, actual):
            raise DatasetError(field_name, expected, actual, where=where)

        if obs.ndim != 2 or obs.shape[1] != spec.obs_step_dim:
            fail("observations", f"shape [N, {spec.obs_step_dim}] (spec observation fields)", list(obs.shape))
        if act.ndim != 2 or act.shape[1] != spec.n_joints:
            fail("actions", f"shape [N, {spec.n_joints}] (one per joint)", list(act.shape))
        if act.shape[0] != obs.shape[0]:
            fail("actions", f"{obs.shape[0]} rows (as observations)", act.shape[0])
        if ends.size == 0:
            fail("episode_ends", "at least one episode", [])
        if np.any(np.diff(np.concatenate([[0], ends])) <= 0):
            fail("episode_ends", "strictly increasing positive indices", ends[:10].tolist())
        if ends[-1] != obs.shape[0]:
            fail("episode_ends", f"the last end to be {obs.shape[0]} (the number of steps)", int(ends[-1]))
        if self.routes.shape != ends.shape:
            fail("routes", f"{ends.size} entries (one per episode)", self.routes.size)
        for name, values in (("observations", obs), ("actions", act)):
            if not np.all(np.isfinite(values)):
                fail(name, "finite numbers", float(values[~np.isfinite(values)][0]))
        if self.task != spec.task:
            fail("task", f"{spec.task!r} (the spec's task)", self.task)

    # --- sizes ------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return int(self.observations.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.size)

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]])

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.episode_starts[i], self.episode_ends[i]
        return self.observations[start:end], self.actions[start:end]

    # --- training windows -------------------------------------------------------------
    def window_indices(self, history: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices ``[N, history]`` into observations and ``[N, horizon]`` into actions.

        Observation windows end at each step and repeat the episode's first frame before its
        start; action chunks start at each step and repeat the episode's last action after its end.
        """
        check_int("history", history, 1)
        check_int("horizon", horizon, 1)
        lengths = np.diff(np.concatenate([[0], self.episode_ends]))
        starts = np.repeat(self.episode_starts, lengths)
        ends = np.repeat(self.episode_ends, lengths)
        steps = np.arange(self.n_steps)
        obs_idx = np.maximum(steps[:, None] + np.arange(1 - history, 1)[None], starts[:, None])
        act_idx = np.minimum(steps[:, None] + np.arange(horizon)[None], ends[:, None] - 1)
        return obs_idx, act_idx

    def windows(self, history: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """``(obs [N, history, D], act [N, horizon, J])`` for every step of every episode."""
        obs_idx, act_idx = self.window_indices(history, horizon)
        return self.observations[obs_idx], self.actions[act_idx]

    def minibatches(self, history: int, horizon: int, batch_size: int, rng: np.random.Generator,
                    drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One shuffled pass over all windows, ``batch_size`` at a time (numpy arrays)."""
        obs_idx, act_idx = self.window_indices(history, horizon)
        order = rng.permutation(self.n_steps)
        for begin in range(0, self.n_steps, batch_size):
            rows = order[begin:begin + batch_size]
            if drop_last and rows.size < batch_size:
                return
            yield self.observations[obs_idx[rows]], self.actions[act_idx[rows]]

    # --- files ------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write a compressed ``.npz`` atomically (nothing half-written on failure); returns ``path``."""
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, observations=self.observations, actions=self.actions,
                                episode_ends=self.episode_ends, routes=self.routes,
                                task=np.array(self.task), spec_json=np.array(self.spec.to_json()))
        return path

    @staticmethod
    def load(path: str, expected_task: str | None = None) -> DemoDataset:
        """Read a dataset; every problem is a one-line DatasetError naming the file and field.

        This checks the file against itself (its arrays against its own spec); checking it against
        a built-in task's interface is ``vdd_ros.tasks.registry.load_dataset``.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {path}: no such file")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                _fail(path, "file", "an .npz archive", f"a single {type(data).__name__}")
            with data:
                missing = [k for k in REQUIRED_KEYS if k not in data.files]
                if missing:
                    _fail(path, "keys", f"all of {list(REQUIRED_KEYS)}", f"missing {missing}")
                arrays = {k: data[k] for k in REQUIRED_KEYS}
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            _fail(path, "file", "a readable .npz archive", f"{type(err).__name__}: {err}")
        except DatasetError:
            raise
        except ValueError as err:
            _fail(path, "file", "a readable .npz archive", str(err))
        for key in ("task", "spec_json"):
            if arrays[key].ndim != 0 or arrays[key].dtype.kind != "U":
                _fail(path, key, "a text scalar", f"{arrays[key].dtype} array of shape {list(arrays[key].shape)}")
        task = str(arrays["task"])
        try:
            spec = ModelSpec.from_json(str(arrays["spec_json"]))
        except SpecError as err:
            _fail(path, f"spec_json.{err.field_name}", err.expected, err.actual)
        if expected_task is not None and task != expected_task:
            _fail(path, "task", repr(expected_task), task)
        for key in ("observations", "actions"):
            if arrays[key].dtype.kind not in "fiu":
                _fail(path, key, "numbers", f"dtype {arrays[key].dtype}")
        for key in ("episode_ends", "routes"):
            if arrays[key].dtype.kind not in "iu" or arrays[key].ndim != 1:
                _fail(path, key, "a 1-d integer array", f"{arrays[key].dtype} of shape {list(arrays[key].shape)}")
        try:
            return DemoDataset(observations=arrays["observations"], actions=arrays["actions"],
                               episode_ends=arrays["episode_ends"], spec=spec, routes=arrays["routes"], task=task)
        except DatasetError as err:
            raise DatasetError(err.field_name, err.expected, err.actual, where=f"dataset {path}") from None


# --- action kinds -------------------------------------------------------------------------
def position_columns(spec: ModelSpec) -> list[int] | None:
    """Columns of a frame holding the measured position of every spec joint (spec order): the first
    ``joint_position`` field that covers them all, or None."""
    offset = 0
    for obs_field in spec.observation_fields:
        joints = tuple(obs_field.joints) or tuple(spec.joint_names)
        if obs_field.kind == "joint_position" and set(spec.joint_names) <= set(joints):
            return [offset + joints.index(name) for name in spec.joint_names]
        offset += obs_field.size
    return None


def convert_action_kind(dataset: DemoDataset, kind: str) -> DemoDataset:
    """A ``joint_position`` dataset (actions: commanded position targets ``a_t``) with its actions as ``kind``:

    - ``joint_delta``: ``a_t - q_t``, the target as an increment from the measured position ``q_t`` of the
      same step (``prepare_training_data`` turns the later actions of a chunk into increments from the
      previous target, as the policy node integrates them, so a chunk integrated from ``q_t`` gives back
      ``a_t, a_t+1, ...``);
    - ``joint_velocity``: the demonstrator's own velocity over the step, ``(q_t+1 - q_t) * control_rate_hz``
      (the last step of an episode repeats the one before; 0 for a one-step episode), clipped to the spec's
      joint velocity limits: held for one control period by a velocity interface it reproduces the recorded
      positions;
    - ``joint_position``: the dataset itself.

    The observations, episodes and routes stay; the spec's ``action_kind`` becomes ``kind``. Raises
    ValueError for another source kind, an unknown ``kind`` or frames without the joints' positions."""
    from vdd_ros.spec import ACTION_KINDS

    spec = dataset.spec
    if kind not in ACTION_KINDS:
        raise ValueError(f"action kind: expected one of {list(ACTION_KINDS)}, got {kind!r}")
    if spec.action_kind != "joint_position":
        raise ValueError(f"convert_action_kind: expected a joint_position dataset, got {spec.action_kind!r}")
    if kind == "joint_position":
        return dataset
    columns = position_columns(spec)
    if columns is None:
        raise ValueError(f"convert_action_kind: the observation fields {[f.name for f in spec.observation_fields]} "
                         f"hold no joint_position field with all of {list(spec.joint_names)}")
    q = dataset.observations[:, columns]
    if kind == "joint_delta":
        actions = dataset.actions - q
    else:
        actions = np.zeros_like(q)
        for start, end in zip(dataset.episode_starts, dataset.episode_ends):
            if end - start < 2:
                continue
            actions[start:end - 1] = np.diff(q[start:end], axis=0) * spec.control_rate_hz
            actions[end - 1] = actions[end - 2]
        limits = np.asarray(spec.joint_velocity_limits, dtype=np.float64)
        actions = np.clip(actions, -limits, limits)
    return DemoDataset(observations=dataset.observations, actions=actions, episode_ends=dataset.episode_ends,
                       spec=spec.replace(action_kind=kind), routes=dataset.routes, task=dataset.task)


def action_chunks(dataset: DemoDataset, act_idx: np.ndarray) -> np.ndarray:
    """The training chunks ``[N, horizon, J]`` for action row indices ``act_idx`` ``[N, horizon]``
    (``window_indices``). For ``joint_delta`` (and frames holding the joints' positions) the first action
    is the step's own (the increment from the measured position) and each later one is the increment of the
    target ``q + delta`` from the previous step's target: what the policy node integrates. Else the actions."""
    if dataset.spec.action_kind != "joint_delta":
        return dataset.actions[act_idx]
    columns = position_columns(dataset.spec)
    if columns is None:
        return dataset.actions[act_idx]
    targets = dataset.observations[:, columns] + dataset.actions
    chunks = np.empty(act_idx.shape + (dataset.actions.shape[1],), dtype=np.float64)
    chunks[:, 0] = dataset.actions[act_idx[:, 0]]
    # after an episode's end the index repeats: an increment of 0 holds its last target
    chunks[:, 1:] = targets[act_idx[:, 1:]] - targets[act_idx[:, :-1]]
    return chunks
