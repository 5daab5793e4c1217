"""Analytic Gaussian-mixture teachers whose score is known in closed form at every noise level.

A mixture of isotropic Gaussians ``sum_k pi_k N(mu_k, s_k^2 I)`` blurred by Gaussian noise of
level sigma is again such a mixture, with variances ``s_k^2 + sigma^2``. Its score is

    grad_x log p_sigma(x) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2),

with ``r_k`` the posterior of component k at x. This gives VDD a teacher with an exact score
and an exact log-density, which is the paper's 2-D check. numpy only.
"""
from __future__ import annotations

import numpy as np

from vdd_ros.files import save_figure
from vdd_ros.validation import fail

LOG_2PI = float(np.log(2.0 * np.pi))


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(values, axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.sum(np.exp(values - peak), axis=axis))


def _sigma_column(sigma, n: int) -> np.ndarray:
    """sigma as a float or ``[n]`` array -> ``[n, 1]`` array of noise levels >= 0."""
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.ndim == 0:
        sig = np.full(n, float(sig))
    sig = sig.reshape(-1)
    if sig.size != n:
        fail("sigma", f"a number or {n} numbers", f"{sig.size} numbers")
    if not np.all(np.isfinite(sig)) or np.any(sig < 0):
        fail("sigma", "finite numbers >= 0", float(sig.min()))
    return sig[:, None]


