"""``vdd bench soak``: the policy node with the student at a high rate against the simulated arm, for minutes.

``policy_node`` and ``arm_sim_node`` run as their own processes (the executables ``ros2 launch`` starts,
with config/policy.yaml and config/arm_sim.yaml) over DDS on localhost; this process listens to
``/diagnostics`` and the command topic. It records the node's resident memory (``VmRSS`` of its process)
at the start and at every ``--sample-every`` seconds, the node's own counts (deadline misses, commands,
stale and invalid inputs, clips) from its diagnostics, and after a clean shutdown whether any Fast DDS
shared-memory file was left in ``/dev/shm``. Growth is the largest RSS after the first sample minus the
first; ``--max-growth-mib`` is the bound it is judged against (exit status 1 beyond it, or on a leak).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from vdd_ros.files import write_json

SHM = Path("/dev/shm")


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="run length in minutes (default: 10)")
    parser.add_argument("--rate", type=float, default=500.0, help="control rate in Hz (default: 500)")
    parser.add_argument("--model", default=None, help="exported model .onnx (default: the shipped student)")
    parser.add_argument("--replan-every", type=int, default=0,
                        help="ticks per model call (default: 0 = the model's execute_steps, as deployed; 1 = a "
                        "model call every tick)")
    parser.add_argument("--sample-every", type=float, default=60.0,
                        help="seconds between memory samples (default: 60)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds after activation before the first sample (default: 5)")
    parser.add_argument("--max-growth-mib", type=float, default=8.0,
                        help="resident-memory growth over the run judged a leak (default: 8 MiB)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS_DOMAIN_ID of the run (default: the environment's, else 43)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def shm_files() -> set[str]:
    """Fast DDS shared-memory files (segments, ports, locks) now in /dev/shm."""
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if p.name.startswith(("fastrtps_", "fastdds_", "sem.fastrtps_",
                                                                  "sem.fastdds_"))}


def run(args) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import Float64MultiArray

    from vdd_ros.paths import config_file, model_file
    from vdd_ros.ros.node_bench import describe_machine, machine_line
    from vdd_ros.ros.processes import NodeProcess, ros_environment, stop_all
    from vdd_ros.runtime import load_policy

    if args.minutes <= 0 or args.rate <= 0 or args.sample_every <= 0 or args.warmup < 0:
        raise ValueError(f"--minutes, --rate and --sample-every must be > 0 and --warmup >= 0, got {args.minutes}, "
                         f"{args.rate}, {args.sample_every}, {args.warmup}")
    model = Path(args.model) if args.model else model_file("student.onnx")
    load_policy(model)  # a bad file fails here, with its one-line message
    machine = describe_machine()
    domain = args.domain_id if args.domain_id is not None else int(os.environ.get("ROS_DOMAIN_ID", "43"))
    env = ros_environment(domain)
    shm_before = shm_files()
    log_dir = Path(tempfile.mkdtemp(prefix="vdd_bench_soak_"))

    context = Context()
    rclpy.init(context=context, domain_id=domain)
    listener = Node("soak_listener", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener)
    latest: dict[str, str] = {}
    counts = {"commands_received": 0}

    def on_diagnostics(msg):
        for status in msg.status:
            if status.name.startswith("/policy_node"):
                latest.clear()
                latest.update({kv.key: kv.value for kv in status.values})

    listener.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    listener.create_subscription(Float64MultiArray, "commands",
                                 lambda _: counts.__setitem__("commands_received", counts["commands_received"] + 1),
                                 1000)

    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)

    sim = NodeProcess("arm_sim_node", log_dir / "arm_sim.log", env, params_files=[config_file("arm_sim.yaml")])
    policy = NodeProcess("policy_node", log_dir / "policy_node.log", env, params_files=[config_file("policy.yaml")],
                         parameters={"model": str(model), "control_rate_hz": float(args.rate),
                                     "allow_rate_override": True, "replan_every": int(args.replan_every),
                                     "diagnostics_period_s": 1.0})
    samples: list[dict] = []
    started = time.monotonic()
    try:
        if not policy.wait_for_log("active: commanding", timeout=120):
            raise RuntimeError(f"policy_node did not become active:\n{policy.log()[-2000:]}")
        spin(args.warmup)
        start = time.monotonic()
        duration = args.minutes * 60.0
        next_sample = start
        print(f"vdd bench soak: {args.rate:g} Hz for {args.minutes:g} min, model {model}\n{machine_line(machine)}",
              flush=True)
        while True:
            now = time.monotonic()
            if now >= next_sample or now - start >= duration:
                sample = {"t_s": round(now - start, 1), "rss_mib": round(rss_mib(policy.process.pid), 2),
                          "deadline_misses": int(latest.get("deadline_misses", 0)),
                          "commands_sent": int(latest.get("commands_sent", 0))}
                samples.append(sample)
                print(f"  t={sample['t_s']:7.1f} s  RSS {sample['rss_mib']:8.2f} MiB  deadline misses "
                      f"{sample['deadline_misses']:6d}  commands {sample['commands_sent']:9d}", flush=True)
                next_sample += args.sample_every
                if now - start >= duration:
                    break
            spin(min(0.5, max(0.0, min(next_sample, start + duration) - time.monotonic())))
        final = dict(latest)
    finally:
        codes = stop_all([policy, sim])
        executor.shutdown()
        listener.destroy_node()
        rclpy.try_shutdown(context=context)
    time.sleep(0.5)
    leaked = sorted(shm_files() - shm_before)
    rss = [s["rss_mib"] for s in samples]
    growth = max(rss[1:], default=rss[0]) - rss[0]
    elapsed = samples[-1]["t_s"] - samples[0]["t_s"]
    commands = int(final.get("commands_sent", 0))
    measured_commands = samples[-1]["commands_sent"] - samples[0]["commands_sent"]
    misses = int(final.get("deadline_misses", 0))
    result = {
        "rate_hz": args.rate, "minutes": args.minutes, "model": str(model), "machine": machine,
        "rss_start_mib": rss[0], "rss_end_mib": rss[-1], "rss_max_mib": max(rss), "rss_growth_mib": round(growth, 2),
        "max_growth_mib": args.max_growth_mib, "samples": samples, "commands_sent": commands,
        "commands_received": counts["commands_received"], "deadline_misses": misses,
        "deadline_miss_share": misses / max(commands, 1), "achieved_rate_hz": measured_commands / max(elapsed, 1e-9),
        "node_counts": {k: final.get(k) for k in ("stale_skips", "invalid_inputs", "limit_clips", "step_clips",
                                                  "watchdog_holds", "ood_holds")},
        "exit_codes": codes, "leaked_shm_files": leaked, "wall_s": round(time.monotonic() - started, 1),
        "logs": str(log_dir),
    }
    print(f"\nRSS {rss[0]:.1f} MiB at start, {rss[-1]:.1f} MiB at the end, growth {growth:+.2f} MiB "
          f"(bound {args.max_growth_mib:g} MiB)\ncommands {commands} sent ({counts['commands_received']} received "
          f"here), {result['achieved_rate_hz']:.1f} Hz achieved of {args.rate:g} (first to last sample); deadline "
          f"misses {misses} "
          f"({100 * result['deadline_miss_share']:.3f}%)\nshutdown exit codes {codes}; Fast DDS files left in "
          f"/dev/shm: {len(leaked)}{' ' + str(leaked) if leaked else ''}")
    if args.json:
        write_json(args.json, result)
    return 0 if growth <= args.max_growth_mib and not leaked and codes == [0, 0] else 1
