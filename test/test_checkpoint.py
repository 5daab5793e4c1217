"""Checkpoints: round trip, atomic writes, clear errors for corrupt files and other specs."""
import os

import pytest
import torch

from vdd_ros.learn import checkpoint as checkpoint_module
from vdd_ros.learn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vdd_ros.learn.diffusion import DiffusionTeacher
from vdd_ros.spec import ModelSpec, Normalization, ObservationField

torch.set_num_threads(1)


def make_spec(history=2, horizon=4) -> ModelSpec:
    return ModelSpec(joint_names=("j1", "j2", "j3"), joint_lower=(-3.0,) * 3, joint_upper=(3.0,) * 3,
                     joint_velocity_limits=(2.0,) * 3,
                     observation_fields=(ObservationField("joints", "joint_position", 3),),
                     history=history, action_kind="joint_position", action_horizon=horizon, control_rate_hz=10.0,
                     normalization=Normalization((0.1, 0.2, 0.3), (1.0, 2.0, 3.0), (0.0, 0.5, 1.0), (1.0, 1.5, 2.0)),
                     task="test")


def make_teacher(seed=0) -> DiffusionTeacher:
    torch.manual_seed(seed)
    return DiffusionTeacher(obs_step_dim=3, history=2, act_dim=12, backbone={"hidden": 32, "mlp_layers": 2},
                            n_steps=4, sigma_max=5.0)


def test_round_trip_restores_model_spec_config_and_history(tmp_path):
    teacher = make_teacher()
    path = save_checkpoint(tmp_path / "teacher.pt", teacher, "diffusion_teacher", make_spec(),
                           {"lr": 0.001, "backbone": {"hidden": 32}}, {"loss": [1.0, 0.5]})
    loaded = load_checkpoint(path, expected_spec=make_spec())
    assert loaded.kind == "diffusion_teacher"
    assert loaded.spec.model_kind == "diffusion_teacher"
    assert loaded.spec.normalization == make_spec().normalization
    assert loaded.config == {"lr": 0.001, "backbone": {"hidden": 32}}
    assert loaded.history == {"loss": [1.0, 0.5]}
    model = loaded.model
    assert isinstance(model, DiffusionTeacher) and not model.training
    assert (model.n_steps, model.sigma_max) == (4, 5.0)
    obs, noise = torch.randn(3, 6), torch.randn(3, 12)
    assert torch.equal(model.sample(obs, noise=noise), teacher.eval().sample(obs, noise=noise))
    # a different model gives different samples, so the equality above is not vacuous
    assert not torch.allclose(make_teacher(seed=1).eval().sample(obs, noise=noise), model.sample(obs, noise=noise))


def test_a_teacher_saved_with_the_dropped_ancestral_sampler_loads_as_euler(tmp_path):
    """Files from before Euler became the only sampler name ``sampler`` three times; the weights stay."""
    teacher = make_teacher()
    spec = make_spec().replace(model_info={"n_steps": 4, "sampler": "ancestral", "execute_steps": 2})
    path = save_checkpoint(tmp_path / "old.pt", teacher, "diffusion_teacher", spec,
                           {"lr": 0.001, "sampler": "ancestral"})
    payload = torch.load(path, weights_only=True)
    payload["model_args"]["sampler"] = "ancestral"  # what the old constructor recorded
    torch.save(payload, path)
    with pytest.warns(UserWarning, match=r"sampler \['ancestral'\] is no longer offered; this teacher samples "
                      r"with Euler"):
        loaded = load_checkpoint(path)
    assert "sampler" not in loaded.config and "sampler" not in loaded.spec.model_info
    assert loaded.spec.model_info == {"n_steps": 4, "execute_steps": 2}
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_interrupted_write_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pt"
    first = make_teacher(seed=0)
    save_checkpoint(path, first, "diffusion_teacher", make_spec(), {"step": 1})
    real_save = torch.save

    def save_then_interrupt(obj, name):
        real_save(obj, name)
        with open(name, "r+b") as handle:  # the write was cut short
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_teacher(seed=1), "diffusion_teacher", make_spec(), {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["teacher.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.config == {"step": 1}
    for key, value in first.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_corrupt_and_missing_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable vdd_ros checkpoint") as info:
        load_checkpoint(garbage)
    assert "\n" not in str(info.value)
    good = save_checkpoint(tmp_path / "good.pt", make_teacher(), "diffusion_teacher", make_spec(), {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(other)


def test_checkpoint_for_another_spec_is_refused_naming_the_differences(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", make_teacher(), "diffusion_teacher", make_spec(), {})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, expected_spec=make_spec(history=3, horizon=8))
    message = str(info.value)
    assert "history: this=3 other=2" in message
    assert "action_horizon: this=8 other=4" in message
    assert "joint_names" not in message


def test_kind_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", make_teacher(), "teacher", make_spec(), {})
    with pytest.raises(TypeError, match="MixtureOfExpertsPolicy"):
        save_checkpoint(tmp_path / "x.pt", make_teacher(), "vdd_mixture", make_spec(), {})
