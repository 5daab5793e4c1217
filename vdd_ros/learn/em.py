"""The EM baseline: the same mixture of experts trained directly on demonstrations.

Every iteration, on a fresh batch of (state, action) pairs:
1. E-step: responsibilities ``r_z = q(z | a, s)`` of the current model (no gradient);
2. expert M-step: gradient steps on the responsibility-weighted log-likelihood
   ``-mean sum_z r_z log N(a; mu_z(s), S_z(s))``;
3. gating M-step: soft cross-entropy ``-mean sum_z r_z log w_z(s)``.
EM maximises the forward likelihood, which tends to average modes when an expert straddles
them; it is the baseline VDD is compared against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, asdict

import numpy as np
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.learn.vdd import build_mixture, check_float, check_int, as_tensor, check_finite, finish_training, \
    mixture_optimisers, posterior_log_probs, set_learning_rate, validate_mixture_fields


@dataclass
class EMConfig:
    """Every knob of an EM run on demonstrations."""

    n_experts: int = 8  # Z, number of Gaussian experts
    iterations: int = 1000  # E-step/M-step rounds
    batch_size: int = 256  # (state, action) pairs per iteration
    expert_lr: float = 1e-2  # Adam learning rate of backbone + expert heads
    gating_lr: float = 1e-2  # Adam learning rate of the gating network
    expert_steps_per_iter: int = 1  # expert M-steps per E-step (same batch and responsibilities)
    gating_steps_per_iter: int = 1  # gating M-steps per E-step
    lr_decay: str = "linear"  # "linear": rates fall linearly over the iterations to lr_final_fraction; "none"
    lr_final_fraction: float = 0.01  # learning-rate multiplier at the last iteration (linear decay)
    covariance: str = "full"  # "full" or "diagonal"
    min_std: float = 1e-4  # floor added to the softplus of the Cholesky diagonal
    init_std: float = 1.0  # initial expert standard deviation (normalised units)
    mean_init_spread: float = 1.5  # initial expert means spread over [-b, b]^A (grid in 2-D)
    gating: str = "detached_features"  # "detached_features" or "own_mlp"
    gating_hidden: int = 0  # own_mlp: width of the gating MLP (0: the backbone's hidden)
    gating_layers: int = 0  # own_mlp: hidden layers of the gating MLP (0: the backbone's mlp_layers)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    history: int = 1  # frames in the observation window (obs_dim = history * obs_step_dim)
    dead_expert_threshold: float = 1e-3  # expert whose mean gating weight is below this is reported dead
    seed: int = 0  # seeds parameters and batches
    device: str = "cpu"
    num_threads: int | None = 1  # torch.set_num_threads for the run (one thread is fastest for small nets); None: leave

    def validate(self) -> "EMConfig":
        owner = "EMConfig"
        for name in ("n_experts", "iterations", "batch_size", "expert_steps_per_iter", "history"):
            check_int(owner, name, getattr(self, name), 1)
        for name in ("gating_steps_per_iter", "seed"):
            check_int(owner, name, getattr(self, name), 0)
        for name in ("expert_lr", "gating_lr", "min_std", "init_std"):
            check_float(owner, name, getattr(self, name), 0.0, strict=True)
        for name in ("mean_init_spread", "dead_expert_threshold"):
            check_float(owner, name, getattr(self, name), 0.0, strict=False)
        validate_mixture_fields(self, owner)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_factor(self, iteration: int) -> float:
        if self.lr_decay == "none":
            return 1.0
        return 1.0 - (1.0 - self.lr_final_fraction) * iteration / max(1, self.iterations - 1)


def em_iteration(model: MixtureOfExpertsPolicy, obs: torch.Tensor, act: torch.Tensor, expert_opt, gating_opt,
                 iteration: int, expert_steps: int = 1, gating_steps: int = 1) -> tuple[float, float]:
    """One E-step and the expert and gating M-steps on ``(obs, act)``; returns (expert, gating) loss."""
    with torch.no_grad():  # E-step
        features = model.features(obs)
        log_w = torch.log_softmax(model.gating_logits(obs, features), -1)
        responsibilities = posterior_log_probs(model, act, log_w, model.expert_means(features),
                                               model.expert_scales(features)).exp()
    expert_loss = torch.zeros(())
    for _ in range(expert_steps):
        expert_loss = -(responsibilities * model.expert_log_probs(act, obs)).sum(-1).mean()
        check_finite(iteration, "expert loss", expert_loss)
        expert_opt.zero_grad(set_to_none=True)
        expert_loss.backward()
        expert_opt.step()
    gating_loss = torch.zeros(())
    for _ in range(gating_steps):
        with torch.no_grad():
            features = model.features(obs)
        gating_loss = -(responsibilities * torch.log_softmax(model.gating_logits(obs, features), -1)).sum(-1).mean()
        check_finite(iteration, "gating loss", gating_loss)
        gating_opt.zero_grad(set_to_none=True)
        gating_loss.backward()
        gating_opt.step()
    return expert_loss.item(), gating_loss.item()


def train_em(observations, actions, config: EMConfig, progress: bool = True, callback=None
             ) -> MixtureOfExpertsPolicy:
    """Fit a mixture of experts to ``(observations [N, obs_dim], actions [N, act_dim])`` by EM.

    ``callback(iteration, model, record)`` is called every iteration. The returned model carries
    ``training_history`` (losses, mean gating weights, dead experts, wall time, config).
    """
    config.validate()
    device = torch.device(config.device)
    obs_all = torch.as_tensor(np.asarray(observations) if not isinstance(observations, torch.Tensor)
                              else observations)
    act_all = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor) else actions)
    if obs_all.dim() != 2 or act_all.dim() != 2:
        raise ValueError(f"observations/actions: expected 2-D arrays [N, dim], got shapes "
                         f"{tuple(obs_all.shape)} and {tuple(act_all.shape)}")
    obs_all = as_tensor("observations", obs_all, obs_all.shape[1], device)
    act_all = as_tensor("actions", act_all, act_all.shape[1], device)
    if act_all.shape[0] != obs_all.shape[0]:
        raise ValueError(f"actions: expected {obs_all.shape[0]} rows (one per observation), got {act_all.shape[0]}")

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    start = time.perf_counter()
    model = build_mixture(config, obs_all.shape[1], act_all.shape[1])
    generator = torch.Generator(device=device).manual_seed(config.seed)
    expert_opt, gating_opt = mixture_optimisers(model, config)
    history = {"expert_loss": [], "gating_loss": [], "warnings": []}

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.iterations, desc="EM", unit="it")
    for iteration in range(config.iterations):
        set_learning_rate(expert_opt, config.expert_lr * config.lr_factor(iteration))
        set_learning_rate(gating_opt, config.gating_lr * config.lr_factor(iteration))
        idx = torch.randint(obs_all.shape[0], (config.batch_size,), generator=generator, device=device)
        expert_loss, gating_loss = em_iteration(model, obs_all[idx], act_all[idx], expert_opt, gating_opt, iteration,
                                                config.expert_steps_per_iter, config.gating_steps_per_iter)
        record = {"iteration": iteration, "expert_loss": expert_loss, "gating_loss": gating_loss}
        history["expert_loss"].append(record["expert_loss"])
        history["gating_loss"].append(record["gating_loss"])
        if callback is not None:
            callback(iteration, model, record)
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0 or iteration == config.iterations - 1:
                bar.set_postfix(nll=f"{record['expert_loss']:.3g}")
    if bar is not None:
        bar.close()

    return finish_training(model, obs_all, config, history, start, "EM")
