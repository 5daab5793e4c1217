"""Logic of the ROS nodes, in this process: joint matching, history, chunk execution, expert hold, validation."""
import math

import numpy as np
import pytest

from vdd_ros.ros.command_executor import ChunkExecutor, ExpertHold
from vdd_ros.ros.observation import (
    ObservationAssembler,
    ObservationError,
    ObservationHistory,
    match_joints,
    spec_mismatches,
)
from vdd_ros.spec import ObservationField
from vdd_ros.tasks import arm_avoid

JOINTS = arm_avoid.JOINT_NAMES


def make_spec(history=2, horizon=4, **changes):
    return arm_avoid.task_spec(history, horizon).replace(**changes)


# --- joint matching ---------------------------------------------------------------------
def test_match_joints_any_order_and_extras_ignored():
    index = match_joints(["gripper", "joint_3", "joint_1", "joint_2"], JOINTS)
    assert index.tolist() == [2, 3, 1]


def test_match_joints_names_the_missing_joint():
    with pytest.raises(ObservationError, match=r"lacks joints \['joint_2'\]"):
        match_joints(["joint_1", "joint_3"], JOINTS)


def test_match_joints_rejects_duplicates():
    with pytest.raises(ObservationError, match="'joint_1' twice"):
        match_joints(["joint_1", "joint_1", "joint_2", "joint_3"], JOINTS)


# --- assembler ----------------------------------------------------------------------------
def test_frame_reorders_joints_into_spec_order():
    assembler = ObservationAssembler(make_spec())
    assembler.update_joint_state(["joint_3", "extra", "joint_1", "joint_2"], [3.0, 9.0, 1.0, 2.0],
                                 [0.3, 9.0, 0.1, 0.2], stamp=10.0)
    np.testing.assert_array_equal(assembler.frame(), [1.0, 2.0, 3.0, 0.1, 0.2, 0.3])
    assert assembler.age(10.25) == pytest.approx(0.25)


@pytest.mark.parametrize("names, positions, velocities, message", [
    (list(JOINTS), [0.0, 1.0], [0.0, 0.0, 0.0], "position has 2 entries but JointState.name has 3"),
    (["joint_1", "joint_2", "joint_3"], [0.0, 1.0, 2.0], [0.0], "velocity has 1 entries"),
    (["joint_1", "joint_2", "joint_3"], [0.0, 1.0, 2.0], [], "velocity is empty"),
    (list(JOINTS), [0.0, math.nan, 2.0], [0.0] * 3, r"position is not finite for joints \['joint_2'\]"),
    (list(JOINTS), [0.0, 1.0, 2.0], [0.0, 0.0, math.inf], r"velocity is not finite for joints \['joint_3'\]"),
    (["joint_1", "joint_2"], [0.0, 1.0], [0.0, 0.0], r"lacks joints \['joint_3'\]"),
])
def test_bad_joint_states_are_refused_and_keep_the_previous_value(names, positions, velocities, message):
    assembler = ObservationAssembler(make_spec())
    assembler.update_joint_state(JOINTS, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], stamp=1.0)
    with pytest.raises(ObservationError, match=message):
        assembler.update_joint_state(names, positions, velocities, stamp=2.0)
    np.testing.assert_array_equal(assembler.frame()[:3], [1.0, 2.0, 3.0])
    assert assembler.age(2.0) == pytest.approx(1.0)


def test_vector_fields_and_missing_sources():
    fields = make_spec().observation_fields + (ObservationField("goal", "vector", 3, topic="goal",
                                                                msg_type="geometry_msgs/PointStamped"),)
    spec = make_spec(observation_fields=fields,
                     normalization=arm_avoid.task_spec(1, 1).normalization.identity(9, 3))
    assembler = ObservationAssembler(spec)
    assert assembler.missing() == ["joint_states", "goal"]
    assert assembler.age(0.0) == math.inf
    with pytest.raises(ObservationError, match="no message yet"):
        assembler.frame()
    assembler.update_joint_state(JOINTS, [1.0, 2.0, 3.0], [0.0] * 3, stamp=5.0)
    with pytest.raises(ObservationError, match="expected 3 numbers, got 2"):
        assembler.update_vector("goal", [1.0, 2.0], stamp=5.0)
    assembler.update_vector("goal", [7.0, 8.0, 9.0], stamp=4.0)
    assert assembler.frame().tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 7.0, 8.0, 9.0]
    assert assembler.age(6.0) == pytest.approx(2.0)  # the oldest source counts


