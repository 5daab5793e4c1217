"""Test-wide environment and shared fixtures.

Environment: DDS stays on this machine, one thread per torch process, no onnxruntime telemetry.

Fixtures (torch is imported only by the fixtures that train or export):
- ``domain_id``: a ROS domain of its own for each test; ``ros_env``: the environment for node
  processes in that domain;
- ``model_dir``: one temporary folder per test session for models the fixtures make;
- ``tiny_models``: untrained tiny ONNX files on a 2-joint spec (student, teacher sampler, teacher
  denoiser) for runtime-level tests; their sizes are ``TINY``;
- ``arm_student`` / ``arm_teacher``: ONNX files for the arm_avoid task, the shipped ones when
  present, else a tiny student cloned from the scripted demonstrations / an untrained teacher.

The ``slow`` marker (setup.cfg) marks multi-second multi-seed or long ROS checks:
``bash scripts/test.sh -m "not slow"`` is the fast loop; CI runs everything.
"""
import itertools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

# set before anything imports rclpy or torch; a caller's own choice wins
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# a test-run-unique domain keeps parallel runs on one machine apart (valid ids: 1..101)
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# onnxruntime telemetry would send DNS queries off the machine (tests import onnxruntime directly too)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_domains = itertools.count()

# sizes of the tiny_models files: observation frame = 2 joint positions + a 3-number goal vector
TINY = SimpleNamespace(history=2, horizon=3, joints=2, experts=3, obs_step_dim=5)


# --- ROS ---------------------------------------------------------------------------------------
@pytest.fixture
def domain_id() -> int:
    """A ROS domain of its own for each test (apart from other test runs by the pytest pid)."""
    return (int(os.environ["ROS_DOMAIN_ID"]) + 7 * next(_domains)) % 100 + 1


@pytest.fixture
def ros_env(domain_id) -> dict:
    """The environment for node processes in ``domain_id`` (localhost DDS, this checkout on the path)."""
    from vdd_ros.ros.processes import ros_environment

    return ros_environment(domain_id)


# --- models ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A folder for the models the session's fixtures make."""
    return tmp_path_factory.mktemp("models")


def tiny_spec(model_kind: str):
    """The 2-joint spec of ``tiny_models`` (a goal vector on a topic, non-trivial normalisation)."""
    from vdd_ros.spec import ModelSpec, Normalization, ObservationField

    return ModelSpec(
        joint_names=("shoulder", "elbow"), joint_lower=(-2.0, -2.0), joint_upper=(2.0, 2.0),
        joint_velocity_limits=(1.0, 1.0),
        observation_fields=(ObservationField("joint_position", "joint_position", 2),
                            ObservationField("goal", "vector", 3, topic="goal", msg_type="std_msgs/Float64MultiArray")),
        history=TINY.history, action_kind="joint_position", action_horizon=TINY.horizon, control_rate_hz=10.0,
        normalization=Normalization((0.0, 0.5, 1.0, -1.0, 0.0), (1.0, 2.0, 0.5, 1.0, 3.0), (0.2, -0.1), (0.5, 1.5)),
        model_kind=model_kind)


@pytest.fixture(scope="session")
def tiny_models(model_dir) -> SimpleNamespace:
    """Untrained tiny exports: ``student`` (3 experts, weights spread so the experts differ),
    ``teacher`` (2-step sampler) and ``denoiser``, all on ``tiny_spec``; ``spec(kind)`` and the sizes ride along."""
    import torch

    from vdd_ros.learn import export
    from vdd_ros.learn.backbones import BackboneConfig
    from vdd_ros.learn.diffusion import DiffusionTeacher
    from vdd_ros.learn.moe import MixtureOfExpertsPolicy

    torch.set_num_threads(1)
    folder = model_dir / "tiny"
    torch.manual_seed(0)
    act_dim = TINY.horizon * TINY.joints
    student = MixtureOfExpertsPolicy(TINY.obs_step_dim, TINY.history, act_dim, TINY.experts,
                                     backbone=BackboneConfig(hidden=16, mlp_layers=1))
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.3 * torch.randn_like(param))
    export.export_student(student.eval(), tiny_spec("vdd_mixture"), folder / "student.onnx")
    teacher = DiffusionTeacher(TINY.obs_step_dim, TINY.history, act_dim, backbone={"hidden": 16, "mlp_layers": 1},
                               n_steps=2).eval()
    export.export_teacher_sampler(teacher, tiny_spec("diffusion_teacher"), folder / "teacher.onnx")
    export.export_teacher_denoiser(teacher, tiny_spec("diffusion_teacher"), folder / "denoiser.onnx")
    return SimpleNamespace(folder=folder, student=folder / "student.onnx", teacher=folder / "teacher.onnx",
                           denoiser=folder / "denoiser.onnx", spec=tiny_spec, **vars(TINY))


