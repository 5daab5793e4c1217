"""The safety logic without ROS: examples, then property-based sequences (hypothesis) of targets, measured
positions and events, checking after every step that no command breaks the limits, the step limit or the
latch."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdd_ros.ros.safety import REASON_ESTOP, REASON_FAULTS, DeadlineWatchdog, SafetyError, SafetyLayer, per_joint

LOWER = np.array([-1.0, -2.0, 0.0])
UPPER = np.array([1.0, 2.0, 3.0])
STEP = np.array([0.1, 0.05, 0.2])


def layer(**kwargs):
    return SafetyLayer(LOWER, UPPER, STEP, **{"max_consecutive_faults": 3, "start_enabled": True, **kwargs})


def test_disabled_at_start_commands_nothing_until_enabled():
    safety = layer(start_enabled=False)
    assert safety.command([0.0, 0.0, 1.0], np.zeros(3)) is None
    assert "start_enabled" in safety.state
    assert safety.enable(True)[0]
    assert safety.command([0.0, 0.0, 0.1], np.array([0.0, 0.0, 0.0])) is not None


def test_first_command_ramps_from_the_measured_position_then_from_the_previous_command():
    safety = layer()
    measured = np.array([0.5, 0.0, 1.0])
    first = safety.command([0.9, 1.0, 1.0], measured)
    np.testing.assert_allclose(first, [0.6, 0.05, 1.0])
    assert safety.step_clips == 1 and not safety.caught_up
    second = safety.command([0.9, 1.0, 1.0], measured)
    np.testing.assert_allclose(second, [0.7, 0.10, 1.0])
    for _ in range(30):
        last = safety.command([0.9, 1.0, 1.0], measured)
    np.testing.assert_allclose(last, [0.9, 1.0, 1.0])
    assert safety.caught_up


def test_targets_are_clipped_to_the_limits_and_counted():
    safety = layer()
    command = safety.command([5.0, -5.0, 1.0], np.array([0.95, -1.98, 1.0]))
    np.testing.assert_allclose(command, [1.0, -2.0, 1.0])
    assert safety.limit_clips == 1 and safety.step_clips == 0


def test_a_measured_position_outside_the_limits_is_left_toward_them_by_at_most_one_step():
    safety = layer()
    command = safety.command([0.0, 0.0, 1.0], np.array([1.5, 0.0, 1.0]))
    np.testing.assert_allclose(command, [1.4, 0.0, 1.0])


def test_estop_latches_until_released_and_enabled():
    safety = layer()
    assert safety.command([0.0, 0.0, 1.0], np.array([0.0, 0.0, 1.0])) is not None
    assert safety.estop(True) is True
    assert safety.command([0.0, 0.0, 1.0], np.array([0.0, 0.0, 1.0])) is None
    ok, message = safety.enable(True)
    assert not ok and "e-stop is active" in message
    safety.estop(False)
    assert safety.command([0.0, 0.0, 1.0], np.array([0.0, 0.0, 1.0])) is None, "released is not enabled"
    assert safety.latched == REASON_ESTOP
    ok, message = safety.enable(True)
    assert ok and "cleared the e-stop latch" in message
    # re-enabled: the ramp starts again from the measured position, not from the command before the stop
    np.testing.assert_allclose(safety.command([0.0, 0.0, 1.0], np.array([0.3, 0.0, 1.0])), [0.2, 0.0, 1.0])


def test_non_finite_targets_are_never_commanded_and_repeated_ones_latch():
    safety = layer(max_consecutive_faults=3)
    measured = np.zeros(3)
    assert safety.command([np.nan, 0.0, 0.0], measured) is None
    assert safety.command([0.0, np.inf, 0.0], measured) is None
    assert safety.enabled and safety.consecutive_faults == 2
    assert safety.command([0.0, 0.0, 0.1], measured) is not None
    assert safety.consecutive_faults == 0
    for _ in range(3):
        assert safety.command([np.nan] * 3, measured) is None
    assert not safety.enabled and safety.latched == REASON_FAULTS
    assert "max_consecutive_faults" in safety.state
    assert safety.command([0.0, 0.0, 0.1], measured) is None
    assert safety.enable(True)[0] and safety.command([0.0, 0.0, 0.1], measured) is not None
    assert safety.invalid_outputs == 5


def test_trajectory_points_are_limited_from_the_measured_position_and_between_points():
    safety = layer()
    points = safety.trajectory(np.array([[0.5, 0.0, 1.0]] * 4 + [[-0.5, 0.0, 1.0]]), np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(points[:, 0], [0.1, 0.2, 0.3, 0.4, 0.3])
    assert safety.trajectory(np.full((2, 3), np.nan), np.zeros(3)) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"upper": [1.0, 2.0]}, "upper: expected one number or 3"),
    ({"max_step": [0.1, 0.0, 0.1]}, "max_joint_step: expected > 0"),
    ({"upper": [-5.0, 2.0, 3.0]}, "above upper"),
    ({"max_consecutive_faults": 0}, "max_consecutive_faults: expected >= 1"),
])
def test_bad_limits_are_refused_with_the_field_named(kwargs, message):
    args = {"lower": LOWER, "upper": UPPER, "max_step": STEP, **kwargs}
    with pytest.raises(SafetyError, match=message):
        SafetyLayer(args["lower"], args["upper"], args["max_step"], args.get("max_consecutive_faults", 3))


def test_per_joint_broadcasts_one_number():
    np.testing.assert_array_equal(per_joint("max_joint_step", [0.2], 3), [0.2, 0.2, 0.2])
    with pytest.raises(SafetyError, match="max_joint_step: expected finite"):
        per_joint("max_joint_step", [np.nan], 3)


def test_watchdog_trips_past_the_count_in_its_window_and_recovers():
    dog = DeadlineWatchdog(max_misses=2, window_s=1.0)
    for t in (0.0, 0.1, 0.2):
        dog.miss(t)
    assert dog.tripped(0.3)
    assert not dog.tripped(1.15)  # the first miss left the window
    assert not DeadlineWatchdog(0, 1.0).tripped(0.0)


# --- property-based: any sequence of events ------------------------------------------------------------
finite = st.floats(-10.0, 10.0, allow_nan=False)
joints = st.lists(finite, min_size=3, max_size=3)
target = st.one_of(st.lists(finite, min_size=3, max_size=3),
                   st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]), min_size=3, max_size=3))
event = st.one_of(
    st.tuples(st.just("command"), target, joints),
    st.tuples(st.just("trajectory"), st.lists(target, min_size=1, max_size=4), joints),
    st.tuples(st.just("estop"), st.booleans()),
    st.tuples(st.just("enable"), st.booleans()),
    st.tuples(st.just("hold"), joints),
)


def _distance_outside(q):
    return np.maximum(np.maximum(LOWER - q, q - UPPER), 0.0)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.integers(1, 4), st.lists(event, min_size=1, max_size=40))
def test_no_sequence_of_events_breaks_the_limits_the_step_limit_or_the_latch(start_enabled, max_faults, events):
    safety = layer(start_enabled=start_enabled, max_consecutive_faults=max_faults)
    reference = None  # what the next command must stay within max_step of (None: the measured position)
    estop, latched, enabled = False, False, start_enabled
    for item in events:
        kind = item[0]
        if kind == "estop":
            safety.estop(item[1])
            estop = item[1]
            if item[1]:
                latched, enabled = True, False
        elif kind == "enable":
            ok, _ = safety.enable(item[1])
            if item[1]:
                assert ok == (not estop)
                if ok:
                    latched, enabled, reference = False, True, None
            else:
                enabled = False
        elif kind == "hold":
            measured = np.array(item[1])
            out = safety.hold(measured)
            if reference is not None:  # toward the measured position, one step at most from the previous command
                np.testing.assert_allclose(out, reference + np.clip(measured - reference, -STEP, STEP))
            else:
                np.testing.assert_array_equal(out, measured)
            reference = out
        else:
            measured = np.array(item[2])
            targets = np.array(item[1], dtype=np.float64).reshape(-1, 3)
            out = safety.command(targets[0], measured) if kind == "command" else safety.trajectory(targets, measured)
            if out is None:
                if not safety.enabled:
                    enabled = False
                continue
            assert enabled and not latched and not estop, "a command while disabled, latched or e-stopped"
            assert np.all(np.isfinite(targets)), "a command from a non-finite target"
            points = np.asarray(out).reshape(-1, 3)
            start = measured if (kind == "trajectory" or reference is None) else reference
            for point in points:
                assert np.all(np.abs(point - start) <= STEP + 1e-12), "step limit broken"
                # inside the limits, or one step closer to them than where it started
                outside_before, outside_now = _distance_outside(start), _distance_outside(point)
                assert np.all((outside_now <= 1e-12) | (outside_now <= outside_before - np.minimum(
                    STEP, outside_before) + 1e-9)), "limits broken"
                start = point
            reference = points[-1]

