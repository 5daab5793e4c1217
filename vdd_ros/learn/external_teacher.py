"""Teachers trained elsewhere: a DDPM epsilon model or an EDM denoiser in a TorchScript or ONNX file.

``vdd distill --teacher-denoiser FILE`` distils a diffusion policy that was not trained by vdd_ros. This
module wraps the file as a VDD teacher (``vdd_ros.learn.teacher_protocol``): ``score(actions, obs, sigma)``
and ``sample(obs)`` in the STUDENT's normalised units, converted through both normalisations.

The calling convention of the file (``B`` rows; ``T`` = --teacher-history frames of ``D`` numbers, the
chosen observation fields in the spec's frame order; ``H`` = --teacher-horizon actions of ``J`` joints,
in the spec's joint order), all in the TEACHER's normalised units:

=================  =========================================================================================
``ddpm_eps``       ``eps = model(x, obs, t)``: ``x`` the noisy chunk ``[B, H*J]`` float32, ``obs`` ``[B, T*D]``
                   float32, ``t`` ``[B]`` int64 (the step, 0 = least noise); ``eps`` like ``x``.
                   ``x = sqrt(abar_t) a + sqrt(1 - abar_t) n`` with ``abar_t`` from --schedule/--train-steps.
``edm_denoiser``   ``denoised = model(x, obs, sigma)``: ``x = a + sigma n`` ``[B, H*J]``, ``sigma`` ``[B]``
                   float32; the clean-chunk estimate, like ``x`` (--edm-output denoised); or the raw network
                   ``F(c_in x, obs, c_noise)`` of Karras et al. with ``c_noise = ln(sigma)/4``, preconditioned
                   here with --sigma-data (--edm-output network).
=================  =========================================================================================

With --teacher-layout sequence, ``x`` and the output are ``[B, H, J]`` and ``obs`` is ``[B, T, D]`` (the flat
layout is that, row-major). Flattened chunks are time-major: step 0's joints, then step 1's, ...

Normalisation (--teacher-norm FILE, .json or .npz; see :func:`load_teacher_normalization`): the teacher's
``x_norm = raw * scale + offset`` per observation entry and per action entry, from ``mean``/``std``,
``min``/``max`` (to [-1, 1]) or ``scale``/``offset``. The student keeps its own normalisation (fitted on
the dataset, as for a vdd_ros teacher); both are affine, so with ``a_teacher = k * a_student + c``:

- the score converts exactly: ``grad_student log p = k * grad_teacher log p``;
- a noise level sigma in student units is ``kappa * sigma`` in teacher units, ``kappa`` the geometric mean
  of ``k`` over the chunk's entries (exact when ``k`` is the same everywhere, e.g. identical normalisations).

Scores: EDM ``(D(x; sigma) - x) / sigma^2``. DDPM: a VE noise level sigma is the step whose
``sigma_t = sqrt((1 - abar_t) / abar_t)`` is nearest in log sigma; the model is queried at the scaled input
``sqrt(abar_t) a`` and ``score = -eps / sigma_t`` (= ``sqrt(abar_t) * (-eps / sqrt(1 - abar_t))``, the score of
``x_t`` carried back to ``a``): exact for an exact eps model at that step.

Sampling (the guard's teacher samples and teacher rollouts): DDPM ancestral over all training steps
(--teacher-sample-steps 0) or DDIM (eta 0) over N evenly spaced steps, optionally clipping the clean
estimate to [-1, 1] (--clip-sample, as diffusers' ``clip_sample``); EDM Euler on the Karras schedule
(sigma_min 0.002, --edm-sigma-max, rho 7).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vdd_ros.learn.ddpm_adapter import BETA_SCHEDULES, beta_schedule
from vdd_ros.learn.diffusion import karras_sigmas
from vdd_ros.learn.pipeline import _PolicyBase
from vdd_ros.spec import ModelSpec
from vdd_ros.validation import FieldError

TEACHER_KINDS = ("ddpm_eps", "edm_denoiser")
LAYOUTS = ("flat", "sequence")
EDM_OUTPUTS = ("denoised", "network")
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
NORM_PARTS = {"obs": "observation", "action": "action"}
NORM_FORMS = (("mean", "std"), ("min", "max"), ("scale", "offset"))
DEFAULT_EDM_STEPS = 18  # Karras et al.'s Euler/Heun step count; the sampler here is Euler
PROBE_BATCH = 2


class ExternalTeacherError(FieldError):
    """``<where>: <field>: expected ..., got ...`` (one line; ``where`` names the file when there is one)."""

    def __init__(self, field_name: str, expected: str, actual, where: str = ""):
        super().__init__(field_name, expected, actual)
        if where:
            self.args = (f"{where}: {self.args[0]}",)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and "TorchScript interpreter" in lines[0]:  # the reason is the last line, after the traceback
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# --- what the user tells about the file ----------------------------------------------------------
@dataclass(frozen=True)
class ExternalTeacherConfig:
    """How to call and read a teacher file; field names follow the ``vdd distill`` flags (errors name the flags)."""

    path: str
    kind: str
    history: int
    horizon: int
    observation_fields: tuple[str, ...]
    norm: str  # a .json/.npz file, or "identity"
    layout: str = "flat"
    schedule: str = ""  # ddpm_eps
    train_steps: int = 0  # ddpm_eps
    beta_start: float = 1e-4  # ddpm_eps, linear / scaled_linear
    beta_end: float = 0.02
    clip_sample: bool = False  # ddpm_eps sampling
    sample_steps: int = 0  # ddpm_eps: 0 ancestral over all steps, N DDIM; edm_denoiser: Euler steps (0: 18)
    edm_output: str = "denoised"  # edm_denoiser
    sigma_data: float = 0.5  # edm_denoiser, edm_output network
    sigma_min: float = 0.002  # edm_denoiser sampling
    sigma_max: float = 80.0
    rho: float = 7.0

    def validate(self) -> ExternalTeacherConfig:
        def fail(flag, expected, actual):
            raise ExternalTeacherError(flag, expected, actual)

        suffix = Path(self.path).suffix.lower()
        if suffix not in TORCHSCRIPT_SUFFIXES + (".onnx",):
            fail("--teacher-denoiser", f"a TorchScript file ({'/'.join(TORCHSCRIPT_SUFFIXES)}) or an .onnx file",
                 self.path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"--teacher-denoiser {self.path}: no such file")
        if self.kind not in TEACHER_KINDS:
            fail("--teacher-kind", f"one of {list(TEACHER_KINDS)}", self.kind or None)
        for flag, value in (("--teacher-history", self.history), ("--teacher-horizon", self.horizon)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(flag, "an integer >= 1 (frames the teacher reads / actions per chunk)", value or None)
        if self.layout not in LAYOUTS:
            fail("--teacher-layout", f"one of {list(LAYOUTS)}", self.layout)
        if not self.norm:
            fail("--teacher-norm", "the teacher's normalisation (a .json/.npz file of obs_* and action_* "
                 "statistics, or 'identity' for a teacher on raw units)", None)
        if self.kind == "ddpm_eps":
            if not self.schedule:
                fail("--schedule", f"the DDPM's beta schedule, one of {list(BETA_SCHEDULES)}", None)
            if self.schedule not in BETA_SCHEDULES:
                fail("--schedule", f"one of {list(BETA_SCHEDULES)}", self.schedule)
            if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 2:
                fail("--train-steps", "the number of diffusion steps the DDPM was trained with (an integer >= 2)",
                     self.train_steps or None)
            if self.schedule != "squaredcos_cap_v2" and not 0 < self.beta_start <= self.beta_end < 1:
                fail("--beta-start/--beta-end", "0 < beta_start <= beta_end < 1",
                     [self.beta_start, self.beta_end])
            if not 0 <= self.sample_steps <= self.train_steps:
                fail("--teacher-sample-steps", f"0 (ancestral over all {self.train_steps} steps) or a DDIM step "
                     f"count 1..{self.train_steps}", self.sample_steps)
            if self.edm_output != "denoised":
                fail("--edm-output", "no value with --teacher-kind ddpm_eps", self.edm_output)
        else:
            if self.schedule:
                fail("--schedule", "no value with --teacher-kind edm_denoiser (only a DDPM has a beta schedule)",
                     self.schedule)
            if self.edm_output not in EDM_OUTPUTS:
                fail("--edm-output", f"one of {list(EDM_OUTPUTS)}", self.edm_output)
            if self.clip_sample:
                fail("--clip-sample", "no value with --teacher-kind edm_denoiser", True)
            if self.sample_steps < 0:
                fail("--teacher-sample-steps", "an integer >= 0 (0: 18 Euler steps)", self.sample_steps)
            for flag, value in (("--sigma-data", self.sigma_data), ("--edm-sigma-max", self.sigma_max)):
                if not (math.isfinite(value) and value > 0):
                    fail(flag, "a positive number", value)
            if not 0 < self.sigma_min < self.sigma_max:
                fail("--edm-sigma-max", f"above sigma_min={self.sigma_min}", self.sigma_max)
        return self

    @property
    def level_name(self) -> str:
        return "t" if self.kind == "ddpm_eps" else "sigma"

    @property
    def format(self) -> str:
        return "onnx" if Path(self.path).suffix.lower() == ".onnx" else "torchscript"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["observation_fields"] = list(self.observation_fields)
        return data


# --- the teacher's normalisation -----------------------------------------------------------------
@dataclass(frozen=True)
class TeacherNormalization:
    """The teacher's ``x_norm = raw * scale + offset``, expanded to the whole window / chunk (float64)."""

    obs_scale: np.ndarray  # [history * obs_step_dim]
    obs_offset: np.ndarray
    act_scale: np.ndarray  # [horizon * n_joints]
    act_offset: np.ndarray
    source: dict  # what the file said (plain lists), for the student's checkpoint

    @staticmethod
    def identity(obs_dim: int, act_dim: int) -> TeacherNormalization:
        return TeacherNormalization(np.ones(obs_dim), np.zeros(obs_dim), np.ones(act_dim), np.zeros(act_dim),
                                    {"identity": True})


