"""The EM baseline: the same mixture of experts trained directly on demonstrations.

Every iteration, on a fresh batch of (state, action) pairs (``mixture_training.em_iteration``):
1. E-step: responsibilities ``r_z = q(z | a, s)`` of the current model (no gradient);
2. expert M-step: gradient steps on the responsibility-weighted log-likelihood
   ``-mean sum_z r_z log N(a; mu_z(s), S_z(s))``;
3. gating M-step: soft cross-entropy ``-mean sum_z r_z log w_z(s)``.
EM maximises the forward likelihood, which tends to average modes when an expert straddles
them; it is the baseline VDD is compared against. The defaults are the shipped arm-task
baseline (``config/em.yaml``); ``EMConfig.preset("gmm2d")`` is the 2-D checks' recipe.
"""
from __future__ import annotations

import time

import torch

from vdd_ros.learn.configs import EMConfig
from vdd_ros.learn.mixture_training import (
    as_tensor,
    build_mixture,
    em_phase,
    finish_training,
    mixture_optimisers,
    progress_bar,
)
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.validation import fail


def train_em(observations, actions, config: EMConfig, progress: bool = True, callback=None
             ) -> MixtureOfExpertsPolicy:
    """Fit a mixture of experts to ``(observations [N, obs_dim], actions [N, act_dim])`` by EM.

    ``callback(iteration, model, record)`` is called every iteration. The returned model carries
    ``training_history`` (losses, mean gating weights, dead experts, wall time, config).
    """
    config.validate()
    device = torch.device(config.device)
    obs_all = as_tensor("observations", observations, None, device)
    act_all = as_tensor("actions", actions, None, device)
    if act_all.shape[0] != obs_all.shape[0]:
        fail("actions", f"{obs_all.shape[0]} rows (one per observation)", f"{act_all.shape[0]} rows")

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    start = time.perf_counter()
    model = build_mixture(config, obs_all.shape[1], act_all.shape[1], config.history)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    expert_opt, gating_opt = mixture_optimisers(model, config)
    history = {"expert_loss": [], "gating_loss": [], "warnings": []}

    def state_action_batch(size: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(obs_all.shape[0], (size,), generator=generator, device=device)
        return obs_all[idx], act_all[idx]

    bar = progress_bar(progress, config.iterations, "EM")
    em_phase(model, state_action_batch, config, config.iterations, config.batch_size, expert_opt, gating_opt,
             config.expert_steps_per_iter, config.gating_steps_per_iter, bar, callback, history)
    if bar is not None:
        bar.close()

    return finish_training(model, obs_all, config, history, start, "EM")
