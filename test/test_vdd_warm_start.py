"""VDDConfig.warm_start_iterations: EM on the demonstrations before VDD gives every expert its own mode."""
import dataclasses

import numpy as np
import pytest
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.teacher_protocol import AnalyticTeacher
from vdd_ros.learn.vdd import VDDConfig, distill
from vdd_ros.tasks.gmm2d import GaussianMixture

SMALL_MLP = BackboneConfig(hidden=32, mlp_layers=1)


def test_em_warm_start_fits_experts_and_gating_to_the_demonstrations():
    """EM on demonstrations of four unequal modes: one expert per mode, gating weights as in the data."""
    square = GaussianMixture(np.array([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]]), 0.4,
                             np.array([0.4, 0.3, 0.2, 0.1]))
    actions = square.sample(8192, np.random.default_rng(0)).astype(np.float32)
    config = VDDConfig.preset("gmm2d", n_experts=4, iterations=1, warm_start_iterations=300, samples_per_expert=4,
                              backbone=BackboneConfig(hidden=64, mlp_layers=2), gating_warmup_fraction=0.0,
                              reinit_fractions=[], seed=1)
    model = distill(AnalyticTeacher(square, obs_dim=1), np.zeros((8192, 1), np.float32), actions, config,
                    progress=False)
    with torch.no_grad():
        weights, means = (t[0] for t in model.weights_and_means(torch.zeros(1, 1)))
    distances = torch.cdist(torch.as_tensor(square.means, dtype=torch.float32), means)
    nearest = distances.argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]  # one expert per mode
    assert float(distances.min(1).values.max()) < 0.25
    assert weights[nearest].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=0.05)
    assert len(model.training_history["warm_start_loss"]) == 300


def test_em_warm_start_on_teacher_samples_when_there_are_no_demonstrations():
    # two modes apart in y: the two initial means (the 2-D grid's corners at x = -1.5) differ in y
    two_modes = GaussianMixture(np.array([[0.0, -2.0], [0.0, 2.0]]), 0.2)
    config = VDDConfig.preset("gmm2d", n_experts=2, iterations=1, warm_start_iterations=150, samples_per_expert=4,
                              backbone=SMALL_MLP, gating_warmup_fraction=0.0, reinit_fractions=[], seed=3)
    model = distill(AnalyticTeacher(two_modes, obs_dim=1), np.zeros((256, 1), np.float32), None, config,
                    progress=False)
    with torch.no_grad():
        _, means = model.weights_and_means(torch.zeros(1, 1))
    ys = sorted(float(y) for y in means[0, :, 1])
    assert ys[0] == pytest.approx(-2.0, abs=0.3) and ys[1] == pytest.approx(2.0, abs=0.3)
    assert len(model.training_history["warm_start_loss"]) == 150


def test_bad_warm_start_setting_names_the_field():
    with pytest.raises(ValueError, match="VDDConfig.warm_start_iterations: expected an integer >= 0"):
        VDDConfig(warm_start_iterations=-1).validate()


def test_em_warm_start_without_actions_or_samples_is_refused():
    class ScoreOnly:
        obs_dim, act_dim = 1, 2

        def score(self, actions, obs, sigma):
            return -actions

    config = VDDConfig.preset("gmm2d", iterations=1, warm_start_iterations=5, gating_steps_per_iter=0,
                              samples_per_expert=4, backbone=SMALL_MLP)
    with pytest.raises(ValueError, match="warm_start_iterations: expected 0 without demonstration actions"):
        distill(ScoreOnly(), np.zeros((8, 1), np.float32), None, config, progress=False)


