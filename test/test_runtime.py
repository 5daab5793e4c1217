"""The torch-free runtime: loading, provider choice, acting, and one-line errors for bad files and inputs."""
import logging
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vdd_ros.runtime import (
    DeviceError,
    InputError,
    ModelLoadError,
    ModelNotFoundError,
    PolicyError,
    load_denoiser,
    load_policy,
)
from vdd_ros.runtime.format import META_FORMAT
from vdd_ros.validation import FieldError

HISTORY, HORIZON, JOINTS, EXPERTS = 2, 3, 2, 3  # the sizes of conftest's tiny_models (checked in files)


@pytest.fixture(scope="module")
def files(tiny_models):
    """The folder of the shared tiny exports: student.onnx, teacher.onnx, denoiser.onnx."""
    sizes = (tiny_models.history, tiny_models.horizon, tiny_models.joints, tiny_models.experts)
    assert sizes == (HISTORY, HORIZON, JOINTS, EXPERTS) and tiny_models.obs_step_dim == 5
    return tiny_models.folder


def window(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((HISTORY, 5))


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    assert err.value.__suppress_context__ or err.value.__context__ is None  # raised `from None`: no ORT trace
    return text


# --- loading ------------------------------------------------------------------------------
def test_load_reports_kind_provider_and_sizes(files, caplog):
    with caplog.at_level(logging.INFO, logger="vdd_ros.runtime"):
        student = load_policy(files / "student.onnx")  # auto: no CUDA provider here, so CPU with a reason
    assert student.provider == "CPUExecutionProvider"
    assert any("CPUExecutionProvider" in r.getMessage() and "CUDAExecutionProvider" in r.getMessage()
               for r in caplog.records)
    assert (student.kind, student.n_experts, student.network_evaluations) == ("vdd_mixture", EXPERTS, 1)
    assert student.spec.joint_names == ("shoulder", "elbow") and student.spec.model_info["n_experts"] == EXPERTS
    teacher = load_policy(files / "teacher.onnx", device="cpu", intra_op_threads=2)
    assert (teacher.kind, teacher.n_experts, teacher.network_evaluations) == ("diffusion_teacher", 0, 2)


def test_cuda_request_without_cuda_is_a_clear_error(files):
    with pytest.raises(DeviceError) as err:
        load_policy(files / "student.onnx", device="cuda")
    assert "CUDAExecutionProvider" in assert_one_line(err) and "onnxruntime-gpu" in str(err.value)
    with pytest.raises(DeviceError, match="cuda:1"):
        load_policy(files / "student.onnx", device="cuda:1")
    with pytest.raises(DeviceError, match="'gpu'"):
        load_policy(files / "student.onnx", device="gpu")
    with pytest.raises(ModelLoadError, match="^intra_op_threads: expected an integer >= 1, got 0$") as info:
        load_policy(files / "student.onnx", intra_op_threads=0)
    assert isinstance(info.value, FieldError) and info.value.field_name == "intra_op_threads"


def test_bad_files_give_one_line_errors(files, tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_policy(tmp_path / "nothing.onnx")
    assert isinstance(err.value, FileNotFoundError) and "nothing.onnx" in assert_one_line(err)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model") as err:
        load_policy(garbage)
    assert_one_line(err)

    # a valid ONNX model that vdd_ros did not write
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(foreign))
    with pytest.raises(ModelLoadError, match="not one exported by vdd_ros") as err:
        load_policy(foreign)
    assert_one_line(err)

    # our file, but from a future export format
    future = onnx.load(str(files / "student.onnx"))
    for entry in future.metadata_props:
        if entry.key == META_FORMAT:
            entry.value = "99"
    onnx.save(future, str(tmp_path / "future.onnx"))
    with pytest.raises(ModelLoadError, match="'99' is not supported") as err:
        load_policy(tmp_path / "future.onnx")
    assert_one_line(err)

    with pytest.raises(ModelLoadError, match="denoiser"):
        load_policy(files / "denoiser.onnx")
    with pytest.raises(ModelLoadError, match="load_policy"):
        load_denoiser(files / "student.onnx")


# --- acting -------------------------------------------------------------------------------
def test_act_shapes_types_and_reproducibility(files):
    for name in ("student.onnx", "teacher.onnx"):
        policy = load_policy(files / name, device="cpu")
        first = policy.act(window(), np.random.default_rng(3))
        assert first.shape == (HORIZON, JOINTS) and first.dtype == np.float64 and np.isfinite(first).all()
        kept = first.copy()
        second = policy.act(window(1), np.random.default_rng(4))
        np.testing.assert_array_equal(first, kept)  # a later call never overwrites a returned chunk
        assert np.abs(second - first).max() > 0
        np.testing.assert_array_equal(policy.act(window(), np.random.default_rng(3)), first)
        # lists and float32 windows are accepted alike
        np.testing.assert_allclose(policy.act(window().astype(np.float32).tolist(), np.random.default_rng(3)), first,
                                   atol=1e-6)


def test_warmup_leaves_the_callers_generator_alone(files):
    policy = load_policy(files / "teacher.onnx", device="cpu")
    rng = np.random.default_rng(8)
    state = rng.bit_generator.state
    policy.warmup(5)
    assert rng.bit_generator.state == state


def test_student_batch_matches_single_calls_and_teacher_noise_matters(files):
    student = load_policy(files / "student.onnx", device="cpu")
    windows = np.stack([window(i) for i in range(6)])
    batch = student.act_batch(windows, np.random.default_rng(0), greedy=True)
    singles = np.stack([student.act(w, np.random.default_rng(0), greedy=True) for w in windows])
    np.testing.assert_allclose(batch, singles, atol=1e-6)
    teacher = load_policy(files / "teacher.onnx", device="cpu")
    chunks = teacher.act_batch(np.repeat(windows[:1], 4, axis=0), np.random.default_rng(0))
    assert chunks.shape == (4, HORIZON, JOINTS) and np.abs(chunks[0] - chunks[1]).max() > 0


def test_student_expert_override_and_greedy(files):
    policy = load_policy(files / "student.onnx", device="cpu")
    rng = np.random.default_rng(0)
    greedy = policy.act_detailed(window(), rng, greedy=True)
    assert greedy.expert == int(np.argmax(greedy.gating)) and greedy.gating.shape == (EXPERTS,)
    assert abs(greedy.gating.sum() - 1.0) < 1e-5 and greedy.expert_means.shape == (EXPERTS, HORIZON, JOINTS)
    for k in range(EXPERTS):
        forced = policy.act_detailed(window(), rng, greedy=True, expert=k)  # forcing beats greedy
        assert forced.expert == k
        np.testing.assert_allclose(forced.actions, greedy.expert_means[k], atol=1e-6)


def test_noise_scale_adds_noise_only_when_positive(files):
    policy = load_policy(files / "student.onnx", device="cpu")
    mean = policy.act_detailed(window(), np.random.default_rng(0), expert=0)
    np.testing.assert_allclose(mean.actions, mean.expert_means[0], atol=1e-6)
    policy.noise_scale = 0.5
    noisy = policy.act_detailed(window(), np.random.default_rng(0), expert=0)
    assert np.abs(noisy.actions - noisy.expert_means[0]).max() > 1e-4
    with pytest.raises(InputError, match="^noise_scale: expected a finite number >= 0, got -1.0$") as info:
        policy.noise_scale = -1.0
    assert isinstance(info.value, FieldError)
    with pytest.raises(InputError, match="teacher"):
        load_policy(files / "teacher.onnx", device="cpu", noise_scale=0.1)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((HISTORY + 1, 5)), r"expected shape \(2, 5\)"),
    (np.zeros((HISTORY, 4)), r"got \(2, 4\)"),
    (np.zeros((HISTORY, 5), dtype=np.int64), "float array, got dtype int64"),
    (np.array([[0, 0, np.nan, 0, 0], [0] * 5], dtype=np.float64), r"observation field 'goal'\[0\]"),
    (np.array([[0] * 5, [0, np.inf, 0, 0, 0]], dtype=np.float32), r"index \(1, 1\).*'joint_position'\[1\]"),
    (np.array([[0] * 5, [0, 0, 0, 0, 1e39]]), "float32 range"),
    ([[1, 2], [3]], "obs_window: expected an array"),
])
def test_bad_observations_are_refused_by_name(files, bad, match):
    policy = load_policy(files / "student.onnx", device="cpu")
    with pytest.raises(InputError, match=match) as err:
        policy.act(bad, np.random.default_rng(0))
    assert_one_line(err)


