"""ONNX export of the student and the teacher: graph checks, metadata, parity with torch, refusals."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from vdd_ros.files import new_file_mode
from vdd_ros.learn import export
from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.checkpoint import save_checkpoint
from vdd_ros.learn.diffusion import DiffusionTeacher
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.runtime import load_denoiser, load_policy
from vdd_ros.runtime.format import (
    EXPORT_FORMAT_VERSION,
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    META_FORMAT,
    META_ROLE,
    META_SPEC,
    OPSET,
)
from vdd_ros.spec import ModelSpec, Normalization, ObservationField

HISTORY, HORIZON, JOINTS, EXPERTS = 2, 4, 3, 4
torch.set_num_threads(1)


def tiny_spec(model_kind: str) -> ModelSpec:
    # non-trivial normalisation, so a graph that forgot it fails parity against the raw-unit reference
    return ModelSpec(
        joint_names=("j1", "j2", "j3"), joint_lower=(-2.0,) * 3, joint_upper=(2.0,) * 3,
        joint_velocity_limits=(1.0,) * 3,
        observation_fields=(ObservationField("q", "joint_position", 3), ObservationField("qd", "joint_velocity", 3)),
        history=HISTORY, action_kind="joint_position", action_horizon=HORIZON, control_rate_hz=20.0,
        normalization=Normalization(tuple(np.linspace(-1, 1, 6)), tuple(np.linspace(0.5, 2, 6)),
                                    (0.1, -0.2, 0.3), (0.5, 1.0, 2.0)),
        model_kind=model_kind, task="tiny")


def tiny_student(covariance: str = "full", seed: int = 0) -> MixtureOfExpertsPolicy:
    torch.manual_seed(seed)
    model = MixtureOfExpertsPolicy(6, HISTORY, HORIZON * JOINTS, EXPERTS, covariance=covariance,
                                   backbone=BackboneConfig(hidden=32, mlp_layers=2))
    with torch.no_grad():  # an untrained student is state independent; perturb it so the state matters
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def tiny_teacher(seed: int = 0, n_steps: int = 4) -> DiffusionTeacher:
    torch.manual_seed(seed)
    return DiffusionTeacher(6, HISTORY, HORIZON * JOINTS, backbone={"hidden": 32, "mlp_layers": 2},
                            n_steps=n_steps).eval()


def raw_windows(spec: ModelSpec, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norm = spec.normalization
    return (np.asarray(norm.obs_mean) + np.asarray(norm.obs_std) * rng.standard_normal((batch, HISTORY, 6)))


def torch_reference_means(model, spec, windows):
    """(weights [B,Z], expert means [B,Z,H,J] raw) straight from the torch model."""
    flat = torch.as_tensor(spec.normalize_obs(windows).reshape(len(windows), -1), dtype=torch.float32)
    with torch.no_grad():
        weights, means = model.weights_and_means(flat)
    raw = spec.denormalize_action(means.numpy().reshape(len(windows), EXPERTS, HORIZON, JOINTS).astype(np.float64))
    return weights.numpy(), raw


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    model, spec = tiny_student(), tiny_spec("vdd_mixture")
    # a distilled student's spec names its teacher's sampling settings (see the assertions below)
    spec_with_teacher = spec.replace(model_info={"n_steps": 16, "sampler": "euler", "teacher": "t.pt"})
    report = export.export_student(model, spec_with_teacher, path, config={"lr": 1e-3, "execute_steps": 2})
    return path, model, spec, report


def test_student_file_is_valid_onnx_with_metadata(student_file):
    path, _, spec, report = student_file
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == OPSET
    assert [i.name for i in proto.graph.input] == list(GRAPH_INPUTS["student"])
    assert [o.name for o in proto.graph.output] == list(GRAPH_OUTPUTS["student"])
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    assert meta[META_ROLE] == "student" and meta[META_FORMAT] == str(EXPORT_FORMAT_VERSION)
    stored = ModelSpec.from_json(meta[META_SPEC])
    assert stored.interface_differences(spec) == [] and stored.normalization == spec.normalization
    info = stored.model_info
    assert info["n_experts"] == EXPERTS and info["graph_role"] == "student" and info["opset"] == OPSET
    assert info["export_format_version"] == EXPORT_FORMAT_VERSION and info["execute_steps"] == 2
    assert info["config_sha256"] == export.config_hash({"execute_steps": 2, "lr": 1e-3})
    assert "n_steps" not in info and (info["teacher_n_steps"], info["teacher_sampler"], info["teacher"]) == \
        (16, "euler", "t.pt")
    assert report.experts_identical is True and report.max_error <= export.STUDENT_TOLERANCE
    assert path.stat().st_mode & 0o777 == new_file_mode()  # readable like any new file, not mkstemp's 0600
    # the batch dimension is symbolic, every other dimension fixed by the spec
    obs_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert obs_dims[0].dim_param and [d.dim_value for d in obs_dims[1:]] == [HISTORY, 6]


def test_student_runtime_matches_torch_means_greedy_and_forced(student_file):
    path, model, spec, _ = student_file
    policy = load_policy(path, device="cpu")
    windows = raw_windows(spec, 16, seed=1)
    weights, means = torch_reference_means(model, spec, windows)
    rng = np.random.default_rng(0)
    for i, window in enumerate(windows):
        greedy = policy.act_detailed(window, rng, greedy=True)
        assert greedy.expert == int(np.argmax(weights[i]))
        np.testing.assert_allclose(greedy.gating, weights[i], atol=1e-6)
        np.testing.assert_allclose(greedy.expert_means, means[i], atol=1e-5)
        np.testing.assert_allclose(greedy.actions, means[i, greedy.expert], atol=1e-5)
        forced = policy.act_detailed(window, rng, expert=(i % EXPERTS))
        assert forced.expert == i % EXPERTS
        np.testing.assert_allclose(forced.actions, means[i, i % EXPERTS], atol=1e-5)
    batch = policy.act_batch(windows, rng, greedy=True)
    np.testing.assert_allclose(batch, means[np.arange(16), weights.argmax(1)], atol=1e-5)


def test_student_noise_uses_the_chosen_experts_cholesky(student_file):
    path, model, spec, _ = student_file
    policy = load_policy(path, device="cpu", noise_scale=0.7)
    window = raw_windows(spec, 1, seed=2)[0]
    out = policy.act_detailed(window, np.random.default_rng(5), expert=1)
    # the runtime draws the uniform, then the noise, from the caller's generator
    replay = np.random.default_rng(5)
    replay.random(dtype=np.float32)
    eps = replay.standard_normal((HORIZON * JOINTS,), dtype=np.float32)
    flat = torch.as_tensor(spec.normalize_obs(window).reshape(1, -1), dtype=torch.float32)
    with torch.no_grad():
        _, means, chol = model.components(flat)
    normalised = means[0, 1] + 0.7 * chol[0, 1] @ torch.from_numpy(eps)
    expected = spec.denormalize_action(normalised.numpy().reshape(HORIZON, JOINTS).astype(np.float64))
    np.testing.assert_allclose(out.actions, expected, atol=1e-5)
    assert np.abs(out.actions - out.expert_means[1]).max() > 1e-3  # the noise really was added


def test_student_expert_frequencies_follow_the_gating(student_file):
    path, _, spec, _ = student_file
    policy = load_policy(path, device="cpu")
    window = raw_windows(spec, 1, seed=3)[0]
    rng = np.random.default_rng(11)
    draws = 4000
    counts = np.bincount([policy.act_detailed(window, rng).expert for _ in range(draws)], minlength=EXPERTS)
    gating = policy.act_detailed(window, rng).gating
    # binomial standard error of each frequency is < 0.008 at 4000 draws: 4 of them is a loose bound
    np.testing.assert_allclose(counts / draws, gating, atol=0.032)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A 4-step teacher exported through `vdd export` with --steps 3 (sampler + denoiser), plus its
    default-step sampler through the API."""
    import argparse

    from vdd_ros.cli import export as export_cli

    folder = tmp_path_factory.mktemp("teacher")
    teacher, spec = tiny_teacher(n_steps=4), tiny_spec("diffusion_teacher")
    checkpoint = save_checkpoint(folder / "teacher.pt", teacher, "diffusion_teacher", tiny_spec("none"),
                                 config={"n_steps": 4, "execute_steps": 2})
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    args = parser.parse_args(["export", str(checkpoint), "--out", str(folder / "t3.onnx"), "--steps", "3"])
    assert args.func(args) == 0
    export.export_teacher_sampler(teacher, spec, folder / "t4.onnx")
    return folder, teacher, spec, parser


