"""The CUDA execution-provider path of the runtime, on the shipped models (torch-free).

Runs where onnxruntime-gpu can really use a GPU; skipped elsewhere with the reason. Run on an
H200 machine with `python -m pytest test/test_runtime_cuda.py` (README: "On a GPU").
"""
import json

import numpy as np
import onnxruntime as ort
import pytest

from vdd_ros.paths import model_file
from vdd_ros.runtime import DeviceError, load_policy
from vdd_ros.runtime.session import CPU, CUDA, cuda_provider, session_options


def _cuda_reason() -> str | None:
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {CUDA} (install onnxruntime-gpu on a CUDA machine)"
    try:
        load_policy(model_file("student.onnx"), device="cuda")
    except DeviceError as err:
        return str(err)
    return None


REASON = _cuda_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no usable CUDA GPU: {REASON}")


def windows(policy, count: int, seed: int) -> np.ndarray:
    """Observation windows around the model's training distribution (its normalisation)."""
    norm = policy.spec.normalization
    shape = (count, policy.spec.history, policy.spec.obs_step_dim)
    noise = np.random.default_rng(seed).standard_normal(shape)
    return np.asarray(norm.obs_mean) + noise * np.asarray(norm.obs_std)


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


def test_auto_picks_cuda():
    assert load_policy(model_file("student.onnx"), device="auto").provider == CUDA


@pytest.mark.parametrize("name, tolerance", [("student.onnx", 1e-5), ("teacher.onnx", 1e-4)])
def test_cuda_matches_cpu_call_by_call_and_in_batches(name, tolerance):
    gpu = load_policy(model_file(name), device="cuda")
    cpu = load_policy(model_file(name), device="cpu")
    obs = windows(cpu, 100, seed=1)
    for i, window in enumerate(obs):
        a = gpu.act_detailed(window, np.random.default_rng(i))
        b = cpu.act_detailed(window, np.random.default_rng(i))
        assert relative_gap(a.actions, b.actions) <= tolerance, f"window {i}"
        assert a.expert == b.expert, f"window {i}"
    batch_gap = relative_gap(gpu.act_batch(obs, np.random.default_rng(7)), cpu.act_batch(obs, np.random.default_rng(7)))
    assert batch_gap <= tolerance  # TF32 off: batched products are not rounded to 10-bit mantissas


def test_student_runs_entirely_on_the_gpu(tmp_path):
    """Every node of the student on the CUDA provider: no CPU node, so no copy to the host mid-graph."""
    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "student")
    session = ort.InferenceSession(str(model_file("student.onnx")), sess_options=options,
                                   providers=[cuda_provider(0), CPU])
    policy = load_policy(model_file("student.onnx"), device="cpu")
    feeds = {k: v.copy() for k, v in policy._call.inputs.items()}
    feeds["obs"][0] = windows(policy, 1, seed=2)[0]
    for _ in range(5):
        session.run(None, feeds)
    events = json.load(open(session.end_profiling()))
    providers = {(e["args"]["op_name"], e["args"].get("provider")) for e in events
                 if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    assert providers and all(provider == CUDA for _, provider in providers), sorted(providers)


def test_missing_gpu_index_is_a_clear_error():
    with pytest.raises(DeviceError, match="cuda:99"):
        load_policy(model_file("student.onnx"), device="cuda:99")
