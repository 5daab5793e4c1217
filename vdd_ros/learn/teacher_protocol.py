"""What VDD needs from a teacher, and an exact analytic teacher built on tasks.gmm2d.

A teacher works in normalised units and gives the score of its action distribution blurred
by Gaussian noise of level sigma: ``score(actions [B,A], obs [B,O], sigma [B]) -> [B,A]``.
A teacher that can also draw actions offers ``sample(obs [B,O], generator=None) -> [B,A]``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from vdd_ros.tasks.gmm2d import GaussianMixture, StateConditionalGaussianMixture


@runtime_checkable
class ScoreTeacher(Protocol):
    obs_dim: int
    act_dim: int

    def score(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``grad_a log p_sigma(a | s)``, ``[B, act_dim]``, no gradient needed."""
        ...


def check_teacher(teacher) -> None:
    """Raise TypeError/ValueError naming what is missing or wrong on ``teacher``."""
    if not isinstance(teacher, ScoreTeacher):
        missing = [name for name in ("obs_dim", "act_dim", "score") if not hasattr(teacher, name)]
        raise TypeError(f"teacher: expected an object with obs_dim, act_dim and score(actions, obs, sigma); "
                        f"{type(teacher).__name__} lacks {missing}")
    if not callable(teacher.score):
        raise TypeError(f"teacher.score: expected a method, got {type(teacher.score).__name__}")
    for name in ("obs_dim", "act_dim"):
        value = getattr(teacher, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"teacher.{name}: expected an integer >= 1, got {value!r}")


def can_sample(teacher) -> bool:
    return callable(getattr(teacher, "sample", None))


class AnalyticTeacher:
    """An exact teacher: a Gaussian mixture (optionally state conditional) from tasks.gmm2d.

    For a state-independent mixture the observation is ignored (``obs_dim`` sets its expected
    width). The score is the closed-form score of the blurred mixture (in the actions' dtype);
    the log-density is float64. ``evaluate_student`` measures a mixture-of-experts student.
    """

    def __init__(self, mixture: GaussianMixture | StateConditionalGaussianMixture, obs_dim: int = 1):
        self.mixture = mixture
        self.conditional = isinstance(mixture, StateConditionalGaussianMixture)
        self.obs_dim = mixture.obs_dim if self.conditional else int(obs_dim)
        self.act_dim = mixture.dim
        self._weights = torch.as_tensor(mixture.weights, dtype=torch.float64)
        self._variances = torch.as_tensor(mixture.stds, dtype=torch.float64) ** 2
        base = mixture.base if self.conditional else mixture
        self._base_means = torch.as_tensor(base.means, dtype=torch.float64)
        if self.conditional:
            self._shift = torch.as_tensor(mixture.shift, dtype=torch.float64)
            self._rotation_rate = torch.as_tensor(mixture.rotation_rate, dtype=torch.float64)

    def means(self, obs: torch.Tensor) -> torch.Tensor:
        """Mode means ``[B, K, A]`` (float64)."""
        obs = obs.to(torch.float64)
        means = self._base_means.expand(obs.shape[0], *self._base_means.shape)
        if not self.conditional:
            return means
        if bool(torch.any(self._rotation_rate != 0)):
            angle = obs @ self._rotation_rate
            cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
            means = torch.stack([cos * means[..., 0] - sin * means[..., 1],
                                 sin * means[..., 0] + cos * means[..., 1]], -1)
        return means + (obs @ self._shift.T)[:, None, :]

    def _log_joint(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype):
        x = actions.to(dtype)
        variances = self._variances.to(dtype)[None] + sigma.to(dtype).reshape(-1, 1) ** 2  # [B, K]
        diff = self.means(obs).to(dtype) - x[:, None, :]
        log_joint = (torch.log(self._weights).to(dtype)[None] - 0.5 * diff.pow(2).sum(-1) / variances
                     - 0.5 * self.act_dim * torch.log(2 * torch.pi * variances))
        return log_joint, diff, variances

    def score(self, actions: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact blurred score in the dtype of ``actions`` (float32 is accurate enough and twice as fast)."""
        log_joint, diff, variances = self._log_joint(actions, obs, sigma, actions.dtype)
        posterior = torch.softmax(log_joint, -1)
        return ((posterior / variances)[..., None] * diff).sum(1)

    def log_density(self, actions: torch.Tensor, obs: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Exact ``log p_sigma(a | s)``, ``[B]`` float64."""
        sigmas = torch.full((actions.shape[0],), float(sigma), dtype=torch.float64)
        log_joint, _, _ = self._log_joint(actions, obs, sigmas, torch.float64)
        return torch.logsumexp(log_joint, -1)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        means = self.means(obs)
        modes = torch.multinomial(self._weights.expand(obs.shape[0], -1), 1, generator=generator).squeeze(-1)
        rows = torch.arange(obs.shape[0])
        noise = torch.randn(obs.shape[0], self.act_dim, generator=generator, dtype=torch.float64)
        return (means[rows, modes] + self._variances[modes, None].sqrt() * noise).to(obs.dtype)

    def evaluate_student(self, model, obs, n_samples: int = 4096, generator: torch.Generator | None = None
                         ) -> dict:
        """How well a mixture-of-experts student matches this mixture at each observation row.

        Per row: every mode's nearest expert mean (``mean_errors``), whether those experts are all
        different (``one_to_one``), the matched experts' gating weights minus the mode weights
        (``weight_errors``), and a Monte-Carlo reverse KL(student || teacher) at sigma=0.
        """
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, self.obs_dim)
        rows = []
        with torch.no_grad():
            weights, means, _ = model.components(obs)
            modes = self.means(obs)  # [M, K, A]
            for row in range(obs.shape[0]):
                distances = torch.cdist(modes[row], means[row].to(torch.float64))  # [K, Z]
                nearest = distances.argmin(1)
                one_to_one = len(set(nearest.tolist())) == modes.shape[1]
                matched_weights = weights[row, nearest].to(torch.float64)
                repeated = obs[row:row + 1].expand(n_samples, -1)
                student_samples = model.sample(repeated, generator=generator)
                kl = (model.log_prob(student_samples, repeated).to(torch.float64)
                      - self.log_density(student_samples, repeated)).mean()
                rows.append({"mean_errors": distances.min(1).values.tolist(), "one_to_one": one_to_one,
                             "weight_errors": (matched_weights - self._weights).abs().tolist(),
                             "reverse_kl": float(kl), "expert_weights": weights[row].tolist()})
        return {"rows": rows,
                "max_mean_error": max(max(r["mean_errors"]) for r in rows),
                "max_weight_error": max(max(r["weight_errors"]) for r in rows),
                "max_reverse_kl": max(r["reverse_kl"] for r in rows),
                "one_to_one": all(r["one_to_one"] for r in rows)}
