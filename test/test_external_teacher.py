"""Teachers trained elsewhere (``vdd distill --teacher-denoiser``): vdd_ros.learn.external_teacher.

- The wrapper's scores are exact for closed-form models of a Gaussian: a DDPM epsilon model (at the step the
  noise level rounds to) and an EDM denoiser (both output conventions), through two different normalisations.
- The same eps model as TorchScript and as ONNX gives the same score and samples.
- Bad inputs fail at load with one line naming the flag or key, the expected and the actual value.
- End to end: a small DDPM epsilon model trained here on the built-in arm_avoid task (in its own min/max
  normalisation, as diffusion_policy trains), saved as TorchScript, distilled through ``vdd distill``, the
  student exported; the student's closed-loop success is within 0.1 of the teacher's on the same episodes.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vdd_ros.cli.main import main as vdd_main
from vdd_ros.learn.ddpm_adapter import alphas_cumprod
from vdd_ros.learn.external_teacher import (
    ExternalTeacherConfig,
    ExternalTeacherError,
    ExternalTeacherPolicy,
    load_external_teacher,
)
from vdd_ros.spec import ModelSpec, Normalization, ObservationField

torch.set_num_threads(1)

# --- a spec and a Gaussian whose blurred score is known --------------------------------------------------
HISTORY, HORIZON, JOINTS, FRAME = 2, 3, 2, 3
OBS_DIM, ACT_DIM = HISTORY * FRAME, HORIZON * JOINTS
# the student's normalisation (per frame entry / joint) and the teacher's (per window / chunk entry)
STUDENT_NORM = Normalization((0.1, -0.2, 0.3), (1.5, 0.5, 2.0), (0.2, -0.4), (0.5, 1.25))


def small_spec(history: int = HISTORY, horizon: int = HORIZON) -> ModelSpec:
    return ModelSpec(joint_names=("a", "b"), joint_lower=(-3.0, -3.0), joint_upper=(3.0, 3.0),
                     joint_velocity_limits=(1.0, 1.0),
                     observation_fields=(ObservationField("joint_position", "joint_position", 2),
                                         ObservationField("goal", "vector", 1, topic="goal",
                                                          msg_type="std_msgs/Float64MultiArray")),
                     history=history, action_kind="joint_position", action_horizon=horizon, control_rate_hz=10.0,
                     normalization=STUDENT_NORM, model_kind="vdd_mixture")


def write_teacher_norm(path, scale: float = 0.8) -> dict:
    """Teacher stats: obs mean/std per frame entry, action min/max per chunk entry (both unlike the student's)."""
    stats = {"obs_mean": [0.0, 0.5, -1.0], "obs_std": [2.0, 1.0, 0.5],
             "action_min": [-scale - 0.1 * i for i in range(ACT_DIM)],
             "action_max": [scale + 0.05 * i for i in range(ACT_DIM)]}
    path.write_text(json.dumps(stats))
    return stats


class GaussianEps(nn.Module):
    """Exact epsilon model of a = mean(obs) + std * n in teacher units: x_t = sqrt(abar) a + sqrt(1-abar) n is
    Gaussian, so eps(x, t) = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def __init__(self, abar: torch.Tensor, std: float):
        super().__init__()
        self.register_buffer("abar", abar.to(torch.float32))
        self.register_buffer("weights", torch.linspace(-0.5, 0.5, OBS_DIM * ACT_DIM).reshape(OBS_DIM, ACT_DIM))
        self.variance = std ** 2

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return 0.3 * obs @ self.weights + 0.1

    def forward(self, x: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].unsqueeze(-1)
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * self.mean(obs)) / (abar * self.variance + 1 - abar)


class GaussianDenoiser(GaussianEps):
    """Exact EDM denoiser D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) of the same Gaussian."""

    def forward(self, x: torch.Tensor, obs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shrink = (self.variance / (self.variance + sigma ** 2)).unsqueeze(-1)
        return self.mean(obs) + shrink * (x - self.mean(obs))


class GaussianNetwork(GaussianEps):
    """The raw EDM network F of the same denoiser: D = c_skip x + c_out F(c_in x, c_noise), sigma = exp(4 c_noise)."""

    def __init__(self, abar, std, sigma_data: float):
        super().__init__(abar, std)
        self.sigma_data = sigma_data

    def forward(self, x_in: torch.Tensor, obs: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(4 * c_noise).unsqueeze(-1)
        total = sigma ** 2 + self.sigma_data ** 2
        x = x_in * torch.sqrt(total)
        denoised = self.mean(obs) + self.variance / (self.variance + sigma ** 2) * (x - self.mean(obs))
        c_skip, c_out = self.sigma_data ** 2 / total, sigma * self.sigma_data / torch.sqrt(total)
        return (denoised - c_skip * x) / c_out


def save_script(module: nn.Module, path) -> str:
    with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; it is what users have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return str(path)


def external_config(path, norm, kind="ddpm_eps", **changes) -> ExternalTeacherConfig:
    values = dict(path=str(path), kind=kind, history=HISTORY, horizon=HORIZON,
                  observation_fields=("joint_position", "goal"), norm=str(norm))
    if kind == "ddpm_eps":
        values.update(schedule="squaredcos_cap_v2", train_steps=50)
    values.update(changes)
    return ExternalTeacherConfig(**values)


def exact_student_score(teacher, model: GaussianEps, actions, obs, sigma_teacher):
    """The blurred Gaussian's score in student units, computed directly: a_teacher = k a + c per entry, so in
    student units a ~ N((mu - c) / k, (s / k)^2), and teacher noise sigma_teacher is sigma_teacher / k there."""
    k, c = teacher.act_k.double(), teacher.act_c.double()
    mean = (model.mean(teacher.to_teacher_obs(obs)).double() - c) / k
    variance = (model.variance + sigma_teacher.double()[:, None] ** 2) / k ** 2
    return -(actions.double() - mean) / variance


@pytest.fixture
def gaussian_files(tmp_path):
    abar = alphas_cumprod("squaredcos_cap_v2", 50)
    write_teacher_norm(tmp_path / "norm.json")
    return SimpleNamespace(folder=tmp_path, abar=abar, norm=tmp_path / "norm.json",
                           eps=save_script(GaussianEps(abar, 0.4), tmp_path / "eps.pt"))


@pytest.fixture(scope="module")
def gaussian_onnx(tmp_path_factory):
    """The same eps model exported to ONNX (torch.onnx.export, dynamic batch): x, obs, t -> eps."""
    model = GaussianEps(alphas_cumprod("squaredcos_cap_v2", 50), 0.4).eval()
    path = tmp_path_factory.mktemp("onnx") / "eps.onnx"
    batch = torch.export.Dim("batch", min=1)
    example = (torch.randn(2, ACT_DIM), torch.randn(2, OBS_DIM), torch.tensor([0, 3]))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, input_names=["x", "obs", "t"], output_names=["eps"],
                                    dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), dynamo=True, verbose=False)
    program.save(str(path))
    return path


def test_ddpm_score_of_an_analytic_gaussian_is_exact_through_both_normalisations(gaussian_files):
    teacher = load_external_teacher(external_config(gaussian_files.eps, gaussian_files.norm), small_spec())
    model = GaussianEps(gaussian_files.abar, 0.4)
    generator = torch.Generator().manual_seed(0)
    actions = torch.randn(64, ACT_DIM, generator=generator, dtype=torch.float64)
    obs = torch.randn(64, OBS_DIM, generator=generator)
    sigma = torch.exp(torch.empty(64).uniform_(math.log(0.02), math.log(2.0), generator=generator))
    effective = teacher.effective_sigma(sigma)
    # sigma rounds to the nearest step in log sigma: never further than half a step's ratio away
    ratios = teacher.step_sigmas[1:] / teacher.step_sigmas[:-1]
    assert torch.all(torch.abs(torch.log(effective / sigma)) <= 0.5 * torch.log(ratios).max() + 1e-9)
    score = teacher.score(actions, obs, sigma)
    assert score.dtype == torch.float64 and score.shape == (64, ACT_DIM)
    exact = exact_student_score(teacher, model, actions, obs, effective * teacher.kappa)
    assert torch.allclose(score, exact, rtol=2e-4, atol=2e-4), (score - exact).abs().max()
    # a sigma exactly on a step is answered at that step
    on_step = teacher.step_sigmas[7] / teacher.kappa
    assert float(teacher.effective_sigma(on_step)) == pytest.approx(float(on_step), rel=1e-9)
    # the counter sees one call per score query
    assert teacher.evaluations == 1


@pytest.mark.parametrize("output", ["denoised", "network"])
def test_edm_score_of_an_analytic_gaussian_is_exact(gaussian_files, output):
    module = GaussianDenoiser(gaussian_files.abar, 0.4) if output == "denoised" else \
        GaussianNetwork(gaussian_files.abar, 0.4, sigma_data=0.7)
    path = save_script(module, gaussian_files.folder / f"edm_{output}.pt")
    config = external_config(path, gaussian_files.norm, kind="edm_denoiser", edm_output=output, sigma_data=0.7,
                             sigma_max=20.0, sample_steps=40)
    teacher = load_external_teacher(config, small_spec())
    generator = torch.Generator().manual_seed(1)
    actions = torch.randn(64, ACT_DIM, generator=generator)
    obs = torch.randn(64, OBS_DIM, generator=generator)
    sigma = torch.empty(64).uniform_(0.05, 1.5, generator=generator)
    score = teacher.score(actions, obs, sigma)
    # the noise level converts by the geometric mean of the action scales (kappa)
    exact = exact_student_score(teacher, module, actions, obs, sigma * teacher.kappa)
    assert torch.allclose(score.double(), exact, rtol=1e-3, atol=1e-3), (score - exact).abs().max()
    # Euler sampling of the exact denoiser reproduces the Gaussian (mean and std in teacher units)
    samples = teacher.to_teacher_actions(teacher.sample(obs[:1].expand(4000, -1), generator=generator))
    target_mean = module.mean(teacher.to_teacher_obs(obs[:1]))[0]
    assert torch.allclose(samples.mean(0), target_mean, atol=0.05)
    assert torch.allclose(samples.std(0), torch.full((ACT_DIM,), 0.4), atol=0.03)


def closed_form_sampler_std(abar: torch.Tensor, std: float, sample_steps: int) -> float:
    """The std of a DDPM sampler's output for N(0, std^2) data and its exact eps model: every update is
    linear in x (plus independent noise), so the variance follows a scalar recursion from v = 1."""
    abar = abar.double()
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    n_train, variance = len(abar), 1.0
    if sample_steps == 0:
        steps = list(range(n_train - 1, -1, -1))
        previous = [t - 1 for t in steps]
    else:
        ratio = n_train // sample_steps
        steps = list(range(ratio * (sample_steps - 1), -1, -ratio))
        previous = [t - ratio for t in steps]
    for t, prev in zip(steps, previous):
        a, a_prev = float(abar[t]), float(abar[prev]) if prev >= 0 else 1.0
        eps_gain = math.sqrt(1 - a) / (a * std ** 2 + 1 - a)  # eps = eps_gain * x
        x0_gain = (1 - math.sqrt(1 - a) * eps_gain) / math.sqrt(a)
        if sample_steps == 0:
            beta = float(betas[t])
            gain = math.sqrt(a_prev) * beta / (1 - a) * x0_gain + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            variance = gain ** 2 * variance + (beta * (1 - a_prev) / (1 - a) if t > 0 else 0.0)
        else:
            variance *= (math.sqrt(a_prev) * x0_gain + math.sqrt(1 - a_prev) * eps_gain) ** 2
    return math.sqrt(variance)


def test_ddpm_samplers_reproduce_the_gaussian(gaussian_files):
    model = GaussianEps(gaussian_files.abar, 0.4)
    for steps in (0, 10):  # ancestral over all 50 steps, DDIM with 10
        teacher = load_external_teacher(external_config(gaussian_files.eps, gaussian_files.norm, sample_steps=steps),
                                        small_spec())
        obs = torch.zeros(4000, OBS_DIM)
        samples = teacher.to_teacher_actions(teacher.sample(obs, generator=torch.Generator().manual_seed(2)))
        target = model.mean(teacher.to_teacher_obs(obs[:1]))[0]
        assert torch.allclose(samples.mean(0), target, atol=0.05), steps
        # neither sampler is exact in finitely many steps (ancestral with the posterior variance and DDIM both
        # shrink the spread a little); the spread must be the one their updates give, run in closed form
        expected = closed_form_sampler_std(gaussian_files.abar, 0.4, steps)
        assert 0.3 < expected < 0.4
        assert torch.allclose(samples.std(0), torch.full((ACT_DIM,), expected), atol=0.015), (steps, expected)
        assert teacher.evaluations == (50 if steps == 0 else 10)


def test_onnx_export_of_the_eps_model_gives_the_torchscript_score(gaussian_files, gaussian_onnx):
    onnx_path = gaussian_onnx
    scripted = load_external_teacher(external_config(gaussian_files.eps, gaussian_files.norm), small_spec())
    onnx = load_external_teacher(external_config(onnx_path, gaussian_files.norm), small_spec())
    assert onnx.config.format == "onnx" and scripted.config.format == "torchscript"
    generator = torch.Generator().manual_seed(3)
    actions, obs = torch.randn(256, ACT_DIM, generator=generator), torch.randn(256, OBS_DIM, generator=generator)
    sigma = torch.empty(256).uniform_(0.03, 0.5, generator=generator)
    assert torch.allclose(onnx.score(actions, obs, sigma), scripted.score(actions, obs, sigma), rtol=1e-5, atol=1e-5)
    draws = [t.sample(obs[:8], generator=torch.Generator().manual_seed(4)) for t in (onnx, scripted)]
    assert torch.allclose(*draws, atol=1e-4)


def test_sequence_layout_and_npz_normalisation(tmp_path, gaussian_files):
    class Sequence(nn.Module):
        def __init__(self, flat: nn.Module):
            super().__init__()
            self.flat = flat

        def forward(self, x, obs, t):
            return self.flat(x.reshape(x.shape[0], -1), obs.reshape(obs.shape[0], -1), t).reshape(x.shape)

    stats = json.loads(gaussian_files.norm.read_text())
    np.savez(tmp_path / "norm.npz", **{k: np.asarray(v) for k, v in stats.items()})
    path = save_script(Sequence(GaussianEps(gaussian_files.abar, 0.4)), tmp_path / "seq.pt")
    seq = load_external_teacher(external_config(path, tmp_path / "norm.npz", layout="sequence"), small_spec())
    flat = load_external_teacher(external_config(gaussian_files.eps, gaussian_files.norm), small_spec())
    actions, obs, sigma = torch.randn(16, ACT_DIM), torch.randn(16, OBS_DIM), torch.full((16,), 0.1)
    assert torch.allclose(seq.score(actions, obs, sigma), flat.score(actions, obs, sigma), atol=1e-6)


def test_bad_inputs_fail_at_load_naming_the_field(tmp_path, gaussian_files, gaussian_onnx):
    spec = small_spec()
    eps, norm = gaussian_files.eps, gaussian_files.norm

    def error(config, spec=spec) -> str:
        with pytest.raises((ExternalTeacherError, FileNotFoundError)) as info:
            load_external_teacher(config, spec)
        message = str(info.value)
        assert len(message.splitlines()) == 1, message
        return message

    assert "--teacher-kind: expected one of ['ddpm_eps', 'edm_denoiser'], got 'ddpm'" in error(
        external_config(eps, norm, kind="ddpm"))
    assert "--schedule: expected one of ['linear', 'scaled_linear', 'squaredcos_cap_v2'], got 'cosine'" in error(
        external_config(eps, norm, schedule="cosine"))
    assert "--schedule: expected the DDPM's beta schedule" in error(external_config(eps, norm, schedule=""))
    assert "--train-steps: expected the number of diffusion steps" in error(external_config(eps, norm, train_steps=0))
    assert "--teacher-norm: expected the teacher's normalisation" in error(external_config(eps, ""))
    assert "no such file" in error(external_config(tmp_path / "missing.pt", norm))
    assert "--teacher-denoiser: expected a TorchScript file" in error(external_config(tmp_path / "m.bin", norm))
    # the eps model reads a window of 2 frames: a history of 3 fails the probe call, naming the widths
    message = error(external_config(eps, norm, history=3), small_spec(history=3))
    assert "probe call model(x [2, 6] float32, obs [2, 9] float32, t [2] int64)" in message
    assert "--teacher-history 3 x frame joint_position[2], goal[1]" in message
    assert "got 'RuntimeError: " in message  # the model's own reason, not TorchScript's traceback header
    # an ONNX file declares its widths: checked before the call
    message = error(external_config(gaussian_onnx, norm, history=3), small_spec(history=3))
    assert "input 1 'obs' (obs) shape: expected ['batch', 9]" in message and "got ['batch', 6]" in message
    # normalisation files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"obs_mean": [0, 0, 0], "obs_std": [1, 1, 1], "act_mean": [0, 0], "act_std": [1, 1]}))
    assert "keys: expected obs_{mean,std | min,max | scale,offset}" in error(external_config(eps, bad))
    bad.write_text(json.dumps({"obs_mean": [0, 0], "obs_std": [1, 1], "action_mean": [0, 0], "action_std": [1, 1]}))
    assert "obs_mean: expected 3 numbers (one per frame entry: joint_position[2], goal[1]) or 6" in error(
        external_config(eps, bad))
    bad.write_text(json.dumps({"obs_mean": [0, 0, 0], "obs_std": [1, 1, 1], "action_min": [0, 0],
                               "action_max": [1, 0]}))
    assert "action_max: expected above action_min at every index, got '0.0 <= 0.0 at index 1'" in error(
        external_config(eps, bad))
    bad.write_text(json.dumps({"obs_mean": [0, 0, 0], "obs_std": [1, 1, 1]}))
    assert "action statistics: expected one pair of action_mean+action_std" in error(external_config(eps, bad))

    # the output must look like x
    class Wrong(nn.Module):
        def forward(self, x, obs, t):
            return x[:, :2]

    wrong = save_script(Wrong(), tmp_path / "wrong.pt")
    assert "output shape: expected [2, 6] (as x), got [2, 2]" in error(external_config(wrong, norm))


def test_cli_errors_are_one_line(tmp_path, gaussian_files, capsys):
    demos = tmp_path / "demos.npz"
    from vdd_ros.learn.pipeline import load_demonstrations

    load_demonstrations("", episodes=2, dataset_seed=0).save(str(demos))
    base = ["distill", "--teacher-denoiser", gaussian_files.eps, "--teacher-norm", "identity", "--out",
            tmp_path / "s.pt", "--quiet"]
    cases = [
        ([], "--dataset: expected the demonstrations .npz"),
        (["--dataset", demos], "--teacher-history: expected an integer >= 1"),
        (["--dataset", demos, "--teacher-history", 2, "--teacher-horizon", 3, "--teacher-kind", "edm"],
         "--teacher-kind: expected one of ['ddpm_eps', 'edm_denoiser'], got 'edm'"),
        (["--dataset", demos, "--teacher-history", 2, "--teacher-horizon", 3, "--teacher-obs-fields", "goal"],
         "--teacher-obs-fields: expected names from ['joint_position', 'joint_velocity'], got unknown ['goal']"),
        (["--dataset", demos, "--teacher", "t.pt"], "--teacher and --teacher-denoiser: expected one of them"),
    ]
    for extra, expected in cases:
        assert vdd_main([str(a) for a in base + extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.pt").exists()


# --- end to end: a DDPM trained here on arm_avoid ----------------------------------------------------------
ARM_HISTORY, ARM_HORIZON, ARM_EXECUTE = 2, 8, 4
DDPM_STEPS, DDPM_SCHEDULE = 100, "squaredcos_cap_v2"
TRAIN_ITERATIONS = 3000
EPISODES, SEED = 200, 1000


class EpsMLP(nn.Module):
    """A small noise-prediction MLP: eps(x [B, 24], obs [B, 6], t [B] int64), sinusoidal step features."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128, n_steps: int = DDPM_STEPS):
        super().__init__()
        self.n_steps = float(n_steps)
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(100.0), 16)))
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim + 32, hidden), nn.Mish(), nn.Linear(hidden, hidden),
                                 nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, act_dim))

    def forward(self, x: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = (t.to(torch.float32) / self.n_steps).unsqueeze(-1) * self.frequencies
        return self.net(torch.cat([x, obs, torch.sin(angles), torch.cos(angles)], -1))


def train_arm_ddpm(folder):
    """Demonstrations, the teacher's own normalisation (obs mean/std, actions min/max to [-1, 1], as
    diffusion_policy does) and a DDPM eps model trained on them: written as demos.npz, stats.json, ddpm.pt."""
    from vdd_ros.learn.pipeline import load_demonstrations

    dataset = load_demonstrations("", episodes=200, dataset_seed=0)
    dataset.save(str(folder / "demos.npz"))
    positions = dataset.observations[:, :3]  # the teacher reads joint positions only
    stats = {"obs_mean": positions.mean(0).tolist(), "obs_std": positions.std(0).tolist(),
             "action_min": dataset.actions.min(0).tolist(), "action_max": dataset.actions.max(0).tolist()}
    (folder / "stats.json").write_text(json.dumps(stats))
    windows, chunks = dataset.windows(ARM_HISTORY, ARM_HORIZON)
    obs = (windows[..., :3] - positions.mean(0)) / positions.std(0)
    low, high = dataset.actions.min(0), dataset.actions.max(0)
    act = 2 * (chunks - low) / (high - low) - 1
    obs = torch.tensor(obs.reshape(len(obs), -1), dtype=torch.float32)
    act = torch.tensor(act.reshape(len(act), -1), dtype=torch.float32)

    abar = alphas_cumprod(DDPM_SCHEDULE, DDPM_STEPS).to(torch.float32)
    torch.manual_seed(0)
    model = EpsMLP(obs.shape[1], act.shape[1])
    ema = EpsMLP(obs.shape[1], act.shape[1])
    ema.load_state_dict(model.state_dict())
    optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=TRAIN_ITERATIONS)
    generator = torch.Generator().manual_seed(0)
    for step in range(TRAIN_ITERATIONS):
        rows = torch.randint(0, len(obs), (256,), generator=generator)
        t = torch.randint(0, DDPM_STEPS, (256,), generator=generator)
        noise = torch.randn(256, act.shape[1], generator=generator)
        a = abar[t].unsqueeze(-1)
        loss = (model(a.sqrt() * act[rows] + (1 - a).sqrt() * noise, obs[rows], t) - noise).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            decay = min(0.995, (1 + step) / (10 + step))
            for averaged, param in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(param, 1 - decay)
    return save_script(ema, folder / "ddpm.pt"), float(loss.detach())


