"""arm_avoid: kinematics, simulator limits and events, routes, metrics, demonstrator, rollouts."""
import math

import numpy as np
import pytest

from vdd_ros.tasks import arm_avoid as A  # noqa: N812 - the task module, used on every line

CFG = A.DEFAULT_CONFIG


def q_at(points) -> np.ndarray:
    """Joint postures reaching EE ``points`` [B, 2] (IK walked from the start posture)."""
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    q = np.repeat(np.asarray(CFG.start_q)[None], len(points), 0)
    for frac in np.linspace(0.0, 1.0, 30)[1:]:
        q = A.inverse_kinematics(np.asarray(CFG.start_ee) + frac * (points - np.asarray(CFG.start_ee)), q)
    return q


@pytest.fixture(scope="module")
def demos():
    return A.generate_demonstrations(96, seed=3)


# --- kinematics --------------------------------------------------------------------------
def test_start_posture_reaches_start_point():
    np.testing.assert_allclose(A.forward_kinematics(CFG.start_q), CFG.start_ee, atol=1e-4)


def test_jacobian_matches_finite_differences():
    q = np.array([0.3, 1.2, 0.9])
    eps = 1e-6
    numeric = np.stack([(A.forward_kinematics(q + eps * e) - A.forward_kinematics(q - eps * e)) / (2 * eps)
                        for e in np.eye(3)], axis=-1)
    np.testing.assert_allclose(A.jacobian(q), numeric, atol=1e-6)


def test_whole_field_is_reachable_inside_the_limits():
    wide = 2 * CFG.obstacle_spacing  # the outermost gap centres
    corners = [(-wide, CFG.finish_y + 0.08), (wide, CFG.finish_y + 0.08), (-wide, 0.35), (wide, 0.35)]
    q = q_at(corners)
    np.testing.assert_allclose(A.forward_kinematics(q), corners, atol=1e-3)
    reach = np.linalg.norm(corners, axis=-1).max()
    assert reach < 0.85 * sum(CFG.link_lengths)  # away from full extension


def test_inverse_kinematics_rejects_unreachable_target():
    with pytest.raises(ValueError, match="target missed"):
        A.inverse_kinematics(np.array([[2.0, 0.0]]), np.asarray(CFG.start_q)[None])


# --- simulator ----------------------------------------------------------------------------
def test_velocity_limit_applied():
    sim = A.ArmSim(batch=1)
    sim.reset(np.random.default_rng(0), q0=CFG.start_q)
    target = np.asarray(CFG.start_q) + np.array([1.0, -1.0, 1.0])
    sim.step_physics(target[None])
    np.testing.assert_allclose(np.abs(sim.qdot[0]), CFG.joint_velocity_limits)
    np.testing.assert_allclose(sim.q[0] - CFG.start_q, np.array([1, -1, 1]) * np.asarray(CFG.joint_velocity_limits)
                               / A.PHYSICS_RATE_HZ)


def test_servo_is_first_order_below_the_limit():
    sim = A.ArmSim(batch=1)
    sim.reset(np.random.default_rng(0), q0=CFG.start_q)
    step = np.array([0.01, -0.02, 0.005])
    sim.step_physics((np.asarray(CFG.start_q) + step)[None])
    np.testing.assert_allclose(sim.qdot[0], CFG.servo_gain * step)


def test_joint_position_limits_applied():
    sim = A.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), q0=np.array([CFG.start_q, CFG.start_q]))
    far = np.array([[10.0, 10.0, 10.0], [-10.0, -10.0, -10.0]])
    for _ in range(4 * A.PHYSICS_RATE_HZ):
        sim.step_physics(far)
    # the EE leaves through obstacles or the finish; whatever ended it, positions stay in the limits
    assert np.all(sim.q >= np.asarray(CFG.joint_lower) - 1e-12)
    assert np.all(sim.q <= np.asarray(CFG.joint_upper) + 1e-12)