def test_teacher_sampler_matches_torch_sampler_and_honours_steps(teacher_files, capsys):
    folder, teacher, spec, _ = teacher_files
    windows = raw_windows(spec, 8, seed=6)
    noise = np.random.default_rng(7).standard_normal((8, HORIZON * JOINTS)).astype(np.float32)
    flat = torch.as_tensor(spec.normalize_obs(windows).reshape(8, -1), dtype=torch.float32)
    for name, steps in (("t4.onnx", 4), ("t3.onnx", 3)):
        policy = load_policy(folder / name, device="cpu")
        assert policy.network_evaluations == steps and policy.n_experts == 0 and policy.kind == "diffusion_teacher"
        info = policy.spec.model_info
        assert info["n_steps"] == steps and info["trained_n_steps"] == 4 and info["graph_role"] == "teacher_sampler"
        ort_actions = policy._session.run(["actions"], {"obs": windows.astype(np.float32),
                                                        "noise": noise.reshape(8, HORIZON, JOINTS)})[0]
        torch_actions = teacher.sample(flat, n_steps=steps, noise=torch.from_numpy(noise))  # the Euler sampler
        expected = spec.denormalize_action(torch_actions.numpy().reshape(8, HORIZON, JOINTS).astype(np.float64))
        np.testing.assert_allclose(ort_actions, expected, atol=export.TEACHER_TOLERANCE)
        detailed = policy.act_detailed(windows[0], np.random.default_rng(0))
        assert detailed.expert == -1 and detailed.gating is None and detailed.expert_means is None
    # a different step count is a different sampler
    a4 = load_policy(folder / "t4.onnx", device="cpu").act(windows[0], np.random.default_rng(1))
    a3 = load_policy(folder / "t3.onnx", device="cpu").act(windows[0], np.random.default_rng(1))
    assert np.abs(a4 - a3).max() > 1e-4