def clone_tiny_student(path, demonstrations, n_experts: int, hidden: int, steps: int, seed: int) -> Path:
    """A small mixture (history 2, chunks of 8, 4 executed) cloned from scripted ``demonstrations``
    (winner-takes-all on the expert means, gating trained on the winner), exported to ONNX at ``path``."""
    import torch

    from vdd_ros.learn.backbones import BackboneConfig
    from vdd_ros.learn.export import export_student
    from vdd_ros.learn.moe import MixtureOfExpertsPolicy
    from vdd_ros.learn.pipeline import prepare_training_data

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = prepare_training_data(demonstrations, 2, 8, "em_mixture")
    spec = data.spec.replace(model_info={"execute_steps": 4})
    model = MixtureOfExpertsPolicy(spec.obs_step_dim, 2, spec.act_dim, n_experts,
                                   BackboneConfig(hidden=hidden, mlp_layers=2), covariance="diagonal",
                                   mean_init_spread=0.5)
    obs, act = torch.from_numpy(data.observations), torch.from_numpy(data.actions)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(obs), (256,), generator=generator)
        features = model.features(obs[rows])
        errors = (model.expert_means(features) - act[rows][:, None]).pow(2).mean(-1)
        best = errors.argmin(-1)
        loss = errors.gather(1, best[:, None]).mean() + 0.1 * torch.nn.functional.cross_entropy(
            model.gating_logits(obs[rows], features), best)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    export_student(model, spec, path)
    return Path(path)


def train_tiny_arm_student(path, steps: int = 1500, seed: int = 0) -> Path:
    """A small arm_avoid mixture (4 experts, 128x2) cloned from 160 scripted demonstrations."""
    from vdd_ros.learn.pipeline import load_demonstrations

    return clone_tiny_student(path, load_demonstrations(episodes=160, dataset_seed=seed), 4, 128, steps, seed)


@pytest.fixture(scope="session")
def arm_student(model_dir) -> Path:
    """The shipped arm_avoid student, or (before one is shipped) a tiny one trained here (~20 s)."""
    from vdd_ros.paths import model_file

    shipped = model_file("student.onnx")
    if shipped.is_file():
        return shipped
    return train_tiny_arm_student(model_dir / "arm_student.onnx")


@pytest.fixture(scope="session")
def arm_teacher(model_dir) -> Path:
    """The shipped arm_avoid teacher, or (before one is shipped) an untrained small one: enough for the plumbing."""
    from vdd_ros.paths import model_file

    shipped = model_file("teacher.onnx")
    if shipped.is_file():
        return shipped
    import torch

    from vdd_ros.learn.backbones import BackboneConfig
    from vdd_ros.learn.diffusion import TeacherConfig, build_teacher
    from vdd_ros.learn.export import export_teacher_sampler
    from vdd_ros.tasks import arm_avoid

    torch.manual_seed(0)
    spec = arm_avoid.task_spec(2, 8, model_kind="diffusion_teacher").replace(model_info={"execute_steps": 4})
    model = build_teacher(TeacherConfig(backbone=BackboneConfig(hidden=64, mlp_layers=2)), spec.obs_step_dim,
                          spec.act_dim)
    path = model_dir / "arm_teacher.onnx"
    export_teacher_sampler(model, spec, path)
    return path
