"""Export trained models to self-contained ONNX files that the torch-free runtime runs.

Three graph roles (inputs and outputs are listed in ``vdd_ros.runtime.format``):

- ``student``: a mixture of experts (VDD or EM). Raw observation window in, raw action chunk
  out; the graph normalises with the spec's statistics, picks an expert by the inverse CDF of
  the gating (or its argmax, or a forced index) and adds ``noise_scale * L_z @ noise``. What is
  exported is :class:`FastStudentGraph`: normalisation folded into the first and last layers,
  a vectorisable Mish, and an ONNX ``If`` that skips the noise offset (the chosen expert's
  Cholesky rows) when every ``noise_scale`` is 0, so the usual mean-of-expert policy pays only
  for the backbone, the gating and the means. Its parity reference is the plain
  :class:`StudentGraph`.
- ``teacher_sampler``: the diffusion teacher's deterministic Euler sampler with all N
  denoiser calls unrolled into one graph (initial noise is an input).
- ``teacher_denoiser``: one denoiser call ``D(x; obs, sigma)`` in normalised action units,
  for callers that run their own sampling loop.

Every file is checked before it is written: ``onnx.checker`` (full check), onnxruntime vs
torch parity on random inputs (student actions within ``STUDENT_TOLERANCE`` and identical
expert indices; teacher within ``TEACHER_TOLERANCE``), and the runtime's own loader. Only
then is the file moved into place (``vdd_ros.files.atomic_path``).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
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
from torch.nn import functional as F  # noqa: N812 - the usual torch alias

from vdd_ros.files import atomic_path
from vdd_ros.learn.backbones import MLPBackbone
from vdd_ros.learn.moe import NormalisedFeatures
from vdd_ros.runtime.format import (
    EXPORT_FORMAT_VERSION,
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    META_FORMAT,
    META_ROLE,
    META_SPEC,
    OPSET,
    ROLE_MODEL_KINDS,
    ROLE_STUDENT,
    ROLE_TEACHER_DENOISER,
    ROLE_TEACHER_SAMPLER,
)
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
    """The student as VDD defines it, written plainly: the torch reference of the parity check.

    :class:`FastStudentGraph` (what is exported) must reproduce its outputs within
    ``STUDENT_TOLERANCE`` and its expert indices exactly.
    """

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
        weights, means = self.model.weights_and_means(obs)
        chosen = choose_experts(weights, uniform, greedy, forced_expert)
        return weights, means, chosen, means[torch.arange(obs.shape[0]), chosen]

    def forward(self, obs, uniform, noise, noise_scale, greedy, forced_expert):
        flat_obs = self.normaliser.observations(obs)
        eps = noise.reshape(obs.shape[0], self.act_dim)
        args = (flat_obs, uniform, eps, noise_scale, greedy, forced_expert)
        branch = self._with_noise if bool((noise_scale != 0).any()) else self._mean_only
        weights, means, chosen, actions = branch(*args)
        return self.normaliser.actions(actions), chosen, weights, self.normaliser.actions(means)


def fast_mish(x: torch.Tensor) -> torch.Tensor:
    """``x * tanh(softplus(x))`` as ``x / (1 + 2 / n)`` with ``n = e^x (e^x + 2)``.

    The same function (tanh(log p) = (p^2 - 1) / (p^2 + 1) with p = 1 + e^x) in 6 ops that
    onnxruntime vectorises (Exp, Add, Mul, Div); its Mish kernel expands to Softplus, Tanh and Mul
    with a scalar Softplus, 1.5x slower per call. No cancellation anywhere, and no NaN: e^x = inf
    gives x, e^x = 0 gives 0. Max error against float64 mish: 1.3e-7 (onnxruntime's Mish: 2.4e-7).
    """
    e = torch.exp(x)
    two = torch.tensor(2.0, dtype=x.dtype)  # a tensor numerator exports as one Div, not Reciprocal and Mul
    return x / (1.0 + two / (e * (e + 2.0)))


def choose_experts_fast(weights: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
                        forced_expert: torch.Tensor) -> torch.Tensor:
    """:func:`choose_experts` in fewer ONNX nodes, with identical results.

    The inverse CDF is the first CDF entry above ``u``; the last weight is replaced by +inf, so
    such an entry always exists and the clamp to ``Z - 1`` is implicit. The other entries of the
    cumulative sum are the same floats (a prefix sum does not read later entries), and a float
    cumulative sum of weights >= 0 never decreases, so "first entry > u" is "number of entries <= u".
    """
    last = torch.zeros(weights.shape[-1], dtype=weights.dtype)
    last[-1] = float("inf")
    cdf = torch.cumsum(weights + last, -1)
    # a float count, not an ArgMax over integers: onnxruntime's CUDA provider has no integer ArgMax and
    # ran that node on the CPU, with a device-to-host copy and back in every call (measured on an H200)
    sampled = (cdf <= uniform.unsqueeze(-1)).to(weights.dtype).sum(-1).to(torch.int64)
    chosen = torch.where(greedy, torch.argmax(weights, -1), sampled)
    return torch.where(forced_expert >= 0, forced_expert, chosen)


class FastMish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_mish(x)


def with_fast_mish(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Mish layers run :func:`fast_mish`: the teacher's graphs get the same
    activation kernel as the student's, so the latency ratio compares equally optimised networks."""
    fast = copy.deepcopy(model)
    for parent in fast.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Mish):
                setattr(parent, name, FastMish())
    return fast


