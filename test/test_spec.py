"""ModelSpec: lossless JSON round trip and one test per validation error (the message names the field)."""
import json
import math

import pytest

from vdd_ros.spec import FORMAT_VERSION, ModelSpec, Normalization, ObservationField, SpecError

JOINTS = ("j1", "j2")


def make_spec(**changes) -> ModelSpec:
    data = dict(
        joint_names=JOINTS,
        joint_lower=(-1.0, -0.1),
        joint_upper=(1.0, 2.5),
        joint_velocity_limits=(1.5, 2.0),
        observation_fields=(ObservationField("pos", "joint_position", 2),
                            ObservationField("goal", "vector", 3, topic="goal", msg_type="geometry_msgs/PointStamped")),
        history=2,
        action_kind="joint_position",
        action_horizon=4,
        control_rate_hz=20.0,
        normalization=Normalization((0.1, 1e-12, -3.5, 0.0, 2.0), (1.0, 0.3, 1e-6, 7.0, 1.0), (0.1, 0.2), (0.5, 1e-3)),
        model_kind="vdd_mixture",
        task="demo",
        model_info={"experts": 4, "lr": 0.1, "nested": {"eps": 1e-12, "list": [1, 2.5]}},
    )
    data.update(changes)
    return ModelSpec(**data)


def spec_dict(**changes) -> dict:
    data = make_spec().to_dict()
    data.update(changes)
    return data


def expect_error(field_name: str, build, *args, **kwargs) -> SpecError:
    with pytest.raises(SpecError) as info:
        build(*args, **kwargs)
    assert info.value.field_name == field_name
    assert f"'{field_name}'" in str(info.value)
    return info.value


# --- round trip ----------------------------------------------------------------------
def test_json_round_trip_is_lossless():
    spec = make_spec()
    text = spec.to_json()
    back = ModelSpec.from_json(text)
    assert back == spec
    assert back.normalization.obs_mean[0] == 0.1
    assert back.normalization.obs_mean[1] == 1e-12
    assert back.normalization.obs_std[2] == 1e-6
    assert back.model_info["nested"]["eps"] == 1e-12
    assert back.to_json() == text
    assert json.loads(text)["format_version"] == FORMAT_VERSION


def test_round_trip_keeps_sizes_and_normalisation():
    spec = ModelSpec.from_json(make_spec().to_json(indent=2))
    assert (spec.obs_step_dim, spec.obs_dim, spec.n_joints, spec.act_dim) == (5, 10, 2, 8)
    assert spec.observation_fields[1].topic == "goal"


def test_interface_differences_names_both_values():
    spec = make_spec()
    assert spec.interface_differences(make_spec(model_kind="none")) == []
    diffs = spec.interface_differences(make_spec(control_rate_hz=10.0, history=3))
    assert diffs == ["history: this=2 other=3", "control_rate_hz: this=20.0 other=10.0"]


# --- validation in ModelSpec.validate ---------------------------------------------------------
def test_bad_format_version():
    assert expect_error("format_version", make_spec, format_version=2).actual == 2


def test_unknown_model_kind():
    assert expect_error("model_kind", make_spec, model_kind="gan").actual == "gan"


def test_unknown_action_kind():
    assert expect_error("action_kind", make_spec, action_kind="torque").actual == "torque"


def test_no_joints():
    expect_error("joint_names", make_spec, joint_names=())


def test_empty_joint_name():
    expect_error("joint_names", make_spec, joint_names=("j1", ""))


def test_duplicate_joint_names():
    err = expect_error("joint_names", make_spec, joint_names=("j1", "j1"))
    assert "'j1' appears twice" in str(err)


@pytest.mark.parametrize("name", ["joint_lower", "joint_upper", "joint_velocity_limits"])
def test_joint_vectors_of_wrong_size(name):
    err = expect_error(name, make_spec, **{name: (1.0, 2.0, 3.0)})
    assert err.expected == "2 numbers" and err.actual == "3 numbers"


@pytest.mark.parametrize("name", ["joint_lower", "joint_upper", "joint_velocity_limits"])
def test_joint_vectors_not_finite(name):
    expect_error(name, make_spec, **{name: (math.nan, 2.0)})


def test_upper_not_above_lower():
    expect_error("joint_upper", make_spec, joint_upper=(1.0, -0.1))


def test_velocity_limits_must_be_positive():
    expect_error("joint_velocity_limits", make_spec, joint_velocity_limits=(1.0, 0.0))


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_bad_history(value):
    expect_error("history", make_spec, history=value)


@pytest.mark.parametrize("value", [0, 2.0])
def test_bad_action_horizon(value):
    expect_error("action_horizon", make_spec, action_horizon=value)


@pytest.mark.parametrize("value", [0.0, -20.0, math.inf, math.nan, "20"])
def test_bad_control_rate(value):
    expect_error("control_rate_hz", make_spec, control_rate_hz=value)


def test_no_observation_fields():
    expect_error("observation_fields", make_spec, observation_fields=())


def test_duplicate_observation_field_names():
    fields = (ObservationField("pos", "joint_position", 2), ObservationField("pos", "joint_velocity", 2))
    expect_error("observation_fields[1].name", make_spec, observation_fields=fields,
                 normalization=Normalization.identity(4, 2))


