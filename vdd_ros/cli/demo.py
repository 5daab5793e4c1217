"""``vdd demo``: the whole pipeline end to end, over ROS 2, without a ROS distribution.

1. the student: distilled from the shipped teacher checkpoint and exported (when torch is
   installed and not ``--skip-distill``), else the shipped ``models/student.onnx``;
2. ``arm_sim_node`` plus two ``policy_node`` processes on the same observations: the student
   drives the simulated arm, the teacher runs in shadow (its commands go to its own topic),
   started exactly as the launch file starts them (``--ros-args --params-file``);
3. the episodes' outcomes over ROS next to offline rollouts of the same models
   (``Policy.act_batch`` + the task's ``rollout``), and each model's inference latency,
   as a table, a JSON file and a plot.

``--task arm_sort`` runs the second built-in task. No model of it is shipped: give
``--student FILE.onnx`` (and ``--teacher FILE.onnx`` for the shadow), or
``--teacher-checkpoint FILE.pt`` (a teacher trained with ``vdd train-teacher --dataset`` on
``vdd demos --task arm_sort`` data): the student is then distilled from it and both are exported.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="end-to-end demo: distil (optional), then drive the simulated arm over ROS 2",
        description="Distil a student from the shipped teacher and export it (when torch is installed; "
        "--skip-distill uses the shipped models/student.onnx), then run the built-in arm task over ROS 2 "
        "(arm_sim_node + policy_node processes on localhost) with the student driving and the teacher in "
        "shadow, and print success rate, behaviour entropy and latency over ROS next to offline rollouts of "
        "the same models. Writes DIR/demo.json and DIR/demo.png.")
    parser.add_argument("--task", default="arm_avoid",
                        help="built-in task: arm_avoid (shipped models) or arm_sort (needs --student or "
                        "--teacher-checkpoint) (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes over ROS (default: %(default)s)")
    parser.add_argument("--offline-episodes", type=int, default=100,
                        help="episodes of each offline evaluation, same seed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the episode start poses, over ROS and offline alike (default: %(default)s)")
    parser.add_argument("--skip-distill", action="store_true",
                        help="use the shipped models/student.onnx instead of distilling a new student")
    parser.add_argument("--student", default=None, help="use this student .onnx (implies --skip-distill)")
    parser.add_argument("--teacher", default=None,
                        help="teacher .onnx for the shadow node and the offline row (default: the shipped "
                        "models/teacher.onnx)")
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="teacher checkpoint to distil from (default: the shipped models/teacher.pt)")
    parser.add_argument("--driver", choices=("student", "teacher"), default="student",
                        help="which model drives the arm; the other runs in shadow (default: %(default)s)")
    parser.add_argument("--lockstep", action="store_true",
                        help="step the simulation one control period per command (exact offline scoring, "
                        "faster than real time) instead of real time")
    parser.add_argument("--out-dir", default="demo_out", help="folder for models, logs, JSON and plot "
                        "(default: %(default)s)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID of the run (default: the environment's, else 42)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="give up on the ROS run after this many seconds (default: %(default)s)")
    parser.set_defaults(func=run)


# --- step 1: the student ----------------------------------------------------------------------
def _vdd(argv: list[str]) -> None:
    """Run a ``vdd`` subcommand in a child process (its own torch, its own progress bar)."""
    from vdd_ros.cli.main import UserError

    print(f"$ vdd {' '.join(argv)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "vdd_ros.cli.main", *argv], env=_child_env())
    if code != 0:
        raise UserError(f"'vdd {' '.join(argv)}' failed with exit status {code}")


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def choose_student(args, out_dir: Path) -> tuple[Path, str]:
    from vdd_ros.cli.main import UserError
    from vdd_ros.paths import model_file

    if args.student:
        return Path(args.student), "given with --student"
    task = getattr(args, "task", "arm_avoid")
    if task != "arm_avoid":
        # the shipped models are arm_avoid's: another task distils from the teacher checkpoint given
        if not args.teacher_checkpoint or args.skip_distill:
            raise UserError(f"--task {task}: no model of this task is shipped; give --student FILE.onnx or "
                            f"--teacher-checkpoint FILE.pt (without --skip-distill)")
        if importlib.util.find_spec("torch") is None:
            raise UserError(f"--task {task} --teacher-checkpoint: distilling needs torch, which is not installed")
        teacher_checkpoint = Path(args.teacher_checkpoint)
        if not teacher_checkpoint.is_file():
            raise UserError(f"--teacher-checkpoint {teacher_checkpoint}: no such file")
        checkpoint, onnx_file = out_dir / "student.pt", out_dir / "student.onnx"
        _vdd(["distill", "--teacher", str(teacher_checkpoint), "--out", str(checkpoint)])
        _vdd(["export", str(checkpoint), "--out", str(onnx_file)])
        return onnx_file, f"distilled here from {teacher_checkpoint}"
    shipped = model_file("student.onnx")
    if args.skip_distill:
        return shipped, "shipped (--skip-distill)"
    if importlib.util.find_spec("torch") is None:
        return shipped, "shipped (torch is not installed: no distillation)"
    teacher_checkpoint = Path(args.teacher_checkpoint) if args.teacher_checkpoint else model_file("teacher.pt")
    if not teacher_checkpoint.is_file():
        return shipped, f"shipped (no teacher checkpoint at {teacher_checkpoint})"
    checkpoint, onnx_file = out_dir / "student.pt", out_dir / "student.onnx"
    _vdd(["distill", "--teacher", str(teacher_checkpoint), "--out", str(checkpoint)])
    _vdd(["export", str(checkpoint), "--out", str(onnx_file)])
    return onnx_file, f"distilled here from {teacher_checkpoint}"


# --- step 3: offline figures -------------------------------------------------------------------
def offline_evaluation(model: Path, episodes: int, seed: int, greedy: bool) -> dict:
    """Offline rollouts of ``model``; a student's run one episode at a time, as the node plans, recording
    each plan's expert (``experts``: per episode)."""
    import numpy as np

    from vdd_ros.ros.episode_monitor import offline_rollout
    from vdd_ros.runtime import load_policy

    policy = load_policy(model, device="cpu")
    rng = np.random.default_rng(seed)
    experts = [] if policy.n_experts else None
    result = offline_rollout(policy, episodes, seed, greedy, rng, experts=experts)
    # the latency of one call as the node makes it (one window), measured on this machine
    window = np.tile(np.asarray(policy.spec.normalization.obs_mean), (policy.spec.history, 1))
    policy.warmup(20)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        policy.act(window, rng, greedy=greedy)
        times.append(time.perf_counter() - started)
    return {"kind": policy.kind, "metrics": result.to_dict(), "latency_s": times, "experts": experts,
            "ee_paths": result.ee_paths, "routes": result.routes, "collisions": [bool(c) for c in result.collision]}