# a short run; the query noise U[0.1, 0.3] (student units; DDPM steps 1..8 here): at the default U[0.03, 0.1]
# (steps 0..1) this briefly trained eps model's score is too rough off the data and the student reached 0.10
# against the teacher's 0.23 (100 episodes); at U[0.1, 0.3] 0.23 against 0.23
TINY_DISTILL = ["--set", "iterations=300", "--set", "warm_start_iterations=500", "--set", "n_experts=4",
                "--set", "batch_size=16", "--set", "samples_per_expert=8", "--set", "gating_batch_size=256",
                "--set", "backbone.hidden=128", "--set", "validation_every=100", "--set", "checkpoint_every=0",
                "--set", "sigma_min=0.1", "--set", "sigma_max=0.3", "--quiet",
                # the NLL guard: a closed-loop one keeps whichever state drives best, here the EM warm start on the
                # scripted demonstrations (0.54 against this weak teacher's 0.20), and this test is about following
                # the teacher
                "--set", "validation_episodes=0"]


@pytest.mark.slow
def test_a_ddpm_trained_elsewhere_distils_into_a_student_as_good_as_it(tmp_path, capsys):
    from vdd_ros.cli.learn import evaluate_checkpoints
    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.runtime import load_policy
    from vdd_ros.tasks import arm_avoid

    timings = {}
    started = time.perf_counter()
    teacher_file, final_loss = train_arm_ddpm(tmp_path)
    timings["train teacher"] = time.perf_counter() - started
    student_path = tmp_path / "student.pt"
    argv = ["distill", "--teacher-denoiser", teacher_file, "--teacher-kind", "ddpm_eps",
            "--schedule", DDPM_SCHEDULE, "--train-steps", DDPM_STEPS, "--teacher-norm", tmp_path / "stats.json",
            "--teacher-history", ARM_HISTORY, "--teacher-horizon", ARM_HORIZON, "--execute-steps", ARM_EXECUTE,
            "--teacher-obs-fields", "joint_position", "--dataset", tmp_path / "demos.npz", "--out", student_path,
            *TINY_DISTILL]
    started = time.perf_counter()
    assert vdd_main([str(a) for a in argv]) == 0
    timings["distill"] = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "ddpm_eps teacher" in printed and "DDPM steps" in printed

    student = load_checkpoint(student_path)
    assert student.kind == "vdd_mixture" and student.spec.task == "arm_avoid"
    assert (student.spec.history, student.spec.action_horizon) == (ARM_HISTORY, ARM_HORIZON)
    assert [f.name for f in student.spec.observation_fields] == ["joint_position"]
    assert student.spec.model_info["teacher"] == "ddpm.pt" and student.spec.model_info["teacher_kind"] == "ddpm_eps"
    source = student.config["external_teacher"]
    assert source["path"] == teacher_file and source["format"] == "torchscript" and len(source["sha256"]) == 64
    assert source["schedule"] == DDPM_SCHEDULE and source["train_steps"] == DDPM_STEPS
    assert source["normalization"]["action_min"] == json.loads((tmp_path / "stats.json").read_text())["action_min"]
    assert student.history["validation_actions"] == "teacher samples"  # the guard sampled the teacher

    onnx_path = tmp_path / "student.onnx"
    assert vdd_main(["export", str(student_path), "--out", str(onnx_path)]) == 0
    policy = load_policy(str(onnx_path))
    frames = arm_avoid.initial_frames(1, 0)
    chunk = policy.act(np.repeat(frames[:, :3], ARM_HISTORY, axis=0), np.random.default_rng(0))
    assert chunk.shape == (ARM_HORIZON, 3) and np.all(np.isfinite(chunk))
    assert policy.spec.model_info["teacher"] == "ddpm.pt" and policy.spec.model_info["teacher_kind"] == "ddpm_eps"

    # both closed loop on the same episodes: the teacher through its own sampler (ancestral, 100 steps)
    started = time.perf_counter()
    config = ExternalTeacherConfig(**{k: (tuple(v) if k == "observation_fields" else v) for k, v in source.items()
                                      if k in ExternalTeacherConfig.__dataclass_fields__})
    teacher = load_external_teacher(config, student.spec)
    frame_fields = arm_avoid.task_spec(1, 1).observation_fields
    teacher_result = arm_avoid.rollout(ExternalTeacherPolicy(teacher, seed=SEED, frame_fields=frame_fields),
                                       EPISODES, SEED, ARM_HISTORY, ARM_EXECUTE)
    args = SimpleNamespace(episodes=EPISODES, seed=SEED, greedy=False, n_steps=None, execute_steps=None,
                           timing_repeats=3, expert_episodes=0)
    rows, _ = evaluate_checkpoints([("student", str(student_path), student)], args)
    timings["rollouts"] = time.perf_counter() - started
    teacher_success, student_success = teacher_result.success_rate, rows[0]["success_rate"]
    print(f"external DDPM teacher: final loss {final_loss:.4f}, success {teacher_success:.3f} (entropy "
          f"{teacher_result.entropy:.3f}); student success {student_success:.3f} (entropy {rows[0]['entropy']:.3f}); "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    assert abs(student_success - teacher_success) <= 0.1