def test_unknown_observation_kind():
    fields = (ObservationField("pos", "joint_effort", 2),)
    expect_error("observation_fields[0].kind", make_spec, observation_fields=fields,
                 normalization=Normalization.identity(2, 2))


def test_vector_field_size_topic_and_type():
    def vector(**changes):
        data = dict(name="goal", kind="vector", size=3, topic="goal", msg_type="std_msgs/Float64MultiArray")
        data.update(changes)
        return (ObservationField(**data),)
    norm = Normalization.identity(3, 2)
    expect_error("observation_fields[0].size", make_spec, observation_fields=vector(size=0),
                 normalization=Normalization.identity(0, 2))
    expect_error("observation_fields[0].topic", make_spec, observation_fields=vector(topic=""), normalization=norm)
    expect_error("observation_fields[0].msg_type", make_spec, observation_fields=vector(msg_type="std_msgs/String"),
                 normalization=norm)


def test_joint_field_with_unknown_joint():
    fields = (ObservationField("pos", "joint_position", 1, joints=("elbow",)),)
    err = expect_error("observation_fields[0].joints", make_spec, observation_fields=fields,
                       normalization=Normalization.identity(1, 2))
    assert err.actual == ["elbow"]


def test_joint_field_size_disagrees_with_joints():
    fields = (ObservationField("pos", "joint_position", 3),)
    expect_error("observation_fields[0].size", make_spec, observation_fields=fields,
                 normalization=Normalization.identity(3, 2))
    fields = (ObservationField("pos", "joint_position", 2, joints=("j2",)),)
    expect_error("observation_fields[0].size", make_spec, observation_fields=fields,
                 normalization=Normalization.identity(2, 2))


def test_normalization_of_wrong_type():
    expect_error("normalization", make_spec, normalization={"obs_mean": [0.0]})


@pytest.mark.parametrize("name,value", [
    ("obs_mean", (0.0,) * 4), ("obs_mean", (0.0, 0.0, math.inf, 0.0, 0.0)),
    ("obs_std", (1.0, 1.0, 0.0, 1.0, 1.0)), ("obs_std", (1.0, 1.0, math.nan, 1.0, 1.0)),
    ("act_mean", (0.0, math.nan)), ("act_mean", (0.0,)),
    ("act_std", (1.0, -1.0)), ("act_std", (1.0, 1.0, 1.0)),
])
def test_bad_normalization_vectors(name, value):
    norm = make_spec().normalization
    changed = Normalization(**{**norm.__dict__, name: value})
    expect_error(f"normalization.{name}", make_spec, normalization=changed)


def test_model_info_must_be_json():
    expect_error("model_info", make_spec, model_info={"fn": print})


# --- validation in from_dict / from_json ----------------------------------------------------------
def test_from_json_rejects_invalid_json():
    expect_error("spec", ModelSpec.from_json, "{not json")


def test_from_dict_rejects_non_object():
    expect_error("spec", ModelSpec.from_dict, [1, 2])


def test_from_dict_rejects_unknown_keys():
    err = expect_error("spec", ModelSpec.from_dict, spec_dict(extra=1, another=2))
    assert err.actual == ["another", "extra"]


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_from_dict_rejects_format_version(version):
    data = spec_dict(format_version=version)
    if version is None:
        del data["format_version"]
    expect_error("format_version", ModelSpec.from_dict, data)


@pytest.mark.parametrize("key", ["joint_names", "history", "normalization", "control_rate_hz"])
def test_from_dict_rejects_missing_key(key):
    data = spec_dict()
    del data[key]
    assert expect_error(key, ModelSpec.from_dict, data).actual == "nothing"


def test_from_dict_rejects_bad_normalization_object():
    expect_error("normalization", ModelSpec.from_dict, spec_dict(normalization=[0.0]))
    norm = spec_dict()["normalization"]
    del norm["act_std"]
    expect_error("normalization", ModelSpec.from_dict, spec_dict(normalization=norm))


def test_from_dict_rejects_observation_fields_not_a_list():
    expect_error("observation_fields", ModelSpec.from_dict, spec_dict(observation_fields={"name": "pos"}))


@pytest.mark.parametrize("key,value", [("history", True), ("history", 2.0), ("action_horizon", "4")])
def test_from_dict_rejects_non_integer_sizes(key, value):
    expect_error(key, ModelSpec.from_dict, spec_dict(**{key: value}))


def test_from_dict_rejects_bad_observation_field_objects():
    fields = spec_dict()["observation_fields"]
    expect_error("observation_fields[1]", ModelSpec.from_dict, spec_dict(observation_fields=[fields[0], "goal"]))
    expect_error("observation_fields[0]", ModelSpec.from_dict,
                 spec_dict(observation_fields=[{**fields[0], "colour": "red"}, fields[1]]))
    missing = dict(fields[0])
    del missing["kind"]
    expect_error("observation_fields[0].kind", ModelSpec.from_dict, spec_dict(observation_fields=[missing, fields[1]]))


def test_from_dict_runs_the_same_validation():
    expect_error("model_kind", ModelSpec.from_dict, spec_dict(model_kind="gan"))
    expect_error("joint_names", ModelSpec.from_dict, spec_dict(joint_names=["a", "a"]))
