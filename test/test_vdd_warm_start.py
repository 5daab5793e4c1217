"""VDDConfig.warm_start_iterations: EM on the demonstrations before VDD gives every expert its own mode."""
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
    assert float(distances.min(1).values.max()) < 0.25  # the one VDD step after it moves a mean by ~0.07
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
