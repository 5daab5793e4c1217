"""``robot.yaml``: a user's robot interface, described once, turned into the project's ModelSpec.

A complete file (every key but ``joints``, ``control_rate_hz`` and ``action.kind`` is optional)::

    name: my_arm                    # the dataset/spec task name (default: the file's stem)
    urdf: my_arm.urdf               # joint limits from here (a path relative to this file)
    joints:                         # the policy's joints, in the order of its actions
      - shoulder                    # limits from the URDF
      - {name: elbow, lower: -2.0, upper: 2.0, velocity: 1.5}   # explicit numbers win over the URDF
    control_rate_hz: 20
    history: 2                      # observation frames the policy reads
    horizon: 16                     # actions per chunk (0: 0.8 s at the control rate, the training default)
    joint_states: /joint_states     # the sensor_msgs/JointState topic
    observations:                   # the frame, in order
      - joint_position              # every joint's position (or {name, kind, joints: [...]})
      - joint_velocity
      - {name: goal, topic: /goal, type: geometry_msgs/PointStamped, size: 3}
    action:
      kind: joint_position          # joint_position | joint_delta | joint_velocity
      topic: /forward_position_controller/commands   # none: the next measured joint positions
      type: std_msgs/Float64MultiArray               # or trajectory_msgs/JointTrajectory
    hdf5_keys: {robot0_joint_pos: joint_position}    # vdd import-hdf5: source key -> field(s)
    lerobot_keys: {observation.state: [joint_position, goal]}  # vdd import-lerobot: column -> fields

Every problem is one ``RobotError`` line: ``robot <file>: <key>: expected ..., got ...``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn

from vdd_ros.spec import ACTION_KINDS, VECTOR_MSG_TYPES, ModelSpec, Normalization, ObservationField, SpecError
from vdd_ros.validation import FieldError

COMMAND_MSG_TYPES = ("std_msgs/Float64MultiArray", "trajectory_msgs/JointTrajectory")
TOP_KEYS = ("name", "urdf", "joints", "control_rate_hz", "history", "horizon", "joint_states", "observations",
            "action", "hdf5_keys", "lerobot_keys")
DEFAULT_JOINT_STATES = "/joint_states"
DEFAULT_HISTORY = 2


class RobotError(FieldError):
    """``robot <file>: <key>: expected <expected>, got <actual>``."""

    def __init__(self, field_name: str, expected: str, actual: Any, where: str = "robot"):
        super().__init__(field_name, expected, actual)
        self.where = where
        self.args = (f"{where}: {self.args[0]}",)


@dataclass(frozen=True)
class Robot:
    """A parsed robot.yaml: the spec plus the topics and key mappings the importers need."""

    spec: ModelSpec  # identity normalisation; history/horizon as written (horizon 0 -> 1 in the spec)
    path: str
    horizon: int  # as written (0: the training default)
    joint_states_topic: str = DEFAULT_JOINT_STATES
    command_topic: str = ""  # "" : actions are the next measured joint positions
    command_type: str = ""
    hdf5_keys: dict = field(default_factory=dict)  # source key -> tuple of field names
    lerobot_keys: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.task

    def describe(self) -> str:
        spec = self.spec
        fields_text = ", ".join(f"{f.name}[{f.size}]" for f in spec.observation_fields)
        action = f"{spec.action_kind} from {self.command_topic} ({self.command_type})" if self.command_topic \
            else f"{spec.action_kind} from the next measured joint positions"
        return (f"robot {self.name}: {spec.n_joints} joints {list(spec.joint_names)}, {spec.control_rate_hz:g} Hz, "
                f"frame {fields_text} ({spec.obs_step_dim} numbers), actions {action}")

    def interface_problems(self, other: ModelSpec) -> list[str]:
        """How ``other`` (a dataset's or checkpoint's spec) differs from this robot's interface (history,
        horizon and the observation fields a model chose to read are left out)."""
        mine = self.spec.replace(history=other.history, action_horizon=other.action_horizon)
        chosen = {f.name for f in other.observation_fields}
        if chosen <= {f.name for f in mine.observation_fields}:
            mine = mine.replace(observation_fields=tuple(f for f in mine.observation_fields if f.name in chosen),
                                normalization=Normalization.identity(other.obs_step_dim, other.n_joints))
        return [d.replace("this=", "robot=").replace("other=", "model=") for d in mine.interface_differences(other)]


def load_robot(path: str) -> Robot:
    """Read and validate ``robot.yaml``; every problem is one RobotError line naming the key."""
    import yaml

    path = os.fspath(path)
    where = f"robot {path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise RobotError("file", "valid YAML", str(err).splitlines()[0], where) from None
    return robot_from_dict(data, path)


def robot_from_dict(data: Any, path: str = "robot.yaml") -> Robot:
    where = f"robot {path}"

    def fail(key: str, expected: str, actual: Any) -> NoReturn:
        raise RobotError(key, expected, actual, where)

    if not isinstance(data, dict):
        fail("file", "a mapping of key: value", type(data).__name__)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        fail(unknown[0], f"one of the keys {list(TOP_KEYS)}", unknown[0])
    name = data.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not name:
        fail("name", "a non-empty text", name)

    rate = _number(data.get("control_rate_hz"), "control_rate_hz", fail, positive=True)
    history = _integer(data.get("history", DEFAULT_HISTORY), "history", 1, fail)
    horizon = _integer(data.get("horizon", 0), "horizon", 0, fail)

    urdf_joints = None
    if data.get("urdf") is not None:
        urdf = data["urdf"]
        if not isinstance(urdf, str) or not urdf:
            fail("urdf", "a path to a URDF file", urdf)
        urdf_path = urdf if os.path.isabs(urdf) else os.path.join(os.path.dirname(os.path.abspath(path)), urdf)
        urdf_joints = _urdf_joints(urdf_path, fail)

    names, lower, upper, velocity = _joints(data.get("joints"), urdf_joints, fail)
    fields_ = _observations(data.get("observations", ["joint_position", "joint_velocity"]), names, fail)
    joint_states = data.get("joint_states", DEFAULT_JOINT_STATES)
    if not isinstance(joint_states, str) or not joint_states.startswith("/"):
        fail("joint_states", "a topic name starting with '/'", joint_states)

    action = data.get("action")
    if not isinstance(action, dict):
        fail("action", "a mapping with kind (and topic, type)", action)
    extra = sorted(set(action) - {"kind", "topic", "type"})
    if extra:
        fail(f"action.{extra[0]}", "only kind, topic, type", extra[0])
    kind = action.get("kind")
    if kind not in ACTION_KINDS:
        fail("action.kind", f"one of {list(ACTION_KINDS)}", kind)
    topic = action.get("topic") or ""
    msg_type = action.get("type") or ""
    if topic:
        if not isinstance(topic, str) or not topic.startswith("/"):
            fail("action.topic", "a topic name starting with '/'", topic)
        if msg_type not in COMMAND_MSG_TYPES:
            fail("action.type", f"one of {list(COMMAND_MSG_TYPES)}", msg_type or None)
    elif msg_type:
        fail("action.topic", f"a topic for action.type {msg_type}", None)

    field_names = [f.name for f in fields_]
    keys = {section: _key_mapping(data.get(section, {}), section, field_names, fail)
            for section in ("hdf5_keys", "lerobot_keys")}
    n = len(names)
    try:
        spec = ModelSpec(joint_names=tuple(names), joint_lower=tuple(lower), joint_upper=tuple(upper),
                         joint_velocity_limits=tuple(velocity), observation_fields=tuple(fields_), history=history,
                         action_kind=kind, action_horizon=max(horizon, 1), control_rate_hz=rate,
                         normalization=Normalization.identity(sum(f.size for f in fields_), n), task=name)
    except SpecError as err:
        fail(err.field_name, err.expected, err.actual)
    return Robot(spec=spec, path=path, horizon=horizon, joint_states_topic=joint_states, command_topic=topic,
                 command_type=msg_type, hdf5_keys=keys["hdf5_keys"], lerobot_keys=keys["lerobot_keys"])


# --- pieces ------------------------------------------------------------------------------
def _number(value, key, fail, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, "a number", value)
    if positive and value <= 0:
        fail(key, "a number > 0", value)
    return float(value)


def _integer(value, key, low, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(key, f"an integer >= {low}", value)
    return int(value)


def _urdf_joints(urdf_path: str, fail) -> dict:
    """``{joint name: (type, lower, upper, velocity)}`` of every joint in the URDF (limits None when absent)."""
    if not os.path.isfile(urdf_path):
        fail("urdf", "an existing URDF file", urdf_path)
    import yourdfpy

    try:
        model = yourdfpy.URDF.load(urdf_path, build_scene_graph=False, load_meshes=False,
                                   load_collision_meshes=False)
    except Exception as err:  # yourdfpy raises whatever its XML parsing raises
        fail("urdf", "a readable URDF file", f"{urdf_path}: {type(err).__name__}: {err}")
    joints = {}
    for name, joint in model.joint_map.items():
        limit = joint.limit
        joints[name] = (joint.type, getattr(limit, "lower", None), getattr(limit, "upper", None),
                        getattr(limit, "velocity", None))
    return joints


def _joints(entries, urdf_joints, fail):
    if not isinstance(entries, list) or not entries:
        fail("joints", "a list of joint names or {name, lower, upper, velocity}", entries)
    names, lower, upper, velocity = [], [], [], []
    for i, entry in enumerate(entries):
        key = f"joints[{i}]"
        given = {}
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"name", "lower", "upper", "velocity"})
            if extra:
                fail(f"{key}.{extra[0]}", "only name, lower, upper, velocity", extra[0])
            given = {k: _number(entry[k], f"{key}.{k}", fail, positive=(k == "velocity"))
                     for k in ("lower", "upper", "velocity") if entry.get(k) is not None}
            entry = entry.get("name")
        if not isinstance(entry, str) or not entry:
            fail(f"{key}.name" if given else key, "a joint name", entry)
        name = entry
        if name in names:
            fail(key, "unique joint names", f"'{name}' appears twice")
        values = {}
        if urdf_joints is not None:
            if name not in urdf_joints:
                known = [j for j, (kind, *_) in urdf_joints.items() if kind != "fixed"]
                fail(key, f"a movable joint of the URDF {known}", name)
            kind, lo, up, vel = urdf_joints[name]
            if kind in ("fixed", "floating", "planar"):
                fail(key, "a revolute, continuous or prismatic joint of the URDF", f"'{name}' is {kind}")
            if kind != "continuous":
                values.update(lower=lo, upper=up)
            values["velocity"] = vel
            values = {k: v for k, v in values.items() if v is not None}
            if kind == "continuous" and not {"lower", "upper"} <= set(given):
                fail(key, f"lower and upper for '{name}' (a continuous joint: the URDF has no position limits)",
                     {k: given.get(k) for k in ("lower", "upper")})
        values.update(given)
        source = "the URDF or here" if urdf_joints is not None else "here (no urdf)"
        for limit in ("lower", "upper", "velocity"):
            if limit not in values:
                fail(f"{key}.{limit}", f"a {limit} limit for '{name}' from {source}", None)
        if values["velocity"] <= 0:
            fail(f"{key}.velocity", f"a velocity limit > 0 for '{name}'", values["velocity"])
        if values["lower"] >= values["upper"]:
            fail(f"{key}.upper", f"above lower={values['lower']} for '{name}'", values["upper"])
        names.append(name)
        lower.append(float(values["lower"]))
        upper.append(float(values["upper"]))
        velocity.append(float(values["velocity"]))
    return names, lower, upper, velocity


def _observations(entries, joint_names, fail) -> list[ObservationField]:
    if not isinstance(entries, list) or not entries:
        fail("observations", "a list of fields (joint_position, joint_velocity or {name, topic, type, size})",
             entries)
    result = []
    for i, entry in enumerate(entries):
        key = f"observations[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry, "kind": entry}
        if not isinstance(entry, dict):
            fail(key, "a field name or a mapping", entry)
        extra = sorted(set(entry) - {"name", "kind", "joints", "topic", "type", "size"})
        if extra:
            fail(f"{key}.{extra[0]}", "only name, kind, joints, topic, type, size", extra[0])
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            fail(f"{key}.name", "a field name", name)
        kind = entry.get("kind", "vector" if "topic" in entry else name)
        if kind in ("joint_position", "joint_velocity"):
            joints = entry.get("joints") or []
            if not isinstance(joints, list) or any(j not in joint_names for j in joints):
                fail(f"{key}.joints", f"names from joints {joint_names}", joints)
            if "topic" in entry or "type" in entry:
                fail(f"{key}.topic", f"no topic for a {kind} field (read from joint_states)", entry.get("topic"))
            result.append(ObservationField(name, kind, len(joints or joint_names), tuple(joints or joint_names)))
        elif kind == "vector":
            topic, msg_type, size = entry.get("topic"), entry.get("type"), entry.get("size")
            if not isinstance(topic, str) or not topic.startswith("/"):
                fail(f"{key}.topic", "a topic name starting with '/'", topic)
            if msg_type not in VECTOR_MSG_TYPES:
                fail(f"{key}.type", f"one of {list(VECTOR_MSG_TYPES)}", msg_type)
            fixed = {"geometry_msgs/PointStamped": 3, "geometry_msgs/PoseStamped": 7}.get(msg_type)
            if size is None and fixed:
                size = fixed
            size = _integer(size, f"{key}.size", 1, fail)
            if fixed and size != fixed:
                fail(f"{key}.size", f"{fixed} for {msg_type}", size)
            result.append(ObservationField(name, "vector", size, (), topic, msg_type))
        else:
            fail(f"{key}.kind", "joint_position, joint_velocity or vector (a vector needs topic, type, size)", kind)
    return result


def _key_mapping(mapping, section, field_names, fail) -> dict:
    """``{source key: field or [fields]}`` -> ``{source key: (fields...)}``; every field named at most once."""
    if not isinstance(mapping, dict):
        fail(section, "a mapping of source key: field name(s)", mapping)
    result, used = {}, set()
    for source, target in mapping.items():
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or any(t not in field_names for t in targets):
            fail(f"{section}.{source}", f"field names from observations {field_names}", target)
        twice = used & set(targets)
        if twice:
            fail(f"{section}.{source}", "each field mapped once", sorted(twice))
        used |= set(targets)
        result[str(source)] = tuple(targets)
    return result

