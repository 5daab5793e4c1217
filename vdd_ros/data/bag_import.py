"""rosbag2 bags (MCAP or SQLite3) -> a DemoDataset on the robot's control grid.

Read with ``rosbags`` (pure Python, no ROS distribution). For each episode:

- streams: ``sensor_msgs/JointState`` on the robot's joint-state topic (joints matched by name,
  any order, extra joints ignored), each vector observation topic of the spec, the command
  topic (``std_msgs/Float64MultiArray`` in the spec's joint order, or
  ``trajectory_msgs/JointTrajectory``: its first point's positions, matched by joint name);
- time: a message's header stamp, or its receive time when a topic has no header or all its
  stamps are zero (the report says so);
- grid: ``t_k = t_0 + k / control_rate_hz`` from the moment every stream has a message to the
  last one's end (commands: the last command); observations are the latest sample at or
  before ``t_k`` (what the policy node sees), the action is the latest command at or before
  ``t_k + period/2`` (a command answers the state just before it), or, without a command
  topic, the measured joint positions at ``t_{k+1}``;
- episodes: one per bag, or the intervals a marker topic marks (``std_msgs/Bool`` true, or
  ``std_msgs/Int32`` constant and >= 0), then split at gaps longer than ``max_gap_s`` in
  any stream; episodes shorter than ``min_steps`` steps are dropped (and listed).

Every problem is one ``BagError`` line naming the bag, topic and time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.import_common import DEFAULT_MIN_STEPS, NS, EpisodeReport, Episodes, ImportReport, stream_stats
from vdd_ros.data.robot import Robot

DEFAULT_MAX_GAP_S = 0.5
MARKER_TYPES = ("std_msgs/Bool", "std_msgs/Int32")


class BagError(ValueError):
    """A bag cannot be imported: one line naming the bag, topic and time."""


def _ros2_type(name: str) -> str:
    """``sensor_msgs/JointState`` -> ``sensor_msgs/msg/JointState``."""
    package, _, message = name.partition("/")
    return f"{package}/msg/{message}"


def _short_type(name: str) -> str:
    return name.replace("/msg/", "/")


@dataclass
class Stream:
    """One topic of one bag: times (ns) and values ``[M, K]`` in receive order."""

    topic: str
    msg_type: str
    stamps: np.ndarray
    values: np.ndarray
    stamp_source: str  # "header" or "receive"


# --- reading --------------------------------------------------------------------------------
class _BagReader:
    """Reads the robot's topics from one bag into Streams (raises BagError naming topic and time)."""

    def __init__(self, bag: str, robot: Robot, marker_topic: str = ""):
        self.bag = bag
        self.robot = robot
        self.marker_topic = marker_topic
        self.start_ns = 0

    def where(self, topic: str, t_ns: int | None = None) -> str:
        text = f"bag {self.bag}: topic {topic}"
        if t_ns is not None:
            text += f" at {(t_ns - self.start_ns) / NS:.3f} s (bag time {t_ns / NS:.9f})"
        return text

    def wanted(self) -> dict:
        """topic -> (accepted ROS 2 types, role)."""
        robot = self.robot
        wanted = {robot.joint_states_topic: (("sensor_msgs/msg/JointState",), "joint_states")}
        for obs_field in robot.spec.observation_fields:
            if obs_field.kind == "vector":
                wanted[obs_field.topic] = ((_ros2_type(obs_field.msg_type),), "vector")
        if robot.command_topic:
            wanted[robot.command_topic] = ((_ros2_type(robot.command_type),), "command")
        if self.marker_topic:
            wanted[self.marker_topic] = (tuple(_ros2_type(t) for t in MARKER_TYPES), "marker")
        return wanted

    def read(self) -> tuple[dict, list]:
        from rosbags.rosbag2 import Reader
        from rosbags.rosbag2.errors import ReaderError
        from rosbags.typesys import Stores, get_typestore

        if not os.path.exists(self.bag):
            raise FileNotFoundError(f"bag {self.bag}: no such file or folder")
        typestore = get_typestore(Stores.LATEST)
        try:
            reader = Reader(self.bag)
            reader.open()
        except (ReaderError, OSError) as err:
            raise BagError(f"bag {self.bag}: expected a rosbag2 folder or file (MCAP or SQLite3), got "
                           f"{type(err).__name__}: {err}") from None
        try:
            self.start_ns = reader.start_time if reader.message_count else 0
            wanted = self.wanted()
            present = {c.topic: c for c in reader.connections}
            for topic, (types, role) in wanted.items():
                if topic not in present:
                    accepted = " or ".join(map(_short_type, types))
                    raise BagError(f"{self.where(topic)}: expected this {role} topic ({accepted}), "
                                   f"got only topics {sorted(present)}")
                if present[topic].msgtype not in types:
                    raise BagError(f"{self.where(topic)}: expected message type "
                                   f"{' or '.join(map(_short_type, types))}, got {present[topic].msgtype}")
            connections = [present[t] for t in wanted]
            collectors = {t: _Collector(self, t, wanted[t][1], present[t].msgtype, typestore) for t in wanted}
            for connection, receive_ns, raw in reader.messages(connections=connections):
                collectors[connection.topic].add_raw(raw, receive_ns)
        finally:
            reader.close()
        streams, notes = {}, []
        for topic, collector in collectors.items():
            collector.decode()
            stream, note = collector.finish()
            streams[topic] = stream
            if note:
                notes.append(note)
        return streams, notes