def test_teacher_denoiser_matches_torch_and_its_loop_matches_the_sampler(teacher_files):
    folder, teacher, spec, _ = teacher_files
    denoiser = load_denoiser(folder / "t3_denoiser.onnx", device="cpu")
    assert denoiser.default_steps == 4 and denoiser.spec.model_info["execute_steps"] == 2
    windows = raw_windows(spec, 5, seed=8)
    x = np.random.default_rng(9).standard_normal((5, HORIZON, JOINTS)).astype(np.float32)
    sigma = np.array([0.01, 0.1, 0.5, 1.0, 5.0], np.float32)
    flat = torch.as_tensor(spec.normalize_obs(windows).reshape(5, -1), dtype=torch.float32)
    with torch.no_grad():
        expected = teacher.denoise(torch.from_numpy(x.reshape(5, -1)), flat, torch.from_numpy(sigma)).numpy()
    np.testing.assert_allclose(denoiser.denoise(x, windows, sigma), expected.reshape(5, HORIZON, JOINTS), atol=1e-5)
    noise = np.random.default_rng(10).standard_normal((HORIZON, JOINTS)).astype(np.float32)
    sampler = load_policy(folder / "t4.onnx", device="cpu")
    unrolled = sampler._session.run(["actions"], {"obs": windows[:1].astype(np.float32), "noise": noise[None]})[0]
    looped = denoiser.sample(windows[0], np.random.default_rng(0), noise=noise)  # default: the trained 4 steps
    np.testing.assert_allclose(looped, unrolled[0], atol=1e-4)


def test_export_refuses_and_writes_nothing(tmp_path, monkeypatch, teacher_files):
    with pytest.raises(export.ExportError, match="model_kind"):
        export.export_student(tiny_student(), tiny_spec("diffusion_teacher"), tmp_path / "s.onnx")
    with pytest.raises(export.ExportError, match=r"\.onnx"):
        export.export_student(tiny_student(), tiny_spec("vdd_mixture"), tmp_path / "s.pt")
    teacher, spec = teacher_files[1], teacher_files[2]
    with pytest.raises(export.ExportError, match="steps"):
        export.export_teacher_sampler(teacher, spec, tmp_path / "t.onnx", n_steps=0)
    # a parity failure (tolerance below any real error) leaves no file and no temporary file behind
    monkeypatch.setattr(export, "TEACHER_TOLERANCE", 0.0)
    with pytest.raises(export.ExportError, match="parity check failed"):
        export.export_teacher_denoiser(teacher, spec, tmp_path / "d.onnx")
    assert os.listdir(tmp_path) == []