def test_observation_fast_path_accepts_what_the_full_check_accepts(files):
    policy = load_policy(files / "student.onnx", device="cpu")
    base = window(5)
    expected = policy.act(base.astype(np.float32), np.random.default_rng(1))
    np.testing.assert_array_equal(policy.act(base, np.random.default_rng(1)), expected)
    np.testing.assert_array_equal(policy.act(np.asfortranarray(base), np.random.default_rng(1)), expected)
    np.testing.assert_array_equal(policy.act(base.T.copy().T, np.random.default_rng(1)), expected)
    np.testing.assert_allclose(policy.act(base.astype(np.float16), np.random.default_rng(1)), expected, atol=0.05)
    # entries near the float32 limit are accepted (the squared norm passes the plain-cast limit)
    for big in (3.0e38, 3.4e38):
        large = base.copy()
        large[0, 0] = big
        policy.act(large, np.random.default_rng(1))  # accepted: no InputError (float64 path, both sides of the limit)
    for bad in (np.float16("inf"), np.float32("nan")):
        with pytest.raises(InputError, match="finite"):
            policy.act(np.full((HISTORY, 5), bad), np.random.default_rng(1))


def test_noise_scale_back_to_zero_returns_the_mean(files):
    policy = load_policy(files / "student.onnx", device="cpu", noise_scale=0.5)
    noisy = policy.act_detailed(window(), np.random.default_rng(0), expert=1)
    assert np.abs(noisy.actions - noisy.expert_means[1]).max() > 1e-4
    policy.noise_scale = 0.0
    mean = policy.act_detailed(window(), np.random.default_rng(0), expert=1)
    np.testing.assert_allclose(mean.actions, mean.expert_means[1], atol=1e-6)


