"""The diffusion-policy teacher: an EDM/BESO-style score-based model of action chunks.

The denoiser ``D(x; obs, sigma)`` maps a noisy normalised action chunk ``x`` at noise level
``sigma`` to an estimate of the clean chunk, with the Karras et al. (EDM) preconditioning

    D = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma); obs)

    c_skip = sd^2 / (sigma^2 + sd^2)      c_out = sigma * sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4          (sd = sigma_data)

so the network ``F`` always sees unit-scale inputs and targets. Training is denoising score
matching with ``ln sigma ~ N(P_mean, P_std^2)`` and the EDM weight ``1 / c_out^2``; sampling
integrates the probability-flow ODE with Euler steps on the Karras sigma schedule (the only
sampler: the one the exported ONNX graph unrolls, so the teacher evaluated is the one deployed).
The score ``(D - x) / sigma^2`` is what VDD distils.

Everything is in normalised units: ``obs`` is the flattened window ``[B, history*obs_step_dim]``
and actions are flattened chunks ``[B, horizon*n_joints]``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from vdd_ros.learn.backbones import BackboneConfig, build_backbone
from vdd_ros.learn.configs import TeacherConfig, check_sampling


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
                 sigma_max: float = 10.0, rho: float = 7.0, n_steps: int = 16, action_reference: dict | None = None):
        super().__init__()
        backbone_config = BackboneConfig.from_dict(dict(backbone or {}))
        self.init_kwargs = dict(obs_step_dim=obs_step_dim, history=history, act_dim=act_dim,
                                backbone=backbone_config.to_dict(), noise_embed_dim=noise_embed_dim,
                                sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                n_steps=n_steps, action_reference=action_reference)
        check_sampling(sigma_min, sigma_max, rho, n_steps, sigma_data)
        self.obs_step_dim = obs_step_dim
        self.history = history
        self.obs_dim = obs_step_dim * history
        self.act_dim = act_dim
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)
        self.n_steps = int(n_steps)
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
    def sample(self, obs: torch.Tensor, n_steps: int | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunks ``[B, act_dim]`` for ``obs [B, obs_dim]``: ``n_steps`` Euler steps of the
        probability-flow ODE (one denoiser call each), the sampler the exported graph unrolls.

        ``noise`` (``[B, act_dim]``, standard normal; default: drawn from ``generator``) is the
        start of the chain; given it, the result is deterministic.
        """
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
            # probability-flow ODE step: dx/dsigma = (x - D) / sigma
            x = denoised + (sigma_next / sigma) * (x - denoised)
        return x


def karras_sigmas(sigma_min: float, sigma_max: float, rho: float, n_steps: int) -> torch.Tensor:
    """The Karras schedule ``(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` + [0]."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected an integer >= 1, got {n_steps!r}")
    ramp = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64) if n_steps > 1 else \
        torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


# --- configuration and training ------------------------------------------------------
def build_teacher(config: TeacherConfig, obs_step_dim: int, act_dim: int,
                  action_reference: dict | None = None) -> DiffusionTeacher:
    return DiffusionTeacher(action_reference=action_reference,
                            obs_step_dim=obs_step_dim, history=config.history, act_dim=act_dim,
                            backbone=config.backbone.to_dict(), noise_embed_dim=config.noise_embed_dim,
                            sigma_data=config.sigma_data, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                            rho=config.rho, n_steps=config.n_steps)


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
