"""The EM baseline recovers a well-separated mixture from its samples."""
import numpy as np
import pytest
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.em import EMConfig, train_em
from vdd_ros.tasks.gmm2d import GaussianMixture

SMALL_MLP = BackboneConfig(hidden=64, mlp_layers=2)
SQUARE = GaussianMixture([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]], 0.4, [0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_em_recovers_modes_weights_and_stds(covariance):
    actions = SQUARE.sample(8192, np.random.default_rng(0)).astype(np.float32)
    observations = np.zeros((8192, 1), np.float32)
    config = EMConfig.preset("gmm2d", n_experts=4, iterations=300, covariance=covariance, backbone=SMALL_MLP, seed=1)
    model = train_em(observations, actions, config, progress=False)
    weights, means, chol = (t.detach()[0] for t in model.components(torch.zeros(1, 1)))
    distances = torch.cdist(torch.as_tensor(SQUARE.means, dtype=torch.float32), means)
    nearest = distances.argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]  # one expert per mode
    assert distances.min(1).values.max() < 0.05
    np.testing.assert_allclose(weights[nearest].numpy(), SQUARE.weights, atol=0.02)
    np.testing.assert_allclose(torch.diagonal(chol, dim1=-2, dim2=-1)[nearest].numpy(), 0.4, atol=0.03)
    assert model.training_history["dead_experts"] == []
    assert len(model.training_history["expert_loss"]) == 300


def test_em_is_reproducible():
    actions = SQUARE.sample(1024, np.random.default_rng(0)).astype(np.float32)
    observations = np.zeros((1024, 1), np.float32)
    config = EMConfig.preset("gmm2d", n_experts=4, iterations=20, backbone=SMALL_MLP, seed=3)
    first = train_em(observations, actions, config, progress=False)
    second = train_em(observations, actions, config, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, field", [
    (dict(n_experts=0), "n_experts"), (dict(batch_size=0), "batch_size"), (dict(expert_lr=-1.0), "expert_lr"),
    (dict(covariance="dense"), "covariance"), (dict(lr_decay="cosine"), "lr_decay"),
    (dict(lr_final_fraction=2.0), "lr_final_fraction"), (dict(gating_hidden=-4), "gating_hidden"),
    (dict(horizon=4, execute_steps=5), "execute_steps"), (dict(observation_fields="joint_position"),
                                                          "observation_fields"),
])
def test_bad_em_config_is_refused(bad, field):
    with pytest.raises(ValueError, match=f"EMConfig.{field}"):
        train_em(np.zeros((4, 1)), np.zeros((4, 2)), EMConfig(**bad), progress=False)


def test_mismatched_data_is_refused():
    config = EMConfig.preset("gmm2d", iterations=1)
    with pytest.raises(ValueError, match="actions: expected 4 rows"):
        train_em(np.zeros((4, 1)), np.zeros((5, 2)), config, progress=False)
    with pytest.raises(ValueError, match="observations: expected finite"):
        train_em(np.full((4, 1), np.nan), np.zeros((4, 2)), config, progress=False)
    with pytest.raises(ValueError, match=r"EMConfig.history: expected a divisor of the observation width 3"):
        train_em(np.zeros((4, 3)), np.zeros((4, 2)), EMConfig(iterations=1), progress=False)
