"""vdd eval --dataset: offline numbers of mixtures on held-out demonstrations (vdd_ros.learn.offline_eval)."""
import json
import math

import numpy as np
import pytest
import torch

from vdd_ros.cli import main as cli_main
from vdd_ros.data.dataset import DemoDataset
from vdd_ros.learn import offline_eval as oe
from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.paths import model_file
from vdd_ros.spec import ModelSpec, Normalization, ObservationField

# a toy robot that no built-in task knows: 2 joints, a goal vector, 10 Hz; chunks of 2 actions
ACT_MEAN, ACT_STD = (0.1, -0.2), (0.5, 3.0)
DEMO_ACTION = np.array([0.3, -0.6])  # every demonstrated action (physical units)
HORIZON = 2


@pytest.fixture(autouse=True)
def learn_commands(monkeypatch):
    modules = tuple(dict.fromkeys(cli_main.SUBCOMMAND_MODULES + ("vdd_ros.cli.learn",)))
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", modules)


def vdd(*argv) -> int:
    return cli_main.main([str(a) for a in argv])


def toy_spec(**changes) -> ModelSpec:
    spec = ModelSpec(
        joint_names=("shoulder", "elbow"), joint_lower=(-2.0, -2.0), joint_upper=(2.0, 2.0),
        joint_velocity_limits=(1.0, 1.0),
        observation_fields=(ObservationField("joint_position", "joint_position", 2),
                            ObservationField("goal", "vector", 3, topic="goal", msg_type="std_msgs/Float64MultiArray")),
        history=1, action_kind="joint_position", action_horizon=HORIZON, control_rate_hz=10.0,
        normalization=Normalization((0.0,) * 5, (1.0,) * 5, ACT_MEAN, ACT_STD), task="toy_robot")
    return spec.replace(**changes)


def toy_dataset() -> DemoDataset:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(60, 5))
    return DemoDataset(observations=obs, actions=np.tile(DEMO_ACTION, (60, 1)), episode_ends=[20, 40, 60],
                       spec=toy_spec())


def constructed_mixture(weights, means, stds, covariance="diagonal", off_diagonal=None) -> MixtureOfExpertsPolicy:
    """A mixture whose weights, means [Z, A] and stds [Z, A] (normalised units) do not depend on the state."""
    weights, means, stds = (torch.as_tensor(np.asarray(v), dtype=torch.float32) for v in (weights, means, stds))
    model = MixtureOfExpertsPolicy(5, 1, means.shape[1], means.shape[0], BackboneConfig(hidden=8, mlp_layers=1),
                                   covariance=covariance)
    with torch.no_grad():
        model.mean_head.weight.zero_()
        model.mean_head.bias.copy_(means.reshape(-1))
        model.std_head.weight.zero_()
        model.std_head.bias.copy_(torch.log(torch.expm1(stds - model.min_std)).reshape(-1))
        if model.off_diagonal_head is not None:
            model.off_diagonal_head.weight.zero_()
            model.off_diagonal_head.bias.copy_(torch.as_tensor(off_diagonal, dtype=torch.float32).reshape(-1))
        model.gating_net[-1].weight.zero_()
        model.gating_net[-1].bias.copy_(torch.log(weights))
    return model.eval()


def normalised_chunk(action) -> np.ndarray:
    return np.tile((np.asarray(action) - ACT_MEAN) / ACT_STD, HORIZON)


# --- energy distance ------------------------------------------------------------------------------
def test_energy_distance_is_zero_for_one_distribution_and_matches_the_closed_form_for_shifted_gaussians():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    assert oe.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    # two independent sets of one distribution: about E|X-X'| (1/n + 1/m) / 2, far below any real shift
    same = oe.energy_distance(rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3)))
    assert 0.0 < same < 0.005
    # point masses a apart: 2|a|
    assert oe.energy_distance(np.zeros((4, 2)), np.tile([3.0, 4.0], (5, 1))) == pytest.approx(10.0)
    # 1-D N(0,1) vs N(mu,1): 2 E|Z| (Z ~ N(mu, 2)) - 2 E|X-X'| with E|X-X'| = 2/sqrt(pi)
    mu, s = 1.5, math.sqrt(2.0)
    mean_abs = s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * s ** 2)) + mu * math.erf(mu / (s * math.sqrt(2)))
    expected = 2 * mean_abs - 2 * (2 / math.sqrt(math.pi))
    measured = oe.energy_distance(rng.normal(size=(4000, 1)), mu + rng.normal(size=(4000, 1)))
    assert measured == pytest.approx(expected, abs=0.03) and expected > 0.5
    # leading axes are batches: one value per state
    batch = oe.energy_distance(np.zeros((3, 4, 2)), np.ones((3, 5, 2)) * np.arange(3)[:, None, None])
    assert batch.shape == (3,) and batch == pytest.approx(2 * np.sqrt(2) * np.arange(3))
    with pytest.raises(ValueError, match="energy_distance: expected"):
        oe.energy_distance(np.zeros((4, 2)), np.zeros((4, 3)))


