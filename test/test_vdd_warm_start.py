"""VDDConfig.warm_start(_iterations): experts start on different teacher modes before VDD runs."""
import numpy as np
import pytest
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.teacher_protocol import AnalyticTeacher
from vdd_ros.learn.vdd import VDDConfig, distill, ranked_teacher_targets, ranking_direction
from vdd_ros.tasks.gmm2d import GaussianMixture

SMALL_MLP = BackboneConfig(hidden=32, mlp_layers=1)
TWO_MODES = GaussianMixture(np.array([[-2.0, 0.0], [2.0, 0.0]]), 0.2)


def test_ranking_direction_is_the_axis_between_the_modes():
    teacher = AnalyticTeacher(TWO_MODES, obs_dim=1)
    direction = ranking_direction(teacher, torch.zeros(64, 1), 16, torch.Generator().manual_seed(0))
    assert abs(float(direction[0])) > 0.99


def test_ranked_targets_give_each_expert_its_own_mode():
    teacher = AnalyticTeacher(TWO_MODES, obs_dim=1)
    generator = torch.Generator().manual_seed(1)
    targets = ranked_teacher_targets(teacher, torch.zeros(200, 1), 2, 8, torch.tensor([1.0, 0.0]), generator)
    assert targets.shape == (200, 2, 2)
    # the lower-ranked expert's target lies left of the other's at (almost) every state
    assert float((targets[:, 0, 0] < targets[:, 1, 0]).float().mean()) > 0.95
    assert float(targets[:, 0, 0].mean()) < -1.0 < 1.0 < float(targets[:, 1, 0].mean())


def test_warm_start_alone_puts_experts_on_distinct_modes():
    teacher = AnalyticTeacher(TWO_MODES, obs_dim=1)
    config = VDDConfig(n_experts=2, iterations=1, warm_start_iterations=150, warm_start_candidates=8,
                       samples_per_expert=4, backbone=SMALL_MLP, reinit_fractions=(), seed=3)
    model = distill(teacher, np.zeros((256, 1), np.float32), None, config, progress=False)
    with torch.no_grad():
        _, means = model.weights_and_means(torch.zeros(1, 1))
    xs = sorted(float(x) for x in means[0, :, 0])
    assert xs[0] == pytest.approx(-2.0, abs=0.3) and xs[1] == pytest.approx(2.0, abs=0.3)
    assert len(model.training_history["warm_start_loss"]) == 150


@pytest.mark.parametrize("changes, field", [
    (dict(warm_start_iterations=-1), "warm_start_iterations"),
    (dict(warm_start_candidates=0), "warm_start_candidates"),
    (dict(warm_start_lr=0.0), "warm_start_lr"),
    (dict(warm_start="kmeans"), "warm_start"),
])
def test_bad_warm_start_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        VDDConfig(**changes).validate()


def test_warm_start_needs_a_sampling_teacher():
    class ScoreOnly:
        obs_dim, act_dim = 1, 2

        def score(self, actions, obs, sigma):
            return -actions

    config = VDDConfig(iterations=1, warm_start_iterations=5, gating_steps_per_iter=0, samples_per_expert=4,
                       backbone=SMALL_MLP)
    with pytest.raises(ValueError, match="warm_start_iterations"):
        distill(ScoreOnly(), np.zeros((8, 1), np.float32), None, config, progress=False)


def test_em_warm_start_fits_experts_and_gating_to_the_demonstrations():
    """EM on demonstrations of four unequal modes: one expert per mode, gating weights as in the data."""
    square = GaussianMixture(np.array([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]]), 0.4,
                             np.array([0.4, 0.3, 0.2, 0.1]))
    actions = square.sample(8192, np.random.default_rng(0)).astype(np.float32)
    config = VDDConfig(n_experts=4, iterations=1, warm_start="em", warm_start_iterations=300, samples_per_expert=4,
                       expert_lr=1e-2, gating_lr=1e-2, init_std=1.0, mean_init_spread=1.5,
                       backbone=BackboneConfig(hidden=64, mlp_layers=2), gating_warmup_fraction=0.0,
                       reinit_fractions=(), seed=1)
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


def test_em_warm_start_without_actions_or_samples_is_refused():
    class ScoreOnly:
        obs_dim, act_dim = 1, 2

        def score(self, actions, obs, sigma):
            return -actions

    config = VDDConfig(iterations=1, warm_start="em", warm_start_iterations=5, gating_steps_per_iter=0,
                       samples_per_expert=4, backbone=SMALL_MLP)
    with pytest.raises(ValueError, match="warm_start: 'em' needs demonstration actions"):
        distill(ScoreOnly(), np.zeros((8, 1), np.float32), None, config, progress=False)
