"""The robot side needs no torch: the runtime and the ROS modules import and act with torch unimportable."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vdd_ros.learn import export
from vdd_ros.learn.backbones import BackboneConfig
from vdd_ros.learn.moe import MixtureOfExpertsPolicy
from vdd_ros.spec import ModelSpec, Normalization, ObservationField

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: a meta-path finder makes torch (and the export-only onnx
# packages) unimportable before anything else is imported.
SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {"torch", "onnx", "onnxscript", "onnx_ir"}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the robot side must not need it")
            return None

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import vdd_ros.runtime as runtime

    policy = runtime.load_policy(sys.argv[1], device="auto")
    window = np.zeros((policy.spec.history, policy.spec.obs_step_dim))
    out = policy.act_detailed(window, np.random.default_rng(0))
    assert out.actions.shape == (policy.spec.action_horizon, policy.spec.n_joints), out.actions.shape
    print("ACTED", policy.kind, policy.provider, out.expert)

    import vdd_ros.ros
    names = sorted(m.name for m in pkgutil.iter_modules(vdd_ros.ros.__path__))
    for name in names:
        importlib.import_module("vdd_ros.ros." + name)
    print("ROS_MODULES", ",".join(names) or "-")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
""")


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec = ModelSpec(joint_names=("a", "b"), joint_lower=(-1.0, -1.0), joint_upper=(1.0, 1.0),
                     joint_velocity_limits=(1.0, 1.0), observation_fields=(ObservationField("q", "joint_position", 2),),
                     history=2, action_kind="joint_position", action_horizon=2, control_rate_hz=10.0,
                     normalization=Normalization.identity(2, 2), model_kind="vdd_mixture")
    model = MixtureOfExpertsPolicy(2, 2, 4, 2, backbone=BackboneConfig(hidden=8, mlp_layers=1)).eval()
    return export.export_student(model, spec, tmp_path_factory.mktemp("no_torch") / "student.onnx").path


def test_runtime_and_ros_modules_work_without_torch(student_file):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(student_file)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACTED vdd_mixture CPUExecutionProvider" in result.stdout
    ros_line = next(line for line in result.stdout.splitlines() if line.startswith("ROS_MODULES"))
    if ros_line == "ROS_MODULES -":
        print("vdd_ros/ros has no modules yet: only the runtime was checked without torch")
    else:
        assert "policy_node" in ros_line  # the node that loads models must be among the checked modules