# --- log-likelihood, closest expert, experts in use -------------------------------------------------
@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_log_likelihood_equals_the_closed_form_mixture_density_in_both_units(covariance):
    weights = np.array([0.6, 0.3, 0.1])
    means = np.stack([normalised_chunk(DEMO_ACTION) + 0.3, normalised_chunk([1.0, 1.0]), np.zeros(4)])
    stds = np.array([[0.5, 0.7, 0.9, 1.1], [0.3, 0.3, 0.6, 0.6], [1.0, 2.0, 1.5, 0.8]])
    off = np.random.default_rng(1).normal(scale=0.2, size=(3, 6))
    model = constructed_mixture(weights, means, stds, covariance, off if covariance == "full" else None)
    # the covariances by hand: L = diag(stds) plus (full) the off-diagonal entries in the order tril_indices gives
    chol = np.zeros((3, 4, 4))
    chol[:, np.arange(4), np.arange(4)] = stds
    if covariance == "full":
        rows, cols = np.tril_indices(4, -1)
        chol[:, rows, cols] = off
    cov_norm = chol @ chol.transpose(0, 2, 1)
    dataset = toy_dataset()
    checkpoint = Checkpoint("vdd_mixture", toy_spec(model_kind="vdd_mixture"), {}, model, {})
    view = oe.held_out(dataset, checkpoint.spec)
    n = dataset.n_steps
    closed_norm = oe.gaussian_mixture_log_density(view.actions, np.tile(weights, (n, 1)), np.tile(means, (n, 1, 1)),
                                                  np.tile(cov_norm, (n, 1, 1, 1)))
    assert oe.mixture_outputs(model, view.observations, view.actions)["log_prob"] == pytest.approx(closed_norm,
                                                                                                    abs=1e-4)
    # in joint units: means and covariances scaled by the action normalisation, the demonstrated chunk as recorded
    scale = np.tile(ACT_STD, HORIZON)
    means_phys = means * scale + np.tile(ACT_MEAN, HORIZON)
    cov_phys = cov_norm * scale[:, None] * scale[None, :]
    closed_phys = oe.gaussian_mixture_log_density(np.tile(DEMO_ACTION, (n, HORIZON)), np.tile(weights, (n, 1)),
                                                  np.tile(means_phys, (n, 1, 1)), np.tile(cov_phys, (n, 1, 1, 1)))
    row = oe.evaluate_offline(dataset, [("student", checkpoint)], options=oe.OfflineOptions(n_clusters=2)).rows[0]
    assert row["log_likelihood_per_dim_normalised"] == pytest.approx(closed_norm.mean() / 4, abs=1e-4)
    assert row["log_likelihood_per_dim_physical"] == pytest.approx(closed_phys.mean() / 4, abs=1e-4)
    assert row["log_likelihood_per_dim_physical"] != pytest.approx(row["log_likelihood_per_dim_normalised"], abs=0.01)


