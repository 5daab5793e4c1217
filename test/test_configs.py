"""One source of truth per default: the config dataclasses, their YAML files and the CLI agree."""
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from vdd_ros.cli import learn
from vdd_ros.cli import main as cli_main
from vdd_ros.learn.configs import EMConfig, TeacherConfig, VDDConfig, yaml_comments

CONFIG_FOLDER = Path(__file__).resolve().parents[1] / "config"
COMMANDS = sorted(learn.COMMANDS)


def leaf_docs(cls):
    docs = cls.field_docs()
    return [d for d in docs if not any(o.name.startswith(d.name + ".") for o in docs)]


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize("command", COMMANDS)
def test_yaml_file_is_the_dataclass_defaults_with_one_comment_per_field(command):
    cls, yaml_name, _, _ = learn.COMMANDS[command]
    text = (CONFIG_FOLDER / yaml_name).read_text()
    assert text == learn.default_config_text(command), (
        f"config/{yaml_name} differs from {cls.__name__}'s defaults: run python -m vdd_ros.cli.learn config/")
    # the same facts, read back independently of the writer
    assert plain(yaml.safe_load(text)) == plain(cls().to_dict())
    comments = yaml_comments(text)
    assert set(comments) == {doc.name for doc in cls.field_docs()}
    for doc in cls.field_docs():
        assert comments[doc.name] == doc.help, doc.name
        assert doc.help, doc.name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_field_with_type_default_and_the_yaml_comment(command, capsys):
    cls, yaml_name, _, _ = learn.COMMANDS[command]
    with pytest.raises(SystemExit):
        cli_main.main([command, "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at hyphens)
    comments = yaml_comments((CONFIG_FOLDER / yaml_name).read_text())
    for doc in leaf_docs(cls):
        flag = "--" + doc.name.replace("_", "-")
        metavar = doc.type_name.replace(" ", "").upper()
        default = learn.yaml_value(doc.default)
        wanted = f"{flag} {metavar} {comments[doc.name]} (default: {default})"
        assert "".join(wanted.split()) in text, wanted


@pytest.mark.parametrize("command", COMMANDS)
def test_command_without_overrides_builds_the_python_default(command):
    cls = learn.COMMANDS[command][0]
    args = cli_main.build_parser().parse_args([command])
    assert learn.build_config(cls, args) == cls().validate()


def test_flags_set_and_config_file_apply_in_order(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("iterations: 10\nn_experts: 4\nbackbone:\n  hidden: 64\n")
    args = cli_main.build_parser().parse_args(
        ["distill", "--config", str(path), "--set", "iterations=20", "--set", "backbone.mlp_layers=2",
         "--iterations", "30", "--backbone.hidden", "128", "--reinit-fractions", "[0.5]", "--dataset", "123.npz",
         "--freeze_gating_fraction", "null"])
    config = learn.build_config(VDDConfig, args)
    assert (config.iterations, config.n_experts, config.backbone.hidden, config.backbone.mlp_layers) == (30, 4, 128, 2)
    assert config.reinit_fractions == [0.5] and config.dataset == "123.npz" and config.freeze_gating_fraction is None
    assert config.seed == VDDConfig().seed  # untouched fields keep the default
    bad = cli_main.build_parser().parse_args(["train-em", "--n-experts", "0"])
    with pytest.raises(ValueError, match=r"^EMConfig.n_experts: expected an integer >= 1, got 0$"):
        learn.build_config(EMConfig, bad)
    from_file = cli_main.build_parser().parse_args(["train-teacher", "--config", str(tmp_path / "t.yaml")])
    (tmp_path / "t.yaml").write_text("n_steps: 0\n")
    with pytest.raises(ValueError, match=r"^config .*t.yaml: TeacherConfig.n_steps: expected an integer >= 1"):
        learn.build_config(TeacherConfig, from_file)


def test_presets_name_only_real_fields_and_change_only_what_they_say():
    for cls in (VDDConfig, EMConfig):
        names = {f.name for f in fields(cls)}
        for name, changes in cls.PRESETS.items():
            assert set(changes) <= names, (cls.__name__, name)
            preset, default = cls.preset(name).to_dict(), cls().to_dict()
            changed = {key for key in names if plain(preset[key]) != plain(default[key])}
            assert changed == set(changes), (cls.__name__, name)
    assert VDDConfig.preset("gmm2d", seed=4).seed == 4
    with pytest.raises(ValueError, match=r"VDDConfig.preset: expected one of \['gmm2d'\], got 'ring'"):
        VDDConfig.preset("ring")


def test_the_arm_defaults_are_not_the_2d_recipe():
    """The README's example VDDConfig(n_experts=8) gets the arm task's gating (EM's too), not the 2-D one."""
    assert VDDConfig(n_experts=8).gating == EMConfig().gating != "detached_features"
    assert VDDConfig.preset("gmm2d").gating == "detached_features"
    assert not re.search(r"\bsampler\b", (CONFIG_FOLDER / "teacher.yaml").read_text().replace("Euler sampler", ""))