def test_targets_and_start_beyond_the_limits_are_clipped():
    above = np.array([CFG.joint_upper[0] + 0.5, CFG.start_q[1], CFG.start_q[2]])
    sim = A.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), q0=np.array([above, CFG.start_q]))
    assert sim.q[0, 0] == CFG.joint_upper[0]
    # a target beyond the limit acts exactly like a target at the limit
    at_limit = np.array([CFG.joint_upper[0], CFG.start_q[1], CFG.start_q[2]])
    beyond = at_limit + np.array([3.0, 0.0, 0.0])
    twin = A.ArmSim(batch=2)
    twin.reset(np.random.default_rng(0), q0=np.array([CFG.start_q, CFG.start_q]))
    sim.reset(np.random.default_rng(0), q0=np.array([CFG.start_q, CFG.start_q]))
    for _ in range(50):
        sim.step_physics(np.array([beyond, beyond]))
        twin.step_physics(np.array([at_limit, at_limit]))
    np.testing.assert_array_equal(sim.q, twin.q)
    assert np.all(sim.q[:, 0] <= CFG.joint_upper[0])


def test_collision_when_ee_inside_obstacle():
    obstacle = CFG.obstacles[0]
    inside = obstacle + np.array([CFG.obstacle_radius + CFG.ee_radius - 0.002, 0.0])
    outside = obstacle + np.array([CFG.obstacle_radius + CFG.ee_radius + 0.002, 0.0])
    sim = A.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), q0=q_at([inside, outside]))
    assert sim.collision.tolist() == [True, False]
    assert sim.done.tolist() == [True, False]
    assert not sim.success.any()


def test_collision_while_moving_freezes_the_episode():
    below = CFG.obstacles[0] - np.array([0.0, 0.06])
    above = CFG.obstacles[0] + np.array([0.0, 0.03])
    sim = A.ArmSim(batch=1)
    sim.reset(np.random.default_rng(0), q0=q_at([below]))
    target = q_at([above])
    for _ in range(A.PHYSICS_RATE_HZ):
        sim.step_physics(target)
    assert sim.collision[0] and sim.done[0] and not sim.success[0]
    distance = np.linalg.norm(sim.ee_position()[0] - CFG.obstacles[0])
    assert distance < CFG.obstacle_radius + CFG.ee_radius
    frozen = sim.q.copy()
    sim.step_physics(target)
    np.testing.assert_array_equal(sim.q, frozen)
    assert sim.ee_path(0).shape == (sim.ticks[0] + 1, 2)
    np.testing.assert_array_equal(sim.ee_paths()[0], sim.ee_path(0))


def test_success_at_finish_line_and_timeout():
    sim = A.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), q0=q_at([(0.3, CFG.finish_y - 0.01), (0.3, 0.5)]))
    targets = q_at([(0.3, CFG.finish_y + 0.05), (0.31, 0.5)])
    while not sim.done.all():
        sim.step_physics(targets)
    assert sim.success.tolist() == [True, False]
    assert sim.timeout.tolist() == [False, True]
    assert sim.time[1] == pytest.approx(CFG.max_episode_s)
    assert sim.route(0) is None  # it never crossed the rows


def test_observation_frame_is_positions_then_velocities():
    sim = A.ArmSim(batch=3)
    sim.reset(np.random.default_rng(1))
    sim.step_physics(sim.q + 0.01)
    frame = sim.observation_frame()
    assert frame.shape == (3, 6)
    np.testing.assert_array_equal(frame[:, :3], sim.q)
    np.testing.assert_array_equal(frame[:, 3:], sim.qdot)


def test_step_rejects_bad_target_shape():
    sim = A.ArmSim(batch=2)
    with pytest.raises(ValueError, match="q_target"):
        sim.step_physics(np.zeros((3, 3)))


# --- routes and entropy ----------------------------------------------------------------------------
def hand_path(gap_xs):
    """Straight segments through the given x at each row's y, from below the field to the finish."""
    ys = np.concatenate([[0.3], CFG.row_y, [CFG.finish_y]])
    xs = np.concatenate([[0.0], gap_xs, [gap_xs[-1]]])
    return np.stack([xs, ys], axis=-1)


def test_route_classification_of_hand_built_paths():
    s = CFG.obstacle_spacing
    assert A.classify_route(hand_path([-s / 2, -s, -1.5 * s, -2 * s])) == 0  # always left
    assert A.classify_route(hand_path([s / 2, s, 1.5 * s, 2 * s])) == 15  # always right
    assert A.classify_route(hand_path([s / 2, 0.0, s / 2, 0.0])) == 0b1010
    assert A.classify_route(hand_path([-s / 2, 0.01, -s / 2 + 0.02, 0.03])) == 0b0101
    # jumping from the leftmost gap to the rightmost one is no pyramid route
    assert A.classify_route(hand_path([-s / 2, s, 1.5 * s, 2 * s])) is None
    # a path that stops before the last row
    assert A.classify_route(hand_path([-s / 2, -s, -1.5 * s, -2 * s])[:4]) is None


