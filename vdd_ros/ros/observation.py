"""Observation assembly for the policy node: pure logic, no rclpy.

The node feeds raw message contents in (joint names/positions/velocities, vectors) and
asks for the observation window the model needs. Everything here validates its input and
raises ``ObservationError`` with one line naming what is wrong, so the node can log it
and skip the tick instead of publishing a command computed from bad data.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from vdd_ros.spec import ModelSpec
from vdd_ros.validation import check_int

# joint_position: position targets; joint_delta: increments integrated into position targets; joint_velocity:
# velocities (rad/s) for a velocity controller
SUPPORTED_ACTION_KINDS = ("joint_position", "joint_delta", "joint_velocity")


class ObservationError(ValueError):
    """An incoming message cannot be turned into an observation."""


def match_joints(message_names: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Indices into ``message_names`` of each name in ``wanted`` (any order, extras ignored)."""
    position = {}
    for i, name in enumerate(message_names):
        if name in position:
            raise ObservationError(f"JointState.name lists '{name}' twice")
        position[name] = i
    missing = [name for name in wanted if name not in position]
    if missing:
        raise ObservationError(f"JointState.name lacks joints {missing}: expected all of {list(wanted)}, "
                               f"got {list(message_names)}")
    return np.array([position[name] for name in wanted], dtype=np.int64)


def _finite(values: np.ndarray, what: str, names: Sequence[str]) -> None:
    bad = [names[i] for i in np.flatnonzero(~np.isfinite(values))]
    if bad:
        raise ObservationError(f"{what} is not finite for joints {bad}: {values.tolist()}")


class ObservationAssembler:
    """Keeps the latest value of every observation field and builds frames from them.

    A frame is the spec's observation fields concatenated in order (``obs_step_dim``
    numbers). Joint fields come from JointState; vector fields from their own topics.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._needs_velocity = any(f.kind == "joint_velocity" for f in spec.observation_fields)
        # the joints whose state is read, in spec order; fields pick their subset from it
        self._joint_values: dict[str, np.ndarray] | None = None
        self._joint_stamp: float | None = None
        self._vectors: dict[str, np.ndarray] = {}
        self._vector_stamps: dict[str, float] = {}
        self._index_cache: tuple[tuple[str, ...], np.ndarray] | None = None

    @property
    def vector_fields(self):
        return [f for f in self.spec.observation_fields if f.kind == "vector"]

    def update_joint_state(self, names: Sequence[str], positions: Sequence[float],
                           velocities: Sequence[float], stamp: float) -> None:
        """Validate a JointState's contents and keep the spec's joints. Raises ObservationError."""
        names = tuple(names)
        if len(positions) != len(names):
            raise ObservationError(f"JointState.position has {len(positions)} entries but JointState.name "
                                   f"has {len(names)}")
        if len(velocities) not in (0, len(names)):
            raise ObservationError(f"JointState.velocity has {len(velocities)} entries but JointState.name "
                                   f"has {len(names)} (expected {len(names)} or 0)")
        if self._needs_velocity and len(velocities) == 0:
            raise ObservationError("JointState.velocity is empty but the model observes joint velocities")
        if self._index_cache is None or self._index_cache[0] != names:
            self._index_cache = (names, match_joints(names, self.spec.joint_names))
        index = self._index_cache[1]
        wanted = self.spec.joint_names
        pos = np.asarray(positions, dtype=np.float64)[index]
        _finite(pos, "JointState.position", wanted)
        vel = np.asarray(velocities, dtype=np.float64)[index] if len(velocities) else np.zeros(len(wanted))
        _finite(vel, "JointState.velocity", wanted)
        self._joint_values = {"joint_position": pos, "joint_velocity": vel}
        self._joint_stamp = float(stamp)

    def update_vector(self, field_name: str, values: Sequence[float], stamp: float) -> None:
        """Keep the latest value of a vector field. Raises ObservationError."""
        field = next((f for f in self.vector_fields if f.name == field_name), None)
        if field is None:
            raise ObservationError(f"observation field '{field_name}' is not a vector field of the model")
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size != field.size:
            raise ObservationError(f"observation '{field_name}' on {field.topic}: expected {field.size} numbers, "
                                   f"got {arr.size}")
        if not np.all(np.isfinite(arr)):
            raise ObservationError(f"observation '{field_name}' on {field.topic} is not finite: {arr.tolist()}")
        self._vectors[field_name] = arr
        self._vector_stamps[field_name] = float(stamp)

    def missing(self) -> list[str]:
        """Names of the sources that have not delivered a value yet."""
        missing = [] if self._joint_values is not None else ["joint_states"]
        return missing + [f.topic for f in self.vector_fields if f.name not in self._vectors]

    def age(self, now: float) -> float:
        """Seconds since the oldest of the latest messages (inf before all have arrived)."""
        if self.missing():
            return math.inf
        stamps = [self._joint_stamp, *self._vector_stamps.values()]
        return now - min(stamps)

    def frame(self) -> np.ndarray:
        """The current frame ``[obs_step_dim]``. Raises ObservationError if a source is missing."""
        missing = self.missing()
        if missing:
            raise ObservationError(f"no message yet on {missing}")
        parts = []
        joint_index = {name: i for i, name in enumerate(self.spec.joint_names)}
        for field in self.spec.observation_fields:
            if field.kind == "vector":
                parts.append(self._vectors[field.name])
            else:
                values = self._joint_values[field.kind]
                parts.append(values[[joint_index[j] for j in field.joints]] if field.joints else values)
        return np.concatenate(parts)

    def joint_positions(self) -> np.ndarray | None:
        """Latest positions of the spec's joints (spec order), or None before the first JointState."""
        return None if self._joint_values is None else self._joint_values["joint_position"].copy()

    def clear(self) -> None:
        self._joint_values = None
        self._joint_stamp = None
        self._vectors.clear()
        self._vector_stamps.clear()


