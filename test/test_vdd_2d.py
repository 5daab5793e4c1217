"""The paper's 2-D check for VDD, over seeds, plus the checks every VDD input must pass.

The ring check runs the 2-D recipe ``VDDConfig.preset("gmm2d")`` on ten seeds (two worker
processes): one seed that converges proves nothing (see the method page's calibration notes).
The defaults of VDDConfig are the arm task's recipe, which these checks never rely on.
"""
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.teacher_protocol import AnalyticTeacher
from vdd_ros.learn.vdd import VDDConfig, analytic_check, distill
from vdd_ros.tasks.gmm2d import GaussianMixture, StateConditionalGaussianMixture

RING_SEEDS = range(10)
SMALL_MLP = BackboneConfig(hidden=64, mlp_layers=2)


def run_checks(jobs):
    """``analytic_check(*job)`` for every job, in two spawned worker processes (2-core CI)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(analytic_check, *zip(*jobs)))


def summary(report) -> str:
    return (f"seed {report['seed']}: wall {report['wall_time_s']:.1f} s, CPU {report['cpu_time_s']:.1f} s, "
            f"max mean error {report['max_mean_error']:.3f}, max weight error {report['max_weight_error']:.3f}, "
            f"reverse KL {report['max_reverse_kl']:.4f}, one-to-one {report['one_to_one']}, "
            f"dead {report['dead_experts']}")


@pytest.mark.slow
def test_ring_of_eight_modes_every_seed():
    teacher = AnalyticTeacher(GaussianMixture.ring(n_modes=8, radius=2.0, std=0.5), obs_dim=1)
    reports = run_checks([(teacher, VDDConfig.preset("gmm2d", seed=seed), np.zeros((1, 1))) for seed in RING_SEEDS])
    print("\n" + "\n".join(summary(r) for r in reports))
    for report in reports:
        assert report["one_to_one"], summary(report)  # each mode has its own expert
        assert report["max_mean_error"] < 0.05, summary(report)
        assert report["max_weight_error"] < 0.03, summary(report)
        assert report["dead_experts"] == [], summary(report)
        assert report["max_reverse_kl"] < 0.01, summary(report)


@pytest.mark.slow
def test_state_conditional_ring_at_several_observations():
    teacher = AnalyticTeacher(StateConditionalGaussianMixture.moving_ring())
    eval_observations = np.array([[0.0, 0.0], [0.8, 0.0], [-0.8, 0.5], [0.3, -0.8], [-0.5, -0.5]])

    def uniform_states(n, rng):
        return rng.uniform(-1.0, 1.0, size=(n, 2))

    config = VDDConfig.preset("gmm2d", seed=0, iterations=1500, backbone=SMALL_MLP)
    report = analytic_check(teacher, config, eval_observations, observation_sampler=uniform_states)
    print("\n" + summary(report))
    for row, obs in zip(report["rows"], eval_observations):
        assert row["one_to_one"], (obs, row)
        assert max(row["mean_errors"]) < 0.1, (obs, row["mean_errors"])
        assert max(row["weight_errors"]) < 0.03, (obs, row["weight_errors"])
        assert row["reverse_kl"] < 0.02, (obs, row["reverse_kl"])


@pytest.mark.slow
def test_unequal_weights_are_recovered():
    teacher = AnalyticTeacher(GaussianMixture.unequal_weights(), obs_dim=1)
    jobs = [(teacher, VDDConfig.preset("gmm2d", n_experts=4, seed=seed), np.zeros((1, 1))) for seed in (0, 1)]
    reports = run_checks(jobs)
    print("\n" + "\n".join(summary(r) for r in reports))
    for report in reports:
        assert report["one_to_one"], summary(report)
        assert report["max_mean_error"] < 0.05, summary(report)
        assert report["max_weight_error"] < 0.03, summary(report)
        assert report["max_reverse_kl"] < 0.01, summary(report)


# --- more experts than modes: unequal weights and widths, uneven placement -----------------------
# Users do not know how many modes their data has. Duplicates on one mode are fine (their weights add
# up); experts parked between modes are not.
# --- inputs VDD must refuse, and failures it must stop on -----------------------------------
class CountingTeacher(AnalyticTeacher):
    """The analytic ring whose score can be corrupted from a given call on."""

    def __init__(self, corrupt=None, from_call=0, with_sampler=True):
        super().__init__(GaussianMixture.ring(), obs_dim=1)
        self.calls, self.corrupt, self.from_call = 0, corrupt, from_call
        if not with_sampler:
            self.sample = None

    def score(self, actions, obs, sigma):
        self.calls += 1
        score = super().score(actions, obs, sigma)
        if self.corrupt is not None and self.calls > self.from_call:
            return self.corrupt(score)
        return score


def ring_data(n=256):
    return np.zeros((n, 1), np.float32), GaussianMixture.ring().sample(n, np.random.default_rng(0)).astype(np.float32)


@pytest.mark.parametrize("bad, field", [
    (dict(n_experts=0), "n_experts"), (dict(batch_size=0), "batch_size"), (dict(iterations=0), "iterations"),
    (dict(sigma_min=0.6, sigma_max=0.5), "sigma_min"), (dict(expert_lr=-1e-3), "expert_lr"),
    (dict(gating_lr=float("nan")), "gating_lr"), (dict(samples_per_expert=7), "samples_per_expert"),
    (dict(covariance="spherical"), "covariance"), (dict(gating="hard"), "gating"),
    (dict(lr_decay="cosine"), "lr_decay"), (dict(gating_warmup_fraction=1.5), "gating_warmup_fraction"),
    (dict(dead_expert_threshold=0.5), "dead_expert_threshold"), (dict(init_std=1e-5), "init_std"),
    (dict(backbone=BackboneConfig(heads=5)), "embed_dim"), (dict(sigma_final_min=0.1, sigma_final_max=0.05),
                                                            "sigma_final_min"),
])
def test_bad_config_is_refused_before_any_work(bad, field):
    teacher = CountingTeacher()
    observations, actions = ring_data()
    with pytest.raises(ValueError, match=field):
        distill(teacher, observations, actions, VDDConfig(**bad), progress=False)
    assert teacher.calls == 0


@pytest.mark.parametrize("corrupt, message", [
    (lambda score: score[:, :1], r"iteration 3: teacher score has shape \(\d+, 1\), expected \(\d+, 2\)"),
    (lambda score: score * float("nan"), "iteration 3: teacher score holds .* NaN/Inf"),
    (lambda score: score.index_fill(0, torch.tensor([5]), float("inf")), "iteration 3: teacher score holds 2 NaN/Inf"),
])
def test_broken_teacher_score_stops_distillation(corrupt, message):
    teacher = CountingTeacher(corrupt, from_call=3)
    observations, actions = ring_data()
    config = VDDConfig.preset("gmm2d", iterations=10, batch_size=4, samples_per_expert=4, backbone=SMALL_MLP,
                              validation_every=0)  # the guard's own score calls would shift the count
    with pytest.raises((ValueError, FloatingPointError), match=message):
        distill(teacher, observations, actions, config, progress=False)
    assert teacher.calls == 4


def test_missing_actions_need_a_sampling_teacher():
    observations, _ = ring_data()
    config = VDDConfig.preset("gmm2d", iterations=2, batch_size=4, samples_per_expert=4, backbone=SMALL_MLP)
    with pytest.raises(ValueError, match="actions: .* no sample"):
        distill(CountingTeacher(with_sampler=False), observations, None, config, progress=False)
    model = distill(CountingTeacher(), observations, None, config, progress=False)  # teacher samples instead
    assert len(model.training_history["gating_loss"]) == 2


def test_bad_teacher_and_data_are_refused():
    observations, actions = ring_data()
    config = VDDConfig.preset("gmm2d", iterations=2, backbone=SMALL_MLP)
    with pytest.raises(TypeError, match="teacher"):
        distill(object(), observations, actions, config, progress=False)
    with pytest.raises(ValueError, match=r"observations: expected shape \[N >= 1, 1\]"):
        distill(CountingTeacher(), np.zeros((4, 3)), actions, config, progress=False)
    with pytest.raises(ValueError, match="actions: expected 256 rows"):
        distill(CountingTeacher(), observations, actions[:10], config, progress=False)


def test_same_seed_gives_identical_parameters():
    observations, actions = ring_data()
    config = VDDConfig.preset("gmm2d", iterations=8, batch_size=4, samples_per_expert=8, backbone=SMALL_MLP, seed=5)
    first = distill(CountingTeacher(), observations, actions, config, progress=False)
    second = distill(CountingTeacher(), observations, actions, config, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    third = distill(CountingTeacher(), observations, actions, VDDConfig(**dict(config.__dict__, seed=6)),
                    progress=False)
    assert not torch.equal(first.mean_head.bias, third.mean_head.bias)


def test_dead_experts_are_reported():
    # a 0.1-weight mode with a threshold of 0.15 must be flagged, in the history and as a warning
    teacher = AnalyticTeacher(GaussianMixture.unequal_weights(), obs_dim=1)
    observations = np.zeros((4096, 1), np.float32)
    actions = GaussianMixture.unequal_weights().sample(4096, np.random.default_rng(0)).astype(np.float32)
    config = VDDConfig.preset("gmm2d", n_experts=4, iterations=200, backbone=SMALL_MLP, dead_expert_threshold=0.15)
    started = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"1 dead expert"):
        model = distill(teacher, observations, actions, config, progress=False)
    history = model.training_history
    assert len(history["dead_experts"]) == 1
    assert history["mean_gating_weights"][history["dead_experts"][0]] < 0.15
    assert 0 < history["wall_time_s"] <= time.perf_counter() - started
    assert len(history["expert_loss"]) == 200
