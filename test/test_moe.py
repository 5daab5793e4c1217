"""The mixture-of-experts student and its backbones: exact densities, sampling, init, ONNX export."""
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from vdd_ros.learn.backbones import BackboneConfig, CausalSelfAttention, build_backbone
from vdd_ros.learn.moe import MixtureOfExpertsPolicy

SMALL_MLP = BackboneConfig(kind="mlp", hidden=32, mlp_layers=2)
SMALL_TRANSFORMER = BackboneConfig(kind="transformer", hidden=32, embed_dim=16, transformer_layers=2, heads=2)
RELU_MLP = BackboneConfig(kind="mlp", hidden=32, mlp_layers=2, activation="relu")


def perturbed_policy(covariance, gating="detached_features", backbone=SMALL_MLP, seed=0):
    """A policy whose heads are no longer at their (state-independent) initial values."""
    torch.manual_seed(seed)
    policy = MixtureOfExpertsPolicy(3, 2, 4, 5, backbone, covariance, gating=gating)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return policy


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
@pytest.mark.parametrize("gating", ["detached_features", "own_mlp", "detached_mlp"])
@pytest.mark.parametrize("backbone", [SMALL_MLP, SMALL_TRANSFORMER, RELU_MLP], ids=["mlp", "transformer", "relu"])
def test_log_prob_equals_torch_distributions(covariance, gating, backbone):
    policy = perturbed_policy(covariance, gating, backbone)
    obs, actions = torch.randn(16, 6), torch.randn(16, 4) * 2
    weights, means, chol = policy.components(obs)
    assert torch.allclose(chol, torch.tril(chol))
    if covariance == "diagonal":
        assert torch.allclose(chol, torch.diag_embed(torch.diagonal(chol, dim1=-2, dim2=-1)))
    reference = MixtureSameFamily(Categorical(probs=weights), MultivariateNormal(means, scale_tril=chol))
    assert torch.allclose(policy.log_prob(actions, obs), reference.log_prob(actions), atol=1e-4)
    per_expert = MultivariateNormal(means, scale_tril=chol).log_prob(actions[:, None, :])
    assert torch.allclose(policy.expert_log_probs(actions, obs), per_expert, atol=1e-4)
    entropies = policy.entropies(policy.expert_scales(policy.features(obs)))
    assert torch.allclose(entropies, MultivariateNormal(means, scale_tril=chol).entropy(), atol=1e-5)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_log_probs_of_several_actions_per_state_equal_torch_distributions(covariance):
    """The [B, V, A] path VDD's E-step uses: V actions per state against every expert."""
    policy = perturbed_policy(covariance)
    obs, actions = torch.randn(8, 6), torch.randn(8, 5, 4) * 2
    _, means, chol = policy.components(obs)
    feats = policy.features(obs)
    result = policy.gaussian_log_probs(actions, policy.expert_means(feats), policy.expert_scales(feats))
    assert result.shape == (8, 5, 5)  # [B, V, Z]
    reference = MultivariateNormal(means[:, None], scale_tril=chol[:, None]).log_prob(actions[:, :, None, :])
    assert torch.allclose(result, reference, atol=1e-4)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_sample_and_act_shapes_and_statistics(covariance):
    torch.manual_seed(0)
    policy = MixtureOfExpertsPolicy(2, 1, 2, 8, SMALL_MLP, covariance, init_std=0.3, mean_init_spread=1.0)
    obs = torch.zeros(20000, 2)
    samples = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (20000, 2)
    # initial mixture: uniform over the 8 grid points, std 0.3 each
    expected_cov = 0.09 * torch.eye(2) + torch.cov(policy.components(obs[:1])[1][0].T, correction=0)
    assert torch.allclose(torch.cov(samples.T), expected_cov, atol=0.03)
    actions = policy.act(obs[:10], generator=torch.Generator().manual_seed(2))
    means = policy.components(obs[:1])[1][0]
    assert actions.shape == (10, 2)
    assert all(torch.isclose(means, a).all(-1).any() for a in actions)  # every action is some expert's mean


def test_greedy_act_picks_the_heaviest_expert():
    policy = perturbed_policy("full")
    obs = torch.randn(32, 6)
    weights, means = policy.weights_and_means(obs)
    expected = means[torch.arange(32), weights.argmax(-1)]
    assert torch.equal(policy.act(obs, greedy=True), expected)
    assert torch.equal(policy(obs)[0], weights)