# messages whose bytes outside the stamp and the float64 arrays are all alike are decoded at once
FAST_TYPES = {"sensor_msgs/msg/JointState": ("position", "velocity"), "std_msgs/msg/Float64MultiArray": ("data",)}
FAST_BATCH = 65536


class _Collector:
    """Turns one topic's messages into rows of numbers, checking each message.

    Raw messages are kept until ``decode``: a JointState or Float64MultiArray topic whose messages
    all have the same length and the same bytes outside the header stamp and the number arrays
    (same frame_id, same joint names in the same order: what a driver publishes) is decoded with
    numpy in one go, after its first message was checked like every message of other topics.
    Anything else is deserialised message by message with rosbags.
    """

    def __init__(self, reader: _BagReader, topic: str, role: str, msgtype: str, typestore):
        self.reader, self.topic, self.role, self.msgtype = reader, topic, role, msgtype
        self.typestore = typestore
        self.raw: list = []
        self.stamps: list[int] = []
        self.receive: list[int] = []
        self.rows: list = []
        spec = reader.robot.spec
        self.joint_names = spec.joint_names
        self.index_cache: tuple = ((), None)
        self.needs_velocity = any(f.kind == "joint_velocity" for f in spec.observation_fields)
        if role == "vector":
            self.size = next(f.size for f in spec.observation_fields if f.kind == "vector" and f.topic == topic)
        self.has_header = msgtype not in ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Bool", "std_msgs/msg/Int32")

    def add_raw(self, raw, receive_ns: int) -> None:
        self.raw.append(raw)
        self.receive.append(receive_ns)

    def decode(self) -> None:
        raw, receive = self.raw, self.receive
        self.raw, self.receive = [], []
        if not raw:
            return
        deserialize = self.typestore.deserialize_cdr
        first = deserialize(raw[0], self.msgtype)
        self.add(first, receive[0])  # checks names, sizes and values of the first message
        if not self._decode_alike(first, raw, receive):
            for data, receive_ns in zip(raw[1:], receive[1:]):
                self.add(deserialize(data, self.msgtype), receive_ns)

    def _decode_alike(self, first, raw: list, receive: list) -> bool:
        """Decode messages 1.. with numpy when they are laid out like ``first``; False if they are not."""
        arrays = FAST_TYPES.get(self.msgtype)
        if arrays is None or len(raw) < 2:
            return False
        head = bytes(raw[0])
        length = len(head)
        if head[:2] != b"\x00\x01":  # little-endian CDR only
            return False
        spans, search_from = [], 4
        for name in arrays:
            values = np.asarray(getattr(first, name), dtype="<f8")
            if values.size == 0:
                spans.append(None)
                continue
            at = head.find(values.tobytes(), search_from)
            if at < 0 or (at - 4) % 8:
                return False
            spans.append((at, at + values.nbytes))
            search_from = at + values.nbytes
        constant = np.ones(length, dtype=bool)
        if self.has_header:
            constant[4:12] = False  # stamp sec, nanosec
        for span in spans:
            if span is not None:
                constant[span[0]:span[1]] = False
        rows = []
        for begin in range(1, len(raw), FAST_BATCH):
            chunk = raw[begin:begin + FAST_BATCH]
            if any(len(data) != length for data in chunk):
                return False
            block = np.frombuffer(b"".join(chunk), dtype=np.uint8).reshape(len(chunk), length)
            if not np.array_equal(block[:, constant], np.broadcast_to(np.frombuffer(head, np.uint8)[constant],
                                                                      (len(chunk), int(constant.sum())))):
                return False
            rows.append(block)
        block = np.concatenate(rows) if len(rows) > 1 else rows[0]
        index = self.index_cache[1]
        parts = []
        for name, span in zip(arrays, spans):
            if span is None:
                continue
            values = np.ascontiguousarray(block[:, span[0]:span[1]]).view("<f8").astype(np.float64)
            if self.role == "joint_states":
                if name == "velocity" and not self.needs_velocity:
                    continue
                values = values[:, index]
            parts.append(values)
        values = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
        if bad.size:
            self.fail(int(receive[1 + bad[0]]), f"expected finite values, got {values[bad[0]].tolist()}")
        if self.has_header:
            sec = np.ascontiguousarray(block[:, 4:8]).view("<i4").astype(np.int64).ravel()
            nanosec = np.ascontiguousarray(block[:, 8:12]).view("<u4").astype(np.int64).ravel()
            self.stamps.extend((sec * NS + nanosec).tolist())
        self.receive.extend(receive[1:])
        self.rows.append(values)
        return True

    def fail(self, receive_ns: int, problem: str):
        raise BagError(f"{self.reader.where(self.topic, receive_ns)}: {problem}")

    def match(self, names, receive_ns: int, what: str) -> np.ndarray:
        names = tuple(names)
        if self.index_cache[0] == names:
            return self.index_cache[1]
        position = {name: i for i, name in enumerate(names)}
        missing = [name for name in self.joint_names if name not in position]
        if missing:
            self.fail(receive_ns, f"{what} lacks joints {missing}: expected all of {list(self.joint_names)}, "
                      f"got {list(names)}")
        index = np.array([position[name] for name in self.joint_names], dtype=np.int64)
        self.index_cache = (names, index)
        return index

    def add(self, msg, receive_ns: int) -> None:
        if self.has_header:
            stamp = msg.header.stamp
            self.stamps.append(stamp.sec * NS + stamp.nanosec)
        self.receive.append(receive_ns)
        role = self.role
        if role == "joint_states":
            index = self.match(msg.name, receive_ns, "JointState.name")
            position = msg.position
            if len(position) != len(msg.name):
                self.fail(receive_ns, f"JointState.position has {len(position)} values for {len(msg.name)} names")
            if self.needs_velocity:
                velocity = msg.velocity
                if len(velocity) != len(msg.name):
                    self.fail(receive_ns, f"JointState.velocity: expected {len(msg.name)} values (the spec reads "
                              f"joint velocities), got {len(velocity)}")
                row = np.concatenate([position[index], velocity[index]])
            else:
                row = position[index]
        elif role == "command":
            if self.msgtype == "trajectory_msgs/msg/JointTrajectory":
                index = self.match(msg.joint_names, receive_ns, "JointTrajectory.joint_names")
                if not msg.points:
                    self.fail(receive_ns, "JointTrajectory: expected at least one point, got none")
                row = np.asarray(msg.points[0].positions, dtype=np.float64)
                if len(row) != len(msg.joint_names):
                    self.fail(receive_ns, f"JointTrajectory.points[0].positions: expected {len(msg.joint_names)} "
                              f"values, got {len(row)}")
                row = row[index]
            else:
                row = np.asarray(msg.data, dtype=np.float64)
                if row.shape != (len(self.joint_names),):
                    self.fail(receive_ns, f"Float64MultiArray.data: expected {len(self.joint_names)} values (one per "
                              f"joint, in the order {list(self.joint_names)}), got {row.size}")
        elif role == "vector":
            if self.msgtype == "std_msgs/msg/Float64MultiArray":
                row = np.asarray(msg.data, dtype=np.float64)
            elif self.msgtype == "geometry_msgs/msg/PointStamped":
                row = np.array([msg.point.x, msg.point.y, msg.point.z])
            else:
                p, q = msg.pose.position, msg.pose.orientation
                row = np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w])
            if row.shape != (self.size,):
                self.fail(receive_ns, f"expected {self.size} values (the spec's size), got {row.size}")
        else:  # marker
            row = np.array([float(msg.data)])
        if not np.all(np.isfinite(row)):
            self.fail(receive_ns, f"expected finite values, got {row.tolist()}")
        self.rows.append(row)

    def finish(self) -> tuple[Stream, str]:
        receive = np.asarray(self.receive, dtype=np.int64)
        width = {"joint_states": len(self.joint_names) * (2 if self.needs_velocity else 1),
                 "command": len(self.joint_names), "marker": 1}.get(self.role, getattr(self, "size", 1))
        rows = [np.asarray(r, dtype=np.float64).reshape(-1, width) for r in self.rows]
        values = np.concatenate(rows) if rows else np.zeros((0, width))
        note = ""
        source = "receive"
        if self.has_header and self.stamps and any(self.stamps):
            stamps = np.asarray(self.stamps, dtype=np.int64)
            if np.any(stamps == 0):
                first = int(np.flatnonzero(stamps == 0)[0])
                raise BagError(f"{self.reader.where(self.topic, int(receive[first]))}: header stamp is zero while "
                               "other stamps are not")
            back = np.flatnonzero(np.diff(stamps) < 0)
            if back.size:
                i = int(back[0]) + 1
                raise BagError(f"{self.reader.where(self.topic, int(receive[i]))}: header stamps go backwards "
                               f"({stamps[i] / NS:.9f} after {stamps[i - 1] / NS:.9f}): expected non-decreasing stamps")
            source = "header"
            offset = float(np.median(stamps - receive)) / NS
            if abs(offset) > 1.0:
                note = (f"bag {self.reader.bag}: topic {self.topic}: header stamps are {offset:+.1f} s from receive "
                        "times (another clock?); topics without a header use receive time")
        else:
            stamps = receive
            if self.has_header and self.stamps:
                note = f"bag {self.reader.bag}: topic {self.topic}: header stamps are all zero, using receive time"
        return Stream(self.topic, self.msgtype, stamps, values, source), note