class ObservationHistory:
    """The last ``history`` frames, oldest first.

    Before ``history`` frames have arrived the window is padded by repeating the oldest
    frame, exactly as the offline rollouts pad the start of an episode.
    """

    def __init__(self, history: int, obs_step_dim: int):
        check_int("history", history, 1)
        self.history = history
        self.obs_step_dim = obs_step_dim
        self._frames: deque[np.ndarray] = deque(maxlen=history)

    def push(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame, dtype=np.float64).reshape(-1)
        if frame.size != self.obs_step_dim:
            raise ObservationError(f"observation frame: expected {self.obs_step_dim} numbers, got {frame.size}")
        self._frames.append(frame)

    def __len__(self) -> int:
        return len(self._frames)

    def window(self) -> np.ndarray:
        """``[history, obs_step_dim]``; raises ObservationError when empty."""
        if not self._frames:
            raise ObservationError("observation history is empty")
        pad = [self._frames[0]] * (self.history - len(self._frames))
        return np.stack(pad + list(self._frames))

    def clear(self) -> None:
        self._frames.clear()


def spec_mismatches(spec: ModelSpec, joint_names: Sequence[str], control_rate_hz: float,
                    allow_rate_override: bool = False, output: str = "commands") -> list[str]:
    """Where the node's parameters disagree with the model's spec: one line per problem, naming both sides.

    ``joint_names`` empty and ``control_rate_hz`` 0 mean "take the model's". Every action kind of
    ``SUPPORTED_ACTION_KINDS`` is commanded; a ``joint_velocity`` model only with ``output`` "commands"
    (a JointTrajectory of positions cannot carry it).
    """
    problems = []
    if joint_names and tuple(joint_names) != tuple(spec.joint_names):
        problems.append(f"joint_names: parameter {list(joint_names)} != model spec {list(spec.joint_names)}")
    if control_rate_hz < 0 or not math.isfinite(control_rate_hz):
        problems.append(f"control_rate_hz: parameter {control_rate_hz} must be >= 0 (0 = the model's rate)")
    elif (control_rate_hz and not allow_rate_override
          and not math.isclose(control_rate_hz, spec.control_rate_hz, rel_tol=1e-6)):
        problems.append(f"control_rate_hz: parameter {control_rate_hz} != model spec {spec.control_rate_hz} "
                        f"(set allow_rate_override to run a model at another rate)")
    if spec.action_kind not in SUPPORTED_ACTION_KINDS:
        problems.append(f"action_kind: this node commands {list(SUPPORTED_ACTION_KINDS)}, model spec has "
                        f"'{spec.action_kind}'")
    elif spec.action_kind == "joint_velocity" and output != "commands":
        problems.append(f"action_kind: a joint_velocity model needs output 'commands' (velocities for a velocity "
                        f"forward_command_controller), parameter output is '{output}'")
    return problems