def test_cli_exports_a_diagonal_em_student_and_refuses_bad_options(tmp_path, teacher_files, capsys):
    from vdd_ros.cli.main import UserError

    parser = teacher_files[3]
    checkpoint = save_checkpoint(tmp_path / "em.pt", tiny_student(covariance="diagonal", seed=4), "em_mixture",
                                 tiny_spec("none"), config={"n_experts": EXPERTS})
    args = parser.parse_args(["export", str(checkpoint), "--out", str(tmp_path / "em.onnx")])
    assert args.func(args) == 0
    assert "em.onnx (student" in capsys.readouterr().out
    policy = load_policy(tmp_path / "em.onnx", device="cpu", noise_scale=1.0)
    assert policy.kind == "em_mixture" and policy.n_experts == EXPERTS and policy.network_evaluations == 1
    info = policy.spec.model_info
    assert info["covariance"] == "diagonal" and info["config_sha256"] == export.config_hash({"n_experts": EXPERTS})
    out = policy.act_detailed(raw_windows(policy.spec, 1, 0)[0], np.random.default_rng(0), expert=0)
    assert np.abs(out.actions - out.expert_means[0]).max() > 1e-3  # diagonal noise is applied
    # the stored spec is plain JSON a non-Python tool can read
    meta = {e.key: e.value for e in onnx.load(str(tmp_path / "em.onnx")).metadata_props}
    assert json.loads(meta[META_SPEC])["model_kind"] == "em_mixture"
    for argv, error, match in (
            ([str(checkpoint), "--out", str(tmp_path / "x.onnx"), "--steps", "4"], (UserError, ValueError), "steps"),
            ([str(checkpoint), "--out", str(tmp_path / "x.onnx"), "--no-denoiser"], UserError, "denoiser"),
            ([str(checkpoint), "--out", str(tmp_path / "x.pt")], UserError, r"\.onnx"),
            ([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")], FileNotFoundError, "missing.pt")):
        args = parser.parse_args(["export"] + argv)
        with pytest.raises(error, match=match):
            args.func(args)
    assert not (tmp_path / "x.onnx").exists()


def test_choose_experts_inverse_cdf_greedy_and_forced():
    weights = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(7, 4)
    uniform = torch.tensor([0.0, 0.1999, 0.2, 0.6999, 0.7, 0.9999999, 0.5])
    greedy = torch.tensor([False] * 6 + [True])
    none = torch.full((7,), -1)
    # [0, 0.2) -> 0; the zero-weight expert 1 owns an empty interval; [0.2, 0.7) -> 2; [0.7, 1) -> 3
    assert export.choose_experts(weights, uniform, greedy, none).tolist() == [0, 0, 2, 2, 3, 3, 2]
    forced = torch.tensor([1, -1, 3, -1, 0, -1, 1])
    assert export.choose_experts(weights, uniform, greedy, forced).tolist() == [1, 0, 3, 2, 0, 3, 1]
    # a last CDF entry rounded below u still yields a valid index
    short = torch.tensor([[0.5, 0.4999]])
    assert export.choose_experts(short, torch.tensor([0.99995]), torch.tensor([False]), torch.tensor([-1])).item() == 1


def test_choose_experts_fast_agrees_with_choose_experts():
    """The exported graph picks experts with choose_experts_fast: identical indices, edge cases included."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4000, 6, generator=generator) * torch.tensor([0.1, 1.0, 5.0, 30.0]).repeat(1000)[:, None]
    weights = torch.softmax(logits, -1)
    weights[::7, 2] = 0.0  # zero-weight experts own empty intervals
    cdf = torch.cumsum(weights, -1)
    uniform = torch.rand(4000, generator=generator)
    uniform[::5] = cdf[::5, 1]  # u exactly on a CDF step
    uniform[1::5] = torch.nextafter(cdf[1::5, -1], torch.tensor(2.0)).clamp(max=0.99999994)  # at/after the last entry
    greedy = torch.rand(4000, generator=generator) < 0.2
    forced = torch.where(torch.rand(4000, generator=generator) < 0.2, torch.arange(4000) % 6, -1)
    expected = export.choose_experts(weights, uniform, greedy, forced)
    assert torch.equal(export.choose_experts_fast(weights, uniform, greedy, forced), expected)
    short = torch.tensor([[0.5, 0.4999]])  # a last CDF entry rounded below u
    assert export.choose_experts_fast(short, torch.tensor([0.99995]), torch.tensor([False]),
                                      torch.tensor([-1])).item() == 1


def test_fast_mish_is_mish():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.linspace(-4, 4, 20001), torch.tensor([1e30, -1e30])])
    reference = torch.nn.functional.mish(x.double())
    got = export.fast_mish(x).double()
    assert torch.isfinite(got).all()
    assert float(((got - reference).abs() / reference.abs().clamp(min=1.0)).max()) < 3e-7


def test_student_graph_skips_normalisation_nodes_and_the_noise_heads_on_the_mean_path(student_file):
    proto = onnx.load(str(student_file[0]))
    nodes = list(proto.graph.node)
    ops = [node.op_type for node in nodes]
    # raw observations go straight into the first Gemm (normalisation folded into its weights)
    first = next(node for node in nodes if "obs" in node.input)
    assert first.op_type == "Reshape" and next(n for n in nodes if first.output[0] in n.input).op_type == "Gemm"
    assert "Mish" not in ops and "Softplus" not in ops and ops.count("If") == 1
    branches = {a.name: a.g for a in nodes[ops.index("If")].attribute}
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]  # the mean path: nothing to compute
    assert "Softplus" in [n.op_type for n in branches["then_branch"].node]  # the chosen expert's std, noisy path only


def test_student_graph_has_no_integer_argmax(student_file):
    """onnxruntime's CUDA provider has float ArgMax only: an integer one runs on the CPU between two copies."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(student_file[0])))
    values = list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    argmax_inputs = [types.get(n.input[0]) for n in proto.graph.node if n.op_type == "ArgMax"]
    assert argmax_inputs == [onnx.TensorProto.FLOAT]  # the greedy choice, over the gating weights


TINY_TRANSFORMER = BackboneConfig(kind="transformer", embed_dim=16, heads=2, transformer_layers=1, hidden=32)


@pytest.mark.parametrize("covariance, gating, backbone, gating_size, folded", [
    ("diagonal", "own_mlp", BackboneConfig(hidden=32, mlp_layers=2), (16, 1), True),
    ("full", "own_mlp", BackboneConfig(hidden=32, mlp_layers=2, activation="relu"), (16, 2), True),
    ("diagonal", "detached_features", BackboneConfig(hidden=32, mlp_layers=1, activation="silu"), (0, 0), True),
    ("diagonal", "detached_mlp", BackboneConfig(hidden=32, mlp_layers=2, activation="relu"), (16, 2), True),
    ("full", "detached_mlp", BackboneConfig(hidden=32, mlp_layers=2), (8, 1), True),
    ("diagonal", "detached_mlp", BackboneConfig(hidden=32, mlp_layers=3, activation="silu"), (0, 0), True),
    ("full", "detached_features", TINY_TRANSFORMER, (0, 0), False),
    ("diagonal", "own_mlp", TINY_TRANSFORMER, (0, 0), False),
    ("diagonal", "detached_mlp", TINY_TRANSFORMER, (16, 2), False),
    ("full", "detached_mlp", BackboneConfig(**{**TINY_TRANSFORMER.to_dict(), "activation": "relu"}), (8, 1), False),
])
def test_student_export_of_other_architectures_passes_parity(tmp_path, covariance, gating, backbone, gating_size,
                                                             folded):
    torch.manual_seed(3)
    model = MixtureOfExpertsPolicy(6, HISTORY, HORIZON * JOINTS, EXPERTS, covariance=covariance, gating=gating,
                                   backbone=backbone, gating_hidden=gating_size[0], gating_layers=gating_size[1])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    report = export.export_student(model.eval(), tiny_spec("vdd_mixture"), tmp_path / "s.onnx")
    assert report.max_error <= export.STUDENT_TOLERANCE and report.experts_identical is True
    nodes = onnx.load(str(tmp_path / "s.onnx")).graph.node
    # an MLP backbone (and an own-MLP gating): read raw observations (normalisation folded, fast Mish)
    reads_obs_raw = [n.op_type for n in nodes if "obs" in n.input] == ["Reshape"]
    assert reads_obs_raw is folded
    if folded:
        assert not {"Sub", "Mish"} & {n.op_type for n in nodes}
    # the gating's own layers: an own MLP or a head has its Gemms, the linear read-out one
    gemms = sum(n.op_type == "Gemm" for n in nodes)
    backbone_gemms = backbone.mlp_layers if backbone.kind == "mlp" else 0
    gating_gemms = 1 + (gating_size[1] or backbone.mlp_layers if gating != "detached_features" else 0)
    if backbone.kind == "mlp":
        assert gemms == backbone_gemms + gating_gemms + 1  # + the mean head


def test_student_parity_is_checked_against_the_plain_reference(tmp_path, monkeypatch):
    """A folding mistake in the exported graph (here: the action offset dropped) fails the export."""
    original = export.FastStudentGraph.__init__

    def broken(self, model, spec):
        original(self, model, spec)
        with torch.no_grad():
            self.mean_head.bias.zero_()

    monkeypatch.setattr(export.FastStudentGraph, "__init__", broken)
    with pytest.raises(export.ExportError, match="parity check failed"):
        export.export_student(tiny_student(), tiny_spec("vdd_mixture"), tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()
