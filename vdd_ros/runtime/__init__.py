"""Torch-free inference: load an exported ONNX file and act (onnxruntime + numpy + the spec only).

    from vdd_ros.runtime import load_policy
    policy = load_policy("models/student.onnx", device="auto")
    chunk = policy.act(obs_window, rng)              # [horizon, n_joints], raw units

Nothing here imports torch, directly or indirectly (test/test_no_torch.py checks it).
"""
from vdd_ros.runtime.denoiser import Denoiser, load_denoiser
from vdd_ros.runtime.errors import DeviceError, InputError, ModelLoadError, ModelNotFoundError, PolicyError
from vdd_ros.runtime.format import EXPORT_FORMAT_VERSION, OPSET
from vdd_ros.runtime.policy import Policy, PolicyOutput, load_policy

__all__ = ["load_policy", "Policy", "PolicyOutput", "load_denoiser", "Denoiser", "PolicyError", "ModelLoadError",
           "ModelNotFoundError", "DeviceError", "InputError", "EXPORT_FORMAT_VERSION", "OPSET"]
