"""Variational Diffusion Distillation (VDD): a score teacher distilled into a mixture of experts.

Read top to bottom with /work/shared/design/vdd-method.md. Every iteration:

1. E-step: ``qt(z|a,s)`` = the current student's posterior over experts (parameters detached).
2. Expert M-step: V reparameterised samples per expert and state; the teacher's score at a
   noise level sigma (no gradient) gives the surrogate ``<stopgrad(f), a>`` of ``log pi(a|s)``;
   maximise ``mean_v[<f, a_v> + log qt(z|a_v,s)] + H(q_z)`` weighted by ``stopgrad(w_z(s))``.
3. Gating M-step: soft cross-entropy of the gating on demonstration (or teacher) actions with
   the posterior as target (amortised EM).

What the 2-D check needed beyond that (measured; see the method page's pitfalls):
- uniform gating for the experts during a warm-up (70% of the run) while the gating network
  is already trained by EM; then the experts use the learned gating and the gating is FROZEN.
  Training the gating while the experts use it is unstable even from the exact solution: an
  expert that gains weight widens (its own posterior term relaxes) and gains more weight, one
  that loses weight narrows and dies;
- sigma annealed from U[0.2, 0.5] to U[0.01, 0.05] over the first half (a fixed range blurs);
- antithetic expert samples (eps, -eps) and 1024 actions per gating step (less gradient noise);
- re-initialisation during the warm-up of experts that duplicate another or are dead, at the
  actions the mixture explains worst (otherwise two experts can share a heavy mode and leave a
  light one uncovered);
- linear learning-rate decay counted in iterations; the gating's decays over its own
  (pre-freeze) iterations.

What the arm task needed (measured; off by default): a warm start (``warm_start_iterations``),
either supervised (expert z on the z-th ranked teacher sample at every state) or EM on the
demonstrations, which gives each expert its own region and the gating a meaning before VDD.
Experts started at uniform means far from the data all followed the teacher's unreliable
off-manifold score onto the same route (behaviour entropy 0.0); experts trained under uniform
gating all take the same path wherever one path dominates the teacher's local modes.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, asdict

import numpy as np
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.moe import COVARIANCES, GATINGS, MixtureOfExpertsPolicy
from vdd_ros.learn.teacher_protocol import can_sample, check_teacher

LR_DECAYS = ("linear", "none")


WARM_STARTS = ("ranked", "em")


def fail_field(name: str, expected: str, actual) -> None:
    raise ValueError(f"{name}: expected {expected}, got {actual!r}")


def validate_mixture_fields(config, owner: str) -> None:
    """Checks that VDDConfig and EMConfig share: schedule, mixture shape and start, backbone, device."""
    if config.lr_decay not in LR_DECAYS:
        fail_field(f"{owner}.lr_decay", f"one of {LR_DECAYS}", config.lr_decay)
    check_float(owner, "lr_final_fraction", config.lr_final_fraction, 0.0, strict=False)
    if config.lr_final_fraction > 1:
        fail_field(f"{owner}.lr_final_fraction", "a number in [0, 1]", config.lr_final_fraction)
    if config.covariance not in COVARIANCES:
        fail_field(f"{owner}.covariance", f"one of {COVARIANCES}", config.covariance)
    if config.gating not in GATINGS:
        fail_field(f"{owner}.gating", f"one of {GATINGS}", config.gating)
    check_int(owner, "gating_hidden", config.gating_hidden, 0)
    check_int(owner, "gating_layers", config.gating_layers, 0)
    if config.init_std <= config.min_std:
        fail_field(f"{owner}.init_std", f"a number > min_std={config.min_std}", config.init_std)
    if config.dead_expert_threshold >= 1.0 / config.n_experts:
        fail_field(f"{owner}.dead_expert_threshold", f"a number < 1/n_experts={1.0 / config.n_experts:g}",
                   config.dead_expert_threshold)
    if not isinstance(config.backbone, BackboneConfig):
        fail_field(f"{owner}.backbone", "a BackboneConfig", config.backbone)
    config.backbone.validate()
    if config.num_threads is not None:
        check_int(owner, "num_threads", config.num_threads, 1)
    try:
        torch.device(config.device)
    except (RuntimeError, TypeError):
        fail_field(f"{owner}.device", "a torch device such as 'cpu' or 'cuda:0'", config.device)


def check_int(owner: str, name: str, value, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        fail_field(f"{owner}.{name}", f"an integer >= {low}", value)


def check_float(owner: str, name: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        fail_field(f"{owner}.{name}", f"a finite number {'>' if strict else '>='} {low}", value)


@dataclass
class VDDConfig:
    """Every knob of a VDD run. Defaults pass the paper's 2-D check (8-mode ring, 10 of 10 seeds)."""

    n_experts: int = 8  # Z, number of Gaussian experts
    iterations: int = 1000  # E-step/M-step rounds
    batch_size: int = 32  # states per expert M-step
    samples_per_expert: int = 64  # V, reparameterised samples per expert per state
    antithetic: bool = True  # draw the V samples in pairs (eps, -eps): lower-variance expert gradients (V even)
    gating_batch_size: int = 1024  # (state, action) pairs per gating M-step (its noise sets the weight error)
    expert_lr: float = 1e-2  # Adam learning rate of backbone + expert heads
    gating_lr: float = 1e-2  # Adam learning rate of the gating network
    expert_steps_per_iter: int = 1  # expert M-steps per iteration (each on a fresh batch)
    gating_steps_per_iter: int = 1  # gating M-steps per iteration (each on a fresh batch)
    lr_decay: str = "linear"  # "linear": both rates fall linearly over the ITERATIONS to lr_final_fraction; "none"
    lr_final_fraction: float = 0.01  # learning-rate multiplier at the last iteration (linear decay)
    sigma_min: float = 0.2  # teacher query noise level: sigma ~ U[sigma_min, sigma_max] per sample at the start
    sigma_max: float = 0.5
    sigma_anneal: bool = True  # move the sigma range linearly to [sigma_final_min, sigma_final_max]
    sigma_final_min: float = 0.01  # (only with sigma_anneal) range reached at sigma_anneal_fraction of the run
    sigma_final_max: float = 0.05
    sigma_anneal_fraction: float = 0.5  # fraction of the iterations over which sigma is annealed
    covariance: str = "full"  # "full" (lower-triangular Cholesky) or "diagonal"
    min_std: float = 1e-4  # floor added to the softplus of the Cholesky diagonal
    init_std: float = 1.0  # initial expert standard deviation (normalised units)
    mean_init_spread: float = 1.5  # initial expert means spread over [-b, b]^A (grid in 2-D)
    # std of the initial mean-head weights: 0 makes the experts start state independent; > 0 gives each
    # expert an offset that varies with the state (the features have unit norm)
    mean_init_weight_std: float = 0.0
    gating: str = "detached_features"  # "detached_features" or "own_mlp"
    gating_hidden: int = 0  # own_mlp: width of the gating MLP (0: the backbone's hidden)
    gating_layers: int = 0  # own_mlp: hidden layers of the gating MLP (0: the backbone's mlp_layers)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    history: int = 1  # frames in the observation window (obs_dim = history * obs_step_dim)
    # The experts see uniform gating for the first gating_warmup_fraction of the run while the gating
    # network is trained by EM on the actions; then the experts use the learned gating. Training
    # the gating while the experts use it is unstable (an expert that gains weight widens and gains
    # more weight; one that loses it narrows and dies), hence the freeze, by default at the same point.
    gating_warmup_fraction: float = 0.7  # fraction of the iterations with uniform gating for the experts
    freeze_gating_fraction: float | None = 0.7  # gating M-steps stop after this fraction (None: never stop)
    dead_expert_threshold: float = 1e-3  # expert whose mean gating weight over states is below this is "dead"
    # Re-initialisation during the warm-up: an expert that duplicates another (means closer than
    # reinit_distance of its stds) or is dead is moved to a demonstration the mixture explains worst.
    reinit_fractions: tuple[float, ...] = (0.15, 0.3, 0.45)  # when (fractions of the run); () disables
    reinit_distance: float = 1.0  # duplicate if |mu_i - mu_j| / std_i averaged over states is below this
    reinit_batch_size: int = 4096  # demonstrations scored to find the worst-explained region
    # Warm start before the VDD iterations (0 iterations: none). "ranked" (needs teacher.sample):
    # expert z's mean is regressed onto the z-th of Z teacher samples per state ranked along one fixed
    # direction (the main direction in which the teacher's samples at one state differ), so the experts
    # start ON the teacher's modes, each on a different one and consistently across states. "em": EM on
    # the (state, action) pairs of the gating step (demonstrations, else teacher samples) with the
    # expert and gating learning rates: experts and gating start as the EM baseline, each expert
    # responsible for its own region (then gating_warmup_fraction=0: VDD keeps using that gating).
    warm_start: str = "ranked"
    warm_start_iterations: int = 0
    warm_start_candidates: int = 4  # teacher samples drawn per expert and state; the ranked quantiles are kept
    warm_start_lr: float = 1e-2  # Adam learning rate of the warm start (decays linearly over its iterations)
    seed: int = 0  # seeds parameters, batches, samples and sigma draws
    device: str = "cpu"
    num_threads: int | None = 1  # torch.set_num_threads for the run (one thread is fastest for small nets); None: leave

    def validate(self) -> "VDDConfig":
        """Raise ValueError naming the field, the expected and the actual value."""
        owner = "VDDConfig"
        for name in ("n_experts", "iterations", "batch_size", "samples_per_expert", "gating_batch_size",
                     "expert_steps_per_iter", "history"):
            check_int(owner, name, getattr(self, name), 1)
        for name in ("gating_steps_per_iter", "seed"):
            check_int(owner, name, getattr(self, name), 0)
        for name in ("expert_lr", "gating_lr", "warm_start_lr", "min_std", "init_std"):
            check_float(owner, name, getattr(self, name), 0.0, strict=True)
        for name in ("sigma_min", "sigma_max", "sigma_final_min", "sigma_final_max", "mean_init_spread",
                     "mean_init_weight_std",
                     "dead_expert_threshold"):
            check_float(owner, name, getattr(self, name), 0.0, strict=False)
        if self.antithetic and self.samples_per_expert % 2 != 0:
            fail_field(f"{owner}.samples_per_expert", "an even number (antithetic=True pairs the samples)",
                  self.samples_per_expert)
        if self.sigma_max <= 0:
            fail_field(f"{owner}.sigma_max", "a number > 0", self.sigma_max)
        if self.sigma_min > self.sigma_max:
            fail_field(f"{owner}.sigma_min", f"<= sigma_max={self.sigma_max}", self.sigma_min)
        if self.sigma_final_min > self.sigma_final_max:
            fail_field(f"{owner}.sigma_final_min", f"<= sigma_final_max={self.sigma_final_max}", self.sigma_final_min)
        if self.sigma_anneal and self.sigma_final_max <= 0:
            fail_field(f"{owner}.sigma_final_max", "a number > 0", self.sigma_final_max)
        check_float(owner, "sigma_anneal_fraction", self.sigma_anneal_fraction, 0.0, strict=True)
        if self.sigma_anneal_fraction > 1:
            fail_field(f"{owner}.sigma_anneal_fraction", "a number in (0, 1]", self.sigma_anneal_fraction)
        validate_mixture_fields(self, owner)
        check_int(owner, "reinit_batch_size", self.reinit_batch_size, 1)
        check_int(owner, "warm_start_iterations", self.warm_start_iterations, 0)
        check_int(owner, "warm_start_candidates", self.warm_start_candidates, 1)
        if self.warm_start not in WARM_STARTS:
            fail_field(f"{owner}.warm_start", f"one of {WARM_STARTS}", self.warm_start)
        check_float(owner, "reinit_distance", self.reinit_distance, 0.0, strict=True)
        if not isinstance(self.reinit_fractions, (tuple, list)):
            fail_field(f"{owner}.reinit_fractions", "a list of numbers in (0, 1)", self.reinit_fractions)
        for value in self.reinit_fractions:
            check_float(owner, "reinit_fractions", value, 0.0, strict=True)
            if value >= 1:
                fail_field(f"{owner}.reinit_fractions", "numbers in (0, 1)", list(self.reinit_fractions))
        for name in ("gating_warmup_fraction", "freeze_gating_fraction"):
            value = getattr(self, name)
            if value is None and name == "freeze_gating_fraction":
                continue
            check_float(owner, name, value, 0.0, strict=False)
            if value > 1:
                fail_field(f"{owner}.{name}", "a number in [0, 1]", value)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def sigma_range(self, iteration: int) -> tuple[float, float]:
        """The teacher query noise range ``[low, high]`` used at ``iteration``."""
        if not self.sigma_anneal:
            return self.sigma_min, self.sigma_max
        progress = min(1.0, iteration / max(1.0, self.sigma_anneal_fraction * self.iterations))
        return (self.sigma_min + progress * (self.sigma_final_min - self.sigma_min),
                self.sigma_max + progress * (self.sigma_final_max - self.sigma_max))

    def lr_factor(self, iteration: int, horizon: int | None = None) -> float:
        """Learning-rate multiplier at ``iteration`` of a schedule lasting ``horizon`` iterations."""
        if self.lr_decay == "none":
            return 1.0
        horizon = self.iterations if horizon is None else horizon
        progress = min(1.0, iteration / max(1, horizon - 1))
        return 1.0 - (1.0 - self.lr_final_fraction) * progress

    @property
    def gating_warmup_iterations(self) -> int:
        """Iterations in which the experts see uniform gating."""
        return round(self.gating_warmup_fraction * self.iterations)

    @property
    def gating_iterations(self) -> int:
        """Iterations in which the gating is trained (its learning rate decays over these)."""
        if self.freeze_gating_fraction is None:
            return self.iterations
        return max(1, round(self.freeze_gating_fraction * self.iterations))


