"""The teacher's single-step denoiser, for callers that run their own sampling loop.

``Denoiser.denoise`` is one network evaluation ``D(x; obs, sigma)`` in normalised action
units; ``Denoiser.sample`` is the deterministic Euler sampler on the Karras schedule written
with numpy around it (the same schedule and update as the teacher's own sampler, so it
matches the unrolled sampler export).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vdd_ros.runtime.errors import ArgumentError, InputError, ModelLoadError, PolicyError
from vdd_ros.runtime.format import ROLE_TEACHER_DENOISER
from vdd_ros.runtime.policy import check_observations
from vdd_ros.runtime.session import native_reason, one_line, open_model
from vdd_ros.validation import check_int


def karras_sigmas(sigma_min: float, sigma_max: float, rho: float, n_steps: int) -> np.ndarray:
    """``(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for i < N, then 0."""
    check_int("n_steps", n_steps, 1, error=ArgumentError)
    ramp = np.linspace(0.0, 1.0, n_steps) if n_steps > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0).astype(np.float32)


class Denoiser:
    def __init__(self, path, device: str = "auto", intra_op_threads: int = 1):
        opened = open_model(Path(path), device, intra_op_threads)
        if opened.role != ROLE_TEACHER_DENOISER:
            raise ModelLoadError(f"model {opened.path}: holds a {opened.role} graph, not the teacher's denoiser; "
                                 f"use vdd_ros.runtime.load_policy for it")
        self.path = opened.path
        self.spec = opened.spec
        self.provider = opened.provider
        self._session = opened.session
        info = self.spec.model_info
        try:
            self.sigma_min, self.sigma_max, self.rho = (float(info[k]) for k in ("sigma_min", "sigma_max", "rho"))
            self.default_steps = int(info["trained_n_steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"model {self.path}: spec.model_info lacks the noise schedule ({one_line(err)})") \
                from None

    def denoise(self, x, obs_windows, sigma) -> np.ndarray:
        """``D(x; obs, sigma)``: ``x [B, H, J]`` normalised, ``obs_windows [B, T, D]`` raw, ``sigma [B] > 0``."""
        spec = self.spec
        obs = np.asarray(obs_windows)
        batch = obs.shape[0] if obs.ndim == 3 and obs.shape[0] >= 1 else 1
        feeds = {"obs": check_observations(spec, obs, batch, "obs_windows")}
        x = np.asarray(x)
        if x.shape != (batch, spec.action_horizon, spec.n_joints) or x.dtype.kind != "f" or not np.isfinite(x).all():
            raise InputError(f"x: expected finite floats of shape {(batch, spec.action_horizon, spec.n_joints)}, "
                             f"got {x.dtype} {x.shape}")
        sigma = np.asarray(sigma)
        if sigma.shape != (batch,) or sigma.dtype.kind != "f" or not (np.isfinite(sigma) & (sigma > 0)).all():
            raise InputError(f"sigma: expected {batch} finite floats > 0, got {sigma.dtype} {sigma.shape}")
        feeds.update(x=x.astype(np.float32), sigma=sigma.astype(np.float32))
        try:
            return self._session.run(["denoised"], feeds)[0]
        except Exception as err:
            raise PolicyError(f"model {self.path.name}: inference failed ({native_reason(err)})") from None

    def sample(self, obs_window, rng: np.random.Generator, n_steps: int | None = None,
               noise: np.ndarray | None = None) -> np.ndarray:
        """One raw action chunk ``[H, J]`` by ``n_steps`` Euler steps (default: the teacher's own)."""
        spec = self.spec
        chunk = (1, spec.action_horizon, spec.n_joints)
        sigmas = karras_sigmas(self.sigma_min, self.sigma_max, self.rho, n_steps or self.default_steps)
        start = rng.standard_normal(chunk, dtype=np.float32) if noise is None else \
            np.asarray(noise, np.float32).reshape(chunk)
        x = start * sigmas[0]
        obs = np.asarray(obs_window)[None]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = self.denoise(x, obs, np.full(1, sigma, np.float32))
            x = denoised + (sigma_next / sigma) * (x - denoised)  # probability-flow ODE Euler step
        return spec.denormalize_action(x[0].astype(np.float64))


def load_denoiser(path, device: str = "auto", intra_op_threads: int = 1) -> Denoiser:
    """Load a ``teacher_denoiser`` export (see :class:`Denoiser`)."""
    return Denoiser(path, device, intra_op_threads)