def test_closest_expert_error_is_zero_when_the_demonstrated_chunk_is_an_expert_mean():
    exact = normalised_chunk(DEMO_ACTION)
    means = np.stack([normalised_chunk([1.5, 1.5]), exact, exact + 0.05])
    stds = np.full((3, 4), 0.2)
    dataset = toy_dataset()
    for weights, expected_zero, carrying in (([0.5, 0.49, 0.01], True, 2), ([0.985, 0.005, 0.01], False, 1)):
        checkpoint = Checkpoint("vdd_mixture", toy_spec(model_kind="vdd_mixture"), {},
                                constructed_mixture(weights, means, stds), {})
        row = oe.evaluate_offline(dataset, [("student", checkpoint)], options=oe.OfflineOptions(n_clusters=2)).rows[0]
        if expected_zero:
            assert row["closest_expert_rmse"] == pytest.approx(0.0, abs=1e-5)
            assert row["closest_expert_rmse_per_joint"] == pytest.approx([0.0, 0.0], abs=1e-5)
        else:  # the exact expert's weight 0.005 is below the threshold: it does not count; expert 0 is far
            assert row["closest_expert_rmse"] > 0.3
        assert row["sampled_rmse"] > 0.05  # samples carry the experts' noise and the far expert
        assert row["experts_with_weight"] == pytest.approx(carrying)
        assert row["effective_experts"] == pytest.approx(math.exp(-sum(w * math.log(w) for w in weights)), rel=1e-4)
        assert "energy_distance" not in row  # no teacher, no distance
    # the array function alone: the nearest eligible mean, and RMSE in joint units per joint
    index = oe.closest_expert(means[None], exact[None], np.array([[0.5, 0.49, 0.01]]))
    assert index.tolist() == [1]
    error = oe.chunk_rmse(np.array([[0.0, 0.0, 0.0, 0.0]]), np.array([[3.0, 0.0, 3.0, 0.0]]), 2)
    assert error["rmse"] == pytest.approx(math.sqrt(4.5)) and error["per_joint"] == pytest.approx([3.0, 0.0])
    usage = oe.expert_usage(np.array([[0.5, 0.5, 0.0, 0.0], [0.97, 0.01, 0.01, 0.01]]))
    assert usage["experts_with_weight"] == pytest.approx(1.5) and usage["experts_used_anywhere"] == 2


def test_kmeans_separates_blobs_and_the_states_come_from_every_cluster():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(50, 2)) + [10, 0], rng.normal(size=(30, 2)) - [10, 0],
                             rng.normal(size=(20, 2)) + [0, 10]])
    labels, centres = oe.kmeans(points, 3, seed=0)
    assert np.bincount(labels).tolist() == [50, 30, 20]  # numbered by decreasing size
    assert centres[0] == pytest.approx([10, 0], abs=0.5)
    states = oe.choose_states(labels, 12, seed=0)
    assert np.bincount(labels[states]).tolist() == [4, 4, 4]
    mean, directions = oe.pca_directions(points)
    assert directions.shape == (2, 2) and abs(directions[0] @ [1.0, 0.0]) > 0.9


def test_a_dataset_that_does_not_fit_the_model_is_named_field_by_field(tmp_path, capsys):
    problems = oe.dataset_fit_problems(toy_spec(control_rate_hz=50.0), toy_spec())
    assert problems == ["control_rate_hz: expected 10.0, got 50.0"]
    narrow = toy_spec(observation_fields=toy_spec().observation_fields[:1], normalization=Normalization(
        (0.0,) * 2, (1.0,) * 2, ACT_MEAN, ACT_STD))
    assert oe.dataset_fit_problems(narrow, toy_spec()) == [
        "observation_fields: expected a field 'goal', got only ['joint_position']"]
    assert oe.dataset_fit_problems(toy_spec(), narrow) == []  # extra dataset fields are fine
    # through the CLI: one line, the field, the model's and the dataset's value
    student = tmp_path / "student.pt"
    save_checkpoint(student, constructed_mixture([0.5, 0.5], np.zeros((2, 4)), np.ones((2, 4))), "vdd_mixture",
                    toy_spec(), {})
    dataset = toy_dataset()
    dataset.spec = toy_spec(control_rate_hz=50.0)
    dataset.save(str(tmp_path / "other.npz"))
    assert vdd("eval", "--dataset", tmp_path / "other.npz", "--student", student, "--json", tmp_path / "x.json",
               "--quiet") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "control_rate_hz: expected 10.0, got 50.0" in error
    assert f"dataset {tmp_path / 'other.npz'} does not fit --student {student} (expected = model" in error
    assert not (tmp_path / "x.json").exists()


def test_cli_on_a_task_without_a_simulator_needs_no_rollouts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "s.pt", constructed_mixture([0.7, 0.3], np.stack([normalised_chunk(DEMO_ACTION),
                                                                                  np.ones(4)]), np.full((2, 4), 0.1)),
                    "vdd_mixture", toy_spec(), {})
    toy_dataset().save(str(tmp_path / "held.npz"))
    assert vdd("eval", "--dataset", "held.npz", "--student", "s.pt", "--clusters", 2, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "LL/dim norm" in printed and "closest RMSE" in printed and "success" not in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report) == ["offline"]
    assert report["offline"]["models"][0]["closest_expert_rmse"] == pytest.approx(0.0, abs=1e-5)
    assert sorted(p.name for p in tmp_path.glob("eval_offline_cluster*.png")) == [
        "eval_offline_cluster0.png", "eval_offline_cluster1.png"]
    assert vdd("eval", "--student", "s.pt") == 2  # rollouts need a built-in task, and the error says what to do
    assert "--dataset held_out.npz" in capsys.readouterr().err
    assert vdd("eval", "--student", "s.pt", "--rollouts") == 2
    assert "--rollouts: expected --dataset too" in capsys.readouterr().err