def _command_gap(driver_commands, shadow_commands, max_lag_s: float = 0.025) -> float | None:
    """Mean |driver - shadow| joint target (rad) over shadow commands with a driver command within max_lag_s."""
    import numpy as np

    if not driver_commands or not shadow_commands:
        return None
    times = np.array([t for t, _ in driver_commands])
    gaps = []
    for t, command in shadow_commands:
        i = int(np.argmin(np.abs(times - t)))
        if abs(times[i] - t) <= max_lag_s and len(command) == len(driver_commands[i][1]):
            gaps.append(np.abs(np.asarray(command) - np.asarray(driver_commands[i][1])).mean())
    return float(np.mean(gaps)) if gaps else None


def run(args) -> int:
    import numpy as np

    from vdd_ros.cli.main import UserError
    from vdd_ros.files import write_json
    from vdd_ros.paths import config_file, model_file

    if args.episodes < 1 or args.offline_episodes < 1:
        raise UserError(f"--episodes and --offline-episodes: expected integers >= 1, got {args.episodes} and "
                        f"{args.offline_episodes}")
    from vdd_ros.tasks.registry import TASKS, task_module

    if args.task not in TASKS:
        raise UserError(f"--task: expected one of {sorted(TASKS)}, got '{args.task}'")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student, student_source = choose_student(args, out_dir)
    if not student.is_file():
        raise FileNotFoundError(f"student model {student}: no such file ({student_source})")
    if args.teacher:
        teacher = Path(args.teacher)
    elif args.task == "arm_avoid":
        teacher = model_file("teacher.onnx")
    elif args.teacher_checkpoint:
        teacher = out_dir / "teacher.onnx"
        _vdd(["export", str(args.teacher_checkpoint), "--out", str(teacher)])
    else:
        teacher = None
        if args.driver == "teacher":
            raise UserError(f"--task {args.task} --driver teacher: give --teacher FILE.onnx or --teacher-checkpoint")
        print(f"vdd demo: no teacher of task {args.task} given: the student runs alone")
    if teacher is not None and not teacher.is_file():
        if args.driver == "teacher":
            raise FileNotFoundError(f"teacher model {teacher}: no such file (needed by --driver teacher)")
        print(f"vdd demo: no teacher model at {teacher}: the student runs alone")
        teacher = None
    print(f"vdd demo: student {student} ({student_source}); teacher {teacher or '-'}")
    _check_model_tasks(args.task, [m for m in (student, teacher) if m is not None])

    import rclpy  # noqa: F401  (fails here, with a clear message, where the ROS 2 wheels are missing)

    from vdd_ros.ros.episode_monitor import EpisodeMonitor, expert_switches, latency_summary, summarize_results
    from vdd_ros.ros.processes import NodeProcess, ros_environment, stop_all

    domain = args.domain_id if args.domain_id is not None else int(os.environ.get("ROS_DOMAIN_ID", "42"))
    env = ros_environment(domain)
    # this process joins the graph too (the episode monitor): DDS stays on localhost unless told otherwise
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    models = {"student": student, "teacher": teacher}
    roles = [r for r in ("student", "teacher") if models[r] is not None]
    policy_names = {role: f"{role}_policy" for role in roles}
    watched = {role: (f"/{policy_names[role]}",
                      "/commands" if role == args.driver else f"/{policy_names[role]}/commands") for role in roles}
    monitor = EpisodeMonitor(domain, policy_nodes=watched)
    policy_parameters = {"trigger": "observation"} if args.lockstep else {}
    processes = []
    from tqdm import tqdm

    bar = tqdm(total=args.episodes, desc="episodes over ROS", unit="ep")
    started = time.monotonic()
    try:
        for role in roles:
            shadow = {} if role == args.driver else {"commands": "~/commands", "joint_trajectory": "~/joint_trajectory"}
            processes.append(NodeProcess(
                "policy_node", out_dir / "logs" / f"{policy_names[role]}.log", env,
                params_files=[config_file("policy.yaml")],
                parameters={"model": str(models[role]), "seed": args.seed, **policy_parameters},
                node_name=policy_names[role], remappings=shadow))
        # the sim starts once the monitor hears the policy nodes, and its first episode waits until every
        # policy node subscribes to joint_states: no early message is lost, the shadow sees every episode
        missing = monitor.wait_for_policy_nodes(timeout=60)
        if missing:
            raise UserError(f"the policy nodes do not publish {missing} after 60 s; see {out_dir / 'logs'}")
        processes.append(NodeProcess("arm_sim_node", out_dir / "logs" / "arm_sim.log", env,
                                     params_files=[config_file("arm_sim.yaml")],
                                     parameters={"task": args.task, "seed": args.seed,
                                                 "max_episodes": args.episodes,
                                                 "lockstep": args.lockstep,
                                                 "wait_for_subscribers": len(roles)}))

        def progress(n):
            bar.update(n - bar.n)

        def finished_or_dead():
            return len(monitor.results) >= args.episodes or not all(p.alive for p in processes)

        monitor.spin_until(finished_or_dead, timeout=args.timeout, on_progress=progress)
    finally:
        bar.close()
        codes = stop_all(processes)
        monitor.close()
    ros_seconds = time.monotonic() - started
    if len(monitor.results) < args.episodes:
        dead = [str(p.log_path) for p, c in zip(processes, codes) if c != 0]
        raise UserError(f"only {len(monitor.results)} of {args.episodes} episodes finished over ROS "
                        f"(see the logs in {out_dir / 'logs'}{'; failed: ' + ', '.join(dead) if dead else ''})")

    greedy = False  # config/policy.yaml: expert_selection sample, as offline
    print(f"vdd demo: offline rollouts of the same models ({args.offline_episodes} episodes, seed {args.seed})")
    offline = {role: offline_evaluation(models[role], args.offline_episodes, args.seed, greedy) for role in roles}
    ros_metrics = summarize_results(monitor.results, args.task)

    rows = [(f"{args.driver} over ROS (drives)", ros_metrics, latency_summary(monitor.latencies[args.driver]))]
    for role in roles:
        if role != args.driver:
            rows.append((f"{role} over ROS (shadow)", None, latency_summary(monitor.latencies[role])))
    for role in roles:
        rows.append((f"{role} offline", offline[role]["metrics"], latency_summary(offline[role]["latency_s"])))
    _print_table(rows)
    period_ms = 1000.0 / task_module(args.task).CONTROL_RATE_HZ
    print(f"latency: over ROS, each plan as the node makes it (one call per {period_ms:g} ms: cold caches); "
          "offline, back-to-back Policy.act calls on one window")
    shadow = next((role for role in roles if role != args.driver), None)
    gap = _command_gap(monitor.commands[args.driver], monitor.commands[shadow]) if shadow else None
    if gap is not None:
        print(f"mean |{args.driver} - shadow| joint target on the same observations: {gap:.4f} rad")
    switch_rates = {}
    if "student" in roles:
        ros_role = "over ROS" if args.driver == "student" else "over ROS in the teacher's shadow"
        for label, episodes in ((ros_role, monitor.experts_per_episode("student")),
                                ("offline", offline["student"]["experts"] or [])):
            switches, pairs = expert_switches(episodes)
            if pairs:
                switch_rates[label] = {"switches": switches, "plan_pairs": pairs, "share": switches / pairs}
        print("student expert switches between consecutive plans of an episode: " + "; ".join(
            f"{label} {v['share']:.0%} ({v['switches']} of {v['plan_pairs']})" for label, v in switch_rates.items()))

    summary = {
        "task": args.task, "student": str(student), "student_source": student_source,
        "teacher": str(teacher) if teacher else None,
        "driver": args.driver, "seed": args.seed, "lockstep": args.lockstep, "ros_seconds": round(ros_seconds, 1),
        "ros": ros_metrics, "ros_episodes": sorted(({k: v for k, v in r.items() if k != "ee_path"}
                                                    for r in monitor.results), key=lambda r: r["episode"]),
        "latency_over_ros": {role: latency_summary(monitor.latencies[role]) for role in roles},
        "offline": {role: {"metrics": offline[role]["metrics"], "latency": latency_summary(offline[role]["latency_s"])}
                    for role in roles},
        "command_gap_rad": gap, "expert_switches": switch_rates, "exit_codes": codes,
    }
    json_path = out_dir / "demo.json"
    write_json(json_path, summary)
    results = sorted(monitor.results, key=lambda r: r["episode"])
    panels = [(f"{args.driver} over ROS ({len(results)} episodes)", [np.asarray(r["ee_path"]) for r in results],
               [r["route"] for r in results], [bool(r["collision"]) for r in results])]
    panels += [(f"{role} offline ({args.offline_episodes} episodes)", offline[role]["ee_paths"],
                offline[role]["routes"], offline[role]["collisions"]) for role in roles]
    latencies = {f"{role} over ROS": monitor.latencies[role] for role in roles}
    latencies.update({f"{role} offline": offline[role]["latency_s"] for role in roles})
    plot_path = plot_demo(out_dir / "demo.png", panels, latencies,
                          f"vdd demo: {args.task} over ROS 2 ({args.driver} drives) vs offline rollouts, "
                          f"seed {args.seed}", task=args.task)
    print(f"vdd demo: {json_path}, {plot_path}; node logs in {out_dir / 'logs'}")
    if any(codes):
        raise UserError(f"a node did not shut down cleanly (exit statuses {codes}); see {out_dir / 'logs'}")
    return 0