def _state_conditional_data(n: int, seed: int):
    """Two modes whose places move with a 1-D state (so the backbone matters)."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    side = np.where(rng.random(n) < 0.6, 1.0, -1.0)
    actions = np.stack([obs[:, 0] + side, side * 0.5], 1) + 0.1 * rng.standard_normal((n, 2))
    return obs, actions.astype(np.float32)


def test_warm_start_is_train_em_and_the_warmed_up_first_vdd_step_keeps_it():
    """VDD's EM warm start is train_em (same code, same settings, same seed: same model), and with
    lr_warmup_iterations the first VDD step barely moves it; without the ramp a fresh Adam's first
    step moves every parameter by about the learning rate."""
    from vdd_ros.learn.configs import EMConfig
    from vdd_ros.learn.em import train_em

    obs, actions = _state_conditional_data(2048, 0)
    teacher = AnalyticTeacher(GaussianMixture(np.array([[1.0, 0.5], [-1.0, -0.5]]), 0.1), obs_dim=1)
    shared = dict(n_experts=3, expert_lr=3e-3, gating_lr=3e-3, backbone=SMALL_MLP, seed=4)
    em = train_em(obs, actions, EMConfig(iterations=60, batch_size=128, history=1, **shared), progress=False)

    def vdd_after_one_step(warmup: int):
        config = VDDConfig(iterations=1, warm_start_iterations=60, gating_batch_size=128, samples_per_expert=2,
                           batch_size=16, lr_warmup_iterations=warmup, validation_every=0, **shared)
        return distill(teacher, obs, actions, config, progress=False)

    ramped, kicked = vdd_after_one_step(10 ** 6), vdd_after_one_step(0)
    em_state, kicked_state = em.state_dict(), kicked.state_dict()
    for name, value in ramped.state_dict().items():
        assert torch.allclose(value, em_state[name], atol=1e-6), name
    largest_kick = max(float((kicked_state[name] - em_state[name]).abs().max()) for name in em_state)
    assert largest_kick > 1e-3  # ~ expert_lr = 3e-3


def test_guard_logs_the_validation_signal_every_validation_every_iterations():
    obs, actions = _state_conditional_data(2048, 1)
    teacher = AnalyticTeacher(GaussianMixture(np.array([[1.0, 0.5], [-1.0, -0.5]]), 0.1), obs_dim=1)
    config = VDDConfig(n_experts=3, iterations=40, warm_start_iterations=60, gating_batch_size=128,
                       samples_per_expert=2, batch_size=16, backbone=SMALL_MLP, validation_every=10,
                       validation_states=64, seed=2)
    history = distill(teacher, obs, actions, config, progress=False).training_history
    records = history["validation"]
    assert [r["iteration"] for r in records] == [-1, 9, 19, 29, 39]
    assert all(np.isfinite([r["teacher_nll"], r["displacement"]]).all() for r in records)
    assert history["validation_actions"] == "teacher samples"
    assert history["best_iteration"] == min(records, key=lambda r: r["teacher_nll"])["iteration"]
    assert history["returned_iteration"] == 39  # not degraded: the last state (NLL alone picks no other)
    assert "VDD guard: validation NLL" in history["guard"]


class ElsewhereTeacher(AnalyticTeacher):
    """A score that pulls every action to one point far from the demonstrations, and no sampler."""

    sample = None

    def __init__(self):
        super().__init__(GaussianMixture(np.array([[3.0, 3.0]]), 0.1), obs_dim=1)


def test_guard_reports_a_degraded_warm_start_and_returns_its_best_state():
    from vdd_ros.learn.vdd import Guard

    obs, actions = _state_conditional_data(2048, 1)
    teacher = ElsewhereTeacher()
    config = VDDConfig(n_experts=3, iterations=60, warm_start_iterations=100, gating_batch_size=128,
                       samples_per_expert=2, batch_size=16, backbone=SMALL_MLP, validation_every=20,
                       validation_states=64, expert_lr=1e-2, seed=2)
    with pytest.warns(RuntimeWarning, match="VDD degraded its warm start: validation NLL .*returning iteration"):
        model = distill(teacher, obs, actions, config, progress=False)
    history = model.training_history
    records = history["validation"]
    assert history["validation_actions"] == "demonstration actions"
    assert records[-1]["teacher_nll"] > records[0]["teacher_nll"] + 1.0  # pulled off the data
    best = min(records, key=lambda r: r["teacher_nll"])
    assert history["returned_iteration"] == best["iteration"] < 59
    again = Guard(teacher, torch.as_tensor(obs), torch.as_tensor(actions), config, config.seed + 7919)
    assert again.evaluate(model, 0)["teacher_nll"] == pytest.approx(best["teacher_nll"], abs=1e-5)
    # without keep-best the degraded last state comes back, still reported
    config.guard_keep_best = False
    with pytest.warns(RuntimeWarning, match="VDD degraded its warm start"):
        last = distill(teacher, obs, actions, config, progress=False)
    assert last.training_history["returned_iteration"] == 59


def _near_mode_share(model, obs):
    """A validation signal computed from the model: the share of its actions (expert drawn from the gating, its
    mean) within 0.3 of one of the two demonstrated modes of _state_conditional_data."""
    with torch.no_grad():
        acts = model.act(torch.as_tensor(obs), generator=torch.Generator().manual_seed(0)).numpy()
    modes = np.stack([np.stack([obs[:, 0] + s, np.full(len(obs), s * 0.5)], 1) for s in (1.0, -1.0)])
    near = (np.linalg.norm(acts[None] - modes, axis=-1) < 0.3).any(0)
    return {"success_rate": float(near.mean()), "entropy": 0.0}


def test_a_rollout_signal_decides_the_guard_and_a_tie_keeps_the_later_state():
    obs, actions = _state_conditional_data(2048, 1)
    probe = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]
    config = VDDConfig(n_experts=3, iterations=60, warm_start_iterations=100, gating_batch_size=128,
                       samples_per_expert=2, batch_size=16, backbone=SMALL_MLP, validation_every=20,
                       validation_states=64, validation_episodes=64, expert_lr=1e-2, seed=2)
    # pulled off the data: the signal falls, the guard warns in its terms and returns the best state
    with pytest.warns(RuntimeWarning, match="VDD degraded its warm start: closed-loop success .*returning iteration"):
        model = distill(ElsewhereTeacher(), obs, actions, config, progress=False,
                        rollout=lambda m: _near_mode_share(m, probe))
    history = model.training_history
    records = history["validation"]
    assert records[0]["success_rate"] > 0.8 and records[-1]["success_rate"] < 0.5
    best = max(r["success_rate"] for r in records)
    margin = max((best * (1 - best) / 64 + 0.2 ** 2 / 64) ** 0.5, 1 / 64)  # one standard error at the best
    chosen = [r for r in records if r["success_rate"] >= best - margin - 1e-12][-1]
    assert history["returned_iteration"] == chosen["iteration"] < 59
    assert _near_mode_share(model, probe)["success_rate"] == pytest.approx(chosen["success_rate"])
    assert "closed-loop success + entropy over 64 episodes" in history["guard"]
    # a teacher on the data: no warning, and the last state of equal success comes back (not the warm start)
    teacher = AnalyticTeacher(GaussianMixture(np.array([[1.0, 0.5], [-1.0, -0.5]]), 0.1), obs_dim=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kept = distill(teacher, obs, actions, config, progress=False, rollout=lambda m: {"success_rate": 1.0,
                                                                                        "entropy": 1.0})
    assert kept.training_history["returned_iteration"] == 59
    assert kept.training_history["best_iteration"] == -1  # the first of equal states; the latest comes back
    # entropy counts as much as success: a state that keeps success but loses routes is not the best
    scores = iter([(1.0, 0.95), (1.0, 0.97), (1.0, 0.80), (1.0, 0.75), (1.0, 0.70)])
    with pytest.warns(RuntimeWarning, match="degraded its warm start: closed-loop success \\+ entropy 1.95 -> 1.7"):
        narrowed = distill(teacher, obs, actions, dataclasses.replace(config, iterations=80), progress=False,
                           rollout=lambda m: dict(zip(("success_rate", "entropy"), next(scores))))
    assert narrowed.training_history["returned_iteration"] == 19
    # an early lucky best does not beat later states within one standard error of it: the latest of those
    scores = iter([(0.70, 0.70), (0.94, 0.94), (0.98, 0.86), (0.98, 0.87), (0.98, 0.87)])
    later = distill(teacher, obs, actions, dataclasses.replace(config, iterations=80), progress=False,
                    rollout=lambda m: dict(zip(("success_rate", "entropy"), next(scores))))
    assert later.training_history["best_iteration"] == 19 and later.training_history["returned_iteration"] == 79


def test_closed_loop_check_rolls_out_a_built_in_task_and_none_without_one():
    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.learn.pipeline import closed_loop_check
    from vdd_ros.paths import model_file

    student = load_checkpoint(model_file("student.pt"))
    check = closed_loop_check(student.spec, 8)
    student.model.train()
    first, again = check(student.model), check(student.model)
    assert first == again and 0.5 <= first["success_rate"] <= 1.0 and 0.0 <= first["entropy"] <= 1.0
    assert student.model.training  # left as it was
    assert closed_loop_check(student.spec.replace(task="my_robot"), 8) is None
    assert closed_loop_check(student.spec, 0) is None
