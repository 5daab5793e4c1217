"""Demonstration datasets: per-control-step observation frames and commanded actions.

Stored as a compressed ``.npz`` holding ``observations [N, D]``, ``actions [N, J]``,
``episode_ends [E]`` (exclusive end index of each episode), ``routes [E]`` (-1: unknown),
``task`` and ``spec_json`` (the task's ModelSpec; its history and horizon do not matter).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vdd_ros.spec import ModelSpec, SpecError

REQUIRED_KEYS = ("observations", "actions", "episode_ends", "routes", "task", "spec_json")


def _fail(path, message: str):
    raise ValueError(f"dataset {path}: {message}")


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

    def validate(self, where: str = "") -> None:
        """Raise ValueError naming the field, expected and actual value when the arrays disagree."""
        where = where or "dataset"
        spec = self.spec
        obs, act, ends = self.observations, self.actions, self.episode_ends
        if obs.ndim != 2 or obs.shape[1] != spec.obs_step_dim:
            raise ValueError(f"{where}: observations: expected shape [N, {spec.obs_step_dim}] "
                             f"(spec observation fields), got {list(obs.shape)}")
        if act.ndim != 2 or act.shape[1] != spec.n_joints:
            raise ValueError(f"{where}: actions: expected shape [N, {spec.n_joints}] (one per joint), "
                             f"got {list(act.shape)}")
        if act.shape[0] != obs.shape[0]:
            raise ValueError(f"{where}: actions: expected {obs.shape[0]} rows (as observations), got {act.shape[0]}")
        if ends.size == 0:
            raise ValueError(f"{where}: episode_ends: expected at least one episode, got none")
        if np.any(np.diff(np.concatenate([[0], ends])) <= 0):
            raise ValueError(f"{where}: episode_ends: expected strictly increasing positive indices, "
                             f"got {ends[:10].tolist()}{'...' if ends.size > 10 else ''}")
        if ends[-1] != obs.shape[0]:
            raise ValueError(f"{where}: episode_ends: expected the last end to be {obs.shape[0]} (the number of "
                             f"steps), got {int(ends[-1])}")
        if self.routes.shape != ends.shape:
            raise ValueError(f"{where}: routes: expected {ends.size} entries (one per episode), got {self.routes.size}")
        if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(act))):
            raise ValueError(f"{where}: observations/actions: expected finite numbers, got NaN or inf")
        if self.task != spec.task:
            raise ValueError(f"{where}: task: expected '{spec.task}' (the spec's task), got '{self.task}'")

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
        if history < 1 or horizon < 1:
            raise ValueError(f"history/horizon: expected integers >= 1, got {history}/{horizon}")
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
        """Write a compressed ``.npz`` atomically (a temp file in the same folder, then rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, observations=self.observations, actions=self.actions,
                                    episode_ends=self.episode_ends, routes=self.routes,
                                    task=np.array(self.task), spec_json=np.array(self.spec.to_json()))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @staticmethod
    def load(path: str, expected_task: str | None = None) -> "DemoDataset":
        """Read a dataset; every problem is a one-line error naming the file and field."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {path}: no such file")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                _fail(path, f"expected an .npz archive, got a single {type(data).__name__}")
            with data:
                missing = [k for k in REQUIRED_KEYS if k not in data.files]
                if missing:
                    _fail(path, f"missing keys {missing} (expected {list(REQUIRED_KEYS)})")
                arrays = {k: data[k] for k in REQUIRED_KEYS}
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            _fail(path, f"not a readable .npz file ({type(err).__name__}: {err})")
        except ValueError as err:
            if str(err).startswith(f"dataset {path}:"):
                raise
            _fail(path, f"not a readable .npz file ({err})")
        for key in ("task", "spec_json"):
            if arrays[key].ndim != 0 or arrays[key].dtype.kind != "U":
                _fail(path, f"{key}: expected a text scalar, got {arrays[key].dtype} array of shape "
                      f"{list(arrays[key].shape)}")
        task = str(arrays["task"])
        try:
            spec = ModelSpec.from_json(str(arrays["spec_json"]))
        except SpecError as err:
            _fail(path, f"spec_json: {err}")
        if expected_task is not None and task != expected_task:
            _fail(path, f"task: expected '{expected_task}', got '{task}'")
        _check_against_task(path, task, spec)
        for key in ("observations", "actions"):
            if arrays[key].dtype.kind not in "fiu":
                _fail(path, f"{key}: expected numbers, got dtype {arrays[key].dtype}")
        for key in ("episode_ends", "routes"):
            if arrays[key].dtype.kind not in "iu" or arrays[key].ndim != 1:
                _fail(path, f"{key}: expected a 1-d integer array, got {arrays[key].dtype} of shape "
                      f"{list(arrays[key].shape)}")
        try:
            return DemoDataset(observations=arrays["observations"], actions=arrays["actions"],
                               episode_ends=arrays["episode_ends"], spec=spec, routes=arrays["routes"], task=task)
        except ValueError as err:
            raise ValueError(str(err).replace("dataset:", f"dataset {path}:", 1)) from None


def _check_against_task(path: str, task: str, spec: ModelSpec) -> None:
    """A dataset of a built-in task must match that task's interface (joints, limits, fields, rate)."""
    from vdd_ros.tasks.registry import TASKS, task_module

    if task not in TASKS:
        return
    expected = task_module(task).task_spec(spec.history, spec.action_horizon)
    differences = spec.interface_differences(expected)
    if differences:
        _fail(path, f"spec disagrees with task '{task}': " + "; ".join(
            d.replace("this=", "dataset=").replace("other=", "task=") for d in differences))