def _print_table(rows) -> None:
    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    header = f"{'':28}{'success':>8}{'collide':>8}{'entropy':>8}{'routes':>7}{'t_finish':>9}" \
             f"{'p50 ms':>9}{'p99 ms':>9}{'calls':>7}"
    print(header)
    print("-" * len(header))
    for label, metrics, latency in rows:
        metrics = metrics or {}
        entropy = fmt(metrics.get('entropy'), '{:.2f}').replace('-0.00', '0.00')
        print(f"{label:28}{fmt(metrics.get('success_rate'), '{:.2f}'):>8}"
              f"{fmt(metrics.get('collision_rate'), '{:.2f}'):>8}{entropy:>8}"
              f"{fmt(metrics.get('routes_covered'), '{:d}'):>7}{fmt(metrics.get('mean_time_to_finish_s'), '{:.2f}'):>9}"
              f"{fmt(latency['p50_ms'], '{:.3f}'):>9}{fmt(latency['p99_ms'], '{:.3f}'):>9}{latency['calls']:>7}")


def _check_model_tasks(task: str, models) -> None:
    """Every model must be one of ``task`` (its spec's task; a spec naming no task counts as arm_avoid)."""
    from vdd_ros.cli.main import UserError
    from vdd_ros.runtime import load_policy

    for model in models:
        named = load_policy(model, device="cpu").spec.task or "arm_avoid"
        if named != task:
            raise UserError(f"model {model}: expected a model of task '{task}' (--task), got '{named}'")