# --- history ------------------------------------------------------------------------------
def test_history_pads_with_the_first_frame_like_offline_rollouts():
    history = ObservationHistory(3, 2)
    with pytest.raises(ObservationError, match="empty"):
        history.window()
    history.push([1.0, 1.0])
    np.testing.assert_array_equal(history.window(), [[1, 1], [1, 1], [1, 1]])
    history.push([2.0, 2.0])
    np.testing.assert_array_equal(history.window(), [[1, 1], [1, 1], [2, 2]])
    history.push([3.0, 3.0])
    history.push([4.0, 4.0])
    np.testing.assert_array_equal(history.window(), [[2, 2], [3, 3], [4, 4]])
    history.clear()
    history.push([5.0, 5.0])
    np.testing.assert_array_equal(history.window(), [[5, 5]] * 3)
    with pytest.raises(ObservationError, match="expected 2 numbers, got 3"):
        history.push([1.0, 2.0, 3.0])


class _EnoughError(Exception):
    pass


def first_windows_of_rollout(n_episodes: int, history: int, calls: int) -> list[np.ndarray]:
    """The observation windows ``tasks.arm_avoid.rollout`` hands its policy in its first ``calls`` calls."""
    seen = []
    policy = arm_avoid.ScriptedPolicy(horizon=4, execute_steps=1)

    def recording(windows):
        seen.append(windows.copy())
        if len(seen) == calls:
            raise _EnoughError
        return policy(windows)

    recording.start_batch = policy.start_batch
    with pytest.raises(_EnoughError):
        arm_avoid.rollout(recording, n_episodes, seed=4, history=history, execute_steps=1, batch_size=n_episodes)
    return seen


def test_history_window_matches_offline_rollout_window():
    """Fed the frames of a real offline rollout, the node's history gives the window rollout gave its policy."""
    h = 3
    windows = first_windows_of_rollout(1, h, calls=5)
    history = ObservationHistory(h, windows[0].shape[-1])
    for window in windows:
        history.push(window[0, -1])  # the newest frame of rollout's window
        np.testing.assert_array_equal(history.window(), window[0])
    assert not np.array_equal(windows[0][0, 0], windows[-1][0, 0])  # the window moved: padding alone is not it


# --- chunk execution ----------------------------------------------------------------------
def test_chunk_executor_replans_every_n_ticks():
    executor = ChunkExecutor(horizon=4, replan_every=2)
    plans, actions = 0, []
    for _ in range(6):
        if executor.needs_plan:
            plans += 1
            executor.load(np.arange(4)[:, None] * np.ones((1, 3)) + 10 * plans)
        actions.append(executor.next_action()[0])
    assert plans == 3
    assert actions == [10, 11, 20, 21, 30, 31]


def test_chunk_executor_remaining_and_errors():
    executor = ChunkExecutor(horizon=3, replan_every=3)
    assert executor.needs_plan
    with pytest.raises(ValueError, match="used up"):
        executor.next_action()
    with pytest.raises(ValueError, match=r"expected shape \[3, n_joints\], got \[2, 3\]"):
        executor.load(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="action chunk: expected finite numbers"):
        executor.load(np.full((3, 3), np.nan))
    executor.load(np.arange(9.0).reshape(3, 3))
    executor.next_action()
    np.testing.assert_array_equal(executor.remaining(), [[3, 4, 5], [6, 7, 8]])
    executor.clear()
    assert executor.needs_plan
    with pytest.raises(ValueError, match=r"replan_every: expected an integer in \[1, 3\], got 4"):
        ChunkExecutor(horizon=3, replan_every=4)


