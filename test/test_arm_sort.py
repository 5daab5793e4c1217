"""The arm_sort task: demonstrator, route classification, second-order dynamics, dataset round trip,
and `vdd eval`'s rows of a mixture's greedy policy and of each expert forced alone."""
import json

import numpy as np
import pytest

from vdd_ros.tasks import arm_sort
from vdd_ros.tasks.registry import load_dataset, task_module

CFG = arm_sort.DEFAULT_CONFIG


@pytest.fixture(scope="module")
def demos():
    return arm_sort.generate_demonstrations(120, seed=4)


def test_registered_with_its_own_interface():
    assert task_module("arm_sort") is arm_sort
    spec = arm_sort.task_spec(2, 8)
    assert spec.joint_names == ("shoulder", "elbow") and spec.control_rate_hz == 10.0
    visited = spec.observation_fields[1]
    assert (visited.name, visited.kind, visited.size, visited.topic, visited.msg_type) == \
        ("visited", "vector", 3, "task_state", "std_msgs/Float64MultiArray")
    assert arm_sort.N_ROUTES == 6 and len(set(arm_sort.ROUTES)) == 6
    assert arm_sort.PHYSICS_RATE_HZ // arm_sort.CONTROL_RATE_HZ == arm_sort.TICKS_PER_CONTROL == 10


def test_demonstrator_succeeds_on_every_route(demos):
    result = arm_sort.evaluate_dataset(demos)
    assert result.success_rate == 1.0 and result.collision_rate == 0.0 and result.timeout_rate == 0.0
    assert result.entropy >= 0.9 and result.routes_covered == 6
    # the replayed routes are the recorded ones, and the episodes vary (timing, via points)
    assert list(demos.routes) == result.routes
    lengths = np.diff(np.concatenate([[0], demos.episode_ends]))
    assert lengths.std() > 2.0
    # the visited flags in the frames switch on one at a time, in the route's order
    obs, _ = demos.episode(0)
    switched = np.diff(obs[:, 2:], axis=0)
    order = [int(np.argmax(switched[i])) for i in np.nonzero(switched.any(-1))[0]]
    # the last visit ends the episode: the frames show the first two
    assert tuple(order) == arm_sort.ROUTES[demos.routes[0]][:2]


def test_scripted_policy_succeeds_in_closed_loop():
    policy = arm_sort.ScriptedPolicy(horizon=8, execute_steps=4)
    result = arm_sort.rollout(policy, 30, seed=2, history=2, execute_steps=4)
    assert result.success_rate == 1.0 and result.routes_covered >= 4
    assert result.to_dict()["mean_targets_visited"] == 3.0


def test_route_classification_of_hand_built_paths():
    left, top, right = (np.asarray(t) for t in CFG.targets)
    start = np.asarray(CFG.start_ee)

    def through(*points):
        knots = [start, *points]
        return np.concatenate([np.linspace(a, b, 50) for a, b in zip(knots, knots[1:])])

    assert arm_sort.visit_order(through(right, top, left)) == [2, 1, 0]
    assert arm_sort.classify_route(through(right, top, left)) == arm_sort.ROUTES.index((2, 1, 0))
    assert arm_sort.classify_route(through(top, left, right)) == arm_sort.ROUTES.index((1, 0, 2))
    # two targets only: no route; passing 6 cm beside a target (radius 5 cm) does not visit it
    assert arm_sort.classify_route(through(left, top)) is None
    assert arm_sort.visit_order(through(left + [0.0, 0.06], top)) == [1]
    assert arm_sort.route_from_order([0, 0, 1]) is None
    assert arm_sort.route_label(arm_sort.ROUTES.index((0, 1, 2))) == "L-T-R"