def test_sampling_is_reproducible_with_a_generator():
    policy = perturbed_policy("full")
    obs = torch.randn(8, 6)
    first = policy.sample(obs, generator=torch.Generator().manual_seed(3))
    second = policy.sample(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_initialisation_grid_in_2d_uniform_otherwise_and_init_std():
    policy = MixtureOfExpertsPolicy(3, 1, 2, 8, SMALL_MLP, "full", init_std=0.7, mean_init_spread=1.5)
    weights, means, chol = policy.components(torch.randn(4, 3))
    # state independent at init: every state has the same experts
    assert torch.allclose(means, means[:1].expand_as(means))
    grid = {(x, y) for x in (-1.5, 0.0, 1.5) for y in (-1.5, 0.0, 1.5)} - {(0.0, 0.0)}
    assert {tuple(round(v, 6) for v in m.tolist()) for m in means[0]} == grid
    assert torch.allclose(weights, torch.full_like(weights, 1 / 8))
    assert torch.allclose(torch.diagonal(chol, dim1=-2, dim2=-1), torch.full((4, 8, 2), 0.7), atol=1e-5)
    assert torch.allclose(chol, torch.diag_embed(torch.diagonal(chol, dim1=-2, dim2=-1)))

    torch.manual_seed(0)
    wide = MixtureOfExpertsPolicy(3, 1, 5, 6, SMALL_MLP, "diagonal", mean_init_spread=2.0)
    means = wide.components(torch.zeros(1, 3))[1][0]
    assert means.abs().max() <= 2.0 and means.std() > 0.5  # spread, not all at the origin


def test_experts_start_state_independent_and_old_hyperparameters_still_rebuild():
    obs = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    model = MixtureOfExpertsPolicy(3, 1, 4, 6, SMALL_MLP, "diagonal", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        means = model.components(obs)[1]
    assert float(means.std(0).max()) < 1e-6  # every expert the same at every state
    # files written before mean_init_weight_std was dropped still name it: it is ignored
    old = dict(model.hyperparameters, mean_init_weight_std=0.0)
    rebuilt = MixtureOfExpertsPolicy.from_hyperparameters(old)
    assert rebuilt.hyperparameters == model.hyperparameters


def test_transformer_attention_is_causal():
    torch.manual_seed(0)
    attention = CausalSelfAttention(dim=8, heads=2, tokens=4)
    tokens = torch.randn(3, 4, 8)
    changed = tokens.clone()
    changed[:, 2:] += 5.0
    assert torch.allclose(attention(tokens)[:, :2], attention(changed)[:, :2])
    assert not torch.allclose(attention(tokens)[:, 2:], attention(changed)[:, 2:])


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_backbone_uses_extra_input(kind):
    backbone = build_backbone(BackboneConfig(kind=kind, hidden=32, embed_dim=16, heads=2), 3, 4, extra_dim=5)
    obs, extra = torch.randn(6, 12), torch.randn(6, 5)
    out = backbone(obs, extra)
    assert out.shape == (6, backbone.out_dim)
    assert not torch.allclose(out, backbone(obs, extra + 1.0))
    with pytest.raises(ValueError, match="extra"):
        backbone(obs, None)


@pytest.mark.parametrize("bad, field", [
    (dict(kind="rnn"), "kind"), (dict(hidden=0), "hidden"), (dict(embed_dim=10, heads=4), "embed_dim"),
    (dict(transformer_layers=-1), "transformer_layers"),
])
def test_bad_backbone_config_is_refused(bad, field):
    with pytest.raises(ValueError, match=f"BackboneConfig.{field}"):
        BackboneConfig(**bad).validate()


@pytest.mark.parametrize("bad, field", [
    (dict(n_experts=0), "n_experts"), (dict(covariance="dense"), "covariance"), (dict(gating="argmax"), "gating"),
    (dict(min_std=0.0), "min_std"), (dict(init_std=1e-5), "init_std"),
    (dict(mean_init_spread=-1.0), "mean_init_spread"),
    (dict(gating_hidden=-1), "gating_hidden"), (dict(gating_layers=1.5), "gating_layers"),
])
def test_bad_policy_arguments_are_refused(bad, field):
    arguments = dict(obs_dim_step=3, history=1, act_dim=2, n_experts=4, backbone=SMALL_MLP)
    arguments.update(bad)
    with pytest.raises(ValueError, match=field):
        MixtureOfExpertsPolicy(**arguments)


def test_own_gating_mlp_has_its_own_size_and_keeps_it_in_a_checkpoint(tmp_path):
    from vdd_ros.learn.checkpoint import load_checkpoint, save_checkpoint
    from vdd_ros.spec import ModelSpec, Normalization, ObservationField

    policy = MixtureOfExpertsPolicy(3, 1, 3, 4, backbone=SMALL_MLP, gating="own_mlp", gating_hidden=8,
                                    gating_layers=1)
    linears = [m for m in policy.gating_net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 8), (8, 4)]
    spec = ModelSpec(joint_names=("j1", "j2", "j3"), joint_lower=(-3.0,) * 3, joint_upper=(3.0,) * 3,
                     joint_velocity_limits=(2.0,) * 3, observation_fields=(ObservationField("q", "joint_position", 3),),
                     history=1, action_kind="joint_position", action_horizon=1, control_rate_hz=10.0,
                     normalization=Normalization((0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3),
                     model_kind="vdd_mixture")
    save_checkpoint(tmp_path / "s.pt", policy, "vdd_mixture", spec, {})
    loaded = load_checkpoint(tmp_path / "s.pt").model
    assert loaded.hyperparameters["gating_hidden"] == 8 and loaded.hyperparameters["gating_layers"] == 1
    obs = torch.randn(5, 3)
    assert torch.equal(loaded.gating_logits(obs, loaded.features(obs)), policy.gating_logits(obs, policy.features(obs)))


@pytest.mark.parametrize("backbone", [SMALL_MLP, SMALL_TRANSFORMER], ids=["mlp", "transformer"])
def test_gating_head_reads_detached_features_and_trains_only_itself(backbone):
    """detached_mlp: a small MLP head on the backbone's features; the gating loss moves only the head."""
    policy = MixtureOfExpertsPolicy(3, 2, 4, 5, backbone=backbone, gating="detached_mlp", gating_hidden=8,
                                    gating_layers=2)
    linears = [m for m in policy.gating_net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(policy.backbone.out_dim, 8), (8, 8), (8, 5)]
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    obs = torch.randn(6, 6)
    policy.gating_logits(obs, policy.features(obs)).logsumexp(-1).sum().backward()
    gating_ids = {id(p) for p in policy.gating_net.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.gating_net.parameters())
    assert all(p.grad is None for p in policy.parameters() if id(p) not in gating_ids)
    # a ReLU backbone gives its activation to the gating MLP too
    relu = MixtureOfExpertsPolicy(3, 2, 4, 5, backbone=RELU_MLP, gating="detached_mlp", gating_hidden=8)
    assert {type(m) for m in relu.modules()} & {torch.nn.Mish, torch.nn.ReLU} == {torch.nn.ReLU}


class Components(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs):
        return self.policy.components(obs)


@pytest.mark.parametrize("backbone", [SMALL_MLP, SMALL_TRANSFORMER], ids=["mlp", "transformer"])
def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path, backbone):
    policy = perturbed_policy("full", backbone=backbone).eval()
    path = str(tmp_path / "policy.onnx")
    torch.onnx.export(Components(policy), (torch.randn(2, 6),), path, opset_version=17, dynamo=False,
                      input_names=["obs"], output_names=["weights", "means", "chol"],
                      dynamic_axes={name: {0: "batch"} for name in ("obs", "weights", "means", "chol")})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    obs = torch.randn(7, 6)
    outputs = session.run(None, {"obs": obs.numpy()})
    with torch.no_grad():
        expected = policy.components(obs)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_rebuild_from_hyperparameters_round_trips():
    policy = perturbed_policy("diagonal", gating="own_mlp")
    rebuilt = MixtureOfExpertsPolicy.from_hyperparameters(policy.hyperparameters)
    rebuilt.load_state_dict(policy.state_dict())
    obs, actions = torch.randn(5, 6), torch.randn(5, 4)
    assert torch.equal(rebuilt.log_prob(actions, obs), policy.log_prob(actions, obs))
    assert math.isclose(sum(p.numel() for p in rebuilt.parameters()), sum(p.numel() for p in policy.parameters()))
