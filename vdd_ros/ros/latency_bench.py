"""``vdd bench ros``: end-to-end latency over ROS 2, observation stamp to command arrival, student vs teacher.

For each model and control rate (and trigger), the real ``policy_node`` runs as its own process with the
model (``replan_every`` 1: a model call per command, the worst case; the safety holds for deadlines and
out-of-distribution observations off, so the figures show timing, not holds). This process is the arm: it
publishes stamped ``JointState`` at the rate and notes when each ``commands`` message arrives, over DDS on
localhost. A command's latency is its arrival minus the stamp of the observation it answers: the newest one
published before it, or the one before when the command came sooner than any answer can (the floor's fastest
round trip plus the fastest model call) and that one has no command yet (trigger ``timer``: the freshest
observation the node could have used).
The DDS floor is the same harness against ``latency_echo``, a bare rclpy node that answers each JointState at
once: the node's own share is its figure minus the floor's.

Per cell: end-to-end p50 / p99 / max, inference p50 / p99 (the node's ``~/inference_time``), achieved command
rate, deadline misses (latency > one period), dropped observations (trigger ``observation``: answered by no
command), CPU use of the node process. Per model and trigger: the highest rate with p99 below one period and at
most 0.1% misses.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vdd_ros.files import save_figure, write_json

MAX_MISS_SHARE = 0.001  # a sustained rate: p99 below one period and at most this share of late commands
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def parse_list(name: str, text: str, cast=float) -> list:
    try:
        values = [cast(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got '{text}'") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{name}: expected comma-separated numbers > 0, got '{text}'")
    return values


class Harness:
    """The arm side: publishes stamped JointStates, records command arrivals and inference times."""

    def __init__(self, domain_id: int, joint_names, positions):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64, Float64MultiArray

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node("latency_bench", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.msg = JointState(name=list(joint_names), position=[float(v) for v in positions],
                              velocity=[0.0] * len(joint_names))
        self.pub = self.node.create_publisher(JointState, "joint_states", 10)
        self.arrivals: list[float] = []
        self.inference: list[float] = []
        self.node.create_subscription(Float64MultiArray, "commands", self._on_command, 1000)
        self.node.create_subscription(Float64, "/bench_policy/inference_time",
                                      lambda m: self.inference.append(m.data), 1000)

    def _on_command(self, _msg) -> None:
        self.arrivals.append(time.perf_counter())

    def wait_matched(self, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.pub.get_subscription_count() >= 1 and self.node.count_publishers("commands") >= 1:
                self.run(0.3, 50.0, record=False)
                return True
            self.executor.spin_once(timeout_sec=0.05)
        return False

    def run(self, seconds: float, rate_hz: float, record: bool = True) -> list[float]:
        """Publish at ``rate_hz`` for ``seconds``; returns the publish times (perf_counter)."""
        clock = self.node.get_clock()
        period = 1.0 / rate_hz
        published: list[float] = []
        if record:
            self.arrivals.clear()
            self.inference.clear()
        start = time.perf_counter()
        next_t = start
        end = start + seconds
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if now >= next_t:
                self.msg.header.stamp = clock.now().to_msg()
                stamp = time.perf_counter()
                self.pub.publish(self.msg)
                published.append(stamp)
                next_t += period
                if next_t < now:  # this process fell behind (a stall): no burst to catch up
                    next_t = now + period
            self.executor.spin_once(timeout_sec=max(0.0, min(next_t, end) - time.perf_counter()))
        # commands still in flight for the last observations
        drain = time.perf_counter() + min(0.2, 5 * period)
        while time.perf_counter() < drain:
            self.executor.spin_once(timeout_sec=0.01)
        if not record:
            self.arrivals.clear()
            self.inference.clear()
        return published

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def answered_observations(pub: np.ndarray, arr: np.ndarray, min_latency_s: float = 0.0) -> np.ndarray:
    """For each command arrival, the index of the observation it answers.

    The newest observation published before the arrival, unless the command came sooner after it than any
    answer can (``min_latency_s``: the DDS round trip plus the model call) and the observation before that one
    has no command yet: then it answers that one (a node falling behind answers observation k after k+1 was
    published). Pairing with the newest alone would understate the latency of a node that falls behind."""
    index = np.searchsorted(pub, arr, side="right") - 1
    if min_latency_s <= 0 or not index.size:
        return index
    answered = np.zeros(pub.size, dtype=bool)
    for i, (arrival, j) in enumerate(zip(arr, index)):
        if arrival - pub[j] < min_latency_s and j > 0 and not answered[j - 1]:
            j = j - 1
            index[i] = j
        answered[j] = True
    return index


def cell_figures(published: list[float], arrivals: list[float], rate_hz: float, seconds: float,
                 inference: list[float], cpu_share: float, trigger: str, min_latency_s: float = 0.0) -> dict:
    """The figures of one cell from publish and arrival times (seconds, one clock); ``min_latency_s``: the
    shortest time in which any answer can arrive (see :func:`answered_observations`)."""
    pub = np.asarray(published)
    arr = np.asarray([a for a in arrivals if pub.size and a >= pub[0]])
    period = 1.0 / rate_hz
    if not pub.size or not arr.size:
        return {"commands": int(arr.size), "observations": int(pub.size), "p50_ms": None, "p99_ms": None,
                "max_ms": None, "misses": int(pub.size), "miss_share": 1.0, "dropped": int(pub.size),
                "achieved_hz": 0.0, "inference_p50_ms": None, "inference_p99_ms": None,
                "cpu_percent": round(100 * cpu_share, 1), "latencies_ms": []}
    index = answered_observations(pub, arr, min_latency_s)
    latency = arr - pub[index]
    answered = np.zeros(pub.size, dtype=bool)
    answered[index] = True
    late = int(np.sum(latency > period))
    # observations nobody answered count as misses too (trigger observation); a timer node answers at its rate
    dropped = int(np.sum(~answered)) if trigger == "observation" else 0
    misses = late + dropped
    inf = np.asarray(inference) * 1e3
    return {
        "commands": int(arr.size), "observations": int(pub.size),
        "p50_ms": float(np.percentile(latency, 50) * 1e3), "p99_ms": float(np.percentile(latency, 99) * 1e3),
        "max_ms": float(latency.max() * 1e3), "misses": misses,
        "miss_share": misses / max(int(pub.size) if trigger == "observation" else int(arr.size), 1),
        "dropped": dropped, "achieved_hz": float(arr.size / seconds),
        "inference_p50_ms": float(np.percentile(inf, 50)) if inf.size else None,
        "inference_p99_ms": float(np.percentile(inf, 99)) if inf.size else None,
        "cpu_percent": round(100 * cpu_share, 1), "latencies_ms": (latency * 1e3).round(4).tolist(),
    }


def sustained_rate(cells: list[dict]) -> float | None:
    """The highest requested rate whose cell kept p99 below one period and misses within MAX_MISS_SHARE."""
    ok = [c["rate_hz"] for c in cells if c["p99_ms"] is not None and c["p99_ms"] < 1e3 / c["rate_hz"]
          and c["miss_share"] <= MAX_MISS_SHARE]
    return max(ok) if ok else None


def attach(domain_id: int, seconds: float, node_name: str, progress=print) -> dict:
    """Measure a policy node that is already running (on a robot): nothing is started or published here. The
    latency of each command is its arrival (this machine's clock) minus the header stamp of the newest
    ``joint_states`` message received before it, so the stamping machine's clock must agree with this one."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64, Float64MultiArray

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = Node("latency_bench_attach", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    stamps: list[float] = []
    latencies: list[float] = []
    inference: list[float] = []

    def on_state(msg):
        stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)

    arrivals: list[float] = []

    def on_command(_msg):
        if stamps:
            latencies.append(time.time() - stamps[-1])
            arrivals.append(time.perf_counter())

    node.create_subscription(JointState, "joint_states", on_state, qos_profile_sensor_data)
    node.create_subscription(Float64MultiArray, "commands", on_command, 1000)
    node.create_subscription(Float64, f"{node_name}/inference_time", lambda m: inference.append(m.data), 1000)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    if not latencies:
        raise RuntimeError(f"no command on 'commands' within {seconds:g} s (is {node_name} active and enabled, and "
                           "ROS_DOMAIN_ID / ROS_AUTOMATIC_DISCOVERY_RANGE set to reach it?)")
    lat = np.asarray(latencies) * 1e3
    inf = np.asarray(inference) * 1e3
    # the rate from the first command on: discovery can take a good part of a short window
    span = arrivals[-1] - arrivals[0]
    rate = (len(arrivals) - 1) / span if span > 0 else 0.0
    cell = {"model": f"attached {node_name}", "trigger": "as running", "rate_hz": rate,
            "commands": int(lat.size), "observations": len(stamps), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "misses": 0, "miss_share": 0.0,
            "dropped": 0, "achieved_hz": rate,
            "inference_p50_ms": float(np.percentile(inf, 50)) if inf.size else None,
            "inference_p99_ms": float(np.percentile(inf, 99)) if inf.size else None, "cpu_percent": 0.0,
            "latencies_ms": lat.round(4).tolist()}
    progress(f"  {cell['model']}: p50 {_ms(cell['p50_ms'])} p99 {_ms(cell['p99_ms'])} ms, "
             f"{cell['achieved_hz']:.0f} Hz")
    return {"cells": [cell], "sustained_hz": {}, "seconds": seconds, "warmup": 0.0, "logs": ""}


def _start(executable: str, log_dir: Path, env: dict, model: Path | None, rate: float, trigger: str,
           executor: str = "single_threaded"):
    from vdd_ros.paths import config_file
    from vdd_ros.ros.processes import NodeProcess

    if executable == "latency_echo":
        return NodeProcess("latency_echo", log_dir / "latency_echo.log", env, node_name="bench_policy",
                           parameters={"executor": executor})
    return NodeProcess("policy_node", log_dir / f"{model.stem}_{rate:g}_{trigger}.log", env,
                       params_files=[config_file("policy.yaml")], node_name="bench_policy",
                       parameters={"model": str(model), "control_rate_hz": float(rate), "allow_rate_override": True,
                                   "trigger": trigger, "replan_every": 1, "max_deadline_misses": -1,
                                   "ood_threshold": 0.0, "executor": executor})


def run_sweep(models: dict[str, Path], rates: list[float], triggers: list[str], seconds: float, warmup: float,
              domain_id: int, floor: bool = True, progress=print, executor: str = "single_threaded") -> dict:
    """Every (model, trigger, rate) cell, plus the DDS floor at each rate; returns the results dict."""
    from vdd_ros.ros.processes import ros_environment
    from vdd_ros.runtime import load_policy

    first = load_policy(next(iter(models.values())))
    spec = first.spec
    positions = np.asarray(spec.normalization.obs_mean[:spec.n_joints])  # an in-distribution pose
    env = ros_environment(domain_id)
    log_dir = Path(tempfile.mkdtemp(prefix="vdd_bench_ros_"))
    harness = Harness(domain_id, spec.joint_names, positions)
    cells = []
    floor_min_s: dict[float, float] = {}
    plan = ([("DDS floor (bare echo)", "latency_echo", None, "observation")] if floor else []) + \
        [(label, "policy_node", path, trigger) for label, path in models.items() for trigger in triggers]
    try:
        for label, executable, path, trigger in plan:
            for rate in rates:
                proc = _start(executable, log_dir, env, path, rate, trigger, executor)
                try:
                    if executable == "policy_node" and not proc.wait_for_log("active: commanding", timeout=120):
                        raise RuntimeError(f"policy_node did not become active:\n{proc.log()[-2000:]}")
                    if not harness.wait_matched():
                        raise RuntimeError(f"{label}: no match with the bench's topics within 30 s")
                    harness.run(warmup, rate, record=False)
                    cpu0, t0 = cpu_seconds(proc.process.pid), time.perf_counter()
                    published = harness.run(seconds, rate)
                    cpu_share = (cpu_seconds(proc.process.pid) - cpu0) / (time.perf_counter() - t0)
                    # no answer comes sooner than the bare echo's fastest round trip plus the fastest model call
                    min_latency = 0.0 if executable == "latency_echo" else \
                        floor_min_s.get(rate, 0.0) + (min(harness.inference) if harness.inference else 0.0)
                    figures = cell_figures(published, harness.arrivals, rate, seconds, harness.inference,
                                           cpu_share, trigger, min_latency)
                    if executable == "latency_echo" and figures["latencies_ms"]:
                        floor_min_s[rate] = min(figures["latencies_ms"]) / 1e3
                finally:
                    code = proc.stop()
                if code != 0:
                    raise RuntimeError(f"{label} at {rate:g} Hz did not shut down cleanly ({code}):\n"
                                       f"{proc.log()[-2000:]}")
                cell = {"model": label, "trigger": trigger, "rate_hz": rate, **figures}
                cells.append(cell)
                progress(f"  {label:28s} {trigger:11s} {rate:7g} Hz: p50 {_ms(cell['p50_ms'])} p99 "
                         f"{_ms(cell['p99_ms'])} ms, {cell['achieved_hz']:.0f} Hz, misses {cell['miss_share']:.2%}")
    finally:
        harness.close()
    sustained = {}
    for label, _, _, trigger in plan:
        group = [c for c in cells if c["model"] == label and c["trigger"] == trigger]
        sustained[f"{label} / {trigger}"] = sustained_rate(group)
    return {"cells": cells, "sustained_hz": sustained, "seconds": seconds, "warmup": warmup, "executor": executor,
            "logs": str(log_dir)}


def _ms(value) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def markdown_table(result: dict) -> str:
    lines = ["| model | trigger | rate Hz | e2e p50 / p99 / max ms | inference p50 / p99 ms | achieved Hz | "
             "misses | dropped | node CPU % |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        inference = "-" if c["inference_p50_ms"] is None else \
            f"{c['inference_p50_ms']:.3f} / {c['inference_p99_ms']:.3f}"
        e2e = "-" if c["p50_ms"] is None else f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f} / {c['max_ms']:.2f}"
        lines.append(f"| {c['model']} | {c['trigger']} | {c['rate_hz']:g} | {e2e} | {inference} | "
                     f"{c['achieved_hz']:.0f} | {c['miss_share']:.2%} | {c['dropped']} | {c['cpu_percent']:.0f} |")
    lines += ["", "| model / trigger | highest sustained rate (p99 < period, misses <= 0.1%) |", "|---|---|"]
    lines += [f"| {k} | {'none of the rates' if v is None else f'{v:g} Hz'} |"
              for k, v in result["sustained_hz"].items()]
    return "\n".join(lines)


def plot(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, rate_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = max(c["rate_hz"] for c in result["cells"])
    for c in result["cells"]:
        if c["rate_hz"] == top and c["latencies_ms"]:
            values = np.sort(c["latencies_ms"])
            cdf.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{c['model']} ({c['trigger']})")
    cdf.axvline(1e3 / top, color="k", lw=0.8, ls="--", label="one period")
    cdf.set_xscale("log")
    cdf.set_xlabel(f"observation stamp to command arrival at {top:g} Hz (ms)")
    cdf.set_ylabel("share of commands")
    cdf.legend(fontsize=7)
    groups = sorted({(c["model"], c["trigger"]) for c in result["cells"]})
    for model, trigger in groups:
        group = [c for c in result["cells"] if c["model"] == model and c["trigger"] == trigger]
        rate_ax.plot([c["rate_hz"] for c in group], [c["achieved_hz"] for c in group], "o-",
                     label=f"{model} ({trigger})")
    rates = sorted({c["rate_hz"] for c in result["cells"]})
    rate_ax.plot(rates, rates, "k--", lw=0.8, label="requested")
    rate_ax.set_xscale("log")
    rate_ax.set_yscale("log")
    rate_ax.set_xlabel("requested rate (Hz)")
    rate_ax.set_ylabel("commands per second")
    rate_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def report(result: dict, machine_text: str, json_path: str | None, plot_path: str | None) -> None:
    print(f"\n{machine_text}\n")
    print(markdown_table(result))
    floor = {c["rate_hz"]: c["p50_ms"] for c in result["cells"] if c["model"].startswith("DDS floor")}
    for c in result["cells"]:
        if c["model"].startswith("DDS floor") or c["p50_ms"] is None or floor.get(c["rate_hz"]) is None:
            continue
        c["over_floor_p50_ms"] = c["p50_ms"] - floor[c["rate_hz"]]
    shares = [f"{c['model']} {c['trigger']} {c['rate_hz']:g} Hz +{c['over_floor_p50_ms']:.3f} ms"
              for c in result["cells"] if "over_floor_p50_ms" in c]
    if shares:
        print("\nend-to-end p50 above the DDS floor at the same rate: " + "; ".join(shares))
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}")
    if plot_path:
        plot(result, plot_path, f"vdd bench ros: end-to-end latency over ROS 2 ({machine_text})")
        print(f"wrote {plot_path}")
