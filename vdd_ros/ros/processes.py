"""Start the package's nodes as separate processes without a ROS distribution (no ``ros2 launch``).

``vdd demo``, ``vdd bench node`` and the integration tests use this: each node runs as
``python -m vdd_ros.ros.<node> --ros-args --params-file F -p key:=value -r __ns:=/x``, exactly
what ``ros2 run`` / launch_ros pass, and stops with SIGINT (rclpy shuts down cleanly on it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vdd_ros.validation import check_choice, check_int

NODE_MODULES = {"policy_node": "vdd_ros.ros.policy_node", "arm_sim_node": "vdd_ros.ros.arm_sim_node",
                "latency_echo": "vdd_ros.ros.latency_echo"}


def ros_environment(domain_id: int, base: dict | None = None) -> dict:
    """A copy of the environment that keeps DDS on this machine, in ``domain_id``, one thread per process."""
    check_int("ROS_DOMAIN_ID", domain_id, 0, 101)
    env = dict(os.environ if base is None else base)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # the source checkout (or installed package) this process runs from
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH", "")]))
    return env


def format_value(value) -> str:
    """A parameter value as ``-p name:=value`` reads it (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f"'{value}'" if value == "" or value.lower() in ("true", "false") else value
    return repr(value)


class NodeProcess:
    """One node in its own process; stdout and stderr go to ``log_path``."""

    def __init__(self, executable: str, log_path, env: dict, params_files=(), parameters: dict | None = None,
                 namespace: str = "", remappings: dict | None = None, node_name: str = "",
                 realtime_priority: int | None = None):
        """``realtime_priority``: None inherits this process's scheduling, 0 is normal scheduling
        (SCHED_OTHER), 1..99 SCHED_FIFO at that priority (set in the child before it starts)."""
        if realtime_priority is not None:
            check_int("realtime_priority", realtime_priority, 0, 99)
        check_choice("executable", executable, sorted(NODE_MODULES))
        command = [sys.executable, "-m", NODE_MODULES[executable], "--ros-args"]
        for path in params_files:
            command += ["--params-file", str(path)]
        for name, value in (parameters or {}).items():
            command += ["-p", f"{name}:={format_value(value)}"]
        if namespace:
            command += ["-r", f"__ns:={namespace}"]
        if node_name:
            command += ["-r", f"__node:={node_name}"]
        for old, new in (remappings or {}).items():
            command += ["-r", f"{old}:={new}"]
        self.command = command
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        preexec = None
        if realtime_priority is not None:
            policy = os.SCHED_FIFO if realtime_priority else os.SCHED_OTHER

            def preexec():
                os.sched_setscheduler(0, policy, os.sched_param(realtime_priority))
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=preexec)
        self._interrupted = False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log():
                return True
            if not self.alive:
                return text in self.log()
            time.sleep(0.1)
        return False

    def interrupt(self) -> None:
        """SIGINT, once: a second one could land after Python reset its handlers while exiting."""
        if self.alive and not self._interrupted:
            self._interrupted = True
            self.process.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT and wait; SIGTERM, then SIGKILL only if it does not exit. Returns the exit status."""
        self.interrupt()
        if self.alive:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)  # run_node: every thread's stack into the log
                time.sleep(1.0)
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()  # last resort: leaves DDS shared-memory files behind
                    self.process.wait()
        self._log.close()
        return self.process.returncode


def stop_all(processes, timeout: float = 10.0) -> list[int]:
    """SIGINT to all at once (they shut down in parallel), then wait for each."""
    for proc in processes:
        proc.interrupt()
    return [proc.stop(timeout) for proc in processes]
