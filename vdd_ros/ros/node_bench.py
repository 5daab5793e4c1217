"""``vdd bench node``: can the policy node hold a high control rate with the student?

The policy node runs in this process (a rclpy SingleThreadedExecutor, exactly as ``policy_node``
runs it) at ``--rate`` Hz with ``allow_rate_override``; ``arm_sim_node`` runs in its own process
and feeds it JointStates at 200 Hz and takes its commands, over DDS on localhost. Every tick's
period and work time and every model call's time are recorded for ``--seconds`` after a
warm-up. A deadline miss is a tick that starts more than 1.5 periods after the previous one,
or whose work (observation, model call, publish) takes longer than one period.

With ``--realtime P`` the control thread runs under SCHED_FIFO P, the middleware's threads and
``arm_sim_node`` (``--sim-priority``) one below, so nothing else in the benchmark competes with a
control tick at its priority. The node runs with its own defaults (heap frozen at activate).
"""
from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

from vdd_ros.files import save_figure, write_json


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="exported model .onnx (default: the shipped student)")
    parser.add_argument("--rate", type=float, default=500.0, help="control rate in Hz (default: 500)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured run length (default: 60)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds run before measuring (default: 3)")
    parser.add_argument("--replan-every", type=int, default=1,
                        help="ticks per model call (default: 1 = a model call every tick, the worst case; "
                        "0 = the model's execute_steps)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda (default: cpu)")
    parser.add_argument("--realtime", type=int, default=0, metavar="PRIORITY",
                        help="run the policy node's control thread under SCHED_FIFO at this priority (2-99; needs "
                        "root or CAP_SYS_NICE, as a robot computer's control process would run), its middleware "
                        "threads one below; 0: normal scheduling (default)")
    parser.add_argument("--sim-priority", type=int, default=None, metavar="PRIORITY",
                        help="SCHED_FIFO priority of arm_sim_node (0: normal scheduling; default: one below "
                        "--realtime, or normal scheduling without it): the simulated arm never competes with the "
                        "control thread at its own priority")
    parser.add_argument("--lock-memory", action="store_true",
                        help="the node's lock_memory parameter: mlockall at activate (default: off, as the "
                        "node's default)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID of the run (default: the environment's, else 42)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--plot", default="bench_node.png",
                        help="histogram of tick periods and inference times (PNG; empty string: no plot)")


def describe_machine() -> dict:
    """The machine a timing was taken on: CPU model, cores, cores this process may use, load average now.

    Printed beside every timing table of ``vdd bench`` and stored in its JSON, so a quoted figure
    carries the machine it was measured on.
    """
    cpu = None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                # x86: "model name"; ARM: "Model" (the board) or "Hardware"
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    cpu = value.strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu or platform.processor() or platform.machine(), "arch": platform.machine(),
            "cores": os.cpu_count(), "usable_cores": usable, "load_average_1_5_15_min": load,
            "python": f"{platform.python_implementation()} {platform.python_version()}"}


def machine_line(machine: dict) -> str:
    """One line for a report: ``machine: CPU, N cores (M usable), load average a b c at start``."""
    cores = f"{machine['cores']} cores"
    if machine["usable_cores"] != machine["cores"]:
        cores += f" ({machine['usable_cores']} usable)"
    load = machine["load_average_1_5_15_min"]
    load_text = "load average " + " ".join(f"{v:.2f}" for v in load) + " (1/5/15 min) at start" if load else \
        "load average unknown"
    return f"machine: {machine['cpu']}, {cores}, {load_text}"


def _stats_ms(seconds) -> dict:
    import numpy as np

    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    if arr.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": int(arr.size), "p50_ms": round(float(np.percentile(arr, 50)), 4),
            "p99_ms": round(float(np.percentile(arr, 99)), 4), "max_ms": round(float(arr.max()), 4)}


