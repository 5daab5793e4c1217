"""The robot side needs no torch: the runtime and the ROS modules import and act with torch unimportable."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_runtime_and_ros_modules_work_without_torch(tiny_models):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_models.student)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACTED vdd_mixture CPUExecutionProvider" in result.stdout
    ros_line = next(line for line in result.stdout.splitlines() if line.startswith("ROS_MODULES"))
    checked = set(ros_line.split(" ", 1)[1].split(","))
    # every node module, the one that loads models among them, imported with torch blocked
    assert {"policy_node", "arm_sim_node", "observation", "processes"} <= checked, ros_line