def test_other_bad_arguments(files):
    student = load_policy(files / "student.onnx", device="cpu")
    teacher = load_policy(files / "teacher.onnx", device="cpu")
    for expert in (EXPERTS, -1, 1.0, True):
        with pytest.raises(InputError, match=r"expert: expected None or an integer in \[0, 3\)"):
            student.act_detailed(window(), np.random.default_rng(0), expert=expert)
    with pytest.raises(InputError, match="teacher has no experts"):
        teacher.act_detailed(window(), np.random.default_rng(0), expert=0)
    with pytest.raises(InputError, match="numpy.random.Generator"):
        student.act(window(), rng=np.random.RandomState(0))
    with pytest.raises(InputError, match=r"B >= 1"):
        student.act_batch(np.zeros((0, HISTORY, 5)), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"batch x history"):
        student.act_batch(np.zeros((2, HISTORY, 6)), np.random.default_rng(0))
    assert issubclass(InputError, PolicyError) and issubclass(PolicyError, ValueError)


def test_a_copied_file_is_all_a_deployment_needs(files, tmp_path):
    """One .onnx file, nothing else: the copy loads and acts identically."""
    moved = tmp_path / "elsewhere" / "policy.onnx"
    moved.parent.mkdir()
    shutil.copy(files / "student.onnx", moved)
    original = load_policy(files / "student.onnx", device="cpu").act(window(), np.random.default_rng(2))
    np.testing.assert_array_equal(load_policy(moved, device="cpu").act(window(), np.random.default_rng(2)), original)


def test_bench_runtime_command_writes_table_json_and_plot(files, tmp_path, capsys):
    """The benchmark's plumbing on tiny models (timings themselves are the bench's output, not asserted)."""
    import argparse
    import json

    from vdd_ros.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "runtime", "--student", str(files / "student.onnx"),
                              "--teacher", str(files / "teacher.onnx"), "--calls", "40", "--warmup", "2",
                              "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "p50 us" in printed and "teacher 2-step" in printed
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["kind"], r["network_evaluations"], r["calls"]) for r in rows] == [("vdd_mixture", 1, 40),
                                                                               ("diffusion_teacher", 2, 40)]
    assert rows[0]["p50_vs_student"] == 1.0 and all(0 < r["p50_us"] <= r["p99_us"] <= r["max_us"] for r in rows)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runtime_keeps_an_extra_student_named_like_the_student(files, tmp_path, capsys):
    """--extra elsewhere/student.onnx gets its own row instead of silently replacing the student's."""
    import argparse
    import json

    from vdd_ros.cli import bench

    other = tmp_path / "other" / "student.onnx"
    other.parent.mkdir()
    shutil.copy(files / "student.onnx", other)
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "runtime", "--student", str(files / "student.onnx"), "--extra", str(other),
                              "--teacher", str(files / "teacher.onnx"), "--calls", "20", "--warmup", "0",
                              "--json", str(tmp_path / "bench.json"), "--plot", ""])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["file"] for r in rows] == [str(files / "student.onnx"), str(other), str(files / "teacher.onnx")]
    assert rows[1]["model"] == f"{other} (vdd_mixture)"
