"""The analytic Gaussian-mixture teacher: closed-form score and blur are right."""
import numpy as np
import pytest
import torch

from vdd_ros.learn.teacher_protocol import AnalyticTeacher, ScoreTeacher
from vdd_ros.tasks.gmm2d import GaussianMixture, StateConditionalGaussianMixture, plot_density


def finite_difference_gradient(function, x, step=1e-5):
    grad = np.zeros_like(x)
    for dim in range(x.shape[1]):
        offset = np.zeros_like(x)
        offset[:, dim] = step
        grad[:, dim] = (function(x + offset) - function(x - offset)) / (2 * step)
    return grad


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.3, 1.0])
def test_score_equals_gradient_of_log_density(sigma):
    mixture = GaussianMixture.unequal_weights()
    x = np.random.default_rng(0).normal(scale=2.0, size=(50, 2))
    numeric = finite_difference_gradient(lambda y: mixture.log_density(y, sigma), x)
    np.testing.assert_allclose(mixture.score(x, sigma), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.2, 0.7])
def test_state_conditional_score_equals_autograd(sigma):
    mixture = StateConditionalGaussianMixture.moving_ring()
    teacher = AnalyticTeacher(mixture)
    rng = np.random.default_rng(1)
    obs = rng.uniform(-1, 1, size=(40, 2))
    x = torch.tensor(rng.normal(scale=2.0, size=(40, 2)), requires_grad=True)
    log_density = teacher.log_density(x, torch.as_tensor(obs), sigma)
    (autograd,) = torch.autograd.grad(log_density.sum(), x)
    np.testing.assert_allclose(mixture.score(x.detach().numpy(), obs, sigma), autograd.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(log_density.detach().numpy(), mixture.log_density(x.detach().numpy(), obs, sigma),
                               rtol=1e-10)
    # the torch teacher's score (float32 path) matches the numpy closed form
    torch_score = teacher.score(x.detach().float(), torch.as_tensor(obs, dtype=torch.float32),
                                torch.full((40,), float(sigma)))
    np.testing.assert_allclose(torch_score.numpy(), mixture.score(x.detach().numpy(), obs, sigma), rtol=1e-4, atol=1e-4)


def test_blurred_mixture_has_variance_plus_sigma_squared():
    mixture = GaussianMixture.ring(n_modes=8, radius=2.0, std=0.5)
    sigma = 0.4
    samples = mixture.sample(200_000, np.random.default_rng(2))
    noisy = samples + sigma * np.random.default_rng(3).standard_normal(samples.shape)
    blurred = mixture.blurred(sigma)
    np.testing.assert_allclose(blurred.stds, np.sqrt(0.25 + 0.16))
    np.testing.assert_allclose(np.cov(noisy.T), blurred.covariance(), atol=0.02)
    # log_density at sigma equals the density of the explicitly blurred mixture
    x = np.random.default_rng(4).normal(size=(20, 2))
    np.testing.assert_allclose(mixture.log_density(x, sigma), blurred.log_density(x), rtol=1e-12)


def test_sampling_recovers_weights_and_means():
    mixture = GaussianMixture.unequal_weights()
    samples = mixture.sample(100_000, np.random.default_rng(5))
    nearest = np.argmin(((samples[:, None, :] - mixture.means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(nearest) / len(samples), mixture.weights, atol=0.01)


def test_state_conditional_means_move_with_observation():
    mixture = StateConditionalGaussianMixture.moving_ring()
    means = mixture.means(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]]))
    np.testing.assert_allclose(means[0], GaussianMixture.ring().means, atol=1e-12)
    angle = np.pi / 8
    rotated = GaussianMixture.ring().means @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(means[1], rotated + [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(means[2], GaussianMixture.ring().means + [0.0, -1.0], atol=1e-12)


def test_analytic_teacher_follows_protocol_and_samples():
    teacher = AnalyticTeacher(GaussianMixture.ring(), obs_dim=3)
    assert isinstance(teacher, ScoreTeacher)
    assert (teacher.obs_dim, teacher.act_dim) == (3, 2)
    samples = teacher.sample(torch.zeros(5000, 3), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5000, 2)
    assert abs(samples.norm(dim=1).mean().item() - 2.0) < 0.1


@pytest.mark.parametrize("bad, message", [
    (dict(means=np.zeros(3), stds=1.0), "means"),
    (dict(means=np.zeros((2, 2)), stds=[1.0, -1.0]), "stds"),
    (dict(means=np.zeros((2, 2)), stds=1.0, weights=[0.3, 0.3]), "weights"),
])
def test_bad_mixture_parameters_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**bad)


def test_bad_inputs_name_the_argument():
    mixture = GaussianMixture.ring()
    with pytest.raises(ValueError, match=r"x: expected shape \[N, 2\]"):
        mixture.score(np.zeros((4, 3)), 0.1)
    with pytest.raises(ValueError, match="sigma"):
        mixture.score(np.zeros((4, 2)), -0.1)
    with pytest.raises(ValueError, match="obs"):
        StateConditionalGaussianMixture.moving_ring().means(np.zeros((4, 3)))


def test_plot_density_writes_png(tmp_path):
    mixture = GaussianMixture.ring()
    path = plot_density(mixture, str(tmp_path / "ring.png"), samples=mixture.sample(500, np.random.default_rng(0)))
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ring.png"]