# --- the shipped models, end to end ---------------------------------------------------------------
def test_cli_on_the_shipped_models_reports_finite_numbers_and_the_student_beats_a_shifted_one(tmp_path, capsys):
    teacher, student = model_file("teacher.pt"), model_file("student.pt")
    if not (teacher.is_file() and student.is_file()):
        pytest.skip("the shipped models are not installed")
    held_out = tmp_path / "held_out.npz"
    assert vdd("demos", "--episodes", 6, "--seed", 4242, "--out", held_out) == 0  # training used seed 0
    bad = load_checkpoint(student)
    with torch.no_grad():
        bad.model.mean_head.bias.add_(0.2)  # every expert mean 0.2 standard deviations off, per entry
    save_checkpoint(tmp_path / "shifted.pt", bad.model, bad.kind, bad.spec, bad.config)
    capsys.readouterr()
    out, prefix = tmp_path / "eval.json", tmp_path / "offline"
    assert vdd("eval", "--dataset", held_out, "--teacher", teacher, "--student", student, "--em",
               tmp_path / "shifted.pt", "--states", 12, "--samples", 32, "--clusters", 3, "--rollouts",
               "--episodes", 4, "--expert-episodes", 0, "--timing-repeats", 2, "--json", out,
               "--plot", tmp_path / "rollouts.png", "--offline-plots", prefix, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "LL/dim phys" in printed and "(floor)" in printed and "success" in printed and "NFE/action" in printed
    report = json.loads(out.read_text())
    assert [row["model"] for row in report["models"]] == ["teacher", "student", "em"]  # the closed-loop rows
    offline = report["offline"]
    assert offline["energy_states"] == 12 and offline["samples_per_state"] == 32 and offline["n_clusters"] == 3
    rows = {row["model"]: row for row in offline["models"]}
    assert list(rows) == ["teacher", "student", "em"]
    mixture_keys = {"log_likelihood_per_dim_normalised", "log_likelihood_per_dim_physical", "closest_expert_rmse",
                    "sampled_rmse", "policy_rmse", "experts_with_weight", "effective_experts", "energy_distance",
                    "energy_distance_se", "energy_distance_noise_floor", "energy_distance_ratio",
                    "energy_distance_policy"}
    for label in ("student", "em"):
        assert mixture_keys <= set(rows[label])
        assert all(math.isfinite(rows[label][key]) for key in mixture_keys)
        assert 1.0 <= rows[label]["effective_experts"] <= rows[label]["n_experts"]
    floor = rows["teacher"]["energy_distance"]
    assert rows["teacher"]["energy_distance_is_noise_floor"] and 0 < floor < rows["student"]["energy_distance"]
    assert math.isfinite(rows["teacher"]["sampled_rmse"])
    good, shifted = rows["student"], rows["em"]
    assert good["log_likelihood_per_dim_physical"] > shifted["log_likelihood_per_dim_physical"] + 1.0
    assert good["closest_expert_rmse"] < 0.5 * shifted["closest_expert_rmse"]
    assert good["sampled_rmse"] < shifted["sampled_rmse"]
    assert good["energy_distance"] < 0.5 * shifted["energy_distance"]
    assert len(offline["clusters"]) == 3 and sum(c["energy_states"] for c in offline["clusters"]) == 12
    assert offline["plots"] == [f"{prefix}_cluster{k}.png" for k in range(3)]
    for path in offline["plots"]:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "rollouts.png").stat().st_size > 10_000


def test_eval_without_dataset_writes_what_it_always_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    student = model_file("student.pt")
    if not student.is_file():
        pytest.skip("the shipped models are not installed")
    out = tmp_path / "eval.json"
    assert vdd("eval", "--student", student, "--episodes", 2, "--expert-episodes", 0, "--timing-repeats", 2,
               "--json", out, "--plot", tmp_path / "r.png") == 0
    report = json.loads(out.read_text())
    assert list(report) == ["task", "episodes", "seed", "expert_episodes", "models"]
    assert "LL/dim" not in capsys.readouterr().out and not list(tmp_path.glob("eval_offline*"))