class GaussianMixture:
    """``sum_k weights_k N(means_k, stds_k^2 I)`` in d dimensions (d = means.shape[1])."""

    def __init__(self, means, stds, weights=None):
        self.means = np.asarray(means, dtype=np.float64)
        if self.means.ndim != 2 or self.means.shape[0] < 1:
            fail("means", "shape [K, d] with K >= 1", list(self.means.shape))
        n_modes = self.means.shape[0]
        self.stds = np.broadcast_to(np.asarray(stds, dtype=np.float64), (n_modes,)).copy()
        if np.any(self.stds <= 0) or not np.all(np.isfinite(self.stds)):
            fail("stds", f"{n_modes} finite numbers > 0", self.stds.tolist())
        weights = np.full(n_modes, 1.0 / n_modes) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (n_modes,) or np.any(weights <= 0) or abs(weights.sum() - 1.0) > 1e-6:
            fail("weights", f"{n_modes} positive numbers summing to 1", weights.tolist())
        self.weights = weights

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    # --- constructors --------------------------------------------------------------
    @staticmethod
    def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.5) -> GaussianMixture:
        """Equal-weight modes evenly spaced on a circle (the paper's 2-D check)."""
        angles = 2.0 * np.pi * np.arange(n_modes) / n_modes
        return GaussianMixture(radius * np.stack([np.cos(angles), np.sin(angles)], 1), std)

    @staticmethod
    def unequal_weights() -> GaussianMixture:
        """Four well-separated modes with weights 0.4, 0.3, 0.2, 0.1."""
        means = [[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]]
        return GaussianMixture(means, 0.4, [0.4, 0.3, 0.2, 0.1])

    # --- density and score ---------------------------------------------------------
    def _component_log_densities(self, x: np.ndarray, means: np.ndarray, sigma, log_weights=None) -> np.ndarray:
        """``log weights_k + log N(x; means_k, (s_k^2 + sigma^2) I)`` as ``[N, K]``; means ``[K,d]`` or ``[N,K,d]``,
        log weights ``[N, K]`` (default: this mixture's own)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            fail("x", f"shape [N, {self.dim}]", list(x.shape))
        variances = self.stds[None, :] ** 2 + _sigma_column(sigma, x.shape[0]) ** 2  # [N, K]
        sq_dist = np.sum((x[:, None, :] - means) ** 2, axis=-1)
        log_w = np.log(self.weights)[None] if log_weights is None else log_weights
        return (log_w - 0.5 * sq_dist / variances
                - 0.5 * self.dim * (LOG_2PI + np.log(variances)))

    def _score(self, x: np.ndarray, means: np.ndarray, sigma, log_weights=None) -> np.ndarray:
        log_joint = self._component_log_densities(x, means, sigma, log_weights)
        posterior = np.exp(log_joint - _logsumexp(log_joint, 1)[:, None])
        variances = self.stds[None, :] ** 2 + _sigma_column(sigma, x.shape[0]) ** 2
        return np.sum((posterior / variances)[..., None] * (means - np.asarray(x)[:, None, :]), axis=1)

    def log_density(self, x, sigma=0.0) -> np.ndarray:
        """``log p_sigma(x)`` for ``x [N, d]``; sigma is a number or ``[N]``."""
        return _logsumexp(self._component_log_densities(x, self.means, sigma), 1)

    def score(self, x, sigma=0.0) -> np.ndarray:
        """``grad_x log p_sigma(x)`` as ``[N, d]``."""
        return self._score(x, self.means, sigma)

    def blurred(self, sigma: float) -> GaussianMixture:
        """The mixture convolved with ``N(0, sigma^2 I)``."""
        return GaussianMixture(self.means, np.sqrt(self.stds ** 2 + sigma ** 2), self.weights)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        modes = rng.choice(self.n_modes, size=n, p=self.weights)
        return self.means[modes] + self.stds[modes, None] * rng.standard_normal((n, self.dim))

    def covariance(self) -> np.ndarray:
        """Total covariance of the mixture (within-mode plus between-mode)."""
        mean = self.weights @ self.means
        centred = self.means - mean
        within = np.sum(self.weights * self.stds ** 2) * np.eye(self.dim)
        return within + (self.weights[:, None] * centred).T @ centred


class StateConditionalGaussianMixture:
    """A mixture whose means move with an observation ``s`` of size ``obs_dim``.

    ``means_k(s) = R(rotation_rate . s) base_k + shift @ s``: the base modes rotated by an angle
    linear in ``s`` (2-D only; zero rate means no rotation) and shifted linearly. The weights are
    the base weights at ``s = 0`` tilted by ``exp(weight_rate_k . s)`` and renormalised (``weight_rate``
    ``[K, obs_dim]``, default zero: constant weights); the stds do not depend on ``s``.
    """

    def __init__(self, base: GaussianMixture, shift, rotation_rate=None, weight_rate=None):
        self.base = base
        self.shift = np.asarray(shift, dtype=np.float64)
        if self.shift.ndim != 2 or self.shift.shape[0] != base.dim:
            fail("shift", f"shape [{base.dim}, obs_dim]", list(self.shift.shape))
        obs_dim = self.shift.shape[1]
        rate = np.zeros(obs_dim) if rotation_rate is None else np.asarray(rotation_rate, dtype=np.float64)
        if rate.shape != (obs_dim,):
            fail("rotation_rate", f"shape [{obs_dim}]", list(rate.shape))
        if np.any(rate != 0) and base.dim != 2:
            fail("rotation_rate", f"zeros for a {base.dim}-D mixture (rotation is 2-D only)", rate.tolist())
        self.rotation_rate = rate
        tilt = np.zeros((base.n_modes, obs_dim)) if weight_rate is None else np.asarray(weight_rate, dtype=np.float64)
        if tilt.shape != (base.n_modes, obs_dim) or not np.all(np.isfinite(tilt)):
            fail("weight_rate", f"finite numbers of shape [{base.n_modes}, {obs_dim}]", list(tilt.shape))
        self.weight_rate = tilt

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def obs_dim(self) -> int:
        return self.shift.shape[1]

    @property
    def n_modes(self) -> int:
        return self.base.n_modes

    @property
    def weights(self) -> np.ndarray:
        """The weights at ``s = 0`` (:meth:`weights_at` gives them at any state)."""
        return self.base.weights

    def log_weights(self, obs) -> np.ndarray:
        """Log mode weights ``[N, K]`` at each observation."""
        logits = np.log(self.base.weights)[None] + self._check_obs(obs) @ self.weight_rate.T
        return logits - _logsumexp(logits, 1)[:, None]

    def weights_at(self, obs) -> np.ndarray:
        return np.exp(self.log_weights(obs))

    @property
    def stds(self) -> np.ndarray:
        return self.base.stds

    @staticmethod
    def moving_ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.5) -> StateConditionalGaussianMixture:
        """The ring, shifted by the 2-D observation and rotated by up to ~22 degrees per unit of s[0]."""
        return StateConditionalGaussianMixture(GaussianMixture.ring(n_modes, radius, std),
                                               shift=np.eye(2), rotation_rate=[np.pi / 8, 0.0])

    def _check_obs(self, obs) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            fail("obs", f"shape [N, {self.obs_dim}]", list(obs.shape))
        return obs

    def means(self, obs) -> np.ndarray:
        """Mode means ``[N, K, d]`` at each observation of ``obs [N, obs_dim]``."""
        obs = self._check_obs(obs)
        base = np.broadcast_to(self.base.means, (obs.shape[0],) + self.base.means.shape)
        if np.any(self.rotation_rate != 0):
            angle = obs @ self.rotation_rate
            cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
            base = np.stack([cos * base[..., 0] - sin * base[..., 1], sin * base[..., 0] + cos * base[..., 1]], -1)
        return base + (obs @ self.shift.T)[:, None, :]

    def at(self, obs_row) -> GaussianMixture:
        """The (unconditional) mixture at one observation."""
        row = np.asarray(obs_row, dtype=np.float64)[None]
        return GaussianMixture(self.means(row)[0], self.stds, self.weights_at(row)[0])

    def log_density(self, x, obs, sigma=0.0) -> np.ndarray:
        return _logsumexp(self.base._component_log_densities(x, self.means(obs), sigma, self.log_weights(obs)), 1)

    def score(self, x, obs, sigma=0.0) -> np.ndarray:
        return self.base._score(x, self.means(obs), sigma, self.log_weights(obs))

    def sample(self, obs, rng: np.random.Generator) -> np.ndarray:
        """One sample per observation row."""
        means, weights = self.means(obs), self.weights_at(obs)
        modes = (rng.random((means.shape[0], 1)) > np.cumsum(weights, 1)[:, :-1]).sum(1)
        rows = np.arange(means.shape[0])
        return means[rows, modes] + self.stds[modes, None] * rng.standard_normal((means.shape[0], self.dim))


# --- more experts than modes (issue 11): unequal weights and widths, uneven placement ---------------
def five_modes() -> GaussianMixture:
    """Five modes, weights 0.35-0.05, stds 0.2-0.45, unevenly placed (8 experts in the checks)."""
    return GaussianMixture([[-2.0, 1.5], [1.8, 2.0], [0.3, -0.2], [2.2, -1.8], [-1.5, -2.2]],
                           [0.45, 0.3, 0.2, 0.35, 0.25], [0.35, 0.25, 0.2, 0.15, 0.05])


def six_modes() -> GaussianMixture:
    """Six modes, weights 0.3-0.05, stds 0.2-0.45, unevenly placed (10 experts in the checks)."""
    return GaussianMixture([[-2.2, 1.2], [0.2, 2.3], [2.4, 0.9], [1.5, -1.9], [-0.9, -0.6], [-2.3, -2.4]],
                           [0.45, 0.2, 0.3, 0.4, 0.25, 0.35], [0.3, 0.25, 0.15, 0.15, 0.1, 0.05])


def moving_five_modes() -> StateConditionalGaussianMixture:
    """:func:`five_modes` moved by a scalar state s (training: s in [-1, 1]): rotated by 22.5 degrees and
    shifted by (0.4, 0.3) per unit of s, the heaviest and the lightest mode's weights tilted (at s = -0.5:
    0.41, 0.23, 0.18, 0.14, 0.03; at s = 0.5: 0.29, 0.27, 0.21, 0.16, 0.07)."""
    return StateConditionalGaussianMixture(five_modes(), shift=[[0.4], [0.3]], rotation_rate=[np.pi / 8],
                                           weight_rate=[[-0.5], [0.0], [0.0], [0.0], [0.6]])


def mode_coverage(mode_means, mode_weights, expert_means, expert_weights, near: float = 0.15, far: float = 0.3
                  ) -> tuple[float, float]:
    """How a mixture of experts covers the modes of a mixture, at one state: ``(weight error, stray weight)``.

    ``weight error``: the largest gap between a mode's weight and the summed weights of the experts within
    ``near`` of its mean (duplicates on one mode add up); ``stray weight``: the largest weight of an expert
    farther than ``far`` from every mode (0 when there is none). Means ``[K, d]`` / ``[Z, d]``, weights
    ``[K]`` / ``[Z]``.
    """
    mode_means, expert_means = np.asarray(mode_means, np.float64), np.asarray(expert_means, np.float64)
    expert_weights = np.asarray(expert_weights, np.float64)
    distances = np.linalg.norm(mode_means[:, None] - expert_means[None], axis=-1)  # [K, Z]
    covered = (distances < near).astype(np.float64) @ expert_weights
    weight_error = float(np.max(np.abs(covered - np.asarray(mode_weights, np.float64))))
    stray = distances.min(0) > far
    return weight_error, float(expert_weights[stray].max()) if stray.any() else 0.0


def plot_density(mixture: GaussianMixture, path: str, samples: np.ndarray | None = None, sigma: float = 0.0,
                 extent: float | None = None, title: str = "") -> str:
    """Save density contours of a 2-D mixture (plus optional samples) as a PNG; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mixture.dim != 2:
        fail("mixture", "a 2-D mixture", f"dim {mixture.dim}")
    if extent is None:
        extent = float(np.max(np.abs(mixture.means)) + 3.0 * np.max(mixture.stds))
    grid = np.linspace(-extent, extent, 200)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(mixture.log_density(np.stack([xx.ravel(), yy.ravel()], 1), sigma)).reshape(xx.shape)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contourf(xx, yy, density, levels=20, cmap="Blues")
    if samples is not None:
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="k", alpha=0.3)
    ax.set_aspect("equal")
    ax.set_title(title or f"Gaussian mixture, sigma={sigma:g}")
    save_figure(fig, path, dpi=100)
    return path
