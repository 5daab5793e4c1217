"""Use a DDPM epsilon-prediction policy as a VDD teacher.

A DDPM model predicts the noise ``eps(x_t, obs, t)`` in ``x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps``.
Its score at step t is ``grad_x log p_t(x) = -eps(x, obs, t) / sqrt(1 - abar_t)``. VDD queries the
teacher at the student's clean samples as if they were noisy inputs; for a DDPM teacher the
noise level is an integer step, drawn per row from ``[t_min, t_max]`` (small steps: the model
is accurate off the data manifold but the target is barely blurred).

The beta schedules (:func:`beta_schedule`: linear, scaled_linear, squaredcos_cap_v2, named as in diffusers) are
shared with ``vdd_ros.learn.external_teacher``, which wraps DDPM files trained elsewhere.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


class DDPMTeacherAdapter:
    """Teacher-protocol view (``obs_dim``, ``act_dim``, ``score``) of an epsilon-prediction model.

    ``eps_model(x [B, act_dim], obs [B, obs_dim], t [B] int64) -> eps [B, act_dim]``;
    ``alphas_cumprod [T]`` is ``abar_t`` for steps ``t = 0..T-1``.
    """

    def __init__(self, eps_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 alphas_cumprod, obs_dim: int, act_dim: int, t_min: int = 1, t_max: int = 4,
                 generator: torch.Generator | None = None):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32).reshape(-1)
        if abar.numel() < 1 or not bool(torch.all((abar > 0) & (abar < 1))):
            raise ValueError(f"alphas_cumprod: expected values in (0, 1), got min {float(abar.min()):.3g} "
                             f"max {float(abar.max()):.3g}")
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DDPMTeacherAdapter.{name}: expected an integer >= 1, got {value!r}")
        if not (isinstance(t_min, int) and isinstance(t_max, int) and 0 <= t_min <= t_max < abar.numel()):
            raise ValueError(f"DDPMTeacherAdapter step range: expected integers 0 <= t_min <= t_max < {abar.numel()}, "
                             f"got t_min={t_min!r} t_max={t_max!r}")
        self.eps_model = eps_model
        self.alphas_cumprod = abar
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.t_min = t_min
        self.t_max = t_max
        self.generator = generator

    def score_at_step(self, actions: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``-eps(actions, obs, t) / sqrt(1 - abar_t)`` for integer steps ``t [B]``."""
        t = t.long()
        eps = self.eps_model(actions, obs, t)
        return -eps / torch.sqrt(1.0 - self.alphas_cumprod[t]).unsqueeze(-1).to(eps.dtype)

    def score(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-protocol score. A DDPM teacher's noise level is its step range, so ``sigma`` is
        not used: each row gets a step drawn uniformly from ``[t_min, t_max]``."""
        t = torch.randint(self.t_min, self.t_max + 1, (actions.shape[0],), generator=self.generator)
        return self.score_at_step(actions, obs, t)


def linear_beta_schedule(n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for linearly spaced betas (Ho et al. 2020), ``[n_steps]``."""
    return torch.cumprod(1.0 - beta_schedule("linear", n_steps, beta_start, beta_end), 0).to(torch.float32)


# the names diffusers' DDPMScheduler(beta_schedule=...) uses, so a model trained there is described the same way
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def beta_schedule(name: str, n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                  max_beta: float = 0.999) -> torch.Tensor:
    """``beta_t`` for ``t = 0..n_steps-1`` (float64) of a named schedule.

    - ``linear``: ``beta_start .. beta_end`` linearly spaced (Ho et al. 2020);
    - ``scaled_linear``: ``sqrt(beta_start) .. sqrt(beta_end)`` linearly spaced, squared;
    - ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal (2021),
      ``abar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2`` and ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)``
      (the betas ignore ``beta_start`` / ``beta_end``).
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected an integer >= 1, got {n_steps!r}")
    if name not in BETA_SCHEDULES:
        raise ValueError(f"schedule: expected one of {list(BETA_SCHEDULES)}, got {name!r}")
    if name == "squaredcos_cap_v2":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1.0 - abar((t + 1) / n_steps) / abar(t / n_steps), max_beta)
                             for t in range(n_steps)], dtype=torch.float64)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"betas: expected 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}")
    if name == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n_steps, dtype=torch.float64) ** 2
    return torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)


def alphas_cumprod(name: str, n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)``, ``[n_steps]`` float64, of :func:`beta_schedule`."""
    return torch.cumprod(1.0 - beta_schedule(name, n_steps, beta_start, beta_end), 0)