def test_second_order_dynamics_lag_overshoot_and_limits():
    sim = arm_sort.ArmSim(batch=1)
    q0 = CFG.start_q
    sim.reset(np.random.default_rng(0), q0)
    step = np.array([0.3, 0.0])
    target = (q0 + step)[None]
    shoulder, velocity, accel = [], [], []
    for _ in range(200):
        before = sim.qdot.copy()
        sim.step_physics(target)
        shoulder.append(sim.q[0, 0])
        velocity.append(sim.qdot[0, 0])
        accel.append((sim.qdot[0, 0] - before[0, 0]) * arm_sort.PHYSICS_RATE_HZ)
        if sim.done[0]:
            break
    shoulder = np.asarray(shoulder) - q0[0]
    # lag: after one control period (10 ticks) the joint has covered well under half of the step
    assert 0.0 < shoulder[9] < 0.5 * step[0]
    # underdamped: it overshoots the target, then settles on it
    assert shoulder.max() > step[0] * 1.05
    assert abs(shoulder[-1] - step[0]) < 0.01
    # limits: acceleration and velocity never exceed theirs
    assert np.max(np.abs(accel)) <= CFG.joint_acceleration_limits[0] + 1e-9
    assert np.max(np.abs(velocity)) <= CFG.joint_velocity_limits[0] + 1e-9
    # a large step saturates the velocity limit
    sim.reset(np.random.default_rng(0), q0)
    peak = 0.0
    for _ in range(100):
        sim.step_physics((q0 + [1.2, 0.0])[None])
        peak = max(peak, float(np.abs(sim.qdot).max()))
    assert peak == pytest.approx(CFG.joint_velocity_limits[0])


def test_joint_limit_is_a_collision_and_holding_still_times_out():
    sim = arm_sort.ArmSim(batch=2)
    sim.reset(np.random.default_rng(0), np.stack([CFG.start_q, CFG.start_q]))
    targets = np.stack([[CFG.joint_upper[0] + 1.0, CFG.start_q[1]], CFG.start_q])
    while not sim.done.all():
        sim.step_physics(targets)
    assert sim.collision.tolist() == [True, False] and sim.timeout.tolist() == [False, True]
    assert sim.q[0, 0] == pytest.approx(CFG.joint_upper[0])
    assert sim.time[1] == pytest.approx(CFG.max_episode_s)
    assert sim.route(0) is None and sim.route(1) is None


def test_dataset_round_trip(demos, tmp_path):
    path = tmp_path / "sort.npz"
    demos.save(str(path))
    loaded = load_dataset(str(path), expected_task="arm_sort")
    assert loaded.task == "arm_sort" and loaded.spec.interface_differences(demos.spec) == []
    np.testing.assert_array_equal(loaded.observations, demos.observations)
    np.testing.assert_array_equal(loaded.actions, demos.actions)
    np.testing.assert_array_equal(loaded.routes, demos.routes)
    png = tmp_path / "sort.png"
    arm_sort.plot_dataset(loaded, str(png), max_episodes=20)
    assert png.stat().st_size > 10_000


