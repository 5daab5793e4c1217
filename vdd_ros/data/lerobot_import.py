"""LeRobotDataset v3 folders -> a DemoDataset, one episode per ``episode_index`` (read with ``pyarrow`` only).

The layout read::

    meta/info.json                  codebase_version (v3.x), fps, features: {column: {dtype, shape, names}}
    data/chunk-*/file-*.parquet     one row per frame: episode_index, frame_index, timestamp, action and
                                    the observation columns (observation.state, ...); other columns not read
    meta/episodes/, meta/tasks.parquet, videos/   (not read: no images, no videos)

Observation columns fill the spec's observation fields by the mapping from ``--key COLUMN=FIELD[,FIELD]``
or robot.yaml's ``lerobot_keys`` (a column filling several fields holds their numbers one after another,
in the order listed); a field left unmapped is read from the column of its own name, if there is one.
``action`` holds one number per joint in the spec's joint order (when its feature names are the joint
names in another order, that is an error) and is taken as robot.yaml's ``action.kind``.

Frames are not resampled: ``fps`` must equal the robot's ``control_rate_hz``; each episode's frames must be
``frame_index`` 0, 1, ... with timestamps 1/fps apart. Episodes shorter than ``min_steps`` are dropped.

Every problem is one ``LeRobotError`` line: ``lerobot <folder>: <file>: <key>: expected ..., got ...``.
"""
from __future__ import annotations

import glob
import json
import math
import os

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

INFO = "meta/info.json"
DATA_FILES = "data/chunk-*/file-*.parquet"
ACTION = "action"
INDEX_COLUMNS = ("episode_index", "frame_index", "timestamp")
NOT_OBSERVATIONS = (ACTION, *INDEX_COLUMNS, "index", "task_index")
TIMESTAMP_TOLERANCE = 0.1  # of a period


class LeRobotError(SourceError):
    """A LeRobot folder cannot be imported: ``lerobot <folder>: <key>: expected ..., got ...``."""