# --- episodes ----------------------------------------------------------------------------------
def _marker_intervals(stream: Stream, end_ns: int) -> list[tuple[int, int]]:
    """``[start, end)`` intervals the marker marks: Bool true, or Int32 constant and >= 0."""
    values, stamps = stream.values[:, 0], stream.stamps
    intervals, open_at, current = [], None, None
    for t, value in zip(stamps, values):
        active = value > 0.5 if stream.msg_type == "std_msgs/msg/Bool" else value >= 0
        if open_at is not None and (not active or value != current):
            intervals.append((open_at, int(t)))
            open_at = None
        if active and open_at is None:
            open_at, current = int(t), value
    if open_at is not None:
        intervals.append((open_at, max(open_at, end_ns) + 1))
    return intervals


def _split_at_gaps(intervals, streams, max_gap_ns: int) -> list[tuple[int, int]]:
    cuts = []
    for stream in streams:
        gaps = np.flatnonzero(np.diff(stream.stamps) > max_gap_ns)
        cuts.extend((int(stream.stamps[i]), int(stream.stamps[i + 1])) for i in gaps)
    result = []
    for start, end in intervals:
        pieces = [(start, end)]
        for gap_start, gap_end in cuts:
            next_pieces = []
            for a, b in pieces:
                if a <= gap_start < b and gap_end < b:
                    next_pieces += [(a, gap_start + 1), (gap_end, b)]
                else:
                    next_pieces.append((a, b))
            pieces = next_pieces
        result.extend(pieces)
    return result