def test_vdd_demos_cli_writes_the_task(tmp_path, capsys):
    from vdd_ros.cli import main as cli_main

    out = tmp_path / "d.npz"
    assert cli_main.main(["demos", "--task", "arm_sort", "--episodes", "12", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "arm_sort" and summary["success"] == 1.0 and summary["routes_covered"] == 6
    assert load_dataset(str(out)).task == "arm_sort"


def test_eval_reports_greedy_and_every_expert_forced_alone(tmp_path, capsys):
    """A tiny EM mixture of arm_sort: `vdd eval` takes the task from the checkpoint and adds, per expert
    forced alone and for the greedy policy, success / collision / timeout over --expert-episodes."""
    import torch

    from vdd_ros.cli import learn as learn_cli
    from vdd_ros.cli import main as cli_main
    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.learn.pipeline import MixturePolicy

    torch.set_num_threads(1)
    modules = tuple(dict.fromkeys(cli_main.SUBCOMMAND_MODULES + ("vdd_ros.cli.learn",)))
    em = tmp_path / "em.pt"
    original = cli_main.SUBCOMMAND_MODULES
    cli_main.SUBCOMMAND_MODULES = modules
    try:
        # no per-task settings: the chunk (0.8 s at 10 Hz) and the fields (no velocities) come from the data
        assert cli_main.main(["train-em", "--set", "task=arm_sort", "--set", "episodes=24", "--set", "dataset_seed=1",
                              "--out", str(em), "--set", "iterations=4",
                              "--set", "n_experts=3", "--set", "backbone.hidden=32", "--set", "backbone.mlp_layers=2",
                              "--quiet"]) == 0
        derived = capsys.readouterr().out
        assert "horizon 8 actions (0.8 s at the demonstrations' 10 Hz)" in derived
        assert "execute_steps 4 (half the horizon)" in derived
        assert "observation fields ['joint_position', 'visited']" in derived
        table = tmp_path / "eval.json"
        assert cli_main.main(["eval", "--em", str(em), "--episodes", "4", "--expert-episodes", "3",
                              "--timing-repeats", "2", "--json", str(table), "--plot", str(tmp_path / "e.png")]) == 0
    finally:
        cli_main.SUBCOMMAND_MODULES = original
    printed = capsys.readouterr().out
    assert "expert 2 alone" in printed and "greedy" in printed and "/6" in printed and "timeout" in printed
    report = json.loads(table.read_text())
    assert report["task"] == "arm_sort"
    row = report["models"][0]
    assert row["task"] == "arm_sort" and row["routes_covered"] <= 6
    assert [e["expert"] for e in row["experts"]] == [0, 1, 2]
    for rates in [row, row["greedy"], *row["experts"]]:
        total = rates["success_rate"] + rates["collision_rate"] + rates["timeout_rate"]
        assert total == pytest.approx(1.0)
    assert row["greedy"]["episodes"] == 3 and all(e["episodes"] == 3 for e in row["experts"])
    # forcing an expert really picks that expert's mean
    checkpoint = load_checkpoint(str(em))
    assert checkpoint.spec.action_horizon == 8 and checkpoint.spec.model_info["execute_steps"] == 4
    assert [f.name for f in checkpoint.spec.observation_fields] == ["joint_position", "visited"]
    assert checkpoint.config["horizon"] == 8 and checkpoint.config["task"] == "arm_sort"
    windows = arm_sort.initial_frames(5, 0)[:, None].repeat(checkpoint.spec.history, 1)
    chunks = [MixturePolicy(checkpoint.model, checkpoint.spec, forced_expert=k)(windows) for k in range(3)]
    assert not np.allclose(chunks[0], chunks[1])
    greedy = MixturePolicy(checkpoint.model, checkpoint.spec, greedy=True)(windows)
    with torch.no_grad():
        obs = torch.as_tensor(checkpoint.spec.normalize_obs(windows).reshape(5, -1), dtype=torch.float32)
        best = checkpoint.model.weights_and_means(obs)[0].argmax(-1).numpy()
    np.testing.assert_allclose(greedy, np.stack([chunks[k][i] for i, k in enumerate(best)]), atol=1e-6)
    with pytest.raises(ValueError, match="forced_expert"):
        MixturePolicy(checkpoint.model, checkpoint.spec, forced_expert=3)
    assert learn_cli.format_table([], 6).startswith("model")


def test_vdd_demo_of_arm_sort_needs_a_model_of_that_task(tmp_path, capsys):
    """No arm_sort model is shipped: `vdd demo --task arm_sort` says what to give instead of running arm_avoid's."""
    from vdd_ros.cli import main as cli_main

    assert cli_main.main(["demo", "--task", "arm_sort", "--skip-distill", "--out-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--task arm_sort" in error and "--student" in error and "--teacher-checkpoint" in error
    assert cli_main.main(["demo", "--task", "arm_sorted", "--out-dir", str(tmp_path)]) == 2
    assert "expected one of ['arm_avoid', 'arm_sort']" in capsys.readouterr().err