class FastStudentGraph(nn.Module):
    """The exported student: the same function as :class:`StudentGraph` with fewer, cheaper nodes.

    - the observation normalisation is folded into the first Linear of an MLP backbone (and of an
      own-MLP gating), the features' 1/sqrt(width) into the heads, and the action de-normalisation
      into the mean head (computed in float64, stored as float32), so no normalisation node runs;
    - Mish is :func:`fast_mish`;
    - the expert is chosen by :func:`choose_experts_fast` and its mean picked from the flat means
      with one GatherElements; only the noise offset sits in an ONNX
      ``If`` (``noise_scale`` all 0: skipped), and it reads the chosen expert's rows of the
      Cholesky heads only (``[A, F]`` per state instead of every expert's ``[Z*A, F]``).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        norm = spec.normalization
        history, horizon = spec.history, spec.action_horizon
        n_experts, act_dim = int(model.n_experts), int(model.act_dim)
        self.model = model
        self.normaliser = _Normaliser(spec)
        self.n_experts, self.act_dim, self.obs_dim, self.chunk = n_experts, act_dim, spec.obs_dim, self.normaliser.chunk
        self.min_std = float(model.min_std)
        obs_mean = torch.tensor(norm.obs_mean, dtype=torch.float64).repeat(history)  # per flat [T*D] entry
        obs_std = torch.tensor(norm.obs_std, dtype=torch.float64).repeat(history)
        act_mean = torch.tensor(norm.act_mean, dtype=torch.float64).repeat(horizon)  # per flat [H*J] entry
        act_std = torch.tensor(norm.act_std, dtype=torch.float64).repeat(horizon)
        backbone = model.backbone
        # an MLP backbone reading the window alone runs here, its first Linear taking raw observations
        self.folded_backbone = isinstance(backbone, MLPBackbone) and backbone.extra_dim == 0 and all(
            isinstance(m, _MLP_MODULES) for m in backbone.net) and isinstance(backbone.net[0], nn.Linear)

        def fold_observation_normalisation(mlp: nn.Sequential) -> nn.ModuleList:
            first = mlp[0]
            weight = first.weight.double() / obs_std
            return nn.ModuleList([_linear(weight, first.bias.double() - weight @ obs_mean)] + list(mlp[1:]))

        self.layers = fold_observation_normalisation(backbone.net) if self.folded_backbone else nn.ModuleList()
        width = model.feature_norm.width
        scale = 1.0 / float(width) ** 0.5  # NormalisedFeatures' 1/sqrt(width), folded into every head
        mean_w = model.mean_head.weight.double().reshape(n_experts, act_dim, width) * (act_std[:, None] * scale)
        mean_b = model.mean_head.bias.double().reshape(n_experts, act_dim) * act_std + act_mean
        self.mean_head = _linear(mean_w.reshape(n_experts * act_dim, width), mean_b.reshape(-1))
        self.own_gating = model.gating == "own_mlp"
        self.head_gating = model.gating == "detached_mlp"
        if model.gating == "detached_features":
            gate = model.gating_net[-1]
            self.gating_head = _linear(gate.weight.double() * scale, gate.bias.double())
        gating_parts = list(model.gating_net)
        gating_mlp = len(gating_parts) == 3 and isinstance(gating_parts[0], nn.Sequential) \
            and all(isinstance(m, _MLP_MODULES) for m in gating_parts[0]) \
            and isinstance(gating_parts[0][0], nn.Linear) and isinstance(gating_parts[1], NormalisedFeatures)
        # an own gating MLP (Linear/activation layers, normalised features, Linear) runs on raw observations too
        self.folded_gating = self.own_gating and gating_mlp
        if self.folded_gating:
            mlp, features, gate = gating_parts
            self.gating_layers = fold_observation_normalisation(mlp)
            self.gating_head = _linear(gate.weight.double() / float(features.width) ** 0.5, gate.bias.double())
        if self.head_gating:  # a gating MLP head reads the layer-normalised features as they are here
            if not gating_mlp:
                raise ExportError("student gating 'detached_mlp': expected an MLP, normalised features and a "
                                  f"Linear, got {[type(m).__name__ for m in gating_parts]}")
            mlp, features, gate = gating_parts
            self.gating_layers = nn.ModuleList(list(mlp))
            self.gating_head = _linear(gate.weight.double() / float(features.width) ** 0.5, gate.bias.double())
        # per-expert Cholesky head rows [Z, rows, F], gathered for the chosen expert only
        self.register_buffer("std_w", (model.std_head.weight.double() * scale).reshape(n_experts, act_dim, width)
                             .float())
        self.register_buffer("std_b", model.std_head.bias.detach().reshape(n_experts, act_dim).float().clone())
        off = model.off_diagonal_head
        self.full = off is not None
        if self.full:
            n_off = off.out_features // n_experts
            self.register_buffer("off_w", (off.weight.double() * scale).reshape(n_experts, n_off, width).float())
            self.register_buffer("off_b", off.bias.detach().reshape(n_experts, n_off).float().clone())
            self.register_buffer("tril_index", model.tril_index.clone())
        self.register_buffer("act_std", act_std.float())
        # row z: the flat indices z*A + [0, A) of expert z's mean
        self.register_buffer("expert_entries", torch.arange(n_experts * act_dim).reshape(n_experts, act_dim))

    def _run_folded(self, layers: nn.ModuleList, obs: torch.Tensor) -> torch.Tensor:
        """A folded MLP on raw observations, layer-normalised (without the 1/sqrt(width) the heads hold)."""
        return _run_mlp(layers, obs.reshape(obs.shape[0], self.obs_dim))

    def _features(self, obs: torch.Tensor, flat_normalised: torch.Tensor | None) -> torch.Tensor:
        """Layer-normalised backbone features (without the 1/sqrt(width), which the heads hold)."""
        if self.folded_backbone:
            return self._run_folded(self.layers, obs)
        h = self.model.backbone(flat_normalised)
        return F.layer_norm(h, (h.shape[-1],))

    def _gating_logits(self, obs: torch.Tensor, feats: torch.Tensor, flat_normalised: torch.Tensor | None):
        if self.head_gating:
            return self.gating_head(_run_mlp(self.gating_layers, feats))
        if not self.own_gating:
            return self.gating_head(feats)
        if self.folded_gating:
            return self.gating_head(self._run_folded(self.gating_layers, obs))
        return self.model.gating_net(flat_normalised)

    def _noisy(self, feats, chosen, actions, noise, noise_scale):
        eps = noise.reshape(noise.shape[0], self.act_dim)
        std = F.softplus((self.std_w[chosen] @ feats.unsqueeze(-1)).squeeze(-1) + self.std_b[chosen]) + self.min_std
        if self.full:
            off = (self.off_w[chosen] @ feats.unsqueeze(-1)).squeeze(-1) + self.off_b[chosen]
            entries = torch.cat([torch.zeros_like(std[:, :1]), std, off], dim=-1)
            chol = entries[:, self.tril_index].reshape(-1, self.act_dim, self.act_dim)
            offset = (chol @ eps.unsqueeze(-1)).squeeze(-1)
        else:
            offset = std * eps
        return actions + noise_scale.unsqueeze(-1) * (offset * self.act_std)

    @staticmethod
    def _mean(feats, chosen, actions, noise, noise_scale):
        return actions.clone()  # torch.cond hands both branches the same operands; this one ignores the noise

    def forward(self, obs, uniform, noise, noise_scale, greedy, forced_expert):
        batch = obs.shape[0]
        needs_normalised = not self.folded_backbone or (self.own_gating and not self.folded_gating)
        flat_normalised = self.normaliser.observations(obs) if needs_normalised else None
        feats = self._features(obs, flat_normalised)
        logits = self._gating_logits(obs, feats, flat_normalised)
        weights = torch.softmax(logits, -1)
        flat_means = self.mean_head(feats)  # [B, Z*A], raw units
        chosen = choose_experts_fast(weights, uniform, greedy, forced_expert)
        actions = torch.gather(flat_means, 1, self.expert_entries[chosen])  # the chosen expert's mean
        # (sum |noise_scale|) as bool: nonzero, inf or NaN exactly when (noise_scale != 0).any() is True
        any_noise = noise_scale.abs().sum().bool()
        actions = torch.cond(any_noise, self._noisy, self._mean, (feats, chosen, actions, noise, noise_scale))
        return (actions.reshape(batch, *self.chunk), chosen, weights,
                flat_means.reshape(batch, self.n_experts, *self.chunk))


_MLP_MODULES = (nn.Linear, nn.Mish, nn.ReLU, nn.SiLU)  # what build_mlp makes


def _run_mlp(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """Linear/activation layers (Mish as :func:`fast_mish`), then a layer norm without affine parameters."""
    for module in layers:
        h = fast_mish(h) if isinstance(module, nn.Mish) else module(h)
    return F.layer_norm(h, (h.shape[-1],))


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A float32 Linear holding ``weight`` and ``bias`` (folded in float64)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        layer.bias.copy_(bias.float())
    return layer.requires_grad_(False)


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
        actions = self.model.sample(flat_obs, n_steps=self.n_steps, noise=start)
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
                 n_experts: int = 0, reference: nn.Module | None = None) -> ExportReport:
    """Trace ``graph``, stamp metadata, check everything, then write ``out_path`` atomically.

    The parity check compares onnxruntime with ``reference`` (default: ``graph`` itself) in torch.
    """
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
    error, experts_identical = _parity(graph if reference is None else reference.eval(), role, blob, spec, n_experts)
    if not error <= tolerance or experts_identical is False:
        raise ExportError(f"parity check failed for the {role} graph: max |onnxruntime - torch| / max(1, |torch|) "
                          f"= {error:.3e} "
                          f"(tolerance {tolerance:.0e}), expert indices identical: {experts_identical}; "
                          f"{out_path} was not written")
    with atomic_path(out_path) as tmp_name:
        with open(tmp_name, "wb") as tmp:
            tmp.write(blob)
        open_model(tmp_name, device="cpu")  # the runtime's own loader must accept it before it is moved in
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
    return export_graph(FastStudentGraph(model, spec), ROLE_STUDENT, spec, out_path, info, n_experts,
                        reference=StudentGraph(model, spec))


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
    return export_graph(TeacherSamplerGraph(with_fast_mish(model), spec, n_steps), ROLE_TEACHER_SAMPLER, spec,
                        out_path, info, reference=TeacherSamplerGraph(model, spec, n_steps))


def export_teacher_denoiser(model: nn.Module, spec: ModelSpec, out_path, config: dict | None = None
                            ) -> ExportReport:
    """Export one denoiser call: ``x`` (normalised) + raw ``obs`` + ``sigma`` -> normalised estimate."""
    info = {**_teacher_info(model, config), "n_steps": 1}
    return export_graph(TeacherDenoiserGraph(with_fast_mish(model), spec), ROLE_TEACHER_DENOISER, spec, out_path,
                        info, reference=TeacherDenoiserGraph(model, spec))


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