def test_route_gaps_inverts_classification():
    for route in range(A.N_ROUTES):
        xs = [CFG.gap_x(row, gap) for row, gap in enumerate(A.route_gaps(route))]
        assert A.classify_route(hand_path(xs)) == route
    with pytest.raises(ValueError, match="route"):
        A.route_gaps(16)


def test_behaviour_entropy():
    assert A.behaviour_entropy(list(range(16)) * 3) == pytest.approx(1.0)
    assert A.behaviour_entropy([5] * 20) == 0.0
    assert A.behaviour_entropy([]) == 0.0
    assert A.behaviour_entropy([None, None]) == 0.0
    assert A.behaviour_entropy([0, 1, None]) == pytest.approx(math.log(2) / math.log(16))
    assert A.behaviour_entropy([0, 1], n_routes=2) == pytest.approx(1.0)


# --- demonstrator -----------------------------------------------------------------------------------
def test_demonstrations_succeed_on_every_route(demos):
    assert demos.n_episodes == 96
    assert sorted(np.bincount(demos.routes, minlength=16)) == [6] * 16
    result = A.evaluate_dataset(demos)
    assert result.success_rate == 1.0
    assert result.collision_rate == 0.0
    assert result.entropy >= 0.9
    assert result.routes == demos.routes.tolist()
    lengths = np.diff(np.concatenate([[0], demos.episode_ends]))
    assert 2.0 * A.CONTROL_RATE_HZ <= lengths.min() and lengths.max() <= 5.0 * A.CONTROL_RATE_HZ


def test_demonstrations_keep_clear_of_obstacles(demos):
    result = A.evaluate_dataset(demos)
    closest = min(np.linalg.norm(path[:, None] - CFG.obstacles[None], axis=-1).min() for path in result.ee_paths)
    assert closest > CFG.obstacle_radius + 2 * CFG.ee_radius


def test_demonstrations_are_smooth_and_within_limits(demos):
    obs, act = demos.observations, demos.actions
    assert np.all(act >= np.asarray(CFG.joint_lower)) and np.all(act <= np.asarray(CFG.joint_upper))
    assert np.all(np.abs(obs[:, 3:]) < 0.5 * np.asarray(CFG.joint_velocity_limits))
    starts = set(demos.episode_starts.tolist())
    jumps = [np.abs(act[i] - act[i - 1]).max() for i in range(1, len(act)) if i not in starts]
    assert max(jumps) < 0.05


def test_demonstrations_are_deterministic():
    a, b = A.generate_demonstrations(20, seed=7), A.generate_demonstrations(20, seed=7)
    c = A.generate_demonstrations(20, seed=8)
    np.testing.assert_array_equal(a.observations, b.observations)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert a.observations.shape != c.observations.shape or not np.array_equal(a.observations, c.observations)


def test_demonstration_spec_is_the_task_spec(demos):
    assert demos.spec == A.task_spec(1, 1)
    assert demos.task == "arm_avoid"


# --- task spec and rollouts ---------------------------------------------------------------------------
def test_task_spec():
    spec = A.task_spec(history=2, horizon=8)
    assert spec.joint_names == A.JOINT_NAMES
    assert [f.name for f in spec.observation_fields] == ["joint_position", "joint_velocity"]
    assert (spec.obs_step_dim, spec.obs_dim, spec.act_dim) == (6, 12, 24)
    assert spec.action_kind == "joint_position" and spec.control_rate_hz == A.CONTROL_RATE_HZ
    assert spec.task == "arm_avoid" and spec.joint_lower == CFG.joint_lower
    assert spec.normalization.obs_std == (1.0,) * 6


class ReplayPolicy:
    """Plays the demonstrations' chunks open-loop, one batch row per demonstration episode."""

    def __init__(self, demos, horizon):
        self.episodes = [demos.episode(i)[1] for i in range(demos.n_episodes)]
        self.horizon = horizon
        self.step = 0
        self.windows = []

    def __call__(self, windows):
        self.windows.append(windows.copy())
        chunk = []
        for actions in self.episodes[: len(windows)]:
            idx = np.minimum(np.arange(self.step, self.step + self.horizon), len(actions) - 1)
            chunk.append(actions[idx])
        self.step += self.horizon
        return np.stack(chunk)