def _latest(stamps: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the latest sample at or before each time (-1: none)."""
    return np.searchsorted(stamps, times, side="right") - 1


def _episode_arrays(robot: Robot, streams: dict, start: int, end: int, fail) -> tuple:
    """Observations and actions on the control grid inside ``[start, end)``; ``(obs, act, grid)``."""
    spec = robot.spec
    period = NS / spec.control_rate_hz
    joint = streams[robot.joint_states_topic]
    observed = [joint] + [streams[f.topic] for f in spec.observation_fields if f.kind == "vector"]
    command = streams.get(robot.command_topic) if robot.command_topic else None
    firsts, lasts = [], []
    for stream in observed + ([command] if command is not None else []):
        inside = stream.stamps[(stream.stamps >= start) & (stream.stamps < end)]
        if inside.size == 0:
            fail(stream.topic, "empty episode: no message in it")
        firsts.append(int(inside[0]))
        lasts.append(int(inside[-1]))
    # the grid runs while every observed stream has data and, with commands, until the last command
    # answers a grid point (it may arrive up to half a period after it); 1% of a period absorbs stamp rounding
    t0 = max(firsts)
    t_end = min(lasts[:len(observed)]) + 0.01 * period
    if command is None:
        t_end -= period  # the action is the position one period later
    else:
        t_end = min(t_end, lasts[-1] + period / 2 - 1)
    if t_end < t0:
        return None
    count = int(np.floor((t_end - t0) / period)) + 1
    grid = t0 + np.round(np.arange(count) * period).astype(np.int64)
    n = spec.n_joints
    needs_velocity = any(f.kind == "joint_velocity" for f in spec.observation_fields)
    js = joint.values[_latest(joint.stamps, grid)]
    positions, velocities = js[:, :n], (js[:, n:] if needs_velocity else None)
    column = {name: i for i, name in enumerate(spec.joint_names)}
    parts = []
    for obs_field in spec.observation_fields:
        if obs_field.kind == "vector":
            stream = streams[obs_field.topic]
            parts.append(stream.values[_latest(stream.stamps, grid)])
        else:
            source = positions if obs_field.kind == "joint_position" else velocities
            cols = [column[j] for j in (obs_field.joints or spec.joint_names)]
            parts.append(source[:, cols])
    obs = np.concatenate(parts, axis=1)
    if command is not None:
        index = _latest(command.stamps, grid + int(period // 2))
        act = command.values[index]
    else:
        following = joint.values[_latest(joint.stamps, grid + int(round(period))), :n]
        if spec.action_kind == "joint_position":
            act = following
        elif spec.action_kind == "joint_delta":
            act = following - positions
        else:
            act = (following - positions) * spec.control_rate_hz
    return obs, act, grid


def import_bags(bags: list[str], robot: Robot, marker_topic: str = "", max_gap_s: float = DEFAULT_MAX_GAP_S,
                min_steps: int = DEFAULT_MIN_STEPS) -> tuple[DemoDataset, ImportReport]:
    """Read every bag, split and resample its episodes; the dataset of the kept episodes and the report."""
    if not bags:
        raise BagError("bags: expected at least one bag, got none")
    if max_gap_s <= 0:
        raise BagError(f"max_gap_s: expected a number > 0, got {max_gap_s}")
    if min_steps < 1:
        raise BagError(f"min_steps: expected an integer >= 1, got {min_steps}")
    spec = robot.spec
    episodes, notes = Episodes(spec, min_steps), []
    for bag in bags:
        reader = _BagReader(bag, robot, marker_topic)
        streams, bag_notes = reader.read()
        notes.extend(bag_notes)
        data_streams = [s for t, s in streams.items() if t != marker_topic]
        for stream in data_streams:
            if stream.stamps.size == 0:
                raise BagError(f"{reader.where(stream.topic)}: expected messages, got none (empty topic)")
        begin = min(int(s.stamps[0]) for s in data_streams)
        finish = max(int(s.stamps[-1]) for s in data_streams)
        if marker_topic:
            intervals = _marker_intervals(streams[marker_topic], finish)
            if not intervals:
                raise BagError(f"{reader.where(marker_topic)}: expected at least one episode marked, got none")
        else:
            intervals = [(begin, finish + 1)]
        intervals = _split_at_gaps(intervals, data_streams, int(max_gap_s * NS))
        for index, (start, end) in enumerate(intervals):
            def fail(topic, problem, start=start, end=end, index=index, bag=bag, origin=reader.start_ns):
                raise BagError(f"bag {bag}: topic {topic}: episode {index} ({(start - origin) / NS:.3f} s to "
                               f"{(end - origin) / NS:.3f} s): {problem}")

            result = _episode_arrays(robot, streams, start, end, fail)
            steps = 0 if result is None else len(result[2])
            report = EpisodeReport(source=bag, index=index, start_s=(start - reader.start_ns) / NS, steps=steps,
                                   duration_s=steps / spec.control_rate_hz,
                                   streams={s.topic: stream_stats(s.stamps, start, end) for s in data_streams})
            episodes.add(report, *(result[:2] if result is not None else (None, None)))

    def no_episode(expected, actual):
        raise BagError(f"bags {bags}: expected {expected}, got {actual}")

    return episodes.finish(notes, no_episode)