def as_tensor(name: str, values, width: int, device: torch.device) -> torch.Tensor:
    """``[N, width]`` float32 tensor from numpy/torch, with a clear error on the wrong shape or non-finite values."""
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    tensor = tensor.to(device=device, dtype=torch.float32)
    if tensor.dim() != 2 or tensor.shape[1] != width or tensor.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [N >= 1, {width}], got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: expected finite numbers, found NaN or Inf")
    return tensor


def check_finite(iteration: int, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    """Stop at once (FloatingPointError/ValueError) naming the iteration and the tensor."""
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"iteration {iteration}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(f"iteration {iteration}: {name} holds {bad} NaN/Inf values")


def posterior_log_probs(model: MixtureOfExpertsPolicy, actions: torch.Tensor, log_weights: torch.Tensor,
                        means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``log q(z | a, s)`` for ``actions [B, (V,) A]`` -> ``[B, (V,) Z]`` (logsumexp, never sums of exp)."""
    extra_axes = actions.dim() - 2
    log_w = log_weights.reshape(log_weights.shape[0], *([1] * extra_axes), model.n_experts)
    log_joint = log_w + model.gaussian_log_probs(actions, means, scales)
    return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)


def _log_gating(model, obs, features, uniform: bool) -> torch.Tensor:
    if uniform:
        return torch.full((obs.shape[0], model.n_experts), -math.log(model.n_experts), device=obs.device)
    return torch.log_softmax(model.gating_logits(obs, features), dim=-1)


def expert_loss(model: MixtureOfExpertsPolicy, teacher, obs: torch.Tensor, config: VDDConfig, iteration: int,
                uniform_gating: bool, generator: torch.Generator) -> torch.Tensor:
    """``-mean_{s,z} stopgrad(w_z(s)) J_z(s)`` for one batch of states (E-step included)."""
    batch, n_experts, n_samples, act_dim = obs.shape[0], model.n_experts, config.samples_per_expert, model.act_dim
    features = model.features(obs)
    means, scales = model.expert_means(features), model.expert_scales(features)
    log_w = _log_gating(model, obs, features, uniform_gating).detach()
    samples = model.sample_experts(means, scales, n_samples, generator, config.antithetic)  # [B, Z, V, A]

    low, high = config.sigma_range(iteration)
    n_queries = batch * n_experts * n_samples
    sigma = low + (high - low) * torch.rand(n_queries, generator=generator, device=obs.device)
    query_obs = obs.unsqueeze(1).expand(batch, n_experts * n_samples, obs.shape[1]).reshape(n_queries, -1)
    with torch.no_grad():
        score = teacher.score(samples.detach().reshape(n_queries, act_dim), query_obs, sigma)
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"iteration {iteration}: teacher score returned {type(score).__name__}, "
                        f"expected a torch.Tensor")
    check_finite(iteration, "teacher score", score, (n_queries, act_dim))
    score = score.to(samples.dtype).reshape(batch, n_experts, n_samples, act_dim)

    # E-step: qt(z|a,s) with every student parameter detached; gradients reach a through the samples
    log_qt = posterior_log_probs(model, samples.reshape(batch, n_experts * n_samples, act_dim), log_w,
                                 means.detach(), scales.detach()).reshape(batch, n_experts, n_samples, n_experts)
    own_log_qt = torch.diagonal(log_qt, dim1=1, dim2=3).transpose(1, 2)  # [B, Z, V]: log qt(z | a from expert z)
    objective = ((score * samples).sum(-1) + own_log_qt).mean(-1) + model.entropies(scales)  # [B, Z]
    loss = -(log_w.exp() * objective).mean()
    check_finite(iteration, "expert loss", loss)
    return loss


def gating_loss(model: MixtureOfExpertsPolicy, obs: torch.Tensor, actions: torch.Tensor, iteration: int
                ) -> torch.Tensor:
    """Soft cross-entropy of the gating against posterior targets on (state, action) pairs.

    The targets use the learned gating as prior (amortised EM for the weights), also during the
    warm-up in which the experts themselves see uniform gating.
    """
    with torch.no_grad():
        features = model.features(obs)
        means, scales = model.expert_means(features), model.expert_scales(features)
    log_w = torch.log_softmax(model.gating_logits(obs, features), -1)
    with torch.no_grad():
        targets = posterior_log_probs(model, actions, log_w.detach(), means, scales).exp()
    loss = -(targets * log_w).sum(-1).mean()
    check_finite(iteration, "gating loss", loss)
    return loss


def redundant_experts(model: MixtureOfExpertsPolicy, obs: torch.Tensor, weights: np.ndarray, distance: float,
                      dead_threshold: float) -> list[int]:
    """Experts that are dead, or duplicate a heavier expert (mean gap below ``distance`` of their stds)."""
    with torch.no_grad():
        features = model.features(obs)
        means = model.expert_means(features)
        stds = model.scale_diagonal(model.expert_scales(features))  # [B, Z, A]
    kept, redundant = [], []
    for expert in np.argsort(-weights, kind="stable"):
        gaps = [((means[:, other] - means[:, expert]) / stds[:, expert]).norm(dim=-1).mean().item() for other in kept]
        if weights[expert] < dead_threshold or any(gap < distance for gap in gaps):
            redundant.append(int(expert))
        else:
            kept.append(int(expert))
    return redundant


def reinitialise_experts(model: MixtureOfExpertsPolicy, experts: list[int], obs: torch.Tensor,
                         actions: torch.Tensor, init_std: float, optimiser: torch.optim.Optimizer) -> list[int]:
    """Move ``experts`` to the actions the mixture explains worst: state independent, std init_std.

    Each moved expert takes the worst-explained action at least 2 init_std away from the ones
    already taken (among the worst 2%); its head rows and their Adam moments are reset.
    Returns the experts moved.
    """
    with torch.no_grad():
        order = torch.argsort(model.log_prob(actions, obs))
    targets: list[torch.Tensor] = []
    for index in order[: max(len(experts), len(order) // 50)]:
        if all((actions[index] - taken).norm() > 2 * init_std for taken in targets):
            targets.append(actions[index])
        if len(targets) == len(experts):
            break
    act_dim, n_off = model.act_dim, model.act_dim * (model.act_dim - 1) // 2
    heads = [(model.mean_head, act_dim), (model.std_head, act_dim)]
    if model.off_diagonal_head is not None:
        heads.append((model.off_diagonal_head, n_off))
    with torch.no_grad():
        for expert, target in zip(experts, targets):
            for head, width in heads:
                rows = slice(expert * width, (expert + 1) * width)
                head.weight[rows] = 0.0
                head.bias[rows] = 0.0
                for parameter in (head.weight, head.bias):
                    for moment in ("exp_avg", "exp_avg_sq"):
                        if moment in optimiser.state.get(parameter, {}):
                            optimiser.state[parameter][moment][rows] = 0.0
            model.mean_head.bias[expert * act_dim:(expert + 1) * act_dim] = target
            std_bias = math.log(math.expm1(init_std - model.min_std))  # softplus(bias) + min_std = init_std
            model.std_head.bias[expert * act_dim:(expert + 1) * act_dim] = std_bias
    return experts[:len(targets)]


def ranking_direction(teacher, obs: torch.Tensor, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Unit vector ``[A]``: the first principal direction of teacher samples around their per-state mean."""
    with torch.no_grad():
        samples = torch.stack([teacher.sample(obs, generator=generator) for _ in range(n_samples)], 1)
    check_finite(-1, "teacher sample", samples, (obs.shape[0], n_samples, teacher.act_dim))
    deviations = (samples - samples.mean(1, keepdim=True)).reshape(-1, teacher.act_dim).to(torch.float32)
    return torch.linalg.svd(deviations, full_matrices=False).Vh[0]


def ranked_teacher_targets(teacher, obs: torch.Tensor, n_experts: int, candidates: int, direction: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
    """``[B, Z, A]``: per state, Z*candidates teacher samples sorted along ``direction``; the middle
    sample of the z-th block of ``candidates`` is expert z's target (its quantile (z + 0.5) / Z)."""
    batch, n_draws = obs.shape[0], n_experts * candidates
    with torch.no_grad():
        draws = teacher.sample(obs.repeat_interleave(n_draws, 0), generator=generator).to(torch.float32)
    check_finite(-1, "teacher sample", draws, (batch * n_draws, teacher.act_dim))
    draws = draws.reshape(batch, n_draws, teacher.act_dim)
    order = torch.argsort(draws @ direction, dim=1)
    picks = order[:, candidates // 2::candidates]  # [B, Z]
    return torch.gather(draws, 1, picks.unsqueeze(-1).expand(batch, n_experts, teacher.act_dim))


def warm_start(model: MixtureOfExpertsPolicy, teacher, obs_all: torch.Tensor, config: VDDConfig,
               generator: torch.Generator, bar=None) -> list[float]:
    """Regress every expert's mean onto its ranked teacher sample (see VDDConfig.warm_start_iterations)."""
    def draw(size: int) -> torch.Tensor:
        return obs_all[torch.randint(obs_all.shape[0], (size,), generator=generator, device=obs_all.device)]

    direction = ranking_direction(teacher, draw(256), 16, generator)
    optimiser = torch.optim.Adam(expert_parameters(model), lr=config.warm_start_lr)
    losses = []
    for iteration in range(config.warm_start_iterations):
        set_learning_rate(optimiser, config.warm_start_lr * config.lr_factor(iteration, config.warm_start_iterations))
        obs = draw(config.batch_size)
        targets = ranked_teacher_targets(teacher, obs, model.n_experts, config.warm_start_candidates, direction,
                                         generator)
        loss = (model.expert_means(model.features(obs)) - targets).pow(2).sum(-1).mean()
        check_finite(iteration, "warm-start loss", loss)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0:
                bar.set_postfix(warm_start_loss=f"{loss.item():.3g}")
    return losses


def em_warm_start(model: MixtureOfExpertsPolicy, state_action_batch, config: VDDConfig, bar=None) -> list[float]:
    """EM on ``state_action_batch(size, iteration)`` pairs before VDD (see VDDConfig.warm_start)."""
    from vdd_ros.learn.em import em_iteration  # em.py builds on this module

    expert_opt, gating_opt = mixture_optimisers(model, config)
    losses = []
    for iteration in range(config.warm_start_iterations):
        factor = config.lr_factor(iteration, config.warm_start_iterations)
        set_learning_rate(expert_opt, config.expert_lr * factor)
        set_learning_rate(gating_opt, config.gating_lr * factor)
        expert_loss, _ = em_iteration(model, *state_action_batch(config.gating_batch_size, iteration), expert_opt,
                                      gating_opt, iteration)
        losses.append(expert_loss)
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0:
                bar.set_postfix(em_warm_start_nll=f"{expert_loss:.3g}")
    return losses


def build_mixture(config, obs_dim: int, act_dim: int) -> MixtureOfExpertsPolicy:
    """The seeded mixture a VDDConfig or an EMConfig describes (from the fields they share)."""
    owner = type(config).__name__
    if obs_dim % config.history != 0:
        fail_field(f"{owner}.history", f"a divisor of the observation width {obs_dim}", config.history)
    torch.manual_seed(config.seed)
    return MixtureOfExpertsPolicy(obs_dim // config.history, config.history, act_dim, config.n_experts,
                                  config.backbone, config.covariance, config.min_std, config.init_std,
                                  config.mean_init_spread, config.gating,
                                  generator=torch.Generator().manual_seed(config.seed),
                                  # EMConfig has no such field: EM's experts start state independent
                                  mean_init_weight_std=getattr(config, "mean_init_weight_std", 0.0),
                                  gating_hidden=config.gating_hidden, gating_layers=config.gating_layers
                                  ).to(config.device)


def expert_parameters(model: MixtureOfExpertsPolicy) -> list[torch.nn.Parameter]:
    gating_ids = {id(p) for p in model.gating_net.parameters()}
    return [p for p in model.parameters() if id(p) not in gating_ids]


def mixture_optimisers(model: MixtureOfExpertsPolicy, config) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the experts (backbone and heads) at ``config.expert_lr``, Adam for the gating at ``config.gating_lr``."""
    return (torch.optim.Adam(expert_parameters(model), lr=config.expert_lr),
            torch.optim.Adam(model.gating_net.parameters(), lr=config.gating_lr))


def set_learning_rate(optimiser: torch.optim.Optimizer, lr: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr


def mean_gating_weights(model: MixtureOfExpertsPolicy, observations: torch.Tensor, max_states: int = 4096
                        ) -> np.ndarray:
    """Gating weights averaged over (up to ``max_states`` evenly spaced) states, ``[Z]``."""
    step = max(1, observations.shape[0] // max_states)
    with torch.no_grad():
        weights, _ = model.weights_and_means(observations[::step])
    return weights.mean(0).cpu().numpy()


def distill(teacher, observations, actions, config: VDDConfig, progress: bool = True, callback=None
            ) -> MixtureOfExpertsPolicy:
    """Distil ``teacher`` into a mixture of experts on the dataset states ``observations [N, obs_dim]``.

    ``actions [N, act_dim]`` (demonstrations paired with the states) feed the gating step; with
    ``None`` the teacher's ``sample(obs, generator)`` provides them. ``callback(iteration, model,
    record)`` is called every iteration (record: that iteration's losses). The returned model
    carries ``training_history`` (losses, mean gating weights, dead experts, wall time, config).
    """
    config.validate()
    check_teacher(teacher)
    device = torch.device(config.device)
    obs_all = as_tensor("observations", observations, teacher.obs_dim, device)
    act_all = None
    if actions is not None:
        act_all = as_tensor("actions", actions, teacher.act_dim, device)
        if act_all.shape[0] != obs_all.shape[0]:
            raise ValueError(f"actions: expected {obs_all.shape[0]} rows (one per observation), "
                             f"got {act_all.shape[0]}")
    elif config.gating_steps_per_iter > 0 and not can_sample(teacher):
        raise ValueError("actions: expected demonstration actions, got None, and the teacher has no "
                         "sample(obs) method to draw them instead")
    if config.warm_start_iterations > 0 and config.warm_start == "ranked" and not can_sample(teacher):
        raise ValueError(f"VDDConfig.warm_start_iterations: expected 0 for a teacher without sample(obs), "
                         f"got {config.warm_start_iterations} (or warm_start='em' with demonstrations)")
    if config.warm_start_iterations > 0 and config.warm_start == "em" and act_all is None \
            and not can_sample(teacher):
        raise ValueError("VDDConfig.warm_start: 'em' needs demonstration actions or a teacher with sample(obs), "
                         "got neither")

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    start = time.perf_counter()
    model = build_mixture(config, obs_all.shape[1], teacher.act_dim)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    expert_opt, gating_opt = mixture_optimisers(model, config)
    history = {"expert_loss": [], "gating_loss": [], "warnings": [], "reinitialised": [], "warm_start_loss": []}
    reinit_iterations = {round(fraction * config.iterations) for fraction in config.reinit_fractions}
    n_states = obs_all.shape[0]

    def batch_indices(size: int) -> torch.Tensor:
        return torch.randint(n_states, (size,), generator=generator, device=device)

    def state_action_batch(size: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Demonstration pairs, or dataset states with teacher-sampled actions."""
        idx = batch_indices(size)
        if act_all is not None:
            return obs_all[idx], act_all[idx]
        with torch.no_grad():
            act = teacher.sample(obs_all[idx], generator=generator)
        check_finite(iteration, "teacher sample", act, (size, teacher.act_dim))
        return obs_all[idx], act.to(obs_all.dtype)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.iterations + config.warm_start_iterations, desc="VDD", unit="it")
    if config.warm_start_iterations > 0 and config.warm_start == "ranked":
        history["warm_start_loss"] = warm_start(model, teacher, obs_all, config, generator, bar)
    elif config.warm_start_iterations > 0:
        history["warm_start_loss"] = em_warm_start(model, state_action_batch, config, bar)
    for iteration in range(config.iterations):
        set_learning_rate(expert_opt, config.expert_lr * config.lr_factor(iteration))
        set_learning_rate(gating_opt, config.gating_lr * config.lr_factor(iteration, config.gating_iterations))
        warming_up = iteration < config.gating_warmup_iterations
        if iteration in reinit_iterations and iteration > 0:
            obs, act = state_action_batch(config.reinit_batch_size, iteration)
            redundant = redundant_experts(model, obs, mean_gating_weights(model, obs), config.reinit_distance,
                                          config.dead_expert_threshold)
            if redundant:
                moved = reinitialise_experts(model, redundant, obs, act, config.init_std, expert_opt)
                history["reinitialised"].append({"iteration": iteration, "experts": moved})

        expert_losses = []
        for _ in range(config.expert_steps_per_iter):
            loss = expert_loss(model, teacher, obs_all[batch_indices(config.batch_size)], config, iteration,
                               warming_up, generator)
            expert_opt.zero_grad(set_to_none=True)
            loss.backward()
            expert_opt.step()
            expert_losses.append(loss.item())

        gating_losses = []
        gating_active = iteration < config.gating_iterations
        for _ in range(config.gating_steps_per_iter if gating_active else 0):
            loss = gating_loss(model, *state_action_batch(config.gating_batch_size, iteration), iteration)
            gating_opt.zero_grad(set_to_none=True)
            loss.backward()
            gating_opt.step()
            gating_losses.append(loss.item())

        record = {"iteration": iteration, "expert_loss": float(np.mean(expert_losses)),
                  "gating_loss": float(np.mean(gating_losses)) if gating_losses else float("nan")}  # nan: frozen
        history["expert_loss"].append(record["expert_loss"])
        history["gating_loss"].append(record["gating_loss"])
        if callback is not None:
            callback(iteration, model, record)
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0 or iteration == config.iterations - 1:
                gating = "frozen" if math.isnan(record["gating_loss"]) else f"{record['gating_loss']:.3g}"
                bar.set_postfix(expert_loss=f"{record['expert_loss']:.3g}", gating_loss=gating)
    if bar is not None:
        bar.close()

    return finish_training(model, obs_all, config, history, start, "VDD")


def finish_training(model: MixtureOfExpertsPolicy, obs_all: torch.Tensor, config, history: dict, start: float,
                    method: str) -> MixtureOfExpertsPolicy:
    """Detect and report dead experts, complete ``history`` and attach it to the model (VDD and EM alike)."""
    weights = mean_gating_weights(model, obs_all)
    dead = [int(z) for z in np.flatnonzero(weights < config.dead_expert_threshold)]
    if dead:
        message = (f"{method}: {len(dead)} dead expert(s) {dead}: mean gating weight below "
                   f"{config.dead_expert_threshold:g} ({[round(float(weights[z]), 5) for z in dead]})")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        history["warnings"].append(message)
    history.update(dead_experts=dead, mean_gating_weights=weights.tolist(),
                   wall_time_s=time.perf_counter() - start, config=config.to_dict())
    model.training_history = history
    return model.eval()


def analytic_check(teacher, config: VDDConfig, eval_observations, n_demos: int = 65536,
                   observation_sampler=None, n_eval_samples: int = 4096) -> dict:
    """Distil an :class:`~vdd_ros.learn.teacher_protocol.AnalyticTeacher` and measure the result.

    Demonstrations are ``n_demos`` teacher samples at states from ``observation_sampler(n, rng)``
    (default: all-zero states). Returns the teacher's ``evaluate_student`` report at
    ``eval_observations`` plus the seed, wall and CPU time of the distillation, dead and
    re-initialised experts.
    """
    rng = np.random.default_rng(config.seed + 12345)
    if observation_sampler is None:
        observations = np.zeros((n_demos, teacher.obs_dim), np.float32)
    else:
        observations = np.asarray(observation_sampler(n_demos, rng), np.float32)
    generator = torch.Generator().manual_seed(config.seed + 54321)
    actions = teacher.sample(torch.as_tensor(observations), generator=generator).numpy()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = distill(teacher, observations, actions, config, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    report = teacher.evaluate_student(model, eval_observations, n_samples=n_eval_samples, generator=generator)
    report.update(seed=config.seed, wall_time_s=wall, cpu_time_s=cpu,
                  dead_experts=model.training_history["dead_experts"],
                  reinitialised=model.training_history["reinitialised"])
    return report
