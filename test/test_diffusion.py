"""The diffusion teacher: preconditioning, score, sampling, training on a bimodal toy, DDPM adapter."""
import math

import numpy as np
import pytest
import torch

from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.ddpm_adapter import DDPMTeacherAdapter, linear_beta_schedule
from vdd_ros.learn.diffusion import DiffusionTeacher, TeacherConfig, karras_sigmas, train_teacher
from vdd_ros.tasks.gmm2d import GaussianMixture

torch.set_num_threads(1)
SMALL = {"kind": "mlp", "hidden": 32, "mlp_layers": 2}


def small_teacher(**kwargs) -> DiffusionTeacher:
    torch.manual_seed(0)
    return DiffusionTeacher(obs_step_dim=3, history=2, act_dim=4, backbone=SMALL, **kwargs).eval()


def test_preconditioning_at_known_sigmas():
    teacher = small_teacher(sigma_data=0.5)
    sigma = torch.tensor([0.5, 1e-6, 100.0])
    c_skip, c_out, c_in, c_noise = teacher.preconditioning(sigma)
    # sigma = sigma_data: half skip, c_out = sd/sqrt(2), c_in = 1/(sd sqrt(2))
    assert c_skip[0].item() == pytest.approx(0.5)
    assert c_out[0].item() == pytest.approx(0.5 / math.sqrt(2))
    assert c_in[0].item() == pytest.approx(1 / (0.5 * math.sqrt(2)))
    assert c_noise[0].item() == pytest.approx(math.log(0.5) / 4)
    # no noise: D is the identity; huge noise: D ignores x and the output is scaled by sigma_data
    assert c_skip[1].item() == pytest.approx(1.0)
    assert c_out[1].item() == pytest.approx(1e-6, rel=1e-3)
    assert c_skip[2].item() == pytest.approx(0.25 / (1e4 + 0.25))
    assert c_out[2].item() == pytest.approx(0.5, rel=1e-4)
    assert c_in[2].item() == pytest.approx(0.01, rel=1e-4)


def test_score_and_euler_sampler_of_a_known_distribution():
    """With a zero output layer the preconditioned denoiser is exact for N(0, sigma_data^2): D = c_skip x.

    Its score must be that Gaussian's, -x / (sigma^2 + sigma_data^2), and the Euler sampler must end
    at its spread (the probability-flow ODE scales x by sqrt(sigma^2 + sd^2) / sqrt(sigma_max^2 + sd^2)).
    """
    teacher = small_teacher(sigma_data=0.5, sigma_max=10.0)
    with torch.no_grad():
        teacher.head.weight.zero_()
        teacher.head.bias.zero_()
    x, obs, sigma = torch.randn(5, 4), torch.randn(5, 6), torch.tensor([0.1, 0.3, 1.0, 2.0, 5.0])
    with torch.no_grad():
        score = teacher.score(x, obs, sigma)
    torch.testing.assert_close(score, -x / (sigma[:, None] ** 2 + 0.25))
    assert teacher.obs_dim == 6 and teacher.act_dim == 4
    samples = teacher.sample(torch.zeros(4000, 6), n_steps=64, generator=torch.Generator().manual_seed(0))
    assert float(samples.std()) == pytest.approx(0.5 * 10.0 / math.sqrt(100.25), rel=0.05)


def test_karras_schedule_ends():
    sigmas = karras_sigmas(0.002, 10.0, 7.0, 8)
    assert sigmas.shape == (9,)
    assert sigmas[0].item() == pytest.approx(10.0)
    assert sigmas[7].item() == pytest.approx(0.002, rel=1e-4)
    assert sigmas[8].item() == 0.0
    assert bool(torch.all(sigmas[1:] < sigmas[:-1]))
    assert small_teacher(n_steps=16).karras_sigmas().shape == (17,)


def test_sampler_is_deterministic_given_the_noise():
    teacher = small_teacher()
    obs = torch.randn(6, 6)
    noise = torch.randn(6, 4)
    first = teacher.sample(obs, noise=noise)
    assert torch.equal(first, teacher.sample(obs, noise=noise.clone()))
    assert not torch.allclose(first, teacher.sample(obs, noise=torch.randn(6, 4)))
    # without noise, the start of the chain is drawn from the generator (Euler is the only sampler)
    drawn = teacher.sample(obs, generator=torch.Generator().manual_seed(3))
    start = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, teacher.sample(obs, noise=start))
    with pytest.raises(TypeError, match="sampler"):
        teacher.sample(obs, sampler="ancestral")
    with pytest.raises(ValueError, match="noise: expected shape"):
        teacher.sample(obs, noise=torch.randn(6, 3))