def run(args) -> int:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from vdd_ros.paths import config_file, model_file
    from vdd_ros.ros.policy_node import LATE_TICK_FACTOR, PolicyNode
    from vdd_ros.ros.processes import NodeProcess, ros_environment
    from vdd_ros.runtime import load_policy

    if args.rate <= 0 or args.seconds <= 0 or args.warmup < 0:
        raise ValueError(f"--rate and --seconds must be > 0 and --warmup >= 0, got {args.rate}, {args.seconds}, "
                         f"{args.warmup}")
    model = Path(args.model) if args.model else model_file("student.onnx")
    if not model.is_file():
        raise FileNotFoundError(f"model {model}: no such file")
    kind = load_policy(model).kind  # fails here, with its one-line message, on a bad file
    if args.realtime and not 2 <= args.realtime <= 99:
        raise ValueError(f"--realtime: expected a priority 2..99 or 0, got {args.realtime}")
    sim_priority = args.sim_priority if args.sim_priority is not None else max(args.realtime - 1, 0)
    if not 0 <= sim_priority <= 99:
        raise ValueError(f"--sim-priority: expected a priority 0..99, got {sim_priority}")
    if args.realtime:
        # the middleware's threads (Fast DDS, started with the first node below) inherit one level below the
        # control thread, which is raised to --realtime once they exist: a DDS thread busy on a core never
        # holds back a control tick at equal priority
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime - 1))
        except PermissionError:
            raise ValueError(f"--realtime {args.realtime}: SCHED_FIFO needs root or CAP_SYS_NICE") from None
    machine = describe_machine()  # the load average before the benchmark's own processes start
    domain = args.domain_id if args.domain_id is not None else int(os.environ.get("ROS_DOMAIN_ID", "42"))
    env = ros_environment(domain)
    os.environ.update({k: env[k] for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID")})
    log_dir = Path(tempfile.mkdtemp(prefix="vdd_bench_node_"))
    sim = NodeProcess("arm_sim_node", log_dir / "arm_sim.log", env, params_files=[config_file("arm_sim.yaml")],
                      parameters={"auto_reset": True}, realtime_priority=sim_priority)
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    overrides = [Parameter("model", value=str(model)), Parameter("control_rate_hz", value=float(args.rate)),
                 Parameter("allow_rate_override", value=True), Parameter("replan_every", value=args.replan_every),
                 Parameter("device", value=args.device), Parameter("max_observation_age_s", value=0.5),
                 Parameter("lock_memory", value=bool(args.lock_memory)),
                 Parameter("start_enabled", value=True)]  # against the simulated arm
    node = PolicyNode("bench_policy", stats_window=None, context=context, parameter_overrides=overrides)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    if args.realtime:  # the DDS participant and its threads exist now
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))  # this (the control) thread only
    try:
        node.start()
        if node.policy is None:
            raise ValueError(f"the policy node did not configure with {model} (see the log above)")
        print(f"vdd bench node: {kind} model {model.name} at {args.rate:g} Hz for {args.seconds:g} s "
              f"(after {args.warmup:g} s warm-up), arm_sim_node feeding joint_states, "
              f"{'SCHED_FIFO ' + str(args.realtime) if args.realtime else 'normal'} scheduling (middleware threads "
              f"{'SCHED_FIFO ' + str(args.realtime - 1) if args.realtime else 'normal'}, arm_sim_node "
              f"{'SCHED_FIFO ' + str(sim_priority) if sim_priority else 'normal'}); heap frozen: {node.gc_frozen}, "
              f"memory locked: {node.memory_locked}")
        end_warmup = time.monotonic() + args.warmup
        while time.monotonic() < end_warmup:
            executor.spin_once(timeout_sec=0.01)
        node._reset_stats()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)
        periods, work, inference = list(node.tick_periods), list(node.tick_work_times), list(node.inference_times)
        stale = node.stale_skips
        frozen, locked = node.gc_frozen, node.memory_locked
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        sim.stop()
    period = 1.0 / args.rate
    late = sum(p > LATE_TICK_FACTOR * period for p in periods)
    elapsed = itertools.accumulate(periods)
    late_at = [round(t, 3) for t, p in zip(elapsed, periods) if p > LATE_TICK_FACTOR * period]
    overrun = sum(w > period for w in work)
    ticks = len(work) + stale
    result = {
        "model": str(model), "kind": kind, "rate_hz": args.rate, "seconds": args.seconds,
        "replan_every": args.replan_every, "ticks": ticks, "expected_ticks": int(args.rate * args.seconds),
        "achieved_rate_hz": round(len(periods) / sum(periods), 3) if periods else 0.0,
        "tick_period": _stats_ms(periods), "tick_work": _stats_ms(work), "inference": _stats_ms(inference),
        "late_ticks": int(late), "late_ticks_at_s": late_at[:100], "overrun_ticks": int(overrun),
        "deadline_misses": int(late + overrun),
        "stale_skips": int(stale), "scheduling": f"SCHED_FIFO {args.realtime}" if args.realtime else "normal",
        "sim_scheduling": f"SCHED_FIFO {sim_priority}" if sim_priority else "normal",
        "gc_frozen": frozen, "memory_locked": locked, "machine": machine,
    }
    print(machine_line(machine))
    print(f"{'':16}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'n':>9}")
    for label, key in (("tick period", "tick_period"), ("tick work", "tick_work"), ("inference", "inference")):
        row = result[key]
        print(f"{label:16}{row['p50_ms'] or 0:>10.3f}{row['p99_ms'] or 0:>10.3f}{row['max_ms'] or 0:>10.3f}"
              f"{row['n']:>9}")
    print(f"achieved {result['achieved_rate_hz']:.1f} Hz of {args.rate:g} Hz "
          f"(ratio {result['achieved_rate_hz'] / args.rate:.4f}); deadline misses {result['deadline_misses']} "
          f"({late} late ticks > {LATE_TICK_FACTOR:g} periods, {overrun} ticks with work > 1 period); "
          f"stale skips {stale}")
    if late_at:
        print(f"late ticks at (s into the run): {late_at[:20]}{' ...' if len(late_at) > 20 else ''}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(periods, inference, period, LATE_TICK_FACTOR, args.plot,
              f"policy node at {args.rate:g} Hz ({kind})\n{machine_line(machine)}")
        print(f"wrote {args.plot}")
    return 0


def _plot(periods, inference, period, late_factor: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, values, color in ((axes[0], periods, "tab:blue"), (axes[1], inference, "tab:green")):
        if len(values):
            ax.hist(np.asarray(values) * 1e3, bins=100, color=color)
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center")
        ax.set_ylabel("ticks" if ax is axes[0] else "model calls")
    axes[0].axvline(period * 1e3, color="black", ls="--", label="nominal period")
    axes[0].axvline(late_factor * period * 1e3, color="red", ls=":", label=f"late ({late_factor:g} periods)")
    axes[0].set_xlabel("tick period [ms]")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("model call [ms]")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)
