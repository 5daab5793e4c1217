"""Export trained models to self-contained ONNX files that the torch-free runtime runs.

Three graph roles (inputs and outputs are listed in ``vdd_ros.runtime.format``):

- ``student``: a mixture of experts (VDD or EM). Raw observation window in, raw action chunk
  out; the graph normalises with the spec's statistics, picks an expert by the inverse CDF of
  the gating (or its argmax, or a forced index) and adds ``noise_scale * L_z @ noise``. An
  ONNX ``If`` skips the Cholesky head entirely when every ``noise_scale`` is 0, so the usual
  mean-of-expert policy pays only for the gating and the means.
- ``teacher_sampler``: the diffusion teacher's deterministic Euler sampler with all N
  denoiser calls unrolled into one graph (initial noise is an input).
- ``teacher_denoiser``: one denoiser call ``D(x; obs, sigma)`` in normalised action units,
  for callers that run their own sampling loop.

Every file is checked before it is written: ``onnx.checker`` (full check), onnxruntime vs
torch parity on random inputs (student actions within ``STUDENT_TOLERANCE`` and identical
expert indices; teacher within ``TEACHER_TOLERANCE``), and the runtime's own loader. Only
then is the file moved into place (temporary name in the same folder + ``os.replace``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from vdd_ros.files import new_file_mode
from vdd_ros.runtime.format import (EXPORT_FORMAT_VERSION, GRAPH_INPUTS, GRAPH_OUTPUTS, META_FORMAT, META_ROLE,
                                    META_SPEC, OPSET, ROLE_MODEL_KINDS, ROLE_STUDENT, ROLE_TEACHER_DENOISER,
                                    ROLE_TEACHER_SAMPLER)
from vdd_ros.runtime.session import open_model
from vdd_ros.spec import ModelSpec

# parity tolerances on |onnxruntime - torch| / max(1, |torch|): absolute for values within unit
# scale, relative beyond (float32 rounding grows with magnitude)
STUDENT_TOLERANCE = 1e-5  # raw student actions, gating and expert means
TEACHER_TOLERANCE = 1e-4  # raw teacher actions (N chained denoiser calls)
PARITY_BATCH = 64
# IR version 8 is the oldest that carries opset 18: files load in onnxruntime >= 1.14
IR_VERSION = 8


class ExportError(ValueError):
    """The export failed a check; nothing was written."""


@dataclass
class ExportReport:
    path: Path
    role: str
    max_error: float  # max |onnxruntime - torch| / max(1, |torch|) over every output (see tolerances)
    tolerance: float
    experts_identical: bool | None  # student only
    nodes: int
    size_bytes: int
    seconds: float

    def summary(self) -> str:
        experts = "" if self.experts_identical is None else ", expert indices identical"
        return (f"{self.path} ({self.role}, {self.nodes} nodes, {self.size_bytes / 1024:.0f} KiB): parity "
                f"|ort - torch| / max(1, |torch|) = {self.max_error:.1e} <= {self.tolerance:.0e}{experts}")


# --- graphs ---------------------------------------------------------------------------
class _Normaliser(nn.Module):
    """The spec's affine normalisation as constant buffers of the exported graph."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        norm = spec.normalization
        for name in ("obs_mean", "obs_std", "act_mean", "act_std"):
            self.register_buffer(name, torch.tensor(getattr(norm, name), dtype=torch.float32))
        self.obs_dim = spec.obs_dim
        self.chunk = (spec.action_horizon, spec.n_joints)

    def observations(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw windows ``[B, T, D]`` -> normalised flat ``[B, T*D]``."""
        return ((obs - self.obs_mean) / self.obs_std).reshape(obs.shape[0], self.obs_dim)

    def actions(self, flat: torch.Tensor) -> torch.Tensor:
        """Normalised flat chunks ``[B, ..., H*J]`` -> raw ``[B, ..., H, J]``."""
        return flat.reshape(*flat.shape[:-1], *self.chunk) * self.act_std + self.act_mean


def choose_experts(weights: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
                   forced_expert: torch.Tensor) -> torch.Tensor:
    """Expert index ``[B]``: forced if >= 0, else argmax if greedy, else the inverse CDF at ``uniform``."""
    n_experts = weights.shape[-1]
    cdf = torch.cumsum(weights, -1)
    # number of CDF steps at or below u; the clamp absorbs a last CDF entry rounded below 1
    sampled = (cdf <= uniform.unsqueeze(-1)).sum(-1).clamp(max=n_experts - 1)
    chosen = torch.where(greedy, torch.argmax(weights, -1), sampled)
    return torch.where(forced_expert >= 0, forced_expert, chosen)


class StudentGraph(nn.Module):
    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.normaliser = _Normaliser(spec)
        self.act_dim = spec.act_dim

    def _with_noise(self, obs, uniform, eps, noise_scale, greedy, forced_expert):
        weights, means, chol = self.model.components(obs)
        chosen = choose_experts(weights, uniform, greedy, forced_expert)
        rows = torch.arange(obs.shape[0])
        offset = (chol[rows, chosen] @ eps.unsqueeze(-1)).squeeze(-1)
        return weights, means, chosen, means[rows, chosen] + noise_scale.unsqueeze(-1) * offset

    def _mean_only(self, obs, uniform, eps, noise_scale, greedy, forced_expert):
        # torch.cond hands both branches the same operands; this one ignores the noise
        weights, means = self.model.weights_and_means(obs)
        chosen = choose_experts(weights, uniform, greedy, forced_expert)
        return weights, means, chosen, means[torch.arange(obs.shape[0]), chosen]

    def forward(self, obs, uniform, noise, noise_scale, greedy, forced_expert):
        flat_obs = self.normaliser.observations(obs)
        eps = noise.reshape(obs.shape[0], self.act_dim)
        operands = (flat_obs, uniform, eps, noise_scale, greedy, forced_expert)
        weights, means, chosen, actions = torch.cond((noise_scale != 0).any(), self._with_noise, self._mean_only,
                                                     operands)
        return self.normaliser.actions(actions), chosen, weights, self.normaliser.actions(means)


class TeacherSamplerGraph(nn.Module):
    def __init__(self, model: nn.Module, spec: ModelSpec, n_steps: int):
        super().__init__()
        self.model = model
        self.normaliser = _Normaliser(spec)
        self.n_steps = n_steps
        self.act_dim = spec.act_dim

    def forward(self, obs, noise):
        flat_obs = self.normaliser.observations(obs)
        start = noise.reshape(obs.shape[0], self.act_dim)
        # the teacher's own sampler, traced: its Python loop becomes N unrolled denoiser calls
        actions = self.model.sample(flat_obs, n_steps=self.n_steps, sampler="euler", noise=start)
        return self.normaliser.actions(actions)


class TeacherDenoiserGraph(nn.Module):
    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.normaliser = _Normaliser(spec)
        self.act_dim = spec.act_dim
        self.chunk = (spec.action_horizon, spec.n_joints)

    def forward(self, x, obs, sigma):
        flat_obs = self.normaliser.observations(obs)
        denoised = self.model.denoise(x.reshape(obs.shape[0], self.act_dim), flat_obs, sigma)
        return denoised.reshape(obs.shape[0], *self.chunk)


# --- example inputs (also the parity inputs) -------------------------------------------
def _raw_observations(spec: ModelSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Windows spread like the training data: mean + std * N(0, 1) per entry."""
    norm = spec.normalization
    mean = torch.tensor(norm.obs_mean, dtype=torch.float32)
    std = torch.tensor(norm.obs_std, dtype=torch.float32)
    return mean + std * torch.randn(batch, spec.history, spec.obs_step_dim, generator=generator)


def _example_inputs(role: str, spec: ModelSpec, batch: int, generator: torch.Generator, n_experts: int = 0,
                    noisy: bool = True) -> tuple[torch.Tensor, ...]:
    obs = _raw_observations(spec, batch, generator)
    chunk = (batch, spec.action_horizon, spec.n_joints)
    if role == ROLE_STUDENT:
        uniform = torch.rand(batch, generator=generator)
        noise = torch.randn(*chunk, generator=generator)
        noise_scale = torch.rand(batch, generator=generator) * 2.0 if noisy else torch.zeros(batch)
        greedy = torch.arange(batch) % 3 == 1
        # every third row forces an expert, cycling through all of them
        forced = torch.where(torch.arange(batch) % 3 == 2, torch.arange(batch) % n_experts, -1)
        return obs, uniform, noise, noise_scale, greedy, forced
    if role == ROLE_TEACHER_SAMPLER:
        return obs, torch.randn(*chunk, generator=generator)
    sigma = torch.exp(torch.empty(batch).uniform_(np.log(0.01), np.log(5.0), generator=generator))
    return torch.randn(*chunk, generator=generator), obs, sigma


# --- export pipeline ------------------------------------------------------------------------
def _config_info(config: dict | None) -> dict:
    """What the spec carries about the training run: its hash, and how many actions of a chunk
    it executed before re-planning (the node's default ``replan_every``)."""
    info = {"config_sha256": config_hash(config)}
    execute_steps = (config or {}).get("execute_steps")
    if isinstance(execute_steps, int) and not isinstance(execute_steps, bool) and execute_steps >= 1:
        info["execute_steps"] = execute_steps
    return info


def config_hash(config: dict | None) -> str:
    """sha256 of the training config (sorted JSON); ties an exported file to its training run."""
    text = json.dumps(config or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _trace(graph: nn.Module, role: str, example: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} for _ in example)
    # the exporter's progress lines, INFO logs and deprecation notes are not the user's business
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, example, input_names=list(GRAPH_INPUTS[role]),
                                        output_names=list(GRAPH_OUTPUTS[role]), dynamic_shapes=dynamic_shapes,
                                        opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return program.model_proto


def _stamp(proto: onnx.ModelProto, role: str, spec: ModelSpec) -> None:
    proto.ir_version = IR_VERSION
    proto.producer_name = "vdd_ros"
    proto.doc_string = f"vdd_ros {role} graph (export format {EXPORT_FORMAT_VERSION}, opset {OPSET})"
    del proto.metadata_props[:]
    for key, value in ((META_SPEC, spec.to_json()), (META_ROLE, role), (META_FORMAT, str(EXPORT_FORMAT_VERSION))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _parity(graph: nn.Module, role: str, blob: bytes, spec: ModelSpec, n_experts: int) -> tuple[float, bool | None]:
    """Max |onnxruntime - torch| / max(1, |torch|) over parity batches (and whether expert indices agree)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(blob, sess_options=options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1234)
    # the student runs twice: noise_scale all 0 takes the mean-only branch of the If
    cases = [True, False] if role == ROLE_STUDENT else [True]
    worst, experts_identical = 0.0, (True if role == ROLE_STUDENT else None)
    for noisy in cases:
        for batch in (PARITY_BATCH, 1):
            example = _example_inputs(role, spec, batch, generator, n_experts, noisy)
            with torch.no_grad():
                expected = graph(*example)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(None, {name: t.numpy() for name, t in zip(GRAPH_INPUTS[role], example)})
            for name, want, have in zip(GRAPH_OUTPUTS[role], expected, got):
                want = want.numpy()
                if want.shape != have.shape:
                    raise ExportError(f"parity: output '{name}' has shape {have.shape} in onnxruntime, "
                                      f"{want.shape} in torch")
                if name == "expert":
                    experts_identical = experts_identical and bool(np.array_equal(want, have))
                else:
                    want = want.astype(np.float64)
                    worst = max(worst, float(np.max(np.abs(want - have) / np.maximum(1.0, np.abs(want)))))
    return worst, experts_identical


def export_graph(graph: nn.Module, role: str, spec: ModelSpec, out_path, model_info: dict,
                 n_experts: int = 0) -> ExportReport:
    """Trace ``graph``, stamp metadata, check everything, then write ``out_path`` atomically."""
    started = time.perf_counter()
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ExportError(f"output file: expected a name ending in .onnx, got {str(out_path)!r}")
    if spec.model_kind not in ROLE_MODEL_KINDS[role]:
        raise ExportError(f"spec.model_kind: a {role} graph holds one of {list(ROLE_MODEL_KINDS[role])}, "
                          f"got {spec.model_kind!r}")
    spec = spec.replace(model_info={**spec.model_info, **model_info, "graph_role": role, "opset": OPSET,
                                    "export_format_version": EXPORT_FORMAT_VERSION})
    graph = graph.eval()
    example = _example_inputs(role, spec, 2, torch.Generator().manual_seed(0), n_experts)
    proto = _trace(graph, role, example)
    _stamp(proto, role, spec)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected the {role} graph: {str(err).splitlines()[0]}") from None
    blob = proto.SerializeToString()
    tolerance = STUDENT_TOLERANCE if role == ROLE_STUDENT else TEACHER_TOLERANCE
    error, experts_identical = _parity(graph, role, blob, spec, n_experts)
    if not error <= tolerance or experts_identical is False:
        raise ExportError(f"parity check failed for the {role} graph: max |onnxruntime - torch| / max(1, |torch|) "
                          f"= {error:.3e} "
                          f"(tolerance {tolerance:.0e}), expert indices identical: {experts_identical}; "
                          f"{out_path} was not written")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".onnx", dir=out_path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(blob)
        os.chmod(tmp_name, new_file_mode())  # mkstemp makes 0600; a shipped model must be readable by all
        open_model(tmp_name, device="cpu")  # the runtime's own loader must accept it
        os.replace(tmp_name, out_path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return ExportReport(path=out_path, role=role, max_error=error, tolerance=tolerance,
                        experts_identical=experts_identical, nodes=len(proto.graph.node), size_bytes=len(blob),
                        seconds=time.perf_counter() - started)


def export_student(model: nn.Module, spec: ModelSpec, out_path, config: dict | None = None) -> ExportReport:
    """Export a MixtureOfExpertsPolicy (``spec.model_kind`` vdd_mixture or em_mixture)."""
    n_experts = int(model.n_experts)
    # a distilled student's spec may carry its teacher's sampling settings; in the student's file
    # they are named as the teacher's, so "n_steps" never suggests the student iterates
    inherited = dict(spec.model_info)
    for key in ("n_steps", "sampler"):
        if key in inherited:
            inherited[f"teacher_{key}"] = inherited.pop(key)
    spec = spec.replace(model_info=inherited)
    info = {"n_experts": n_experts, "covariance": getattr(model, "covariance", "full"), **_config_info(config)}
    return export_graph(StudentGraph(model, spec), ROLE_STUDENT, spec, out_path, info, n_experts)


def _teacher_info(model: nn.Module, config: dict | None) -> dict:
    return {"trained_n_steps": int(model.n_steps), "sigma_min": float(model.sigma_min),
            "sigma_max": float(model.sigma_max), "rho": float(model.rho), "sigma_data": float(model.sigma_data),
            **_config_info(config)}


def export_teacher_sampler(model: nn.Module, spec: ModelSpec, out_path, n_steps: int | None = None,
                           config: dict | None = None) -> ExportReport:
    """Export the teacher's N-step Euler sampler as one graph (N defaults to the teacher's own)."""
    n_steps = int(model.n_steps) if n_steps is None else n_steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ExportError(f"steps: expected an integer >= 1, got {n_steps!r}")
    info = {**_teacher_info(model, config), "n_steps": n_steps, "sampler": "euler"}
    return export_graph(TeacherSamplerGraph(model, spec, n_steps), ROLE_TEACHER_SAMPLER, spec, out_path, info)


def export_teacher_denoiser(model: nn.Module, spec: ModelSpec, out_path, config: dict | None = None
                            ) -> ExportReport:
    """Export one denoiser call: ``x`` (normalised) + raw ``obs`` + ``sigma`` -> normalised estimate."""
    info = {**_teacher_info(model, config), "n_steps": 1}
    return export_graph(TeacherDenoiserGraph(model, spec), ROLE_TEACHER_DENOISER, spec, out_path, info)


def export_checkpoint(checkpoint_path, out_path, n_steps: int | None = None,
                      denoiser_path=None) -> list[ExportReport]:
    """Export a checkpoint file: a student to ``out_path``; a teacher's sampler to ``out_path``
    and, when ``denoiser_path`` is given, its single-step denoiser there."""
    from vdd_ros.learn.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    spec, model = checkpoint.spec.replace(model_kind=checkpoint.kind), checkpoint.model.eval()
    if checkpoint.kind == "diffusion_teacher":
        reports = [export_teacher_sampler(model, spec, out_path, n_steps, checkpoint.config)]
        if denoiser_path is not None:
            reports.append(export_teacher_denoiser(model, spec, denoiser_path, checkpoint.config))
        return reports
    if n_steps is not None:
        raise ExportError(f"steps: a {checkpoint.kind} student takes one network evaluation; --steps applies to "
                          f"a diffusion_teacher checkpoint only")
    if denoiser_path is not None:
        raise ExportError(f"denoiser output: only a diffusion_teacher checkpoint has a denoiser, "
                          f"{checkpoint_path} holds a {checkpoint.kind}")
    return [export_student(model, spec, out_path, checkpoint.config)]