def test_rollout_pads_history_and_executes_chunks(demos):
    policy = ReplayPolicy(demos, horizon=1)
    A.rollout(policy, n_episodes=3, seed=11, history=3, batch_size=8)
    w0, w1, w2 = policy.windows[:3]
    assert w0.shape == (3, 3, 6)
    first = w0[:, 2]
    # the history is padded with the first frame, oldest first, until real frames fill it
    for padded in (w0[:, 0], w0[:, 1], w1[:, 0], w1[:, 1], w2[:, 0]):
        np.testing.assert_array_equal(padded, first)
    np.testing.assert_array_equal(w2[:, 1], w1[:, 2])
    assert not np.array_equal(w1[:, 2], first)
    chunked = ReplayPolicy(demos, horizon=4)
    result = A.rollout(chunked, n_episodes=3, seed=11, history=3, batch_size=8)
    # each query executes the whole chunk of 4: about a quarter as many queries
    assert abs(len(chunked.windows) - len(policy.windows) / 4) <= 1
    assert result.n_episodes == 3 and len(result.ee_paths) == 3
    summary = result.to_dict()
    assert summary["episodes"] == 3 and sum(summary["route_counts"]) == sum(r is not None for r in result.routes)


def test_rollout_execute_steps_limits_the_executed_part_of_a_chunk():
    def hold_still(queries):
        def policy(windows):
            queries.append(len(windows))
            return np.repeat(windows[:, -1:, :3], 8, axis=1)
        return policy
    whole, part = [], []
    result = A.rollout(hold_still(whole), n_episodes=2, seed=1, history=1)
    A.rollout(hold_still(part), n_episodes=2, seed=1, history=1, execute_steps=2)
    steps = round(CFG.max_episode_s * A.CONTROL_RATE_HZ)  # holding still times out
    assert (len(whole), len(part)) == (steps // 8, steps // 2)
    assert result.success_rate == 0.0 and result.routes == [None, None]
    assert math.isnan(result.mean_time_to_finish) and result.to_dict()["mean_time_to_finish_s"] is None


def test_rollout_is_seeded_and_start_states_do_not_depend_on_batch_size(demos):
    def run(seed, batch_size):
        return A.rollout(ReplayPolicy(demos, horizon=8), n_episodes=4, seed=seed, history=1, batch_size=batch_size)
    a, b, c, d = run(5, 4), run(5, 4), run(6, 4), run(5, 3)
    for path_a, path_b in zip(a.ee_paths, b.ee_paths):
        np.testing.assert_array_equal(path_a, path_b)
    assert a.routes == b.routes
    assert not np.array_equal(a.ee_paths[0][0], c.ee_paths[0][0])
    np.testing.assert_array_equal([p[0] for p in a.ee_paths], [p[0] for p in d.ee_paths])


def test_rollout_of_recorded_targets_mostly_succeeds(demos):
    # the recorded targets, open loop from a slightly different random start, still follow the route
    result = A.rollout(ReplayPolicy(demos, horizon=8), n_episodes=16, seed=2, history=1, execute_steps=8)
    assert result.success_rate >= 0.9
    assert result.routes[: 16] == [r if ok else None for r, ok in zip(demos.routes[:16].tolist(), result.success)]


def test_scripted_policy_in_closed_loop_rollout():
    result = A.rollout(A.ScriptedPolicy(horizon=8), n_episodes=48, seed=4, history=2, batch_size=24)
    assert result.success_rate == 1.0
    assert result.entropy >= 0.9 and result.routes_covered >= 14
    assert 2.0 < result.mean_time_to_finish < 5.0
    assert all(path[-1, 1] >= CFG.finish_y for path in result.ee_paths)


def test_rollout_rejects_bad_policy_output():
    with pytest.raises(ValueError, match="policy output"):
        A.rollout(lambda w: np.zeros((len(w), 3)), n_episodes=2, seed=0, history=1)


def test_plot_rollouts_writes_png(tmp_path, demos):
    result = A.evaluate_dataset(demos)
    out = A.plot_rollouts({"demos": result, "raw": (result.ee_paths[:3], [None, 1, 2])}, str(tmp_path / "r.png"))
    data = (tmp_path / "r.png").read_bytes()
    assert out.endswith("r.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]
