"""joint_delta and joint_velocity without ROS: the delta integration, the velocity safety path (examples, then
hypothesis sequences as in test_safety.py), the simulated arm's velocity input, the conversion of position
demonstrations to the other kinds and the spec checks of the node."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdd_ros.data.dataset import action_chunks, convert_action_kind, position_columns
from vdd_ros.ros.observation import spec_mismatches
from vdd_ros.ros.safety import REASON_ESTOP, REASON_FAULTS, SafetyError, SafetyLayer, integrate_deltas
from vdd_ros.tasks import arm_avoid

LOWER = np.array([-1.0, -2.0, 0.0])
UPPER = np.array([1.0, 2.0, 3.0])
STEP = np.array([0.1, 0.05, 0.2])
VMAX = np.array([2.0, 1.0, 4.0])
PERIOD = 0.05


def layer(**kwargs):
    return SafetyLayer(LOWER, UPPER, STEP, **{"max_consecutive_faults": 3, "start_enabled": True,
                                              "max_velocity": VMAX, "period_s": PERIOD, **kwargs})


# --- joint_delta: increments -> position targets ------------------------------------------------------------
def test_deltas_integrate_from_the_measured_position_then_from_the_previous_target():
    targets = integrate_deltas([[0.1, 0.0, -0.2], [0.1, 0.05, 0.0], [-0.3, 0.0, 0.1]], [0.5, 1.0, 2.0])
    np.testing.assert_allclose(targets, [[0.6, 1.0, 1.8], [0.7, 1.05, 1.8], [0.4, 1.05, 1.9]])
    with pytest.raises(SafetyError, match="3 joints"):
        integrate_deltas(np.zeros((2, 3)), [0.0, 0.0])


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 12).flatmap(lambda h: st.tuples(
    st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=h, max_size=h),
    st.lists(st.floats(-3, 3), min_size=3, max_size=3))))
def test_integrated_deltas_give_back_their_increments_and_the_safety_layer_keeps_them_in_limits(case):
    deltas, measured = np.array(case[0]), np.array(case[1])
    targets = integrate_deltas(deltas, measured)
    np.testing.assert_allclose(targets[0] - measured, deltas[0], atol=1e-9)
    np.testing.assert_allclose(np.diff(targets, axis=0), deltas[1:], atol=1e-9)
    # the targets then take the position path: limits and step limit from the measured position
    def outside(q):
        return np.maximum(np.maximum(LOWER - q, q - UPPER), 0.0)

    safety = layer()
    previous = measured
    for target in targets:
        command = safety.command(target, measured)
        assert np.all(np.abs(command - previous) <= STEP + 1e-12)
        assert np.all(outside(command) <= outside(previous) + 1e-12)  # never further outside the limits
        previous = command
    points = safety.trajectory(targets, measured)
    assert np.all(np.abs(np.diff(np.vstack([measured, points]), axis=0)) <= STEP + 1e-12)


# --- joint_velocity: the safety path -------------------------------------------------------------------------
def test_velocities_are_clipped_to_the_velocity_limits_and_counted():
    safety = layer()
    command = safety.velocity([5.0, -0.5, -9.0], np.array([0.0, 0.0, 1.5]))
    np.testing.assert_allclose(command, [2.0, -0.5, -4.0])
    assert safety.velocity_clips == 1 and safety.limit_clips == 0
    np.testing.assert_allclose(safety.velocity([0.1, 0.2, 0.3], np.array([0.0, 0.0, 1.5])), [0.1, 0.2, 0.3])
    assert safety.velocity_clips == 1 and safety.caught_up


def test_velocity_toward_a_position_limit_stops_at_it_and_never_leaves_further():
    safety = layer()
    # at the upper limit of joint 1, beyond the lower limit of joint 2, 0.05 rad below the upper one of joint 3
    q = np.array([1.0, -2.5, 2.95])
    command = safety.velocity([1.0, -1.0, 4.0], q)
    np.testing.assert_allclose(command, [0.0, 0.0, 1.0])  # joint 3: exactly to its limit in one period
    assert safety.limit_clips == 1
    # away from the limits is allowed, also back inside from beyond them
    np.testing.assert_allclose(safety.velocity([-1.0, 0.5, -4.0], q), [-1.0, 0.5, -4.0])


def test_velocity_commands_respect_enable_estop_and_the_fault_latch():
    safety = layer(start_enabled=False)
    q = np.zeros(3) + [0.0, 0.0, 1.0]
    assert safety.velocity([0.1, 0.1, 0.1], q) is None
    assert safety.enable(True)[0]
    assert safety.velocity([0.1, 0.1, 0.1], q) is not None
    safety.estop(True)
    assert safety.velocity([0.1, 0.1, 0.1], q) is None and safety.latched == REASON_ESTOP
    safety.estop(False)
    assert safety.velocity([0.1, 0.1, 0.1], q) is None
    assert safety.enable(True)[0]
    for _ in range(3):
        assert safety.velocity([np.nan, 0.0, 0.0], q) is None
    assert not safety.enabled and safety.latched == REASON_FAULTS and safety.invalid_outputs == 3
    assert safety.enable(True)[0] and safety.velocity([0.0, 0.0, np.inf], q) is None
    assert safety.velocity([0.0, 0.0, 0.0], None) is None  # no measured position: nothing (the node: zero)
    assert safety.velocity([0.0, 0.0, 0.0], np.array([np.nan, 0.0, 1.0])) is None


def test_a_velocity_layer_needs_limits_and_a_period():
    with pytest.raises(SafetyError, match="velocity"):
        SafetyLayer(LOWER, UPPER, STEP, start_enabled=True).velocity([0.0, 0.0, 0.0], np.zeros(3))
    with pytest.raises(SafetyError, match="period"):
        SafetyLayer(LOWER, UPPER, STEP, max_velocity=VMAX)
    with pytest.raises(SafetyError, match="joint_velocity_limits"):
        SafetyLayer(LOWER, UPPER, STEP, max_velocity=[1.0, 0.0, 1.0], period_s=0.1)


VELOCITY = st.tuples(st.just("velocity"), st.lists(st.floats(-10, 10), min_size=3, max_size=3),
                     st.lists(st.floats(-4, 5), min_size=3, max_size=3))
EVENTS = st.one_of(
    VELOCITY, VELOCITY, VELOCITY, VELOCITY,
    st.tuples(st.just("velocity"), st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.5]), min_size=3,
                                            max_size=3), st.lists(st.floats(-4, 5), min_size=3, max_size=3)),
    st.tuples(st.just("estop"), st.booleans()),
    st.tuples(st.just("enable"), st.booleans()))
CASES = {"sequences": 0, "commands": 0}


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENTS, min_size=1, max_size=40), st.booleans())
def test_no_velocity_command_breaks_the_velocity_limits_the_position_limits_or_the_latch(events, start_enabled):
    CASES["sequences"] += 1
    safety = layer(start_enabled=start_enabled)
    estop_pressed = False  # since the last successful enable
    for event in events:
        if event[0] == "estop":
            safety.estop(event[1])
            estop_pressed |= event[1]
            continue
        if event[0] == "enable":
            ok, _ = safety.enable(event[1])
            if ok and event[1]:
                estop_pressed = False
            continue
        target, q = np.array(event[1]), np.array(event[2])
        command = safety.velocity(target, q)
        if command is None:
            continue
        CASES["commands"] += 1
        assert safety.enabled and not estop_pressed and not safety.estop_active
        assert np.all(np.isfinite(command)) and np.all(np.isfinite(target))
        assert np.all(np.abs(command) <= VMAX)
        reach = q + command * PERIOD
        inside = (q >= LOWER) & (q <= UPPER)
        # from inside the limits one period stays inside; from outside nothing moves further out
        assert np.all(~inside | ((reach >= LOWER - 1e-9) & (reach <= UPPER + 1e-9)))
        assert np.all(command[q > UPPER] <= 0) and np.all(command[q < LOWER] >= 0)
        # within the limits and the velocity limit the model's velocity is passed on unchanged
        wanted = q + target * PERIOD  # (a margin: at a limit, 1e-57 rad/s rounds to no motion)
        free = inside & (np.abs(target) <= VMAX) & (wanted >= LOWER + 1e-9) & (wanted <= UPPER - 1e-9)
        np.testing.assert_array_equal(command[free], target[free])


def test_report_how_many_velocity_cases_ran():
    print(f"velocity safety: {CASES['sequences']} generated sequences, {CASES['commands']} commands checked")
    assert CASES["sequences"] == 0 or CASES["commands"] > 0


# --- the simulated arm's velocity input ------------------------------------------------------------------------
def test_the_arm_integrates_velocities_within_its_velocity_and_position_limits():
    sim = arm_avoid.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), np.array([[0.3, 1.9, 1.7], [1.79, 0.21, 2.49]]))
    q0 = sim.q.copy()
    sim.step_velocity(np.array([[0.5, -0.5, 10.0], [5.0, -5.0, 5.0]]))
    dt = 1.0 / arm_avoid.PHYSICS_RATE_HZ
    np.testing.assert_allclose(sim.q[0], q0[0] + np.array([0.5, -0.5, 3.0]) * dt)  # joint 3 at its 3 rad/s
    np.testing.assert_allclose(sim.q[1], [1.8, 0.2, 2.5])  # stopped at the position limits
    np.testing.assert_allclose(sim.qdot[1], (sim.q[1] - q0[1]) / dt)
    for _ in range(5):
        sim.step_velocity(np.array([[0.0, 0.0, 0.0], [5.0, -5.0, 5.0]]))
    np.testing.assert_allclose(sim.qdot, 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="finite joint velocities"):
        sim.step_velocity(np.array([[np.nan, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# --- demonstrations of each kind ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demos():
    return arm_avoid.generate_demonstrations(16, seed=3)


def test_velocity_demonstrations_replayed_through_the_velocity_input_reproduce_the_recorded_positions(demos):
    data = convert_action_kind(demos, "joint_velocity")
    assert data.spec.action_kind == "joint_velocity" and data.spec.interface_differences(demos.spec)
    assert np.all(np.abs(data.actions) <= np.array(data.spec.joint_velocity_limits))
    for i in range(3):
        obs, velocities = data.episode(i)
        sim = arm_avoid.ArmSim(batch=1)
        sim.reset(np.random.default_rng(0), obs[0, :3])
        for t in range(len(obs) - 1):
            for _ in range(arm_avoid.TICKS_PER_CONTROL):
                sim.step_velocity(velocities[t][None])
            np.testing.assert_allclose(sim.q[0], obs[t + 1, :3], atol=1e-9)


def test_delta_chunks_integrated_from_the_measured_position_give_back_the_position_targets(demos):
    data = convert_action_kind(demos, "joint_delta")
    assert data.spec.action_kind == "joint_delta"
    np.testing.assert_allclose(data.actions, demos.actions - demos.observations[:, :3])
    _, act_idx = demos.window_indices(2, 8)
    chunks = action_chunks(data, act_idx)
    positions = demos.actions[act_idx]
    for row in np.random.default_rng(0).choice(len(chunks), 200, replace=False):
        np.testing.assert_allclose(integrate_deltas(chunks[row], demos.observations[row, :3]), positions[row],
                                   atol=1e-9)
    # position datasets keep their chunks as they were
    np.testing.assert_array_equal(action_chunks(demos, act_idx), positions)


def test_training_data_of_a_delta_dataset_carries_the_integrated_chunks(demos):
    from vdd_ros.learn.pipeline import prepare_training_data

    data = prepare_training_data(convert_action_kind(demos, "joint_delta"), 2, 8, "em_mixture")
    assert data.spec.action_kind == "joint_delta"
    chunks = data.spec.denormalize_action(data.actions.reshape(len(data.actions), 8, 3).astype(np.float64))
    _, act_idx = demos.window_indices(2, 8)
    targets = integrate_deltas(chunks[50], demos.observations[50, :3])
    np.testing.assert_allclose(targets, demos.actions[act_idx[50]], atol=1e-5)  # float32 training arrays


def test_conversion_refuses_what_it_cannot_convert(demos):
    assert convert_action_kind(demos, "joint_position") is demos
    with pytest.raises(ValueError, match="one of"):
        convert_action_kind(demos, "torque")
    with pytest.raises(ValueError, match="joint_position dataset"):
        convert_action_kind(convert_action_kind(demos, "joint_delta"), "joint_velocity")
    from vdd_ros.spec import Normalization

    no_positions = demos.spec.replace(observation_fields=demos.spec.observation_fields[1:],
                                      normalization=Normalization.identity(3, 3))
    assert position_columns(no_positions) is None and position_columns(demos.spec) == [0, 1, 2]


# --- the node's spec checks -----------------------------------------------------------------------------------
def test_the_node_accepts_every_action_kind_and_refuses_trajectories_of_velocities():
    spec = arm_avoid.task_spec(2, 8)
    for kind in ("joint_position", "joint_delta", "joint_velocity"):
        assert spec_mismatches(spec.replace(action_kind=kind), [], 0.0) == []
    assert spec_mismatches(spec.replace(action_kind="joint_delta"), [], 0.0, output="joint_trajectory") == []
    problems = spec_mismatches(spec.replace(action_kind="joint_velocity"), [], 0.0, output="joint_trajectory")
    assert len(problems) == 1 and "joint_velocity model needs output 'commands'" in problems[0]
