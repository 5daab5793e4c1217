"""robomimic-layout HDF5 files -> a DemoDataset, one episode per demonstration (read with ``h5py``).

The layout read::

    data                    group; attrs: env_args (JSON: env_name, env_kwargs.control_freq, ...), total
      demo_N                one group per demonstration, taken in the order of N; attrs: num_samples
        obs/<key>           [T] or [T, K] numbers, one row per control step
        actions             [T, n_joints]
        rewards, dones, states, next_obs, ...   (not read)
    mask                    filter keys (not read)

Observation keys fill the spec's observation fields by the mapping from ``--key SOURCE=FIELD[,FIELD]``
or robot.yaml's ``hdf5_keys`` (a key filling several fields holds their columns one after another,
in the order listed); a field left unmapped is read from the obs key of its own name, if there is one.
Actions are taken as they are, as robot.yaml's ``action.kind``. The layout has no time stamps: each
sample is one control step at the robot's ``control_rate_hz`` (``env_kwargs.control_freq``, where
``env_args`` has it, must be the same rate). Demonstrations shorter than ``min_steps`` are dropped.

Every problem is one ``Hdf5Error`` line: ``hdf5 <file>: <key>: expected ..., got ...``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.import_common import (
    DEFAULT_MIN_STEPS,
    NS,
    EpisodeReport,
    Episodes,
    ImportReport,
    SourceError,
    field_sources,
    first_non_finite,
    stream_stats,
)
from vdd_ros.data.robot import Robot
from vdd_ros.validation import check_int

DEMO_NAME = re.compile(r"demo_(\d+)")


class Hdf5Error(SourceError):
    """An HDF5 file cannot be imported: ``hdf5 <file>: <key>: expected ..., got ...``."""


def import_hdf5(path: str, robot: Robot, keys: dict | None = None,
                min_steps: int = DEFAULT_MIN_STEPS) -> tuple[DemoDataset, ImportReport]:
    """Read every ``data/demo_N``; the dataset of the kept demonstrations and the report.

    ``keys``: ``{obs key: field or [fields]}`` replacing robot.yaml's ``hdf5_keys`` (None: those).
    """
    import h5py

    path = os.fspath(path)
    where = f"hdf5 {path}"

    def fail(key, expected, actual):
        raise Hdf5Error(key, expected, actual, where)

    check_int("min_steps", min_steps, 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        fail("file", "an HDF5 file", f"{type(err).__name__}: {err}")
    spec = robot.spec
    episodes = Episodes(spec, min_steps)
    period_ns = NS / spec.control_rate_hz
    with handle:
        data = handle.get("data")
        if not isinstance(data, h5py.Group):
            fail("data", "the robomimic group data (data/demo_N/obs/<key>, data/demo_N/actions)",
                 sorted(handle.keys()))
        notes = [f"{where}: no time stamps in this layout: each sample is one control step at "
                 f"{spec.control_rate_hz:g} Hz"]
        notes += _env_args(data, robot, fail, where)
        demos, others = _demos(data, h5py)
        if not demos:
            fail("data", "groups demo_0, demo_1, ... (one per demonstration)", sorted(data.keys()))
        if others:
            notes.append(f"{where}: not demonstrations (not read): {others}")
        sources = None
        for number, name in demos:
            group = data[name]
            obs_group = group.get("obs")
            if not isinstance(obs_group, h5py.Group):
                fail(f"data/{name}/obs", "a group of observation datasets", sorted(group.keys()))
            if sources is None:  # the mapping is resolved against the first demonstration's keys
                sources = field_sources(spec, keys, robot.hdf5_keys, "hdf5_keys", list(obs_group.keys()), fail)
                unused = sorted(set(obs_group.keys()) - set(sources.sources))
                if unused:
                    notes.append(f"{where}: obs keys not read: {unused}")
            act = _array(group, "actions", f"data/{name}/actions", h5py, fail)
            steps = len(act)
            if act.shape[1] != spec.n_joints:
                fail(f"data/{name}/actions", f"shape [T, {spec.n_joints}] (one column per joint "
                     f"{list(spec.joint_names)})", list(act.shape))
            if "num_samples" in group.attrs:
                count = group.attrs["num_samples"]
                if int(count) != steps:
                    fail(f"data/{name}.attrs['num_samples']", f"{steps} (the rows of data/{name}/actions)",
                         int(count))
            arrays = {}
            for key in sources.sources:
                label = f"data/{name}/obs/{key}"
                if key not in obs_group:
                    fail(label, f"an obs dataset named {key} (for {sources.describe(key)}) among the obs keys",
                         sorted(obs_group.keys()))
                values = _array(obs_group, key, label, h5py, fail)
                if values.shape[1] != sources.width(key):
                    fail(label, f"shape [T, {sources.width(key)}] ({sources.describe(key)})", list(values.shape))
                if len(values) != steps:
                    fail(label, f"{steps} rows (as data/{name}/actions)", len(values))
                arrays[key] = values
            checked = {f"data/{name}/obs/{k}": v for k, v in arrays.items()}
            checked[f"data/{name}/actions"] = act
            for label, values in checked.items():
                row = first_non_finite(values)
                if row is not None:
                    fail(f"{label}[{row}]", "finite numbers", values[row].tolist())
            stamps = np.round(np.arange(steps) * period_ns).astype(np.int64)
            stats = stream_stats(stamps)
            report = EpisodeReport(source=path, index=number, start_s=0.0, steps=steps,
                                   duration_s=steps / spec.control_rate_hz,
                                   streams={**{f"obs/{k}": dict(stats) for k in arrays}, "actions": dict(stats)})
            episodes.add(report, sources.frame(spec, arrays), act)

    def no_episode(expected, actual):
        fail("data", expected, actual)

    return episodes.finish(notes, no_episode, source_label="file", stream_label="key")


def _demos(data, h5py) -> tuple[list, list]:
    """``([(N, 'demo_N'), ...] in the order of N, [other member names])``."""
    demos, others = [], []
    for name, member in data.items():
        match = DEMO_NAME.fullmatch(name)
        if match and isinstance(member, h5py.Group):
            demos.append((int(match.group(1)), name))
        else:
            others.append(name)
    return sorted(demos), sorted(others)


def _array(group, key: str, label: str, h5py, fail) -> np.ndarray:
    """A numeric dataset as float64 ``[T, K]`` (``[T]`` -> ``[T, 1]``)."""
    dataset = group.get(key)
    if not isinstance(dataset, h5py.Dataset):
        fail(label, "a dataset of numbers", "missing" if dataset is None else type(dataset).__name__)
    if dataset.dtype.kind not in "fiub" or dataset.ndim not in (1, 2):
        fail(label, "numbers of shape [T] or [T, K]", f"{dataset.dtype} of shape {list(dataset.shape)}")
    values = np.asarray(dataset[()], dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


def _env_args(data, robot: Robot, fail, where: str) -> list[str]:
    """Notes on ``data.attrs['env_args']``; its ``env_kwargs.control_freq`` must be the robot's rate."""
    if "env_args" not in data.attrs:
        return []
    raw = data.attrs["env_args"]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        env = json.loads(str(raw))
    except json.JSONDecodeError:
        return [f"{where}: data.attrs['env_args'] is not JSON: not read"]
    if not isinstance(env, dict):
        return []
    notes = []
    if env.get("env_name"):
        kind = f" (type {env['type']})" if "type" in env else ""
        notes.append(f"{where}: recorded in env {env['env_name']}{kind}")
    kwargs = env.get("env_kwargs")
    rate = kwargs.get("control_freq") if isinstance(kwargs, dict) else None
    if rate is not None and (not isinstance(rate, (int, float)) or float(rate) != robot.spec.control_rate_hz):
        fail("data.attrs['env_args'].env_kwargs.control_freq",
             f"{robot.spec.control_rate_hz:g} (control_rate_hz of robot {robot.path}; samples are not resampled)",
             rate)
    return notes