def _read_norm_file(path: str) -> dict:
    where = f"--teacher-norm {path}"
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".npz"):
        raise ExternalTeacherError("--teacher-norm", "a .json or .npz file, or 'identity'", path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        else:
            with np.load(path, allow_pickle=False) as archive:
                data = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise ExternalTeacherError("file", f"readable {suffix[1:].upper()}", _one_line(err), where) from None
    if not isinstance(data, dict):
        raise ExternalTeacherError("file", "an object of named vectors", type(data).__name__, where)
    return data


def load_teacher_normalization(norm: str, spec: ModelSpec) -> TeacherNormalization:
    """Read --teacher-norm for the window and chunk of ``spec`` (history, fields, horizon, joints).

    File format (JSON object or NPZ arrays), one pair per part:
    ``obs_mean`` + ``obs_std`` | ``obs_min`` + ``obs_max`` | ``obs_scale`` + ``obs_offset``, and the same
    with ``action_``. Each vector has one number per frame entry (``obs_step_dim``; repeated over the window)
    or per window entry (``history * obs_step_dim``); for actions one per joint (repeated over the chunk) or
    per chunk entry (``horizon * n_joints``). min/max maps to [-1, 1]; scale/offset means ``raw * scale + offset``.
    """
    if norm == "identity":
        return TeacherNormalization.identity(spec.obs_dim, spec.act_dim)
    where = f"--teacher-norm {norm}"
    data = _read_norm_file(norm)
    known = {f"{part}_{name}" for part in NORM_PARTS for form in NORM_FORMS for name in form}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ExternalTeacherError("keys", "obs_{mean,std | min,max | scale,offset} and action_{same}",
                                   f"unknown {unknown}", where)
    frame = ", ".join(f"{f.name}[{f.size}]" for f in spec.observation_fields)
    sizes = {"obs": (spec.obs_step_dim, spec.obs_dim, f"one per frame entry: {frame}",
                     f"the whole window of {spec.history} frames"),
             "action": (spec.n_joints, spec.act_dim, f"one per joint: {list(spec.joint_names)}",
                        f"the whole chunk of {spec.action_horizon} actions")}
    result, source = {}, {}
    for part, label in NORM_PARTS.items():
        forms = [form for form in NORM_FORMS if any(f"{part}_{name}" in data for name in form)]
        if len(forms) != 1 or not all(f"{part}_{name}" in data for name in forms[0]):
            present = sorted(k for k in data if k.startswith(part + "_"))
            raise ExternalTeacherError(f"{label} statistics", f"one pair of {part}_mean+{part}_std, "
                                       f"{part}_min+{part}_max or {part}_scale+{part}_offset", present, where)
        step, whole, step_text, whole_text = sizes[part]
        vectors = []
        for name in forms[0]:
            key = f"{part}_{name}"
            try:
                values = np.asarray(data[key], dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise ExternalTeacherError(key, "a vector of numbers", data[key], where) from None
            if values.size not in (step, whole):
                raise ExternalTeacherError(key, f"{step} numbers ({step_text}) or {whole} ({whole_text})",
                                           f"{values.size} numbers", where)
            if not np.all(np.isfinite(values)):
                raise ExternalTeacherError(key, "finite numbers", values.tolist(), where)
            vectors.append(np.resize(values, whole))  # a per-frame / per-joint vector repeats over time
            source[key] = values.tolist()
        first, second = vectors
        kind = forms[0][0]
        if kind == "mean":
            bad = np.flatnonzero(second <= 0)
            if bad.size:
                raise ExternalTeacherError(f"{part}_std", "positive numbers", f"{second[bad[0]]} at index {bad[0]}",
                                           where)
            scale, offset = 1.0 / second, -first / second
        elif kind == "min":
            bad = np.flatnonzero(second <= first)
            if bad.size:
                raise ExternalTeacherError(f"{part}_max", f"above {part}_min at every index",
                                           f"{second[bad[0]]} <= {first[bad[0]]} at index {bad[0]}", where)
            scale = 2.0 / (second - first)
            offset = -1.0 - first * scale
        else:
            bad = np.flatnonzero(first == 0)
            if bad.size:
                raise ExternalTeacherError(f"{part}_scale", "non-zero numbers", f"0 at index {bad[0]}", where)
            scale, offset = first, second
        result[part] = (scale, offset)
    return TeacherNormalization(*result["obs"], *result["action"], source=source)


# --- the file ------------------------------------------------------------------------------------
_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32}


class _TorchScriptModel:
    def __init__(self, path: str):
        try:
            with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; it is what users export
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(path, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - a bad file raises anything from zip to pickle errors
            raise ExternalTeacherError("file", "a TorchScript module saved with torch.jit.save (or an .onnx file)",
                                       _one_line(err), f"--teacher-denoiser {path}") from None
        self.module.eval()

    def check_inputs(self, expected: list[tuple[str, list, str]], where: str) -> None:
        """TorchScript declares no shapes: the probe call checks them."""

    def __call__(self, x: torch.Tensor, obs: torch.Tensor, level: torch.Tensor):
        with torch.no_grad():
            return self.module(x, obs, level)


class _OnnxModel:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        from vdd_ros.runtime.session import session_options

        try:
            self.session = ort.InferenceSession(path, sess_options=session_options(max(1, threads)),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own native exception types
            raise ExternalTeacherError("file", "an ONNX model onnxruntime can load", _one_line(err),
                                       f"--teacher-denoiser {path}") from None
        self.inputs = self.session.get_inputs()
        self.dtypes: list = []

    def check_inputs(self, expected: list[tuple[str, list, str]], where: str) -> None:
        """Compare the declared inputs with (role, shape with 'batch' first, what decides the widths)."""
        names = [i.name for i in self.inputs]
        if len(self.inputs) != len(expected):
            raise ExternalTeacherError("inputs", f"{len(expected)} ({', '.join(e[0] for e in expected)}, in this "
                                       f"order)", f"{len(self.inputs)} {names}", where)
        self.dtypes = []
        for index, (declared, (role, shape, why)) in enumerate(zip(self.inputs, expected)):
            field = f"input {index} '{declared.name}' ({role})"
            dims = list(declared.shape) if declared.shape is not None else None
            if dims is not None:
                if len(dims) != len(shape):
                    raise ExternalTeacherError(f"{field} shape", f"{shape} ({why})", dims, where)
                if isinstance(dims[0], int) and dims[0] > 0:
                    raise ExternalTeacherError(f"{field} batch dimension", "a dynamic (named) batch dimension "
                                               "(export with dynamic axes)", dims[0], where)
                for got, want in zip(dims[1:], shape[1:]):
                    if isinstance(got, int) and got > 0 and got != want:
                        raise ExternalTeacherError(f"{field} shape", f"{shape} ({why})", dims, where)
            wanted = ("tensor(int64)", "tensor(int32)", "tensor(float)", "tensor(double)") if role == "t" else \
                ("tensor(float)", "tensor(double)")
            if declared.type not in wanted:
                raise ExternalTeacherError(f"{field} type", " or ".join(wanted), declared.type, where)
            self.dtypes.append(_ONNX_TYPES[declared.type])

    def __call__(self, x: torch.Tensor, obs: torch.Tensor, level: torch.Tensor):
        feeds = {declared.name: tensor.detach().cpu().numpy().astype(dtype, copy=False)
                 for declared, tensor, dtype in zip(self.inputs, (x, obs, level), self.dtypes)}
        return torch.from_numpy(np.asarray(self.session.run(None, feeds)[0]))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the teacher ---------------------------------------------------------------------------------
class ExternalTeacher:
    """A teacher file as a VDD teacher: ``obs_dim``, ``act_dim``, ``history``, ``score`` and ``sample``, all
    in the student's normalised units (``spec``'s normalisation, flattened window and chunk).

    Build it with :func:`load_external_teacher`. ``evaluations`` counts the model calls made.
    """

    def __init__(self, model, config: ExternalTeacherConfig, spec: ModelSpec, normalization: TeacherNormalization):
        self.model, self.config, self.spec, self.normalization = model, config, spec, normalization
        self.where = f"--teacher-denoiser {config.path}"
        self.obs_dim, self.act_dim, self.history = spec.obs_dim, spec.act_dim, spec.history
        self.evaluations = 0
        norm = spec.normalization
        obs_mean = np.tile(norm.obs_mean, spec.history)
        obs_std = np.tile(norm.obs_std, spec.history)
        act_mean = np.tile(norm.act_mean, spec.action_horizon)
        act_std = np.tile(norm.act_std, spec.action_horizon)
        # teacher units = student units * k + c (raw = student * std + mean; teacher = raw * scale + offset)
        as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32)  # noqa: E731
        self.obs_k = as_tensor(obs_std * normalization.obs_scale)
        self.obs_c = as_tensor(obs_mean * normalization.obs_scale + normalization.obs_offset)
        act_k = act_std * normalization.act_scale
        self.act_k = as_tensor(act_k)
        self.act_c = as_tensor(act_mean * normalization.act_scale + normalization.act_offset)
        self.kappa = float(np.exp(np.mean(np.log(np.abs(act_k)))))  # student sigma -> teacher sigma
        if config.kind == "ddpm_eps":
            betas = beta_schedule(config.schedule, config.train_steps, config.beta_start, config.beta_end)
            abar = torch.cumprod(1.0 - betas, 0)
            if not bool(torch.all(abar > 0)):
                raise ExternalTeacherError("--schedule", "a schedule whose abar_t stays above 0",
                                           f"abar_T = {float(abar[-1])}")
            self.betas, self.alphas_cumprod = betas, abar
            self.step_sigmas = torch.sqrt((1.0 - abar) / abar)  # VE noise level of each step, increasing
            log_sigmas = torch.log(self.step_sigmas)
            self._log_midpoints = 0.5 * (log_sigmas[1:] + log_sigmas[:-1])
        self._probe()

    # --- unit conversion ---------------------------------------------------------------------
    def to_teacher_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.to(torch.float32) * self.act_k + self.act_c

    def to_student_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions.to(torch.float32) - self.act_c) / self.act_k

    def to_teacher_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(torch.float32) * self.obs_k + self.obs_c

    def teacher_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.kappa

    def step_for_sigma(self, sigma_teacher: torch.Tensor) -> torch.Tensor:
        """DDPM step ``[B]`` int64 whose ``sigma_t`` is nearest to ``sigma_teacher`` in log sigma."""
        log_sigma = torch.log(torch.as_tensor(sigma_teacher, dtype=torch.float64).clamp_min(1e-12))
        return torch.bucketize(log_sigma, self._log_midpoints).to(torch.int64)

    def effective_sigma(self, sigma) -> torch.Tensor:
        """The noise level (student units) a score query at ``sigma`` is answered at (DDPM: the nearest step's)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.config.kind != "ddpm_eps":
            return sigma
        return self.step_sigmas[self.step_for_sigma(sigma * self.kappa)] / self.kappa

    # --- model calls -------------------------------------------------------------------------
    def _shapes(self, batch) -> tuple[list, list]:
        spec = self.spec
        if self.config.layout == "sequence":
            return [batch, spec.action_horizon, spec.n_joints], [batch, spec.history, spec.obs_step_dim]
        return [batch, spec.act_dim], [batch, spec.obs_dim]

    def _width_text(self) -> str:
        spec = self.spec
        frame = ", ".join(f"{f.name}[{f.size}]" for f in spec.observation_fields)
        return (f"--teacher-history {spec.history} x frame {frame}; --teacher-horizon {spec.action_horizon} x "
                f"{spec.n_joints} joints")

    def _call(self, x: torch.Tensor, obs: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """One model call in teacher units on flat ``x [B, act_dim]``, ``obs [B, obs_dim]``; output flat."""
        batch = x.shape[0]
        x_shape, obs_shape = self._shapes(batch)
        out = self.model(x.reshape(x_shape), obs.reshape(obs_shape), level)
        self.evaluations += 1
        if isinstance(out, (tuple, list)) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ExternalTeacherError("output", "one tensor", type(out).__name__, self.where)
        if list(out.shape) != x_shape:
            raise ExternalTeacherError("output shape", f"{x_shape} (as x)", list(out.shape), self.where)
        return out.to(torch.float32).reshape(batch, self.act_dim)

    def _denoise(self, x: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """EDM clean-chunk estimate in teacher units (preconditioned here for --edm-output network)."""
        if self.config.edm_output == "denoised":
            return self._call(x, obs, sigma)
        sd = self.config.sigma_data
        total = sigma ** 2 + sd ** 2
        c_skip, c_out, c_in = sd ** 2 / total, sigma * sd / torch.sqrt(total), 1.0 / torch.sqrt(total)
        network = self._call(c_in[:, None] * x, obs, torch.log(sigma) / 4.0)
        return c_skip[:, None] * x + c_out[:, None] * network

    def _probe(self) -> None:
        """Call the model once at load, so wrong widths, types or outputs fail here with one line."""
        x_shape, obs_shape = self._shapes("batch")
        level = "[batch] int64" if self.config.kind == "ddpm_eps" else "[batch] float32"
        self.model.check_inputs([("x", x_shape, self._width_text()), ("obs", obs_shape, self._width_text()),
                                 (self.config.level_name, ["batch"], level)], self.where)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(PROBE_BATCH, self.act_dim, generator=generator)
        obs = torch.randn(PROBE_BATCH, self.obs_dim, generator=generator)
        if self.config.kind == "ddpm_eps":
            level_values = torch.tensor([0, self.config.train_steps - 1], dtype=torch.int64)
        else:
            level_values = torch.tensor([0.1, 1.0], dtype=torch.float32)
        call = (f"probe call model(x {self._shapes(PROBE_BATCH)[0]} float32, obs {self._shapes(PROBE_BATCH)[1]} "
                f"float32, {self.config.level_name} [{PROBE_BATCH}] {str(level_values.dtype).replace('torch.', '')})")
        try:
            out = self._denoise(x, obs, level_values) if self.config.kind == "edm_denoiser" else \
                self._call(x, obs, level_values)
        except ExternalTeacherError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the user's model raises on wrong inputs
            raise ExternalTeacherError(call, f"an output like x (widths: {self._width_text()})", _one_line(err),
                                       self.where) from None
        if not bool(torch.all(torch.isfinite(out))):
            raise ExternalTeacherError("probe call output", "finite numbers", "NaN or inf", self.where)
        self.evaluations = 0

    # --- the teacher protocol ----------------------------------------------------------------
    def eval(self) -> ExternalTeacher:
        return self

    def score(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``grad_a log p_sigma(a | obs)`` in student units, ``[B, act_dim]``, in the dtype of ``actions``."""
        batch = actions.shape[0]
        x = self.to_teacher_actions(actions)
        obs_t = self.to_teacher_obs(obs)
        sigma_t = self.teacher_sigma(sigma).reshape(-1).expand(batch)
        with torch.no_grad():
            if self.config.kind == "ddpm_eps":
                steps = self.step_for_sigma(sigma_t)
                abar = self.alphas_cumprod[steps].to(torch.float32)[:, None]
                eps = self._call(torch.sqrt(abar) * x, obs_t, steps)
                score = -eps / self.step_sigmas[steps].to(torch.float32)[:, None]
            else:
                score = (self._denoise(x, obs_t, sigma_t) - x) / (sigma_t ** 2)[:, None]
        return (score * self.act_k).to(actions.dtype)

    @property
    def evaluations_per_sample(self) -> int:
        if self.config.kind == "ddpm_eps":
            return self.config.sample_steps or self.config.train_steps
        return self.config.sample_steps or DEFAULT_EDM_STEPS

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunks ``[B, act_dim]`` (student units) drawn with the teacher's sampler (see the module doc)."""
        obs_t = self.to_teacher_obs(obs)
        noise = torch.randn(obs.shape[0], self.act_dim, generator=generator, dtype=torch.float32)
        with torch.no_grad():
            if self.config.kind == "ddpm_eps":
                x = self._sample_ddpm(obs_t, noise, generator)
            else:
                x = self._sample_edm(obs_t, noise)
        return self.to_student_actions(x).to(obs.dtype)

    def _clean_estimate(self, x, eps, abar):
        x0 = (x - torch.sqrt(1.0 - abar) * eps) / torch.sqrt(abar)
        if self.config.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def _sample_ddpm(self, obs: torch.Tensor, x: torch.Tensor, generator) -> torch.Tensor:
        batch, n_train = x.shape[0], self.config.train_steps
        abar_all, betas = self.alphas_cumprod.to(torch.float32), self.betas.to(torch.float32)
        one = torch.ones((), dtype=torch.float32)
        if self.config.sample_steps == 0:  # ancestral: every step, the posterior's variance (diffusers' fixed_small)
            for t in range(n_train - 1, -1, -1):
                abar, abar_prev = abar_all[t], abar_all[t - 1] if t > 0 else one
                eps = self._call(x, obs, torch.full((batch,), t, dtype=torch.int64))
                x0 = self._clean_estimate(x, eps, abar)
                x = (torch.sqrt(abar_prev) * betas[t] / (1 - abar)) * x0 + \
                    (torch.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar)) * x
                if t > 0:
                    variance = betas[t] * (1 - abar_prev) / (1 - abar)
                    x = x + torch.sqrt(variance) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            return x
        ratio = n_train // self.config.sample_steps  # DDIM, eta 0, evenly spaced ("leading") steps
        for t in range(ratio * (self.config.sample_steps - 1), -1, -ratio):
            abar, abar_prev = abar_all[t], abar_all[t - ratio] if t - ratio >= 0 else one
            eps = self._call(x, obs, torch.full((batch,), t, dtype=torch.int64))
            x0 = self._clean_estimate(x, eps, abar)
            if self.config.clip_sample:
                eps = (x - torch.sqrt(abar) * x0) / torch.sqrt(1 - abar)
            x = torch.sqrt(abar_prev) * x0 + torch.sqrt(1 - abar_prev) * eps
        return x

    def _sample_edm(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        config = self.config
        sigmas = karras_sigmas(config.sigma_min, config.sigma_max, config.rho, self.evaluations_per_sample)
        batch = noise.shape[0]
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self._denoise(x, obs, sigma.expand(batch))
            x = denoised + (sigma_next / sigma) * (x - denoised)
        return x

    # --- what the student's checkpoint records ----------------------------------------------------
    def describe(self) -> dict:
        """Where the teacher came from and how it was called (plain data for the checkpoint's config)."""
        return {**self.config.to_dict(), "format": self.config.format, "sha256": file_sha256(self.config.path),
                "size_bytes": Path(self.config.path).stat().st_size, "normalization": self.normalization.source,
                "sigma_scale": self.kappa}

    def summary(self) -> str:
        """One line: the calling convention found at load."""
        config = self.config
        x_shape, obs_shape = (str(self._shapes("B")[i]).replace("'", "") for i in (0, 1))
        level = "t [B] int64" if config.kind == "ddpm_eps" else "sigma [B] float32"
        output = "eps" if config.kind == "ddpm_eps" else ("denoised" if config.edm_output == "denoised" else "F")
        if config.kind == "ddpm_eps":
            steps = f"{config.train_steps}-step {config.schedule} schedule"
            sampler = f"DDIM {config.sample_steps} steps" if config.sample_steps else "ancestral"
        else:
            steps = f"sigma_data {config.sigma_data}" if config.edm_output == "network" else "denoiser output"
            sampler = f"Euler {self.evaluations_per_sample} steps"
        return (f"{config.kind} teacher {config.path} ({config.format}): {output} = model(x {x_shape}, obs "
                f"{obs_shape}, {level}); {steps}; sampler {sampler}; student sigma x {self.kappa:.4g} = teacher sigma")

    def query_range(self, low: float, high: float) -> str:
        """What a student sigma range becomes in the teacher's noise levels (DDPM: which steps)."""
        lo, hi = self.teacher_sigma(low), self.teacher_sigma(high)
        if self.config.kind != "ddpm_eps":
            return f"query sigma [{low:g}, {high:g}] -> teacher sigma [{float(lo):.4g}, {float(hi):.4g}]"
        steps = self.step_for_sigma(torch.stack([lo, hi]))
        return f"query sigma [{low:g}, {high:g}] -> DDPM steps {int(steps[0])}..{int(steps[1])}"


def load_external_teacher(config: ExternalTeacherConfig, spec: ModelSpec) -> ExternalTeacher:
    """Validate ``config``, read the normalisation, open the file and probe it for ``spec``'s window and chunk
    (``spec``: the student's spec: history, observation fields, horizon, joints and fitted normalisation)."""
    config.validate()
    if (spec.history, spec.action_horizon) != (config.history, config.horizon):
        raise ExternalTeacherError("spec", f"history {config.history} and horizon {config.horizon} (as the teacher)",
                                   [spec.history, spec.action_horizon])
    normalization = load_teacher_normalization(config.norm, spec)
    if config.format == "onnx":
        model = _OnnxModel(config.path, torch.get_num_threads())
    else:
        model = _TorchScriptModel(config.path)
    return ExternalTeacher(model, config, spec, normalization)


class ExternalTeacherPolicy(_PolicyBase):
    """Raw observation windows -> raw action chunks sampled from an :class:`ExternalTeacher` (for
    ``tasks.*.rollout``), like ``pipeline.TeacherPolicy`` for a vdd_ros teacher."""

    def __init__(self, teacher: ExternalTeacher, seed: int = 0, frame_fields=None):
        super().__init__(teacher, teacher.spec, seed, frame_fields)
        self.evaluations_per_action = teacher.evaluations_per_sample

    def normalised_actions(self, obs: torch.Tensor) -> torch.Tensor:
        return self.model.sample(obs, generator=self.generator)
