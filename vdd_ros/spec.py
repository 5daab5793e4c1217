"""The model spec: one validated contract between training, export and the ROS node.

Only numpy and json are used here, so the robot side can read a spec without torch.

Shapes used everywhere:
- one observation frame is the concatenation of the observation fields, in order
  (``obs_step_dim`` numbers);
- the observation window holds the last ``history`` frames, oldest first
  (``obs_dim = history * obs_step_dim`` when flattened);
- one action is one number per joint; the action chunk holds ``action_horizon`` actions
  (``act_dim = action_horizon * n_joints`` when flattened).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from vdd_ros.validation import FieldError, check_choice, check_float, check_int, finite_vector

FORMAT_VERSION = 1
MODEL_KINDS = ("diffusion_teacher", "vdd_mixture", "em_mixture", "none")
ACTION_KINDS = ("joint_position", "joint_delta", "joint_velocity")
OBSERVATION_KINDS = ("joint_position", "joint_velocity", "vector")
VECTOR_MSG_TYPES = ("std_msgs/Float64MultiArray", "geometry_msgs/PointStamped", "geometry_msgs/PoseStamped")


class SpecError(FieldError):
    """A spec field holds a value it must not hold: ``spec field '<name>': expected ..., got ...``."""

    def __init__(self, field_name: str, expected: str, actual: Any):
        super().__init__(field_name, expected, actual)
        self.args = (f"spec field '{field_name}': expected {expected}, got {actual!r}",)


def _vector(name: str, values, size: int, positive: bool = False) -> tuple[float, ...]:
    return finite_vector(name, values, size, positive=positive, error=SpecError)


@dataclass(frozen=True)
class ObservationField:
    """One part of an observation frame.

    ``joint_position`` / ``joint_velocity`` read the named joints from sensor_msgs/JointState
    (``joints`` empty means all of the spec's joints); ``vector`` reads ``size`` numbers
    from ``topic`` (message type ``msg_type``).
    """

    name: str
    kind: str
    size: int
    joints: tuple[str, ...] = ()
    topic: str = ""
    msg_type: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "size": self.size,
                "joints": list(self.joints), "topic": self.topic, "msg_type": self.msg_type}

    @staticmethod
    def from_dict(data: dict, where: str) -> ObservationField:
        if not isinstance(data, dict):
            raise SpecError(where, "an object", data)
        known = {f.name for f in fields(ObservationField)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(where, f"only keys {sorted(known)}", unknown)
        try:
            return ObservationField(name=str(data["name"]), kind=str(data["kind"]), size=int(data["size"]),
                                    joints=tuple(str(j) for j in data.get("joints", ())),
                                    topic=str(data.get("topic", "")), msg_type=str(data.get("msg_type", "")))
        except KeyError as missing:
            raise SpecError(f"{where}.{missing.args[0]}", "a value", "nothing") from None


@dataclass(frozen=True)
class Normalization:
    """Per-dimension affine normalisation: ``x_norm = (x - mean) / std``.

    ``obs_*`` have ``obs_step_dim`` entries (applied to every frame of the window);
    ``act_*`` have ``n_joints`` entries (applied to every step of the chunk).
    """

    obs_mean: tuple[float, ...]
    obs_std: tuple[float, ...]
    act_mean: tuple[float, ...]
    act_std: tuple[float, ...]

    @staticmethod
    def identity(obs_step_dim: int, n_joints: int) -> Normalization:
        return Normalization((0.0,) * obs_step_dim, (1.0,) * obs_step_dim, (0.0,) * n_joints, (1.0,) * n_joints)

    @staticmethod
    def fit(observations: np.ndarray, actions: np.ndarray, min_std: float = 1e-3) -> Normalization:
        """Statistics of frames ``[N, obs_step_dim]`` and actions ``[M, n_joints]``."""
        obs = np.asarray(observations, dtype=np.float64)
        act = np.asarray(actions, dtype=np.float64)
        return Normalization(tuple(obs.mean(0)), tuple(np.maximum(obs.std(0), min_std)),
                             tuple(act.mean(0)), tuple(np.maximum(act.std(0), min_std)))


@dataclass(frozen=True)
class ModelSpec:
    joint_names: tuple[str, ...]
    joint_lower: tuple[float, ...]
    joint_upper: tuple[float, ...]
    joint_velocity_limits: tuple[float, ...]
    observation_fields: tuple[ObservationField, ...]
    history: int
    action_kind: str
    action_horizon: int
    control_rate_hz: float
    normalization: Normalization
    model_kind: str = "none"
    task: str = ""
    model_info: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("history", "action_horizon"):  # numpy integers become ints (the spec is written as JSON)
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1, error=SpecError))
        self.validate()

    # --- derived sizes -------------------------------------------------------------
    @property
    def n_joints(self) -> int:
        return len(self.joint_names)

    @property
    def obs_step_dim(self) -> int:
        return sum(f.size for f in self.observation_fields)

    @property
    def obs_dim(self) -> int:
        return self.history * self.obs_step_dim

    @property
    def act_dim(self) -> int:
        return self.action_horizon * self.n_joints

    # --- validation ----------------------------------------------------------------
    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise SpecError("format_version", f"{FORMAT_VERSION}", self.format_version)
        check_choice("model_kind", self.model_kind, MODEL_KINDS, error=SpecError)
        check_choice("action_kind", self.action_kind, ACTION_KINDS, error=SpecError)
        if not self.joint_names:
            raise SpecError("joint_names", "at least one joint name", list(self.joint_names))
        seen = set()
        for name in self.joint_names:
            if not isinstance(name, str) or not name:
                raise SpecError("joint_names", "non-empty strings", list(self.joint_names))
            if name in seen:
                raise SpecError("joint_names", "unique names", f"'{name}' appears twice")
            seen.add(name)
        n = self.n_joints
        lower = _vector("joint_lower", self.joint_lower, n)
        upper = _vector("joint_upper", self.joint_upper, n)
        if any(lo >= up for lo, up in zip(lower, upper)):
            raise SpecError("joint_upper", f"each above joint_lower {list(lower)}", list(upper))
        _vector("joint_velocity_limits", self.joint_velocity_limits, n, positive=True)
        check_int("history", self.history, 1, error=SpecError)
        check_int("action_horizon", self.action_horizon, 1, error=SpecError)
        check_float("control_rate_hz", self.control_rate_hz, 0, strict_low=True, error=SpecError)
        if not self.observation_fields:
            raise SpecError("observation_fields", "at least one field", [])
        names = set()
        for i, obs_field in enumerate(self.observation_fields):
            where = f"observation_fields[{i}]"
            if obs_field.name in names:
                raise SpecError(f"{where}.name", "unique field names", obs_field.name)
            names.add(obs_field.name)
            check_choice(f"{where}.kind", obs_field.kind, OBSERVATION_KINDS, error=SpecError)
            if obs_field.kind == "vector":
                check_int(f"{where}.size", obs_field.size, 1, error=SpecError)
                if not obs_field.topic:
                    raise SpecError(f"{where}.topic", "a topic name for a vector observation", obs_field.topic)
                check_choice(f"{where}.msg_type", obs_field.msg_type, VECTOR_MSG_TYPES, error=SpecError)
            else:
                unknown = [j for j in obs_field.joints if j not in seen]
                if unknown:
                    raise SpecError(f"{where}.joints", f"names from joint_names {list(self.joint_names)}", unknown)
                expected = len(obs_field.joints) or n
                if obs_field.size != expected:
                    raise SpecError(f"{where}.size", f"{expected} (one per joint)", obs_field.size)
        norm = self.normalization
        if not isinstance(norm, Normalization):
            raise SpecError("normalization", "a Normalization", type(norm).__name__)
        _vector("normalization.obs_mean", norm.obs_mean, self.obs_step_dim)
        _vector("normalization.obs_std", norm.obs_std, self.obs_step_dim, positive=True)
        _vector("normalization.act_mean", norm.act_mean, n)
        _vector("normalization.act_std", norm.act_std, n, positive=True)
        try:
            json.dumps(self.model_info)
        except TypeError as err:
            raise SpecError("model_info", "a JSON-serialisable object", str(err)) from None

    # --- normalisation helpers (numpy) -------------------------------------------
    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """Raw frames ``[..., obs_step_dim]`` -> normalised."""
        norm = self.normalization
        return (obs - np.asarray(norm.obs_mean, obs.dtype)) / np.asarray(norm.obs_std, obs.dtype)

    def normalize_action(self, act: np.ndarray) -> np.ndarray:
        norm = self.normalization
        return (act - np.asarray(norm.act_mean, act.dtype)) / np.asarray(norm.act_std, act.dtype)

    def denormalize_action(self, act: np.ndarray) -> np.ndarray:
        """Normalised actions ``[..., n_joints]`` -> raw units."""
        norm = self.normalization
        return act * np.asarray(norm.act_std, act.dtype) + np.asarray(norm.act_mean, act.dtype)

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["joint_names"] = list(self.joint_names)
        data["observation_fields"] = [f.to_dict() for f in self.observation_fields]
        data["normalization"] = {k: list(v) for k, v in asdict(self.normalization).items()}
        for key in ("joint_lower", "joint_upper", "joint_velocity_limits"):
            data[key] = list(data[key])
        return data

    def to_json(self, indent: int | None = None) -> str:
        # repr-exact floats: json writes the shortest string that reads back to the same double
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_dict(data: dict) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError("spec", "a JSON object", type(data).__name__)
        known = {f.name for f in fields(ModelSpec)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError("spec", f"only keys {sorted(known)}", unknown)
        version = data.get("format_version", None)
        if version != FORMAT_VERSION:
            raise SpecError("format_version", f"{FORMAT_VERSION}", version)
        required = known - {"model_kind", "task", "model_info", "format_version"}
        missing = sorted(required - set(data))
        if missing:
            raise SpecError(missing[0], "a value", "nothing")
        norm = data["normalization"]
        if not isinstance(norm, dict):
            raise SpecError("normalization", "an object", norm)
        norm_keys = {"obs_mean", "obs_std", "act_mean", "act_std"}
        if set(norm) != norm_keys:
            raise SpecError("normalization", f"keys {sorted(norm_keys)}", sorted(norm))
        fields_data = data["observation_fields"]
        if not isinstance(fields_data, list):
            raise SpecError("observation_fields", "a list", fields_data)

        return ModelSpec(
            joint_names=tuple(data["joint_names"]),
            joint_lower=tuple(data["joint_lower"]),
            joint_upper=tuple(data["joint_upper"]),
            joint_velocity_limits=tuple(data["joint_velocity_limits"]),
            observation_fields=tuple(ObservationField.from_dict(f, f"observation_fields[{i}]")
                                     for i, f in enumerate(fields_data)),
            history=check_int("history", data["history"], error=SpecError),
            action_kind=data["action_kind"],
            action_horizon=check_int("action_horizon", data["action_horizon"], error=SpecError),
            control_rate_hz=float(data["control_rate_hz"]),
            normalization=Normalization(**{k: tuple(float(x) for x in v) for k, v in norm.items()}),
            model_kind=data.get("model_kind", "none"),
            task=str(data.get("task", "")),
            model_info=dict(data.get("model_info", {})),
            format_version=version,
        )

    @staticmethod
    def from_json(text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as err:
            raise SpecError("spec", "valid JSON", str(err)) from None
        return ModelSpec.from_dict(data)

    def replace(self, **changes) -> ModelSpec:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return ModelSpec(**data)

    # --- comparison ----------------------------------------------------------------
    def interface_differences(self, other: ModelSpec) -> list[str]:
        """Differences that make two specs incompatible for the same robot interface.

        Compares what a deployment or a checkpoint depends on (joints, limits, observation
        fields, history, action kind and horizon, control rate), not the model kind,
        normalisation or model_info. Each entry reads ``field: this=... other=...``.
        """
        keys = ("joint_names", "joint_lower", "joint_upper", "joint_velocity_limits", "observation_fields",
                "history", "action_kind", "action_horizon", "control_rate_hz")
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: this={mine[key]!r} other={theirs[key]!r}" for key in keys if mine[key] != theirs[key]]
