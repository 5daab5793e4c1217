"""What VDD (``vdd.py``) and EM (``em.py``) share: the mixture they train and the EM iteration.

- checks of the fields both configs have (schedule, mixture shape and start, backbone, device);
- building the seeded :class:`~vdd_ros.learn.moe.MixtureOfExpertsPolicy` a config describes;
- the optimiser pair (experts: backbone and heads; gating) and the linear learning-rate decay;
- the posterior ``log q(z | a, s)`` and one EM iteration (E-step, expert and gating M-steps),
  which is EM's whole loop body and VDD's EM warm start;
- input and finiteness checks, and the end of a run (dead experts, history).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.validation import fail


def lr_factor(config, iteration: int, horizon: int | None = None) -> float:
    """Learning-rate multiplier at ``iteration`` of a schedule lasting ``horizon`` (default: all) iterations."""
    if config.lr_decay == "none":
        return 1.0
    horizon = config.iterations if horizon is None else horizon
    progress = min(1.0, iteration / max(1, horizon - 1))
    return 1.0 - (1.0 - config.lr_final_fraction) * progress


def build_mixture(config, obs_dim: int, act_dim: int, history: int) -> MixtureOfExpertsPolicy:
    """The seeded mixture a VDDConfig or an EMConfig describes, reading ``history`` frames of ``obs_dim / history``."""
    owner = type(config).__name__
    if obs_dim % history != 0:
        fail(f"{owner}.history", f"a divisor of the observation width {obs_dim}", history)
    torch.manual_seed(config.seed)
    return MixtureOfExpertsPolicy(obs_dim // history, history, act_dim, config.n_experts, config.backbone,
                                  config.covariance, config.min_std, config.init_std, config.mean_init_spread,
                                  config.gating, generator=torch.Generator().manual_seed(config.seed),
                                  gating_hidden=config.gating_hidden, gating_layers=config.gating_layers
                                  ).to(config.device)


def expert_parameters(model: MixtureOfExpertsPolicy) -> list[torch.nn.Parameter]:
    gating_ids = {id(p) for p in model.gating_net.parameters()}
    return [p for p in model.parameters() if id(p) not in gating_ids]


def mixture_optimisers(model: MixtureOfExpertsPolicy, config) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the experts (backbone and heads) at ``config.expert_lr``, for the gating at ``config.gating_lr``."""
    return (torch.optim.Adam(expert_parameters(model), lr=config.expert_lr),
            torch.optim.Adam(model.gating_net.parameters(), lr=config.gating_lr))


def set_learning_rate(optimiser: torch.optim.Optimizer, lr: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr


def as_tensor(name: str, values, width: int | None, device: torch.device) -> torch.Tensor:
    """``[N, width]`` float32 tensor (any width when None) from numpy/torch; a clear error on a wrong
    shape or non-finite values."""
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    tensor = tensor.to(device=device, dtype=torch.float32)
    if tensor.dim() != 2 or (width is not None and tensor.shape[1] != width) or tensor.shape[0] < 1:
        fail(name, f"shape [N >= 1, {'dim' if width is None else width}]", f"shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        fail(name, "finite numbers", "NaN or Inf")
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


def em_phase(model: MixtureOfExpertsPolicy, state_action_batch, config, iterations: int, batch_size: int,
             expert_opt, gating_opt, expert_steps: int = 1, gating_steps: int = 1, bar=None, callback=None,
             history: dict | None = None) -> list[float]:
    """``iterations`` EM iterations on ``state_action_batch(batch_size, iteration) -> (obs, act)``: the whole of
    ``train_em`` and the whole of VDD's EM warm start (one algorithm, one code path).

    Learning rates ``config.expert_lr`` / ``config.gating_lr`` decay over these ``iterations`` as
    ``config.lr_decay`` says. Returns the expert losses; appends both losses to ``history`` when given.
    """
    losses = []
    for iteration in range(iterations):
        factor = lr_factor(config, iteration, iterations)
        set_learning_rate(expert_opt, config.expert_lr * factor)
        set_learning_rate(gating_opt, config.gating_lr * factor)
        expert_loss, gating_loss = em_iteration(model, *state_action_batch(batch_size, iteration), expert_opt,
                                                gating_opt, iteration, expert_steps, gating_steps)
        losses.append(expert_loss)
        if history is not None:
            history["expert_loss"].append(expert_loss)
            history["gating_loss"].append(gating_loss)
        if callback is not None:
            callback(iteration, model, {"iteration": iteration, "expert_loss": expert_loss,
                                        "gating_loss": gating_loss})
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0 or iteration == iterations - 1:
                bar.set_postfix(em_nll=f"{expert_loss:.3g}")
    return losses


def mean_gating_weights(model: MixtureOfExpertsPolicy, observations: torch.Tensor, max_states: int = 4096
                        ) -> np.ndarray:
    """Gating weights averaged over (up to ``max_states`` evenly spaced) states, ``[Z]``."""
    step = max(1, observations.shape[0] // max_states)
    with torch.no_grad():
        weights, _ = model.weights_and_means(observations[::step])
    return weights.mean(0).cpu().numpy()


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it")


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