def plot_demo(path: Path, panels, latencies: dict, title: str, task: str = "arm_avoid") -> Path:
    """The demo figure: one workspace panel per run, a legend for routes and failures, and the latency CDFs.

    ``panels``: [(title, ee_paths, routes, collisions)], a route None where the episode failed;
    ``latencies``: label -> seconds per plan, labels "<role> over ROS" (solid) or "<role> offline" (dashed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from vdd_ros.files import save_figure
    from vdd_ros.tasks.registry import task_module

    arm_task = task_module(task)
    colors = arm_task.route_colors()
    fig = plt.figure(figsize=(5.0 * len(panels), 9.6), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=(1.35, 1.0))
    for column, (label, ee_paths, routes, collisions) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        arm_task.draw_workspace(ax)
        for ee_path, route, collided in zip(ee_paths, routes, collisions):
            ee_path = np.asarray(ee_path)
            if route is not None:
                ax.plot(ee_path[:, 0], ee_path[:, 1], color=colors[route], lw=0.8, alpha=0.7, zorder=3)
                continue
            # black dashed: no route colour (tab20 has reds) reads as a failure
            ax.plot(ee_path[:, 0], ee_path[:, 1], color="black", ls="--", lw=1.0, alpha=0.9, zorder=3)
            ax.plot(ee_path[-1, 0], ee_path[-1, 1], "x" if collided else "o", color="red" if collided else "black",
                    ms=7, mew=2, mfc="none", zorder=4)
        ok = [r for r in routes if r is not None]
        ax.set_title(f"{label}\n{len(ok)}/{len(routes)} success, {sum(collisions)} collided, "
                     f"{len(set(ok))}/{arm_task.N_ROUTES} routes, entropy {arm_task.behaviour_entropy(ok):.2f}",
                     fontsize=9)

    ax = fig.add_subplot(grid[1, : max(1, len(panels) - 1)])
    role_colors = {}
    for label, seconds in latencies.items():
        values = np.sort(np.asarray(seconds, dtype=float)) * 1e3
        if values.size == 0:
            continue
        role = label.split(" ")[0]
        color = role_colors.setdefault(role, f"C{len(role_colors)}")
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", color=color,
                ls="--" if label.endswith("offline") else "-", lw=1.6,
                label=f"{label}: p50 {np.percentile(values, 50):.2f} ms, p99 {np.percentile(values, 99):.2f} ms "
                f"({values.size} calls)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("plan latency, one model call [ms] (log scale)")
    ax.set_ylabel("fraction of calls (CDF)")
    ax.set_title("plan latency: over ROS as the node calls it (solid), back-to-back offline calls (dashed)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)

    legend_ax = fig.add_subplot(grid[1, -1]) if len(panels) > 1 else None
    handles = [Patch(color=colors[route], label=f"route {arm_task.route_label(route)}")
               for route in range(arm_task.N_ROUTES)]
    handles += [Line2D([], [], color="black", ls="--", lw=1.0, label="failed episode"),
                Line2D([], [], color="red", marker="x", ls="none", ms=7, mew=2, label="collision (end point)"),
                Line2D([], [], color="black", marker="o", mfc="none", ls="none", ms=7, mew=2,
                       label="time-out (end point)")]
    if task == "arm_avoid":
        handles += [Line2D([], [], color="green", ls="--", lw=2, label="finish line"),
                    Line2D([], [], color="black", marker="o", ls="none", ms=8, label="obstacle (grey: EE radius)")]
    else:
        handles += [Line2D([], [], color="0.8", marker="o", ls="none", ms=8, label="target (its radius)")]
    if legend_ax is not None:
        legend_ax.axis("off")
        legend_ax.legend(handles=handles, ncol=2, fontsize=8, loc="center", frameon=False,
                         title="end-effector paths: colour = route" + (" through the obstacle rows" if task ==
                                                                         "arm_avoid" else " (visiting order)"),
                         title_fontsize=8)
    else:
        ax.legend(handles=handles, ncol=3, fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, dpi=110)
    return path
