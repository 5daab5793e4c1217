"""End to end: vdd train-teacher -> distill -> train-em -> eval on a tiny dataset, plus bad input."""
import json

import pytest
import torch

from vdd_ros.cli import main as cli_main
from vdd_ros.learn.checkpoint import load_checkpoint
from vdd_ros.learn.pipeline import load_demonstrations

TINY_TEACHER = ["--set", "iterations=40", "--set", "batch_size=64", "--set", "backbone.hidden=32",
                "--set", "backbone.mlp_layers=2", "--set", "checkpoint_every=20", "--set", "n_steps=4",
                "--set", "horizon=4", "--set", "execute_steps=2", "--set", "observation_fields=[joint_position]",
                "--set", "relative_to=joint_position", "--quiet"]
TINY_DISTILL = ["--set", "iterations=6", "--set", "n_experts=2", "--set", "samples_per_expert=4",
                "--set", "batch_size=8", "--set", "gating_batch_size=32", "--set", "backbone.hidden=32",
                "--set", "backbone.mlp_layers=2", "--set", "gating_warmup_fraction=0.3",
                "--set", "checkpoint_every=3", "--set", "warm_start_iterations=5", "--quiet"]
TINY_EM = ["--set", "iterations=4", "--set", "n_experts=2", "--set", "backbone.hidden=32",
           "--set", "backbone.mlp_layers=2", "--set", "horizon=4", "--set", "execute_steps=2",
           "--set", "observation_fields=[joint_position]", "--quiet"]
# the same run with the per-field flags --help lists
TINY_EM_FLAGS = ["--iterations", "4", "--n-experts", "2", "--backbone.hidden", "32", "--backbone.mlp-layers", "2",
                 "--horizon", "4", "--execute-steps", "2", "--observation-fields", "[joint_position]", "--quiet"]


@pytest.fixture(autouse=True)
def learn_commands(monkeypatch):
    # the learning subcommands, whether or not the package's command list names them yet
    modules = tuple(dict.fromkeys(cli_main.SUBCOMMAND_MODULES + ("vdd_ros.cli.learn",)))
    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", modules)


def vdd(*argv) -> int:
    return cli_main.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "demos.npz"
    load_demonstrations("", episodes=16, dataset_seed=3).save(str(path))
    return path


def test_train_distill_em_eval_chain(tmp_path, demos, capsys):
    teacher, student, em = tmp_path / "teacher.pt", tmp_path / "student.pt", tmp_path / "em.pt"
    assert vdd("train-teacher", "--dataset", demos, "--out", teacher, *TINY_TEACHER) == 0
    loaded = load_checkpoint(teacher)
    assert loaded.kind == "diffusion_teacher"
    assert loaded.config["iterations"] == 40 and loaded.config["backbone"]["hidden"] == 32
    assert loaded.config["dataset"] == str(demos)
    assert loaded.model.n_steps == 4 and loaded.model.act_dim == 4 * 3
    assert (loaded.spec.history, loaded.spec.action_horizon) == (2, 4)
    # the model reads only the joint positions, and denoises chunks relative to them
    assert [f.name for f in loaded.spec.observation_fields] == ["joint_position"]
    assert loaded.model.obs_dim == 2 * 3 and loaded.model.uses_reference
    assert loaded.spec.model_info["execute_steps"] == 2
    dataset = load_demonstrations(str(demos))
    assert loaded.spec.normalization.act_mean == pytest.approx(tuple(dataset.actions.mean(0)))
    assert loaded.spec.normalization.obs_mean == pytest.approx(tuple(dataset.observations[:, :3].mean(0)))
    assert len(loaded.history["loss"]) >= 1

    # same config and seed: the same weights
    again = tmp_path / "teacher_again.pt"
    assert vdd("train-teacher", "--dataset", demos, "--out", again, *TINY_TEACHER) == 0
    for key, value in load_checkpoint(again).model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key

    assert vdd("distill", "--teacher", teacher, "--out", student, *TINY_DISTILL) == 0
    distilled = load_checkpoint(student, expected_spec=loaded.spec)
    assert distilled.kind == "vdd_mixture" and distilled.model.n_experts == 2
    assert distilled.config["teacher"] == str(teacher) and distilled.config["dataset"] == str(demos)
    assert distilled.spec.normalization == loaded.spec.normalization
    assert len(distilled.history["expert_loss"]) == 6 and len(distilled.history["warm_start_loss"]) == 5

    assert vdd("train-em", "--dataset", demos, "--out", em, *TINY_EM) == 0
    baseline = load_checkpoint(em, expected_spec=loaded.spec)
    assert baseline.kind == "em_mixture"

    capsys.readouterr()
    table, figure = tmp_path / "eval.json", tmp_path / "eval.png"
    assert vdd("eval", "--teacher", teacher, "--student", student, "--em", em, "--episodes", 3, "--seed", 5,
               "--timing-repeats", 3, "--json", table, "--plot", figure) == 0
    printed = capsys.readouterr().out
    assert "success" in printed and "NFE/action" in printed
    report = json.loads(table.read_text())
    assert [row["model"] for row in report["models"]] == ["teacher", "student", "em"]
    assert report["episodes"] == 3 and report["seed"] == 5
    for row in report["models"]:
        assert row["episodes"] == 3
        assert 0.0 <= row["success_rate"] <= 1.0 and 0.0 <= row["entropy"] <= 1.0
        assert row["time_per_action_ms"] > 0 and row["time_per_action_p50_ms"] > 0
    nfe = {row["model"]: row["network_evaluations_per_action"] for row in report["models"]}
    assert nfe == {"teacher": 4, "student": 1, "em": 1}
    assert figure.stat().st_size > 10_000


