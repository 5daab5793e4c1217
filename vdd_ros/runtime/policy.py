"""The torch-free policy: one exported ONNX file in, action chunks out.

    policy = load_policy("models/student.onnx")            # or teacher.onnx
    actions = policy.act(obs_window, rng)                   # [horizon, n_joints], raw units

Observation windows are in the robot's raw units (the graph normalises them with the
statistics stored in the file) and action chunks come back in raw units as float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vdd_ros.runtime.binding import BoundCall
from vdd_ros.runtime.errors import ArgumentError, InputError, ModelLoadError, PolicyError
from vdd_ros.runtime.format import ROLE_STUDENT, ROLE_TEACHER_DENOISER
from vdd_ros.runtime.session import OpenedModel, native_reason, one_line, open_model
from vdd_ros.spec import ModelSpec
from vdd_ros.validation import check_float


@dataclass(frozen=True)
class PolicyOutput:
    """One decision: the chunk and, for a mixture, which expert made it and the alternatives."""

    actions: np.ndarray  # [H, J] raw units
    expert: int  # index of the expert that produced ``actions``; -1 for the teacher
    gating: np.ndarray | None  # [Z] gating weights (None for the teacher)
    expert_means: np.ndarray | None  # [Z, H, J] every expert's mean chunk, raw units (None for the teacher)


# a squared norm up to this (float32 max ** 2 / 1.1) means every entry is finite and casts to
# float32 without overflow
_PLAIN_CAST_LIMIT = float(np.finfo(np.float32).max) ** 2 / 1.1


def check_observations(spec: ModelSpec, obs, batch: int | None, name: str, out: np.ndarray | None = None
                       ) -> np.ndarray:
    """Copy ``obs`` (``[history, obs_step_dim]``, or ``[batch, ...]``) into float32 ``out``, checked.

    Raises InputError for a wrong shape, a non-float dtype or a non-finite entry (including
    float64 values beyond the float32 range); returns ``out`` (allocated when None).
    """
    window = (spec.history, spec.obs_step_dim)
    expected = window if batch is None else (batch,) + window
    try:
        arr = obs if isinstance(obs, np.ndarray) else np.asarray(obs)
    except (ValueError, TypeError) as err:
        raise InputError(f"{name}: expected an array of shape {expected}, got {type(obs).__name__} "
                         f"({one_line(err)})") from None
    if arr.shape != expected:
        what = "history x obs_step_dim" if batch is None else "batch x history x obs_step_dim"
        raise InputError(f"{name}: expected shape {expected} ({what}), got {arr.shape}")
    if arr.dtype.kind != "f":
        raise InputError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if out is None:
        out = np.empty(expected, np.float32)
    if arr.dtype.itemsize <= 4:
        np.copyto(out, arr, casting="same_kind")
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # float64 overflow shows up as inf, reported below
            np.copyto(out, arr, casting="same_kind")
    if not all_finite(out):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise InputError(f"{name}: expected finite numbers within the float32 range, got {arr[tuple(bad)]!r} at "
                         f"index {tuple(int(i) for i in bad)} ({_entry_name(spec, int(bad[-1]))})")
    return out


def all_finite(arr: np.ndarray) -> bool:
    """Whether every entry is finite: a dot product is NaN/inf when any entry is (4x cheaper than
    ``np.isfinite(arr).all()`` on small arrays); only when it overflows does the full check run."""
    return math.isfinite(float(np.vdot(arr, arr))) or bool(np.isfinite(arr).all())


def _entry_name(spec: ModelSpec, index: int) -> str:
    """Which observation field an entry of a frame belongs to, e.g. "field 'joint_pos'[2]"."""
    start = 0
    for obs_field in spec.observation_fields:
        if index < start + obs_field.size:
            return f"observation field '{obs_field.name}'[{index - start}]"
        start += obs_field.size
    return f"entry {index}"


def _count(value) -> int:
    """A positive count from the spec's model_info, or 0 when it is missing or not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Policy:
    """An exported student (mixture of experts) or teacher (unrolled diffusion sampler).

    Attributes: ``spec``, ``kind`` (spec.model_kind), ``provider`` (the onnxruntime execution
    provider in use), ``network_evaluations`` (1 for the student, N for the teacher),
    ``n_experts`` (0 for the teacher), ``noise_scale`` (student only: 0 returns the chosen
    expert's mean, as VDD's policy does; > 0 adds ``noise_scale * L_z @ N(0, I)``).
    Not thread-safe: one Policy per thread (they share nothing).
    """

    def __init__(self, opened: OpenedModel, noise_scale: float = 0.0):
        if opened.role == ROLE_TEACHER_DENOISER:
            raise ModelLoadError(f"model {opened.path}: holds the teacher's single-step denoiser, not a policy; "
                                 f"load the sampler export (or use vdd_ros.runtime.load_denoiser)")
        self.path = opened.path
        self.spec = opened.spec
        self.kind = opened.spec.model_kind
        self.provider = opened.provider
        self._role = opened.role
        self._session = opened.session
        spec = self.spec
        self._chunk = (spec.action_horizon, spec.n_joints)
        window = (spec.history, spec.obs_step_dim)
        info = spec.model_info
        if self._role == ROLE_STUDENT:
            self.n_experts = _count(info.get("n_experts"))
            gating_shape = opened.session.get_outputs()[2].shape
            if self.n_experts < 1 or gating_shape[-1] != self.n_experts:
                raise ModelLoadError(f"model {self.path}: spec.model_info n_experts={info.get('n_experts')!r} "
                                     f"does not match the gating output shape {gating_shape}")
            self.network_evaluations = 1
            inputs = {"obs": ((1,) + window, np.float32), "uniform": ((1,), np.float32),
                      "noise": ((1,) + self._chunk, np.float32), "noise_scale": ((1,), np.float32),
                      "greedy": ((1,), np.bool_), "forced_expert": ((1,), np.int64)}
            outputs = {"actions": ((1,) + self._chunk, np.float32), "expert": ((1,), np.int64),
                       "gating": ((1, self.n_experts), np.float32),
                       "expert_means": ((1, self.n_experts) + self._chunk, np.float32)}
        else:
            self.n_experts = 0
            self.network_evaluations = _count(info.get("n_steps"))
            if self.network_evaluations < 1:
                raise ModelLoadError(f"model {self.path}: spec.model_info n_steps expected an integer >= 1, "
                                     f"got {info.get('n_steps')!r}")
            inputs = {"obs": ((1,) + window, np.float32), "noise": ((1,) + self._chunk, np.float32)}
            outputs = {"actions": ((1,) + self._chunk, np.float32)}
        self._student = self._role == ROLE_STUDENT
        self._call = BoundCall(opened.session, opened.provider, opened.device_id, inputs, outputs)
        self._in = self._call.inputs
        self._out = self._call.outputs
        # views of the bound inputs that a call writes (the setter below fills noise_scale)
        self._obs = self._in["obs"][0]
        self._noise = self._in["noise"]
        if self._student:
            self._uniform, self._greedy = self._in["uniform"], self._in["greedy"]
            self._forced = self._in["forced_expert"]
        self.noise_scale = noise_scale

    # --- configuration ---------------------------------------------------------------
    @property
    def noise_scale(self) -> float:
        return self._noise_scale

    @noise_scale.setter
    def noise_scale(self, value: float) -> None:
        check_float("noise_scale", value, 0, error=ArgumentError)
        if value > 0 and self._role != ROLE_STUDENT:
            raise InputError(f"noise_scale: the teacher draws its own noise, expected 0, got {value!r}")
        self._noise_scale = float(value)
        if self._student:
            self._in["noise_scale"][0] = self._noise_scale  # the bound input: set once, not every call

    def __repr__(self) -> str:
        return (f"Policy({self.path.name!r}, kind={self.kind!r}, provider={self.provider!r}, "
                f"network_evaluations={self.network_evaluations}, n_experts={self.n_experts})")

    # --- acting ----------------------------------------------------------------------
    def _load_window(self, obs_window) -> None:
        """Write ``obs_window`` into the bound ``obs`` input (checked; the node's hot path).

        A float array of the right shape whose squared norm is below ``_PLAIN_CAST_LIMIT`` is finite
        and within the float32 range: a plain cast, with no error-state context (about 1 us of a
        call). Everything else takes :func:`check_observations`, which raises the one-line errors.
        """
        obs = obs_window
        out = self._obs
        if type(obs) is np.ndarray and obs.shape == out.shape and obs.dtype.kind == "f":
            if obs.dtype.itemsize > 4:
                if float(np.vdot(obs, obs)) <= _PLAIN_CAST_LIMIT:  # False for NaN and inf too
                    out[...] = obs
                    return
            else:
                out[...] = obs
                if math.isfinite(float(np.vdot(out, out))):
                    return
        check_observations(self.spec, obs_window, None, "obs_window", out=out)

    def _run_one(self, obs_window, rng: np.random.Generator, greedy: bool, expert: int | None) -> dict:
        self._load_window(obs_window)
        if not isinstance(rng, np.random.Generator):
            raise InputError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        if self._student:
            if expert is None:
                self._forced[0] = -1
            elif isinstance(expert, (bool, np.bool_)) or not isinstance(expert, (int, np.integer)) \
                    or not 0 <= expert < self.n_experts:
                raise InputError(f"expert: expected None or an integer in [0, {self.n_experts}), got {expert!r}")
            else:
                self._forced[0] = expert
            self._greedy[0] = bool(greedy)
            rng.random(dtype=np.float32, out=self._uniform)  # the same draw as rng.random(dtype=np.float32)
            if self._noise_scale > 0:
                rng.standard_normal(dtype=np.float32, out=self._noise)
        else:
            if expert is not None:
                raise InputError(f"expert: the teacher has no experts, expected None, got {expert!r}")
            rng.standard_normal(dtype=np.float32, out=self._noise)
        try:
            return self._call.run()
        except Exception as err:  # native errors: one line, no onnxruntime trace
            raise PolicyError(f"model {self.path.name}: inference failed ({native_reason(err)})") from None

    def act(self, obs_window, rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        """The action chunk ``[horizon, n_joints]`` (raw units) for one observation window.

        ``greedy`` (student): the most probable expert instead of one sampled from the gating;
        the teacher ignores it (its sampler is deterministic given the noise drawn from ``rng``).
        """
        return self._run_one(obs_window, rng, greedy, None)["actions"][0].astype(np.float64)

    def act_detailed(self, obs_window, rng: np.random.Generator, greedy: bool = False,
                     expert: int | None = None) -> PolicyOutput:
        """Like :meth:`act`, plus the chosen expert, the gating and every expert's mean chunk.

        ``expert=k`` forces expert k (to hold one mode across ticks); the teacher refuses it.
        """
        out = self._run_one(obs_window, rng, greedy, expert)
        actions = out["actions"][0].astype(np.float64)
        if self._role != ROLE_STUDENT:
            return PolicyOutput(actions=actions, expert=-1, gating=None, expert_means=None)
        return PolicyOutput(actions=actions, expert=int(out["expert"][0]), gating=out["gating"][0].astype(np.float64),
                            expert_means=out["expert_means"][0].astype(np.float64))

    def act_batch(self, obs_windows, rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
        """Action chunks ``[B, horizon, n_joints]`` for ``B`` windows at once (offline rollouts)."""
        arr = np.asarray(obs_windows) if not isinstance(obs_windows, np.ndarray) else obs_windows
        batch = arr.shape[0] if arr.ndim == 3 else -1
        if batch < 1:
            raise InputError(f"obs_windows: expected shape (B, {self.spec.history}, {self.spec.obs_step_dim}) "
                             f"with B >= 1, got {arr.shape}")
        feeds = {"obs": check_observations(self.spec, arr, batch, "obs_windows")}
        if not isinstance(rng, np.random.Generator):
            raise InputError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        noise = np.zeros((batch,) + self._chunk, np.float32)
        if self._role == ROLE_STUDENT:
            feeds["uniform"] = rng.random(batch, dtype=np.float32)
            if self._noise_scale > 0:
                rng.standard_normal(dtype=np.float32, out=noise)
            feeds.update(noise=noise, noise_scale=np.full(batch, self._noise_scale, np.float32),
                         greedy=np.full(batch, bool(greedy)), forced_expert=np.full(batch, -1, np.int64))
        else:
            rng.standard_normal(dtype=np.float32, out=noise)
            feeds["noise"] = noise
        try:
            actions = self._session.run(["actions"], feeds)[0]
        except Exception as err:
            raise PolicyError(f"model {self.path.name}: inference failed ({native_reason(err)})") from None
        return actions.astype(np.float64)

    def warmup(self, n: int = 50) -> None:
        """Run ``n`` calls on the mean observation so the first real call is not the slow one."""
        mean_frame = np.asarray(self.spec.normalization.obs_mean, np.float32)
        window = np.tile(mean_frame, (self.spec.history, 1))
        rng = np.random.default_rng(0)  # own generator: warming up must not shift the caller's stream
        for _ in range(n):
            self._run_one(window, rng, False, None)


def load_policy(path, device: str = "auto", intra_op_threads: int = 1, noise_scale: float = 0.0) -> Policy:
    """Load an exported student or teacher sampler (``.onnx``) for acting.

    ``device``: ``"auto"`` (CUDA when onnxruntime can really use it, else CPU; the choice and
    its reason are logged on logger ``vdd_ros.runtime``), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``
    (raise DeviceError when unusable). ``intra_op_threads``: CPU threads per call (1 is fastest
    for these small models on a shared CPU). Raises ModelLoadError (one line) for a missing,
    invalid, foreign or unsupported file.
    """
    return Policy(open_model(Path(path), device, intra_op_threads), noise_scale=noise_scale)

