"""The diffusion-policy teacher: an EDM/BESO-style score-based model of action chunks.

The denoiser ``D(x; obs, sigma)`` maps a noisy normalised action chunk ``x`` at noise level
``sigma`` to an estimate of the clean chunk, with the Karras et al. (EDM) preconditioning

    D = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma); obs)

    c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma * sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4          (sd = sigma_data)

so the network ``F`` always sees unit-scale inputs and targets. Training is denoising score
matching with ``ln sigma ~ N(P_mean, P_std^2)`` and the EDM weight ``1 / c_out^2``; sampling
integrates the probability-flow ODE (deterministic Euler) or its ancestral SDE counterpart
on the Karras sigma schedule. The score ``(D - x) / sigma^2`` is what VDD distils.

Everything is in normalised units: ``obs`` is the flattened window ``[B, history*obs_step_dim]``
and actions are flattened chunks ``[B, horizon*n_joints]``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, asdict, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from vdd_ros.learn.backbones import BackboneConfig, build_backbone

SAMPLERS = ("euler", "ancestral")


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal features of ``c_noise`` (fixed frequencies: a constant buffer, export friendly)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"noise_embed_dim: expected an even integer >= 2, got {dim!r}")
        half = dim // 2
        # c_noise spans about [-1.6, 0.6] for sigma in [0.002, 10]: slow frequencies keep the features
        # smooth in sigma, so the denoiser interpolates between the noise levels it was trained on
        frequencies = torch.exp(torch.linspace(math.log(0.5), math.log(16.0), half))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.unsqueeze(-1) * self.frequencies
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class DiffusionTeacher(nn.Module):
    """Score-based diffusion policy over flattened normalised action chunks.

    Constructor arguments are plain values (kept in ``init_kwargs``) so a checkpoint can
    rebuild the module. ``obs_dim`` / ``act_dim`` make it a teacher for VDD (see
    ``vdd_ros.learn.teacher_protocol``).
    """

    def __init__(self, obs_step_dim: int, history: int, act_dim: int, backbone: dict | None = None,
                 noise_embed_dim: int = 16, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 10.0, rho: float = 7.0, n_steps: int = 8, sampler: str = "euler",
                 action_reference: dict | None = None):
        super().__init__()
        backbone_config = BackboneConfig.from_dict(dict(backbone or {}))
        self.init_kwargs = dict(obs_step_dim=obs_step_dim, history=history, act_dim=act_dim,
                                backbone=backbone_config.to_dict(), noise_embed_dim=noise_embed_dim,
                                sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                n_steps=n_steps, sampler=sampler, action_reference=action_reference)
        _check_sampling(sigma_min, sigma_max, rho, n_steps, sampler, sigma_data)
        self.obs_step_dim = obs_step_dim
        self.history = history
        self.obs_dim = obs_step_dim * history
        self.act_dim = act_dim
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)
        self.n_steps = int(n_steps)
        self.sampler = sampler
        self.noise_embedding = NoiseLevelEmbedding(noise_embed_dim)
        self.backbone = build_backbone(backbone_config, obs_step_dim, history, extra_dim=act_dim + noise_embed_dim)
        self.head = nn.Linear(self.backbone.out_dim, act_dim)
        self._set_action_reference(action_reference)

    def _set_action_reference(self, reference: dict | None) -> None:
        """Constants that map the last observation frame to a reference chunk in normalised action units.

        ``reference`` = {obs_index: [J] positions in a frame, obs_mean/obs_std: their normalisation,
        act_mean/act_std: the actions' normalisation}. The diffusion then runs on the offset of the chunk
        from the current joint positions, which is small, so the network needs far less precision.
        """
        self.uses_reference = reference is not None
        if reference is None:
            return
        index = [int(i) for i in reference["obs_index"]]
        n_joints = len(index)
        if n_joints < 1 or self.act_dim % n_joints or any(not 0 <= i < self.obs_step_dim for i in index):
            raise ValueError(f"action_reference.obs_index: expected {self.act_dim}/horizon indices in "
                             f"[0, {self.obs_step_dim}), got {index}")
        for key in ("obs_mean", "obs_std", "act_mean", "act_std"):
            if len(reference[key]) != n_joints:
                raise ValueError(f"action_reference.{key}: expected {n_joints} numbers, got {len(reference[key])}")
        last_frame = (self.history - 1) * self.obs_step_dim
        self.register_buffer("reference_index", torch.tensor(index) + last_frame, persistent=False)
        # raw q = obs_norm * obs_std + obs_mean; reference = (q - act_mean) / act_std = obs_norm * scale + shift
        obs_mean, obs_std = torch.tensor(reference["obs_mean"]), torch.tensor(reference["obs_std"])
        act_mean, act_std = torch.tensor(reference["act_mean"]), torch.tensor(reference["act_std"])
        self.register_buffer("reference_scale", (obs_std / act_std).float(), persistent=False)
        self.register_buffer("reference_shift", ((obs_mean - act_mean) / act_std).float(), persistent=False)
        self.reference_repeats = self.act_dim // n_joints

    def reference(self, obs: torch.Tensor) -> torch.Tensor:
        """The chunk that holds the current joint positions, ``[B, act_dim]`` (zeros without a reference)."""
        if not self.uses_reference:
            return torch.zeros(obs.shape[0], self.act_dim, dtype=obs.dtype)
        current = obs[:, self.reference_index] * self.reference_scale + self.reference_shift
        return current.repeat(1, self.reference_repeats)

    # --- the denoiser --------------------------------------------------------------
    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma [B]``."""
        sd2 = self.sigma_data ** 2
        total = sigma ** 2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / torch.sqrt(total)
        c_in = 1.0 / torch.sqrt(total)
        c_noise = torch.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise

    def denoise(self, x: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Clean-chunk estimate ``D(x; obs, sigma)``; ``x [B, act_dim]``, ``obs [B, obs_dim]``, ``sigma [B]``."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        # noise commutes with a shift: denoise the offset from the reference, then shift back
        reference = self.reference(obs)
        offset = x - reference
        extra = torch.cat([c_in.unsqueeze(-1) * offset, self.noise_embedding(c_noise)], dim=-1)
        network_output = self.head(self.backbone(obs, extra))
        return reference + c_skip.unsqueeze(-1) * offset + c_out.unsqueeze(-1) * network_output

    def forward(self, x: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, obs, sigma)

    def score(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Teacher-protocol score ``grad_a log p_sigma(a | obs) ~ (D(a; obs, sigma) - a) / sigma^2``."""
        return (self.denoise(actions, obs, sigma) - actions) / (sigma ** 2).unsqueeze(-1)

    def loss(self, actions: torch.Tensor, obs: torch.Tensor, P_mean: float, P_std: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """EDM denoising score-matching loss of a batch (mean over rows and dimensions)."""
        batch = actions.shape[0]
        log_sigma = P_mean + P_std * torch.randn(batch, generator=generator, dtype=actions.dtype)
        sigma = torch.exp(log_sigma)
        noisy = actions + sigma.unsqueeze(-1) * torch.randn(actions.shape, generator=generator, dtype=actions.dtype)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        error = (self.denoise(noisy, obs, sigma) - actions) ** 2
        return (weight.unsqueeze(-1) * error).mean()

    # --- sampling ------------------------------------------------------------------
    def karras_sigmas(self, n_steps: int | None = None) -> torch.Tensor:
        """``n_steps`` decreasing noise levels from sigma_max to sigma_min, then a final 0."""
        return karras_sigmas(self.sigma_min, self.sigma_max, self.rho, n_steps or self.n_steps)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, n_steps: int | None = None, sampler: str | None = None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunks ``[B, act_dim]`` for ``obs [B, obs_dim]`` with ``n_steps`` denoiser calls.

        ``noise`` (``[B, act_dim]``, standard normal) fixes the start of the chain; the
        ``euler`` sampler is then deterministic. ``ancestral`` adds fresh noise each step
        (from ``generator``).
        """
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        sigmas = self.karras_sigmas(n_steps).to(obs.dtype)
        batch = obs.shape[0]
        if noise is None:
            noise = torch.randn(batch, self.act_dim, generator=generator, dtype=obs.dtype)
        elif tuple(noise.shape) != (batch, self.act_dim):
            raise ValueError(f"noise: expected shape {(batch, self.act_dim)}, got {tuple(noise.shape)}")
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self.denoise(x, obs, sigma.expand(batch))
            if sampler == "euler":
                # probability-flow ODE step: dx/dsigma = (x - D) / sigma
                x = denoised + (sigma_next / sigma) * (x - denoised)
            else:
                sigma_up = torch.minimum(sigma_next, torch.sqrt(
                    sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
                sigma_down = torch.sqrt(sigma_next ** 2 - sigma_up ** 2)
                x = denoised + (sigma_down / sigma) * (x - denoised)
                x = x + sigma_up * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x


def karras_sigmas(sigma_min: float, sigma_max: float, rho: float, n_steps: int) -> torch.Tensor:
    """The Karras schedule ``(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` + [0]."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected an integer >= 1, got {n_steps!r}")
    ramp = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64) if n_steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def _check_sampling(sigma_min, sigma_max, rho, n_steps, sampler, sigma_data) -> None:
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
        raise ValueError(f"sigma_data: expected a number > 0, got {sigma_data!r}")
    if not (isinstance(sigma_min, (int, float)) and sigma_min > 0):
        raise ValueError(f"sigma_min: expected a number > 0, got {sigma_min!r}")
    if not (isinstance(sigma_max, (int, float)) and sigma_max > sigma_min):
        raise ValueError(f"sigma_max: expected a number > sigma_min={sigma_min}, got {sigma_max!r}")
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise ValueError(f"rho: expected a number > 0, got {rho!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected an integer >= 1, got {n_steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")


# --- configuration and training ------------------------------------------------------
@dataclass
class TeacherConfig:
    """Everything that defines a teacher training run (``config/teacher.yaml``)."""

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(hidden=256, mlp_layers=3))
    noise_embed_dim: int = 16  # width of the sinusoidal noise-level embedding fed to the backbone
    sigma_data: float = 0.5  # assumed std of the normalised actions (EDM preconditioning)
    P_mean: float = -1.2  # mean of ln(sigma) during training
    P_std: float = 1.2  # std of ln(sigma) during training
    sigma_min: float = 0.002  # smallest noise level of the sampling schedule
    sigma_max: float = 10.0  # largest noise level (start of sampling)
    rho: float = 7.0  # Karras schedule curvature
    n_steps: int = 8  # denoiser evaluations per sampled action chunk
    sampler: str = "euler"  # "euler" (deterministic ODE) or "ancestral" (stochastic)
    lr: float = 1e-3  # Adam learning rate (cosine-decayed to 10% over the run)
    weight_decay: float = 0.0  # AdamW weight decay
    observation_fields: list = field(default_factory=list)  # frame fields the model reads (empty: all of the data's)
    relative_to: str = ""  # joint-position observation field the chunk is denoised relative to ("": absolute)
    obs_noise: float = 0.0  # std of Gaussian noise added to the normalised observations while training (robustness)
    batch_size: int = 256  # samples per optimiser step
    iterations: int = 6000  # optimiser steps
    ema_decay: float = 0.999  # exponential moving average of the weights (the EMA copy is saved)
    history: int = 2  # observation frames in the window
    horizon: int = 8  # actions per predicted chunk
    execute_steps: int = 4  # actions of each chunk executed before re-planning (rollouts)
    seed: int = 0  # seeds torch (initialisation, batches, noise) and the demo generator offset
    dataset: str = ""  # demonstration file (.npz); empty: generate the built-in arm task's demos
    episodes: int = 200  # demonstrations generated when dataset is empty
    dataset_seed: int = 0  # seed of the generated demonstrations
    checkpoint_every: int = 1000  # iterations between periodic checkpoints (0: only at the end)

    def validate(self) -> "TeacherConfig":
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        self.backbone.validate()
        _check_sampling(self.sigma_min, self.sigma_max, self.rho, self.n_steps, self.sampler, self.sigma_data)
        positive_ints = ("noise_embed_dim", "batch_size", "iterations", "history", "horizon", "execute_steps",
                         "episodes")
        for name in positive_ints:
            _require_int(self, name, 1)
        _require_int(self, "checkpoint_every", 0)
        _require_int(self, "seed", 0)
        _require_int(self, "dataset_seed", 0)
        if self.noise_embed_dim % 2:
            raise ValueError(f"TeacherConfig.noise_embed_dim: expected an even integer, got {self.noise_embed_dim}")
        if self.execute_steps > self.horizon:
            raise ValueError(f"TeacherConfig.execute_steps: expected <= horizon={self.horizon}, "
                             f"got {self.execute_steps}")
        for name in ("lr", "P_std"):
            _require_float(self, name, low=0.0, low_open=True)
        _require_float(self, "weight_decay", low=0.0)
        _require_float(self, "obs_noise", low=0.0)
        _require_float(self, "P_mean")
        _require_float(self, "ema_decay", low=0.0, high=1.0, high_open=True)
        if not isinstance(self.observation_fields, (list, tuple)) or not all(
                isinstance(name, str) and name for name in self.observation_fields):
            raise ValueError(f"TeacherConfig.observation_fields: expected a list of field names, "
                             f"got {self.observation_fields!r}")
        if not isinstance(self.relative_to, str):
            raise ValueError(f"TeacherConfig.relative_to: expected an observation field name or '', "
                             f"got {self.relative_to!r}")
        if not isinstance(self.dataset, str):
            raise ValueError(f"TeacherConfig.dataset: expected a path string, got {self.dataset!r}")
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["backbone"] = self.backbone.to_dict() if isinstance(self.backbone, BackboneConfig) else dict(self.backbone)
        return data

    @staticmethod
    def from_dict(data: dict) -> "TeacherConfig":
        return config_from_dict(TeacherConfig, data)


def config_from_dict(cls, data: dict):
    """Build and validate a config dataclass; unknown keys are refused by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(known)}")
    values = dict(data)
    if "backbone" in values and isinstance(values["backbone"], dict):
        values["backbone"] = BackboneConfig.from_dict(values["backbone"])
    return cls(**values).validate()


def _require_int(config, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{type(config).__name__}.{name}: expected an integer >= {low}, got {value!r}")


def _require_float(config, name: str, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{type(config).__name__}.{name}: expected {expected}, got {value!r}")


def build_teacher(config: TeacherConfig, obs_step_dim: int, act_dim: int,
                  action_reference: dict | None = None) -> DiffusionTeacher:
    return DiffusionTeacher(action_reference=action_reference,
                            obs_step_dim=obs_step_dim, history=config.history, act_dim=act_dim,
                            backbone=config.backbone.to_dict(), noise_embed_dim=config.noise_embed_dim,
                            sigma_data=config.sigma_data, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                            rho=config.rho, n_steps=config.n_steps, sampler=config.sampler)


def train_teacher(observations, actions, config: TeacherConfig, progress: bool = True,
                  on_checkpoint: Callable[[DiffusionTeacher, dict], None] | None = None,
                  action_reference: dict | None = None) -> tuple[DiffusionTeacher, dict]:
    """Fit a teacher to normalised ``observations [N, obs_dim]`` and ``actions [N, act_dim]``.

    ``action_reference`` (see ``DiffusionTeacher``; ``pipeline.action_reference`` builds it from a
    spec) makes the model denoise chunks relative to the current joint positions.

    Returns the EMA model (eval mode) and a history dict (``loss`` per logged step).
    ``on_checkpoint(ema_model, history)`` is called every ``config.checkpoint_every`` steps.
    """
    from tqdm import tqdm

    config.validate()
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    act = torch.as_tensor(np.asarray(actions), dtype=torch.float32)
    if obs.ndim != 2 or act.ndim != 2 or obs.shape[0] != act.shape[0]:
        raise ValueError(f"train_teacher: expected observations [N, obs_dim] and actions [N, act_dim] with the same N, "
                         f"got {tuple(obs.shape)} and {tuple(act.shape)}")
    if obs.shape[1] % config.history:
        raise ValueError(f"train_teacher: observation width {obs.shape[1]} is not a multiple of "
                         f"history={config.history}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_teacher(config, obs.shape[1] // config.history, act.shape[1], action_reference)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / config.iterations, 1.0))))
    history: dict = {"step": [], "loss": []}
    n = obs.shape[0]
    running = None
    bar = tqdm(range(config.iterations), desc="teacher", disable=not progress, mininterval=0.5)
    for step in bar:
        index = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        batch_obs = obs[index]
        if config.obs_noise > 0:
            batch_obs = batch_obs + config.obs_noise * torch.randn(batch_obs.shape, generator=generator)
        loss = model.loss(act[index], batch_obs, config.P_mean, config.P_std, generator=generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            # early on the average warms up faster so short runs still get a usable EMA
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.lerp_(param, 1.0 - decay)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == config.iterations - 1:
            history["step"].append(step)
            history["loss"].append(running)
            bar.set_postfix(loss=f"{running:.4f}")
        if on_checkpoint and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.iterations:
            on_checkpoint(ema.eval(), history)
    bar.close()
    return ema.eval(), history
