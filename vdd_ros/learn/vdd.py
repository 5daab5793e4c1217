"""Variational Diffusion Distillation (VDD): a score teacher distilled into a mixture of experts.

Read top to bottom with /work/shared/design/vdd-method.md. Every iteration:

1. E-step: ``qt(z|a,s)`` = the current student's posterior over experts (parameters detached).
2. Expert M-step (:func:`expert_loss`): V reparameterised samples per expert and state; the
   teacher's score at a noise level sigma (no gradient) gives the surrogate ``<stopgrad(f), a>``
   of ``log pi(a|s)``; maximise ``mean_v[<f, a_v> + log qt(z|a_v,s)] + H(q_z)`` weighted by
   ``stopgrad(w_z(s))``.
3. Gating M-step (:func:`gating_loss`): soft cross-entropy of the gating on demonstration (or
   teacher) actions with the posterior as target (amortised EM).

Before the iterations, an EM warm start (``warm_start_iterations``) on the demonstrations gives
each expert its own region and the gating a meaning (measured on the arm task: experts started
elsewhere all followed the teacher's off-manifold score onto the same route). The mixture, its
optimisers and the EM iteration are shared with the EM baseline (``mixture_training.py``).

The defaults are the shipped arm-task recipe (``config/distill.yaml`` writes them out). The
paper's 2-D check needs another one, ``VDDConfig.preset("gmm2d")``: uniform gating for the experts
during a warm-up (70% of the run) while the gating is trained, then the gating FROZEN (training
it while the experts use it is unstable even from the exact solution); sigma annealed from
U[0.2, 0.5] to U[0.01, 0.05]; antithetic samples and 1024 actions per gating step; duplicate or
dead experts re-initialised during the warm-up at the actions the mixture explains worst.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from vdd_ros.learn.configs import VDDConfig
from vdd_ros.learn.mixture_training import (
    as_tensor,
    build_mixture,
    check_finite,
    em_phase,
    finish_training,
    lr_factor,
    mean_gating_weights,
    mixture_optimisers,
    posterior_log_probs,
    progress_bar,
    set_learning_rate,
)
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.learn.teacher_protocol import AnalyticTeacher, can_sample, check_teacher
from vdd_ros.tasks.gmm2d import five_modes, mode_coverage, moving_five_modes, six_modes
from vdd_ros.validation import fail


# --- the two M-steps ---------------------------------------------------------------------------
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


# --- warm start and re-initialisation --------------------------------------------------------
def em_warm_start(model: MixtureOfExpertsPolicy, state_action_batch, config: VDDConfig, bar=None) -> list[float]:
    """EM on ``state_action_batch(size, iteration)`` pairs before VDD (``warm_start_iterations``).

    The same code as ``train_em`` (``mixture_training.em_phase``): ``vdd train-em`` with
    ``iterations = warm_start_iterations``, ``batch_size = gating_batch_size`` and the same learning
    rates, decay and seed trains the same model. Its optimisers are its own (as train_em's are).
    """
    expert_opt, gating_opt = mixture_optimisers(model, config)
    return em_phase(model, state_action_batch, config, config.warm_start_iterations, config.gating_batch_size,
                    expert_opt, gating_opt, bar=bar)


def vdd_lr_factor(config: VDDConfig, iteration: int, horizon: int | None = None) -> float:
    """Learning-rate multiplier of VDD iteration ``iteration``: the linear decay times the warm-up ramp.

    After a warm start, a fresh Adam's first steps move every parameter by about the learning rate
    whatever its gradient (``m/sqrt(v) = sign(g)``); the ramp over ``lr_warmup_iterations`` lets the
    moments settle before the steps are full size.
    """
    ramp = 1.0
    if config.lr_warmup_iterations > 0 and config.warm_start_iterations > 0:
        ramp = min(1.0, (iteration + 1) / (config.lr_warmup_iterations + 1))
    return ramp * lr_factor(config, iteration, horizon)


# --- the guard: a cheap validation signal --------------------------------------------------------
# standard deviation of the normalised route entropy of n episodes is about ENTROPY_SD / sqrt(n) (simulated:
# 6 or 16 routes, uniform or arm_sort's teacher frequencies, n = 50: 0.018-0.030)
ENTROPY_SD = 0.2


def rollout_score(record: dict) -> float:
    """The guard's closed-loop score of a validation record: success rate + route entropy (each in [0, 1])."""
    return record["success_rate"] + record["entropy"]


class Guard:
    """Validation signals at fixed dataset states, the best state of the run and the warm start's figures.

    Every ``validation_every`` iterations (and right after the warm start, as "iteration -1"):
    - ``teacher_nll``: the mixture's negative log-likelihood of teacher samples (demonstration actions
      when the teacher cannot sample) at the validation states, per action dimension: low when the
      student covers what the teacher does;
    - ``displacement``: RMS of ``sigma^2 * score`` (how far the teacher's denoiser would move the
      action) at each expert's mean, weighted by the gating, at sigma = ``sigma_max``: low when the
      actions the student executes lie where the teacher puts its mass.
    - with ``rollout`` (``rollout(model) -> {"success_rate": s, "entropy": e}``: closed-loop episodes of the
      task's simulator, the same start states every time): the success rate and route entropy.
    The score is success rate + route entropy where there is a rollout (the two figures the fidelity targets
    are set on), otherwise ``teacher_nll``. Every evaluated state is kept in memory; :meth:`choose` picks the
    latest one whose score is within one standard error of the best (the NLL: the best itself). Demonstration
    likelihood alone is a poor judge of a reverse-KL fit: VDD
    narrows experts onto the teacher's modes, which can raise ``teacher_nll`` while the policy gets no worse
    (arm_sort: docs/results.md).
    """

    def __init__(self, teacher, obs_all, act_all, config: VDDConfig, generator_seed: int, rollout=None):
        self.rollout = rollout
        generator = torch.Generator(device=obs_all.device).manual_seed(generator_seed)
        n_states = min(config.validation_states, obs_all.shape[0])
        index = torch.randperm(obs_all.shape[0], generator=generator, device=obs_all.device)[:n_states]
        self.obs = obs_all[index]
        self.teacher, self.config = teacher, config
        if can_sample(teacher):
            with torch.no_grad():
                self.actions = teacher.sample(self.obs, generator=generator).to(self.obs.dtype)
            self.action_source = "teacher samples"
        else:
            self.actions = act_all[index]
            self.action_source = "demonstration actions"
        self.sigma = float(config.sigma_max)
        self.records: list[dict] = []
        self.states: dict[int, dict] = {}  # iteration -> the model's state then

    def evaluate(self, model: MixtureOfExpertsPolicy, iteration: int) -> dict:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            nll = -float(model.log_prob(self.actions, self.obs).mean()) / model.act_dim
            weights, means = model.weights_and_means(self.obs)  # [B, Z], [B, Z, A]
            batch, n_experts, act_dim = means.shape
            flat = means.reshape(batch * n_experts, act_dim)
            obs = self.obs.repeat_interleave(n_experts, 0)
            sigma = torch.full((flat.shape[0],), self.sigma, dtype=flat.dtype, device=flat.device)
            score = self.teacher.score(flat, obs, sigma)
            check_finite(iteration, "teacher score at the validation states", score, tuple(flat.shape))
            moved = (self.sigma ** 2 * score).pow(2).mean(-1)
            displacement = float((weights.reshape(-1) * moved).sum() / batch) ** 0.5
        record = {"iteration": iteration, "teacher_nll": nll, "displacement": displacement}
        if self.rollout is not None:
            record.update({key: float(value) for key, value in self.rollout(model).items()})
        model.train(was_training)
        self.records.append(record)
        self.states[iteration] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return record

    def loss(self, record: dict) -> float:
        """Lower is better: -(success + entropy) with a rollout, else ``teacher_nll``."""
        return -rollout_score(record) if self.rollout is not None else record["teacher_nll"]

    def choose(self) -> tuple[dict, dict, float]:
        """``(best record, chosen record, margin)``. With a rollout the chosen one is the latest whose loss is
        within ``margin`` of the best: one standard error of a closed-loop score (success: binomial at the best's
        rate; entropy: ENTROPY_SD / sqrt(episodes); at least one episode's worth). Among states the validation
        cannot tell apart, the one trained longest: the maximum of noisy evaluations favours early lucky ones.
        With the NLL alone the last state, unless the run degraded its start: then the best (the NLL of a
        reverse-KL fit is no measure to pick among good states by: the 2-D checks lose mode weights that way)."""
        best = min(self.records, key=self.loss)
        if self.rollout is None:
            return best, best if self.degraded() else self.records[-1], 0.0
        margin = max(math.sqrt(self._score_variance(best["success_rate"])), 1.0 / self._episodes)
        chosen = [r for r in self.records if self.loss(r) <= self.loss(best) + margin + 1e-12][-1]
        return best, chosen, margin

    @property
    def _episodes(self) -> int:
        return max(int(self.config.validation_episodes), 1)

    def _score_variance(self, success_rate: float) -> float:
        """Variance of one closed-loop score (success: binomial; entropy: ENTROPY_SD / sqrt(episodes))."""
        return (success_rate * (1.0 - success_rate) + ENTROPY_SD ** 2) / self._episodes

    def degraded(self) -> bool:
        """Whether the run ended worse than its start: with a rollout, success + entropy lower by more than two
        standard errors of the difference over ``validation_episodes`` each (success: binomial; entropy:
        ENTROPY_SD / sqrt(episodes); at least two episodes' worth); otherwise a higher ``teacher_nll``."""
        start, final = self.records[0], self.records[-1]
        if self.rollout is None:
            return final["teacher_nll"] > start["teacher_nll"]
        pooled = (start["success_rate"] + final["success_rate"]) / 2.0
        margin = max(2.0 * math.sqrt(2.0 * self._score_variance(pooled)), 2.0 / self._episodes)
        return rollout_score(start) - rollout_score(final) > margin


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


def _heads(model: MixtureOfExpertsPolicy) -> list[tuple[torch.nn.Linear, int]]:
    """The expert heads with their rows per expert (mean, Cholesky diagonal, off-diagonal)."""
    act_dim, n_off = model.act_dim, model.act_dim * (model.act_dim - 1) // 2
    heads = [(model.mean_head, act_dim), (model.std_head, act_dim)]
    if model.off_diagonal_head is not None:
        heads.append((model.off_diagonal_head, n_off))
    return heads


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
    act_dim = model.act_dim
    with torch.no_grad():
        for expert, target in zip(experts, targets):
            for head, width in _heads(model):
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


def duplicate_groups(model: MixtureOfExpertsPolicy, obs: torch.Tensor, weights: np.ndarray, distance: float
                     ) -> list[list[int]]:
    """Groups of experts that sit on one mode: each lighter member's mean lies within ``distance`` of the
    group's heaviest expert's stds (RMS over the dimensions would shrink with width: this is the norm,
    as in :func:`redundant_experts`), averaged over ``obs``. Groups of one are left out."""
    with torch.no_grad():
        features = model.features(obs)
        means = model.expert_means(features)
        stds = model.scale_diagonal(model.expert_scales(features))
    free, groups = set(range(model.n_experts)), []
    for expert in np.argsort(-weights, kind="stable"):
        expert = int(expert)
        if expert not in free:
            continue
        free.discard(expert)
        members = [other for other in sorted(free)
                   if ((means[:, other] - means[:, expert]) / stds[:, expert]).norm(dim=-1).mean().item() < distance]
        free.difference_update(members)
        if members:
            groups.append([expert, *members])
    return groups


def _head_tensors(model: MixtureOfExpertsPolicy, optimiser: torch.optim.Optimizer):
    """(tensor, rows per expert) of every head parameter and its Adam moments."""
    for head, width in _heads(model):
        for parameter in (head.weight, head.bias):
            state = optimiser.state.get(parameter, {})
            for tensor in [parameter.data] + [state[m] for m in ("exp_avg", "exp_avg_sq") if m in state]:
                yield tensor, width


def merge_experts(model: MixtureOfExpertsPolicy, group: list[int], weights: np.ndarray,
                  optimiser: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Make ``group``'s experts identical: their head rows (mean, Cholesky) and those rows' Adam moments
    become the gating-weighted average of the members'. The heads are linear in the shared features, so
    the merged mean is the weighted average of the members' means at every state; the gating, and so each
    member's weight, is untouched (duplicates on one mode are harmless: their weights add up).
    Returns the tensors as they were (for :func:`restore_heads`)."""
    saved = []
    share = weights[group] / weights[group].sum()
    with torch.no_grad():
        for tensor, width in _head_tensors(model, optimiser):
            saved.append(tensor.clone())
            rows = tensor.view(model.n_experts, width, *tensor.shape[1:])
            rows[group] = torch.einsum("g,g...->...", torch.as_tensor(share, dtype=tensor.dtype), rows[group])
    return saved


def restore_heads(model: MixtureOfExpertsPolicy, optimiser: torch.optim.Optimizer, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for (tensor, _), old in zip(_head_tensors(model, optimiser), saved):
            tensor.copy_(old)


def merge_duplicates(model: MixtureOfExpertsPolicy, obs: torch.Tensor, actions: torch.Tensor, config: VDDConfig,
                     optimiser: torch.optim.Optimizer) -> list[dict]:
    """Merge every group of :func:`duplicate_groups` whose merge the data accepts: the mixture's
    log-likelihood of ``actions`` (teacher samples or demonstrations at ``obs``), weighted by the group's
    posterior, may fall by at most ``merge_tolerance`` nats per action dimension (two experts on two
    nearby modes would lose far more); else the group is left as it was. Returns one record per group."""
    weights = mean_gating_weights(model, obs)
    records = []
    for group in duplicate_groups(model, obs, weights, config.merge_distance):
        with torch.no_grad():
            features = model.features(obs)
            log_w = torch.log_softmax(model.gating_logits(obs, features), -1)
            log_joint = log_w + model.gaussian_log_probs(actions, model.expert_means(features),
                                                         model.expert_scales(features))
            before = torch.logsumexp(log_joint, -1)
            mass = (log_joint[:, group].logsumexp(-1) - before).exp()  # the group's posterior
        saved = merge_experts(model, group, weights, optimiser)
        with torch.no_grad():
            after = model.log_prob(actions, obs)
        loss = float((mass * (before - after)).sum() / mass.sum().clamp_min(1e-12)) / model.act_dim
        accepted = loss <= config.merge_tolerance
        if not accepted:
            restore_heads(model, optimiser, saved)
        records.append({"experts": group, "nll_change": round(loss, 5), "merged": accepted})
    return records


# --- the run ------------------------------------------------------------------------------------
def distill(teacher, observations, actions, config: VDDConfig, progress: bool = True, callback=None,
            rollout=None) -> MixtureOfExpertsPolicy:
    """Distil ``teacher`` into a mixture of experts on the dataset states ``observations [N, obs_dim]``.

    ``actions [N, act_dim]`` (demonstrations paired with the states) feed the gating step; with
    ``None`` the teacher's ``sample(obs, generator)`` provides them. ``callback(iteration, model,
    record)`` is called every iteration (record: that iteration's losses). The returned model
    carries ``training_history`` (losses, mean gating weights, dead experts, wall time, config).
    The student reads the teacher's observation window: ``teacher.history`` frames (1 without it).
    ``rollout(model) -> {"success_rate", "entropy"}`` (a task with a simulator): the guard's closed-loop signal.
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
    if config.warm_start_iterations > 0 and act_all is None and not can_sample(teacher):
        fail("VDDConfig.warm_start_iterations", "0 without demonstration actions or a teacher with sample(obs)",
             config.warm_start_iterations)

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    start = time.perf_counter()
    # the student reads the teacher's observation window (frames of obs_dim / history)
    model = build_mixture(config, obs_all.shape[1], teacher.act_dim, int(getattr(teacher, "history", 1)))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    expert_opt, gating_opt = mixture_optimisers(model, config)
    history = {"expert_loss": [], "gating_loss": [], "warnings": [], "reinitialised": [], "merged": [],
               "warm_start_loss": []}
    reinit_iterations = {round(fraction * config.iterations) for fraction in config.reinit_fractions}
    merge_iterations = {round(fraction * config.iterations) for fraction in config.merge_fractions}
    merge_obs = merge_act = None
    if merge_iterations:  # fixed pairs drawn with their own generator: the training draws stay as they were
        merge_generator = torch.Generator(device=device).manual_seed(config.seed + 104729)
        index = torch.randperm(obs_all.shape[0], generator=merge_generator, device=device)[:config.merge_batch_size]
        merge_obs = obs_all[index]
        if act_all is not None:
            merge_act = act_all[index]
        else:
            with torch.no_grad():
                merge_act = teacher.sample(merge_obs, generator=merge_generator).to(merge_obs.dtype)
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

    bar = progress_bar(progress, config.iterations + config.warm_start_iterations, "VDD")
    if config.warm_start_iterations > 0:
        history["warm_start_loss"] = em_warm_start(model, state_action_batch, config, bar)
    guard = None
    if config.validation_every > 0:
        guard = Guard(teacher, obs_all, act_all, config, config.seed + 7919, rollout)
        guard.evaluate(model, -1)  # the warm start (or the initial mixture)
    for iteration in range(config.iterations):
        set_learning_rate(expert_opt, config.expert_lr * vdd_lr_factor(config, iteration))
        set_learning_rate(gating_opt, config.gating_lr * vdd_lr_factor(config, iteration, config.gating_iterations))
        warming_up = iteration < config.gating_warmup_iterations
        if iteration in reinit_iterations and iteration > 0:
            obs, act = state_action_batch(config.reinit_batch_size, iteration)
            redundant = redundant_experts(model, obs, mean_gating_weights(model, obs), config.reinit_distance,
                                          config.dead_expert_threshold)
            if redundant:
                moved = reinitialise_experts(model, redundant, obs, act, config.init_std, expert_opt)
                history["reinitialised"].append({"iteration": iteration, "experts": moved})
        if iteration in merge_iterations:
            history["merged"].append({"iteration": iteration,
                                      "groups": merge_duplicates(model, merge_obs, merge_act, config, expert_opt)})

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
        if guard is not None and ((iteration + 1) % config.validation_every == 0 or iteration == config.iterations - 1):
            record["validation"] = guard.evaluate(model, iteration)
        if callback is not None:
            callback(iteration, model, record)
        if bar is not None:
            bar.update(1)
            if iteration % 20 == 0 or iteration == config.iterations - 1:
                gating = "frozen" if math.isnan(record["gating_loss"]) else f"{record['gating_loss']:.3g}"
                postfix = dict(expert_loss=f"{record['expert_loss']:.3g}", gating_loss=gating)
                if guard is not None:
                    postfix["val_nll"] = f"{guard.records[-1]['teacher_nll']:.3g}"
                    if "success_rate" in guard.records[-1]:
                        postfix["val_success"] = f"{guard.records[-1]['success_rate']:.2f}"
                bar.set_postfix(**postfix)
    if bar is not None:
        bar.close()
    if guard is not None:
        finish_guard(model, guard, config, history, verbose=progress)
    return finish_training(model, obs_all, config, history, start, "VDD")


def finish_guard(model: MixtureOfExpertsPolicy, guard: Guard, config: VDDConfig, history: dict,
                 verbose: bool = True) -> None:
    """With ``guard_keep_best``, return the state :meth:`Guard.choose` picks (the warm start itself when nothing
    after it came close) instead of the last; warn when the run ended worse than its start, or when no VDD state
    came within the margin of the warm start."""
    start, final = guard.records[0], guard.records[-1]
    best, chosen, margin = guard.choose()
    history["validation"] = guard.records
    history["validation_actions"] = guard.action_source
    history["best_iteration"] = best["iteration"]
    history["returned_iteration"] = final["iteration"]
    label = "warm start" if config.warm_start_iterations > 0 else "initial mixture"
    summary = (f"VDD guard: validation NLL of {guard.action_source} {start['teacher_nll']:.4g} after the {label}, "
               f"{final['teacher_nll']:.4g} at the end; displacement {start['displacement']:.3g} -> "
               f"{final['displacement']:.3g}")
    if guard.rollout is not None:
        summary += (f"; closed-loop success + entropy over {config.validation_episodes} episodes "
                    f"{start['success_rate']:.3f} + {start['entropy']:.3f} -> {final['success_rate']:.3f} + "
                    f"{final['entropy']:.3f}, best {rollout_score(best):.3f} at iteration {best['iteration']}, "
                    f"latest within {margin:.3f} of it: iteration {chosen['iteration']}")
        signal, before, after = "closed-loop success + entropy", rollout_score(start), rollout_score(final)
    else:
        summary += f"; best NLL {best['teacher_nll']:.4g} at iteration {best['iteration']}"
        signal, before, after = "validation NLL", start["teacher_nll"], final["teacher_nll"]
    history["guard"] = summary
    if verbose:
        print(summary, flush=True)
    if config.guard_keep_best and chosen["iteration"] != final["iteration"]:
        model.load_state_dict(guard.states[chosen["iteration"]])
        history["returned_iteration"] = chosen["iteration"]
    guard.states.clear()
    messages = []
    if guard.degraded():
        messages.append(f"VDD degraded its {label}: {signal} {before:.4g} -> {after:.4g}")
    if config.guard_keep_best and chosen["iteration"] == start["iteration"]:
        messages.append(f"no VDD state came within {margin:.3g} of its {label} by the {signal}")
    if messages:
        message = "; ".join(messages) + f"; returning iteration {history['returned_iteration']}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        history["warnings"].append(message)


def analytic_demonstrations(teacher, seed: int, n_demos: int, observation_sampler=None
                            ) -> tuple[np.ndarray, np.ndarray, torch.Generator]:
    """``n_demos`` teacher samples at states from ``observation_sampler(n, rng)`` (default: all-zero states),
    drawn from generators seeded by ``seed``; returns the torch generator too, for draws that follow."""
    rng = np.random.default_rng(seed + 12345)
    if observation_sampler is None:
        observations = np.zeros((n_demos, teacher.obs_dim), np.float32)
    else:
        observations = np.asarray(observation_sampler(n_demos, rng), np.float32)
    generator = torch.Generator().manual_seed(seed + 54321)
    actions = teacher.sample(torch.as_tensor(observations), generator=generator).numpy()
    return observations, actions, generator


def analytic_check(teacher, config: VDDConfig, eval_observations, n_demos: int = 65536,
                   observation_sampler=None, n_eval_samples: int = 4096) -> dict:
    """Distil an :class:`~vdd_ros.learn.teacher_protocol.AnalyticTeacher` and measure the result.

    Demonstrations are ``n_demos`` teacher samples at states from ``observation_sampler(n, rng)``
    (default: all-zero states). Returns the teacher's ``evaluate_student`` report at
    ``eval_observations`` plus the seed, wall and CPU time of the distillation, dead and
    re-initialised experts.
    """
    observations, actions, generator = analytic_demonstrations(teacher, config.seed, n_demos, observation_sampler)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = distill(teacher, observations, actions, config, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    report = teacher.evaluate_student(model, eval_observations, n_samples=n_eval_samples, generator=generator)
    report.update(seed=config.seed, wall_time_s=wall, cpu_time_s=cpu,
                  dead_experts=model.training_history["dead_experts"],
                  reinitialised=model.training_history["reinitialised"])
    return report


class TiltedAnalyticTeacher(AnalyticTeacher):
    """:class:`AnalyticTeacher` of a state-conditional mixture whose weights depend on the state too
    (``StateConditionalGaussianMixture(weight_rate=...)``): exact score, log-density and samples."""

    def __init__(self, mixture):
        super().__init__(mixture)
        self._weight_rate = torch.as_tensor(mixture.weight_rate, dtype=torch.float64)

    def mode_weights(self, obs: torch.Tensor) -> torch.Tensor:
        """Mode weights ``[B, K]`` (float64)."""
        logits = torch.log(self._weights)[None] + obs.to(torch.float64) @ self._weight_rate.T
        return torch.softmax(logits, -1)

    def _log_joint(self, actions, obs, sigma, dtype):
        log_joint, diff, variances = super()._log_joint(actions, obs, sigma, dtype)
        tilt = torch.log(self.mode_weights(obs)) - torch.log(self._weights)[None]
        return log_joint + tilt.to(dtype), diff, variances

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        means = self.means(obs)
        modes = torch.multinomial(self.mode_weights(obs), 1, generator=generator).squeeze(-1)
        rows = torch.arange(obs.shape[0])
        noise = torch.randn(obs.shape[0], self.act_dim, generator=generator, dtype=torch.float64)
        return (means[rows, modes] + self._variances[modes, None].sqrt() * noise).to(obs.dtype)


def coverage_check(teacher: AnalyticTeacher, config: VDDConfig, eval_observations, n_demos: int = 16384,
                   observation_sampler=None, near: float = 0.15, far: float = 0.3) -> dict:
    """Distil an analytic teacher (demonstrations as in :func:`analytic_check`) and measure how the experts
    cover its modes at each row of ``eval_observations`` (``tasks.gmm2d.mode_coverage``): the worst
    ``weight_error`` and ``stray`` weight over the rows, both per row, seed, wall time and the merges."""
    observations, actions, generator = analytic_demonstrations(teacher, config.seed, n_demos, observation_sampler)
    start = time.perf_counter()
    model = distill(teacher, observations, actions, config, progress=False)
    wall = time.perf_counter() - start
    obs = torch.as_tensor(np.asarray(eval_observations, np.float32)).reshape(-1, teacher.obs_dim)
    mode_weights = teacher.mode_weights(obs) if hasattr(teacher, "mode_weights") else teacher._weights.expand(
        obs.shape[0], -1)
    with torch.no_grad():
        weights, means = model.weights_and_means(obs)
    rows = [mode_coverage(teacher.means(obs)[row].numpy(), mode_weights[row].numpy(), means[row].numpy(),
                          weights[row].numpy(), near, far) for row in range(obs.shape[0])]
    return {"seed": config.seed, "weight_error": max(r[0] for r in rows), "stray": max(r[1] for r in rows),
            "rows": rows, "wall_time_s": wall, "merged": model.training_history["merged"],
            "dead_experts": model.training_history["dead_experts"]}


def uniform_scalar_states(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` scalar states uniform in [-1, 1] (the state-conditional coverage case)."""
    return rng.uniform(-1.0, 1.0, size=(n, 1))


@dataclass(frozen=True)
class CoverageCase:
    """One 2-D check with more experts than modes: the mixture, the experts, the states checked, the recipe."""

    mixture: object  # a factory of tasks.gmm2d
    n_experts: int
    eval_observations: tuple = ((0.0,),)
    observation_sampler: object = None
    recipe: dict = field(default_factory=dict)  # VDDConfig fields on top of the gmm2d preset

    def teacher(self) -> AnalyticTeacher:
        mixture = self.mixture()
        return TiltedAnalyticTeacher(mixture) if hasattr(mixture, "weight_rate") else AnalyticTeacher(mixture)

    def config(self, seed: int, **changes) -> VDDConfig:
        return VDDConfig.preset("gmm2d", n_experts=self.n_experts, seed=seed, **{**self.recipe, **changes})


# state-independent: one state, so a few states per expert step and a tiny backbone cost nothing in accuracy
_ONE_STATE = dict(batch_size=4, samples_per_expert=32, gating_batch_size=256,
                  backbone=dict(hidden=16, mlp_layers=1, activation="mish"))
COVERAGE_CASES = {
    "5 modes, 8 experts": CoverageCase(five_modes, 8, recipe=_ONE_STATE),
    "6 modes, 10 experts": CoverageCase(six_modes, 10, recipe=_ONE_STATE),
    "5 modes moving with s, 8 experts": CoverageCase(
        moving_five_modes, 8, eval_observations=((-0.5,), (0.0,), (0.5,)), observation_sampler=uniform_scalar_states,
        recipe=dict(batch_size=16, samples_per_expert=16, gating_batch_size=256, iterations=2500,
                    backbone=dict(hidden=32, mlp_layers=2, activation="mish"))),
}