def test_tiny_teacher_learns_both_modes_of_a_conditional_bimodal_toy():
    # actions: +-1 (50/50) shifted by the observation's first coordinate
    rng = np.random.default_rng(0)
    n = 2000
    obs = rng.normal(size=(n, 2)).astype(np.float32)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    act = (sign + 0.5 * obs[:, 0] + 0.05 * rng.normal(size=n))[:, None].astype(np.float32)
    config = TeacherConfig(backbone=BackboneConfig(hidden=64, mlp_layers=2), iterations=1000, batch_size=128,
                           history=1, horizon=1, execute_steps=1, lr=3e-3, ema_decay=0.99, checkpoint_every=0)
    teacher, history = train_teacher(obs, act, config, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    query = torch.zeros(1000, 2)
    query[:, 0] = 0.8
    samples = teacher.sample(query, generator=torch.Generator().manual_seed(0)).numpy()[:, 0] - 0.4
    upper = (samples > 0).mean()
    assert 0.3 < upper < 0.7, f"mode weights {upper:.2f}/{1 - upper:.2f}"
    assert np.median(np.abs(np.abs(samples) - 1.0)) < 0.15
    assert (np.abs(samples) < 0.5).mean() < 0.1  # little mass between the modes


def test_teacher_config_refuses_impossible_values():
    with pytest.raises(ValueError, match="sigma_max"):
        TeacherConfig(sigma_min=1.0, sigma_max=0.5).validate()
    with pytest.raises(ValueError, match="execute_steps"):
        TeacherConfig(horizon=4, execute_steps=5).validate()
    with pytest.raises(ValueError, match="ema_decay"):
        TeacherConfig(ema_decay=1.0).validate()
    with pytest.raises(ValueError, match=r"unknown fields \['sampler'\]"):  # Euler is the only sampler
        TeacherConfig.from_dict({"sampler": "ancestral"})
    with pytest.raises(ValueError, match="unknown fields"):
        TeacherConfig.from_dict({"learning_rate": 1e-3})
    assert TeacherConfig.from_dict({"backbone": {"hidden": 64}}).backbone.hidden == 64


def _posterior_mean_eps(mixture: GaussianMixture, x: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """Exact eps-prediction of x_t = sqrt(abar) a + sqrt(1-abar) eps, a ~ mixture, by Gaussian conjugacy.

    E[eps | x_t] = (x_t - sqrt(abar) E[a | x_t]) / sqrt(1 - abar), with E[a | x_t] the posterior mean
    of each component weighted by the component posterior.
    """
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        ab, xt = abar[row], x[row]
        var_t = ab * mixture.stds ** 2 + (1 - ab)  # [K]
        diff = xt[None] - np.sqrt(ab) * mixture.means
        log_r = np.log(mixture.weights) - 0.5 * (diff ** 2).sum(1) / var_t - mixture.dim * 0.5 * np.log(var_t)
        r = np.exp(log_r - log_r.max())
        r /= r.sum()
        gain = np.sqrt(ab) * mixture.stds ** 2 / var_t  # [K]
        component_means = mixture.means + gain[:, None] * diff
        out[row] = (xt - np.sqrt(ab) * (r[:, None] * component_means).sum(0)) / np.sqrt(1 - ab)
    return out


def test_ddpm_adapter_score_equals_the_analytic_score():
    mixture = GaussianMixture.ring(8, 2.0, 0.5)
    abar = linear_beta_schedule(50, 1e-3, 0.1)

    def eps_model(x, obs, t):
        return torch.as_tensor(_posterior_mean_eps(mixture, x.double().numpy(), abar.double().numpy()[t.numpy()]))

    adapter = DDPMTeacherAdapter(eps_model, abar, obs_dim=1, act_dim=2, t_min=1, t_max=4,
                                 generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    x = rng.normal(scale=2.0, size=(64, 2))
    t = torch.as_tensor(rng.integers(0, 50, 64))
    got = adapter.score_at_step(torch.as_tensor(x), torch.zeros(64, 1), t).numpy()
    for row in range(64):
        ab = float(abar[t[row]])
        # the noisy marginal at step t: means scaled by sqrt(abar), variances abar s^2 + 1 - abar
        scaled = GaussianMixture(np.sqrt(ab) * mixture.means, np.sqrt(ab * mixture.stds ** 2 + 1 - ab))
        np.testing.assert_allclose(got[row], scaled.score(x[row:row + 1])[0], rtol=1e-4, atol=1e-5)
    # protocol score: steps drawn from [t_min, t_max]; each row equals the score at one of those steps
    protocol = adapter.score(torch.as_tensor(x), torch.zeros(64, 1), torch.full((64,), 0.3)).numpy()
    candidates = np.stack([adapter.score_at_step(torch.as_tensor(x), torch.zeros(64, 1),
                                                 torch.full((64,), step)).numpy() for step in range(1, 5)])
    assert np.all(np.min(np.abs(candidates - protocol[None]).max(-1), 0) < 1e-6)
    with pytest.raises(ValueError, match="t_max"):
        DDPMTeacherAdapter(eps_model, abar, 1, 2, t_min=3, t_max=60)


def test_relative_chunks_denoise_the_offset_from_the_current_joint_positions():
    reference = {"obs_index": [0, 1], "obs_mean": [0.5, -1.0], "obs_std": [2.0, 0.5],
                 "act_mean": [0.1, 0.2], "act_std": [1.0, 0.25]}
    torch.manual_seed(0)
    relative = DiffusionTeacher(obs_step_dim=3, history=2, act_dim=4, backbone=SMALL, action_reference=reference)
    absolute = DiffusionTeacher(obs_step_dim=3, history=2, act_dim=4, backbone=SMALL)
    absolute.load_state_dict(relative.state_dict())
    obs = torch.randn(5, 6)
    # the last frame's joints 0, 1 in raw units, then in normalised action units, repeated per chunk step
    raw = obs[:, 3:5] * torch.tensor([2.0, 0.5]) + torch.tensor([0.5, -1.0])
    expected_reference = ((raw - torch.tensor([0.1, 0.2])) / torch.tensor([1.0, 0.25])).repeat(1, 2)
    assert torch.allclose(relative.reference(obs), expected_reference, atol=1e-6)
    x, sigma = torch.randn(5, 4), torch.full((5,), 0.3)
    with torch.no_grad():
        shifted = expected_reference + absolute.denoise(x - expected_reference, obs, sigma)
        assert torch.allclose(relative.denoise(x, obs, sigma), shifted, atol=1e-5)
    with pytest.raises(ValueError, match="obs_index"):
        DiffusionTeacher(obs_step_dim=3, history=2, act_dim=4, backbone=SMALL,
                         action_reference=dict(reference, obs_index=[0, 7]))