def import_lerobot(folder: str, robot: Robot, keys: dict | None = None,
                   min_steps: int = DEFAULT_MIN_STEPS) -> tuple[DemoDataset, ImportReport]:
    """Read every episode of the folder's parquet files; the dataset of the kept episodes and the report.

    ``keys``: ``{column: field or [fields]}`` replacing robot.yaml's ``lerobot_keys`` (None: those).
    """
    folder = os.fspath(folder)
    where = f"lerobot {folder}"

    def fail(key, expected, actual):
        raise LeRobotError(key, expected, actual, where)

    check_int("min_steps", min_steps, 1)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: no such folder")
    spec = robot.spec
    info = _info(folder, fail)
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        fail(f"{INFO}: fps", "a frame rate > 0", fps)
    if float(fps) != spec.control_rate_hz:
        fail(f"{INFO}: fps", f"{spec.control_rate_hz:g} (control_rate_hz of robot {robot.path}; frames are not "
             "resampled)", fps)
    features = info.get("features")
    if not isinstance(features, dict):
        fail(f"{INFO}: features", "a mapping of column: {dtype, shape, names}", features)
    candidates = [name for name, feature in features.items()
                  if name not in NOT_OBSERVATIONS and not _is_media(feature)]
    sources = field_sources(spec, keys, robot.lerobot_keys, "lerobot_keys", candidates, fail)
    widths = {column: sources.width(column) for column in sources.sources}
    for column in [*sources.sources, ACTION]:
        width = widths.get(column, spec.n_joints)
        what = sources.describe(column) if column in widths else f"one number per joint {list(spec.joint_names)}"
        if column not in features:
            fail(f"{INFO}: features", f"a feature {column} ({what})", sorted(features))
        shape = features[column].get("shape") if isinstance(features[column], dict) else None
        if shape is not None and (not isinstance(shape, list) or math.prod(shape) != width):
            fail(f"{INFO}: features.{column}.shape", f"[{width}] ({what})", shape)
    _check_action_names(features[ACTION], spec, fail)

    files = sorted(glob.glob(os.path.join(glob.escape(folder), DATA_FILES)))
    if not files:
        fail("data", f"parquet files {DATA_FILES}", sorted(os.listdir(os.path.join(folder, "data")))
             if os.path.isdir(os.path.join(folder, "data")) else None)
    columns = [*sources.sources, ACTION, *INDEX_COLUMNS]
    parts = [_read(path, os.path.relpath(path, folder), columns, widths, spec.n_joints, fail) for path in files]
    table = {name: np.concatenate([part[name] for part in parts]) for name in columns}
    origin = np.concatenate([np.full(len(part[ACTION]), i) for i, part in enumerate(parts)])
    order = np.lexsort((table["frame_index"], table["episode_index"]))
    table = {name: values[order] for name, values in table.items()}
    origin = origin[order]
    relative = [os.path.relpath(path, folder) for path in files]

    period = 1.0 / float(fps)
    episodes = Episodes(spec, min_steps)
    numbers, starts = np.unique(table["episode_index"], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    for i, number in enumerate(numbers.tolist()):
        rows = slice(bounds[i], bounds[i + 1])
        rel = relative[int(origin[bounds[i]])]
        frames, stamps = table["frame_index"][rows], table["timestamp"][rows]
        steps = len(frames)
        label = f"{rel}: episode {number}"
        wrong = np.flatnonzero(frames != np.arange(steps))
        if wrong.size:
            at = int(wrong[0])
            fail(f"{label}: frame_index", f"frames 0..{steps - 1} once each (one per control step)",
                 f"{int(frames[at])} at position {at}" + (f" after {int(frames[at - 1])}" if at else ""))
        steps_s = np.diff(stamps)
        off = np.flatnonzero(np.abs(steps_s - period) > TIMESTAMP_TOLERANCE * period)
        if off.size:
            at = int(off[0])
            fail(f"{label}: timestamp", f"frames 1/fps = {period:.4f} s apart",
                 f"{float(steps_s[at]):.4f} s from frame {at} to {at + 1}")
        arrays = {column: table[column][rows] for column in sources.sources}
        act = table[ACTION][rows]
        for column, values in [*arrays.items(), (ACTION, act)]:
            bad = first_non_finite(values)
            if bad is not None:
                fail(f"{label}: {column} (frame {bad})", "finite numbers", values[bad].tolist())
        stamps_ns = np.round((stamps - stamps[0]) * NS).astype(np.int64)
        stats = stream_stats(stamps_ns)
        report = EpisodeReport(source=os.path.join(folder, rel), index=number, start_s=float(stamps[0]),
                               steps=steps, duration_s=steps / spec.control_rate_hz,
                               streams={column: dict(stats) for column in [*sources.sources, ACTION]})
        episodes.add(report, sources.frame(spec, arrays), act)
    notes = []
    unused = sorted(set(candidates) - set(sources.sources))
    if unused:
        notes.append(f"{where}: columns not read: {unused}")
    media = sorted(name for name, feature in features.items() if _is_media(feature))
    if media:
        notes.append(f"{where}: images and videos not read: {media}")

    def no_episode(expected, actual):
        fail("data", expected, actual)

    return episodes.finish(notes, no_episode, source_label="file", stream_label="column")


def _info(folder: str, fail) -> dict:
    path = os.path.join(folder, INFO)
    if not os.path.isfile(path):
        fail(INFO, "a LeRobotDataset v3 folder's metadata file", "missing")
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(INFO, "readable JSON", f"{type(err).__name__}: {err}")
    if not isinstance(info, dict):
        fail(INFO, "a JSON object", type(info).__name__)
    version = info.get("codebase_version")
    if version is not None and not str(version).startswith("v3"):
        fail(f"{INFO}: codebase_version", "v3.x (a LeRobotDataset v3 folder)", version)
    return info


def _is_media(feature) -> bool:
    return isinstance(feature, dict) and feature.get("dtype") in ("image", "video")


def _check_action_names(feature, spec, fail) -> None:
    """Action feature names that are the spec's joints in another order would silently swap joints."""
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if (isinstance(names, list) and sorted(map(str, names)) == sorted(spec.joint_names)
            and tuple(names) != spec.joint_names):
        fail(f"{INFO}: features.{ACTION}.names", f"the joints in the order of robot.yaml {list(spec.joint_names)}",
             names)


def _read(path: str, rel: str, columns: list, widths: dict, n_joints: int, fail) -> dict:
    """The columns of one parquet file as numpy arrays: vectors ``[rows, width]``, the index columns ``[rows]``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        present = pq.read_schema(path).names
        missing = [c for c in columns if c not in present]
        if missing:
            fail(f"{rel}: {missing[0]}", "this column", sorted(present))
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        fail(rel, "a readable parquet file", f"{type(err).__name__}: {err}")
    result = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        label = f"{rel}: {name}"
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            fail(f"{label} (row {row})", "a value in every row", None)
        if name in INDEX_COLUMNS:
            kind = pa.types.is_floating if name == "timestamp" else pa.types.is_integer
            if not kind(column.type):
                fail(label, "floating-point seconds" if name == "timestamp" else "integers", str(column.type))
            result[name] = column.to_numpy(zero_copy_only=False).astype(np.float64 if name == "timestamp"
                                                                        else np.int64)
            continue
        width = widths.get(name, n_joints)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
                or pa.types.is_fixed_size_list(column.type):
            lengths = np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False))
            wrong = np.flatnonzero(lengths != width)
            if wrong.size:
                fail(f"{label} (row {int(wrong[0])})", f"{width} numbers", int(lengths[wrong[0]]))
            values = column.flatten()
        elif width == 1:
            values = column
        else:
            fail(label, f"lists of {width} numbers", str(column.type))
        if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
            fail(label, "numbers", str(values.type))
        if values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // width
            fail(f"{label} (row {row})", "finite numbers", None)
        result[name] = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(column), width)
    return result