def test_impossible_config_is_refused_before_any_work(tmp_path, demos, capsys):
    out = tmp_path / "teacher.pt"
    assert vdd("train-teacher", "--dataset", demos, "--out", out, "--set", "sigma_min=2",
               "--set", "sigma_max=1", "--quiet") == 2
    error = capsys.readouterr().err
    assert "sigma_max" in error and "expected" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()
    assert vdd("train-teacher", "--out", out, "--set", "learning_rate=0.1", "--quiet") == 2
    assert "unknown fields ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # Euler is the only sampler: the option is gone
        vdd("eval", "--teacher", out, "--sampler", "ancestral")
    assert "unrecognized arguments: --sampler" in capsys.readouterr().err
    assert vdd("train-teacher", "--out", out, "--set", "backbone.hidden=-4", "--quiet") == 2
    assert "hidden" in capsys.readouterr().err
    assert vdd("distill", "--teacher", tmp_path / "missing.pt", "--out", out, "--quiet") == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()


def test_teacher_for_another_spec_is_refused_naming_the_difference(tmp_path, demos, capsys):
    teacher = tmp_path / "teacher.pt"
    assert vdd("train-teacher", "--dataset", demos, "--out", teacher, *TINY_TEACHER) == 0
    dataset = load_demonstrations(str(demos))
    other_spec = dataset.spec.replace(task="other_robot", control_rate_hz=50.0)
    dataset.spec, dataset.task = other_spec, "other_robot"
    other = tmp_path / "other.npz"
    dataset.save(str(other))
    capsys.readouterr()
    assert vdd("distill", "--teacher", teacher, "--dataset", other, "--out", tmp_path / "s.pt", *TINY_DISTILL) == 2
    error = capsys.readouterr().err
    assert "control_rate_hz: this=50.0 other=20.0" in error
    assert not (tmp_path / "s.pt").exists()


def test_default_output_is_a_new_run_folder_and_shipped_models_need_the_option(tmp_path, demos, capsys,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / "package" / "models" / "em.pt"
    monkeypatch.setattr("vdd_ros.paths.model_file", lambda name: tmp_path / "package" / "models" / name)
    capsys.readouterr()
    assert vdd("train-em", "--dataset", demos, *TINY_EM_FLAGS) == 0
    written = list((tmp_path / "runs").glob("train-em-*/em.pt"))
    assert len(written) == 1 and not shipped.exists()
    assert f"writing {written[0].relative_to(tmp_path)}" in capsys.readouterr().out
    flags = load_checkpoint(written[0])
    assert (flags.config["iterations"], flags.config["n_experts"], flags.config["backbone"]["hidden"],
            flags.config["horizon"]) == (4, 2, 32, 4)
    # --set and the flags build the same run: the same weights
    assert vdd("train-em", "--dataset", demos, "--out", tmp_path / "set.pt", *TINY_EM) == 0
    with_set = load_checkpoint(tmp_path / "set.pt")
    assert with_set.config == flags.config
    for key, value in with_set.model.state_dict().items():
        assert torch.equal(value, flags.model.state_dict()[key]), key

    assert vdd("train-em", "--dataset", demos, "--replace-shipped", *TINY_EM) == 0
    assert shipped.is_file() and len(list((tmp_path / "runs").glob("*"))) == 1
    capsys.readouterr()
    assert vdd("train-em", "--out", tmp_path / "x.pt", "--replace-shipped", *TINY_EM) == 2
    assert "--out and --replace-shipped: expected one of them" in capsys.readouterr().err


def test_overrides_parse_nested_yaml_values():
    from vdd_ros.cli.learn import parse_overrides

    assert parse_overrides(["a=1", "backbone.hidden=64", "name=mlp", "x=[1, 2]", "flag=true", "none=null"]) == {
        "a": 1, "backbone": {"hidden": 64}, "name": "mlp", "x": [1, 2], "flag": True, "none": None}
    with pytest.raises(ValueError, match="expected key=value"):
        parse_overrides(["iterations"])


def test_data_choices_derive_the_chunk_and_fields_from_the_demonstrations():
    """One default for every task: 0 / [] resolve against the demonstrations' spec, and each derived value says so."""
    from vdd_ros.learn.pipeline import choose_data
    from vdd_ros.tasks import arm_avoid, arm_sort

    avoid = choose_data(arm_avoid.task_spec(2, 1))
    assert (avoid.horizon, avoid.execute_steps, avoid.observation_fields) == (16, 8, ("joint_position",))
    assert any("left out: ['joint_velocity']" in note for note in avoid.notes)
    sort = choose_data(arm_sort.task_spec(2, 1))
    assert (sort.horizon, sort.execute_steps, sort.observation_fields) == (8, 4, ("joint_position", "visited"))
    given = choose_data(arm_avoid.task_spec(2, 1), 4, 2, ["joint_velocity", "joint_position"])
    assert (given.horizon, given.execute_steps, given.observation_fields, given.notes) == (
        4, 2, ("joint_position", "joint_velocity"), ())
    assert choose_data(arm_avoid.task_spec(2, 1), 4).execute_steps == 2
    with pytest.raises(ValueError, match=r"execute_steps: expected <= horizon=4, got 6"):
        choose_data(arm_avoid.task_spec(2, 1), 4, 6)
    with pytest.raises(ValueError, match=r"observation_fields: expected names from .*unknown \['visited'\]"):
        choose_data(arm_avoid.task_spec(2, 1), observation_fields=["visited"])