# --- expert hold --------------------------------------------------------------------------
def run_hold(hold, gatings, choose):
    """Drive ExpertHold as the node does; ``choose(gating)`` is the free choice. Returns experts and calls."""
    experts, calls = [], 0
    for tick, gating in enumerate(gatings):
        held = hold.candidate(tick)
        calls += 1
        expert = held if held is not None else choose(gating)
        if held is not None and not hold.keeps(tick, gating):
            hold.release()
            held = None
            calls += 1
            expert = choose(gating)
        hold.record(tick, expert, held=held is not None)
        experts.append(expert)
    return experts, calls


def test_expert_hold_by_ticks():
    gatings = [np.eye(3)[i] for i in (0, 1, 2, 1, 2, 0, 1)]  # the argmax changes every tick
    experts, calls = run_hold(ExpertHold(hold_ticks=3), gatings, lambda g: int(np.argmax(g)))
    assert experts == [0, 0, 0, 1, 1, 1, 1]  # kept 3 ticks, then chosen afresh and kept again
    assert calls == 7  # a hold by ticks alone never needs a second model call


def test_expert_hold_by_weight_releases_below_threshold():
    gatings = [np.array([0.6, 0.4]), np.array([0.4, 0.6]), np.array([0.25, 0.75]), np.array([0.1, 0.9])]
    experts, calls = run_hold(ExpertHold(hold_ticks=0, min_weight=0.3), gatings, lambda g: int(np.argmax(g)))
    assert experts == [0, 0, 1, 1]
    assert calls == 5  # the release at tick 2 re-runs the model once


def test_no_hold_chooses_freely_every_time():
    hold = ExpertHold()
    hold.record(0, 2, held=False)
    assert hold.candidate(1) is None


def test_expert_hold_validates_its_settings():
    with pytest.raises(ValueError, match="expert_hold_ticks"):
        ExpertHold(hold_ticks=-1)
    with pytest.raises(ValueError, match="expert_hold_min_weight"):
        ExpertHold(min_weight=1.5)


# --- spec vs parameters -------------------------------------------------------------------
def test_spec_mismatches_name_both_sides():
    spec = make_spec()
    assert spec_mismatches(spec, [], 0.0) == []
    assert spec_mismatches(spec, list(JOINTS), 20.0) == []
    problems = spec_mismatches(spec, ["joint_1", "joint_2", "wrist"], 50.0)
    assert len(problems) == 2
    assert "['joint_1', 'joint_2', 'wrist']" in problems[0] and "['joint_1', 'joint_2', 'joint_3']" in problems[0]
    assert "parameter 50.0 != model spec 20.0" in problems[1]
    assert spec_mismatches(spec, [], 500.0, allow_rate_override=True) == []
    for kind in ("joint_delta", "joint_velocity"):  # every action kind the spec allows runs now
        assert spec_mismatches(make_spec(action_kind=kind), [], 0.0) == []


# --- offline start poses ----------------------------------------------------------------
def test_sim_node_start_poses_match_offline_rollout_starts(domain_id):
    """arm_sim_node draws one start per episode from its seed; rollout draws the starts of a batch at once:
    the node's episodes start where rollout's episodes with the same seed start."""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from vdd_ros.ros.arm_sim_node import ArmSimNode

    n, seed = 5, 4
    offline = first_windows_of_rollout(n, 1, calls=1)[0][:, -1, :len(JOINTS)]  # each episode's first frame
    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        node = ArmSimNode("start_pose_test", context=context, parameter_overrides=[Parameter("seed", value=seed)])
        starts = [node.start_q.copy()]
        for _ in range(n - 1):
            node._begin_episode()
            starts.append(node.start_q.copy())
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    np.testing.assert_array_equal(np.array(starts), offline)


def test_throttled_warnings_log_each_key_once_per_period():
    from vdd_ros.ros.spin import ThrottledWarnings

    class Lines:
        def __init__(self):
            self.lines = []

        def warning(self, text):
            self.lines.append(text)

    logger = Lines()
    warn = ThrottledWarnings(logger, period_s=60.0)
    warn("a", "first")
    warn("a", "again")  # same key within the period: dropped
    warn("b", "other")
    assert logger.lines == ["first", "other"]
    ThrottledWarnings(logger, period_s=0.0)("a", "x")
    assert logger.lines[-1] == "x"
