"""Simulated arm: a built-in task's ArmSim (parameter ``task``: arm_avoid, the default, or
arm_sort), one episode at a time, behind ROS 2 topics.

Runs the physics at the task's rate (arm_avoid 200 Hz, arm_sort 100 Hz; times ``real_time_factor``)
and publishes ``joint_states`` and, for a task whose observation holds ``vector`` fields (arm_sort:
``visited`` on ``task_state``, std_msgs/Float64MultiArray), each of them on its topic just before
every ``joint_states`` message (the policy node stamps them on arrival).

Takes joint position targets from ``commands`` (std_msgs/Float64MultiArray, joints in the order
of the ``joint_names`` it publishes) or ``joint_trajectory`` (trajectory_msgs/JointTrajectory:
each point's positions are the target from the previous point's time until its own
``time_from_start``, counted from the header stamp or, when that is zero, from the arrival; the
last point is held).

With ``command_interface: velocity`` (a velocity forward_command_controller; arm_avoid only) ``commands``
carries joint velocities (rad/s) instead: each is held until the next command, clipped to the joint's
velocity limit and integrated, a joint stopping at its position limit; ``joint_trajectory`` is ignored. Each
episode starts at rest (zero velocity).

Episodes: after a reset the arm holds its start pose still for ``settle_s`` (commands are
ignored), then publishes ``episode_start`` (std_msgs/Int32, the episode index; the policy node
clears its observation history and action chunk on it) and waits for the first command: the
episode's clock starts with it, as an offline rollout starts with its first action. When an
episode ends (success, collision or timeout) its outcome goes out on ``episode_result``
(std_msgs/String, JSON: episode, success, collision, timeout, route (null unless success),
duration_s, start_q, ee_path at the control rate) and, with ``auto_reset``, the next episode
starts. Start poses come from ``seed`` exactly as the task's ``rollout(seed=...)`` draws
them, so episode k over ROS starts where offline episode k starts.

Pacing: real time by default (``real_time_factor`` scales it; with ``publish_clock`` the
simulated time goes out on ``/clock`` for nodes run with ``use_sim_time``). ``lockstep``
instead steps one control period per command and publishes ``joint_states`` once per control
period (policy node: ``trigger:=observation``): the run then reproduces the offline rollout
exactly, as fast as the policy answers. Vector fields go out with each episode's announcement
and, when one changed during a period (an arm_sort target was reached), before ``joint_states``
by ``LOCKSTEP_ANNOUNCE_LEAD_S``: the policy reads the new value with the observation it triggers
(messages on two topics may arrive in either order).
"""
from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, Int32, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from vdd_ros.ros.spin import ThrottledWarnings, parameter_descriptor, run_node, stamp_seconds
from vdd_ros.tasks.registry import TASKS, task_module

WARN_PERIOD_S = 2.0
RESULT_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# physics ticks one timer callback may catch up on before the sim gives up on real time
MAX_CATCH_UP_TICKS = 40

# lockstep: how often the state machine is polled, and the start of an episode is announced
LOCKSTEP_POLL_S = 0.01
LOCKSTEP_REPEAT_S = 0.5
LOCKSTEP_ANNOUNCE_LEAD_S = 0.05

SETTLING, WAITING, RUNNING, FINISHED = "settling", "waiting_for_command", "running", "finished"
COMMAND_INTERFACES = ("position", "velocity")


PARAMETERS = {
    "task": ("arm_avoid", parameter_descriptor(ParameterType.PARAMETER_STRING, "The built-in task simulated.",
                                               choices=sorted(TASKS))),
    "seed": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER, "Seed of the episode start poses (as offline "
                                     "rollouts with the same seed).", int_range=(0, 2**31 - 1))),
    "auto_reset": (True, parameter_descriptor(ParameterType.PARAMETER_BOOL, "Start the next episode when one ends.")),
    "max_episodes": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER, "Stop after this many episodes "
                                                                     "(0 = never).", int_range=(0, 10**9))),
    "settle_s": (0.25, parameter_descriptor(ParameterType.PARAMETER_DOUBLE, "Seconds the start pose is held still "
                                                                   "(commands ignored) before an episode starts.",
                                   float_range=(0.0, 60.0))),
    "real_time_factor": (1.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE, "Simulated seconds per wall-clock "
                                                                         "second.", float_range=(0.05, 20.0))),
    "publish_clock": (False, parameter_descriptor(ParameterType.PARAMETER_BOOL, "Publish the simulated time on /clock "
                                                                       "(run other nodes with use_sim_time).")),
    "lockstep": (False, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                    "Step one control period per command: joint_states go out once per control "
                                    "period and the physics waits for the next command on 'commands' (run the "
                                    "policy node with trigger:=observation, output:=commands). As fast as the "
                                    "policy answers, and scored exactly like an offline rollout.")),
    "wait_for_subscribers": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                            "Keep the first episode settling until joint_states has this many "
                                            "subscribers (0 = do not wait), so that every policy node, a shadow "
                                            "included, sees the whole run.", int_range=(0, 1000))),
    "command_interface": ("position", parameter_descriptor(
        ParameterType.PARAMETER_STRING, "What 'commands' carries: position (joint position targets, the task's "
        "servo tracks them) or velocity (joint velocities in rad/s for a velocity controller: held until the next "
        "command, clipped to the velocity limits, stopped at the position limits; arm_avoid only).",
        choices=COMMAND_INTERFACES)),
    "publish_every": (1, parameter_descriptor(ParameterType.PARAMETER_INTEGER, "Publish joint_states every this many "
                                                                      "physics ticks.", int_range=(1, 1000))),
}


class ArmSimNode(Node):
    def __init__(self, node_name: str = "arm_sim", **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.auto_reset, self.max_episodes, self.settle_s = p["auto_reset"], p["max_episodes"], p["settle_s"]
        self.rtf, self.publish_every, self.lockstep = p["real_time_factor"], p["publish_every"], p["lockstep"]
        self.wait_for_subscribers = p["wait_for_subscribers"]
        if self.lockstep and p["publish_clock"]:
            self.get_logger().warning("publish_clock is ignored in lockstep: stamps are wall-clock times")
            p["publish_clock"] = False
        if p["task"] not in TASKS:
            raise ValueError(f"parameter 'task': expected one of {sorted(TASKS)}, got {p['task']!r}")
        self.task = task_module(p["task"])
        if p["command_interface"] not in COMMAND_INTERFACES:
            raise ValueError(f"parameter 'command_interface': expected one of {list(COMMAND_INTERFACES)}, got "
                             f"{p['command_interface']!r}")
        self.velocity_interface = p["command_interface"] == "velocity"
        if self.velocity_interface and not hasattr(self.task.ArmSim, "step_velocity"):
            raise ValueError(f"parameter 'command_interface': task {p['task']!r} has no velocity input "
                             "(expected position)")
        self.joint_names = tuple(self.task.JOINT_NAMES)
        self.physics_rate_hz = self.task.PHYSICS_RATE_HZ
        self.ticks_per_control = self.task.TICKS_PER_CONTROL
        self.vector_fields = [f for f in self.task.task_spec(1, 1).observation_fields if f.kind == "vector"]
        self.sim = self.task.ArmSim(batch=1)
        self.dt = 1.0 / self.physics_rate_hz
        self.start_rng = np.random.default_rng(p["seed"])
        self.episode = -1
        self.state = FINISHED
        self.target = self.sim.q[0].copy()
        self.velocity = np.zeros_like(self.target)  # command_interface velocity: the velocity commanded
        self.trajectory = None  # (start time [sim clock s], times [n], positions [n, J])
        self._warn = ThrottledWarnings(self.get_logger(), WARN_PERIOD_S)
        # simulated clock: seconds since the epoch, starting at the wall time of start-up
        self.clock_s = time.time()
        self._physics_ticks = 0
        self._wall_start = time.monotonic()
        self.lagged_ticks = 0

        self.joint_pub = self.create_publisher(JointState, "joint_states", 10)
        # late subscribers (a scorer that starts after the sim) still get every outcome
        self.result_pub = self.create_publisher(String, "episode_result", RESULT_QOS)
        self.start_pub = self.create_publisher(Int32, "episode_start", 10)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if p["publish_clock"] else None
        self.vector_pubs = {f.name: self.create_publisher(Float64MultiArray, f.topic, 10) for f in self.vector_fields}
        self._published_vectors: dict[str, list[float]] = {}
        self.create_subscription(Float64MultiArray, "commands", self._on_commands, 10)
        self.create_subscription(JointTrajectory, "joint_trajectory", self._on_trajectory, 10)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self._begin_episode()
        if self.lockstep:
            self.create_timer(LOCKSTEP_POLL_S, self._on_lockstep_timer)
        else:
            # the timer runs at the physics rate in wall time at most; it catches up on missed ticks
            self.create_timer(self.dt / max(self.rtf, 1.0), self._on_timer)
        pace = "in lockstep with the commands" if self.lockstep else f"x {self.rtf:g} real time"
        self.get_logger().info(f"{p['task']} simulation at {self.physics_rate_hz} Hz {pace}, "
                               f"{p['command_interface']} commands, "
                               f"joints {list(self.joint_names)}, seed {p['seed']}, "
                               f"{self.max_episodes or 'unlimited'} episodes")

    # --- episodes --------------------------------------------------------------------
    def _begin_episode(self) -> None:
        if self.max_episodes and self.episode + 1 >= self.max_episodes:
            self.state = FINISHED
            self.get_logger().info(f"all {self.max_episodes} episodes done: holding")
            return
        self.episode += 1
        self.sim.reset(self.start_rng, self.sim.sample_start(self.start_rng, 1))
        self.start_q = self.sim.q[0].copy()
        self.target = self.start_q.copy()
        self.velocity = np.zeros_like(self.start_q)
        self.trajectory = None
        self._path = [self.sim.ee_position()[0].copy()]
        self.state = SETTLING
        self._settle_until = self.clock_s + self.settle_s
        self._settle_until_wall = time.monotonic() + self.settle_s
        self._announced_at = -math.inf
        self._state_due = math.inf

    def _subscribers_ready(self) -> bool:
        """Whether the first episode may start: joint_states has the subscribers asked for."""
        if self.wait_for_subscribers == 0:
            return True
        found = self.count_subscribers(self.joint_pub.topic_name)
        if found >= self.wait_for_subscribers:
            self.get_logger().info(f"{found} subscribers on {self.joint_pub.topic_name}: episode {self.episode} starts")
            self.wait_for_subscribers = 0
            return True
        self._warn("subscribers", f"episode {self.episode} waits for {self.wait_for_subscribers} subscribers on "
                                  f"{self.joint_pub.topic_name}, {found} so far")
        return False

    def _end_episode(self) -> None:
        sim = self.sim
        route = sim.route(0)
        result = {"episode": self.episode, "success": bool(sim.success[0]), "collision": bool(sim.collision[0]),
                  "timeout": bool(sim.timeout[0]), "route": route, "duration_s": round(float(sim.time[0]), 4),
                  "start_q": [round(float(v), 6) for v in self.start_q],
                  "ee_path": np.round(np.asarray(self._path), 5).tolist()}
        self.result_pub.publish(String(data=json.dumps(result)))
        outcome = "success" if result["success"] else "collision" if result["collision"] else "timeout"
        self.get_logger().info(f"episode {self.episode}: {outcome}, route {route}, {result['duration_s']:.2f} s")
        if self.auto_reset:
            self._begin_episode()
        else:
            self.state = FINISHED

    def _on_reset(self, request, response):
        self._begin_episode()
        response.success = self.state == SETTLING
        response.message = f"episode {self.episode} starts after {self.settle_s:g} s" if response.success \
            else f"all {self.max_episodes} episodes done"
        return response

    # --- commands --------------------------------------------------------------------
    def _accepting(self) -> bool:
        return self.state in (WAITING, RUNNING)

    def _on_commands(self, msg: Float64MultiArray) -> None:
        target = np.asarray(msg.data, dtype=np.float64)
        if target.size != len(self.joint_names) or not np.all(np.isfinite(target)):
            what = "velocities" if self.velocity_interface else "positions"
            self._warn("commands", f"ignored command on {self.resolve_topic_name('commands')}: expected "
                                   f"{len(self.joint_names)} finite {what} for {list(self.joint_names)}, got "
                                   f"{list(msg.data)}")
            return
        if not self._accepting():
            return
        if self.velocity_interface:
            self.velocity = target
        else:
            self.target = target
        self.trajectory = None
        if self.state == WAITING:
            self.state = RUNNING
        if self.lockstep:
            self._lockstep_control_period()

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        topic = self.resolve_topic_name("joint_trajectory")
        if self.velocity_interface:
            self._warn("trajectory", f"ignored trajectory on {topic}: command_interface is velocity")
            return
        joint_names = self.joint_names
        if sorted(msg.joint_names) != sorted(joint_names):
            self._warn("trajectory", f"ignored trajectory on {topic}: joint_names {list(msg.joint_names)}, "
                                     f"expected {list(joint_names)} in any order")
            return
        order = [list(msg.joint_names).index(name) for name in joint_names]
        if not msg.points or any(len(p.positions) != len(joint_names) for p in msg.points):
            self._warn("trajectory", f"ignored trajectory on {topic}: expected points with "
                                     f"{len(joint_names)} positions each")
            return
        positions = np.asarray([p.positions for p in msg.points], dtype=np.float64)[:, order]
        times = np.asarray([stamp_seconds(p.time_from_start) for p in msg.points])
        if not np.all(np.isfinite(positions)) or np.any(np.diff(times) <= 0):
            self._warn("trajectory", f"ignored trajectory on {topic}: positions must be finite and "
                                     f"time_from_start increasing, got times {times.tolist()}")
            return
        if not self._accepting():
            return
        if self.lockstep:
            self._warn("lockstep", "ignored trajectory: in lockstep the sim steps on 'commands' only")
            return
        start = stamp_seconds(msg.header.stamp) or self.clock_s
        self.trajectory = (start, times, positions)
        if self.state == WAITING:
            self.state = RUNNING

    def _current_target(self) -> np.ndarray:
        if self.trajectory is not None:
            start, times, positions = self.trajectory
            # the first point not yet due is the one being moved to; after the last, hold it
            index = int(np.searchsorted(times, self.clock_s - start, side="right"))
            return positions[min(index, len(times) - 1)]
        return self.target

    # --- physics loop -------------------------------------------------------------------
    def _on_timer(self) -> None:
        due = int((time.monotonic() - self._wall_start) * self.physics_rate_hz * self.rtf) - self._physics_ticks
        if due > MAX_CATCH_UP_TICKS:
            # too far behind (a busy CPU): drop the backlog instead of running faster than real time
            self.lagged_ticks += due - MAX_CATCH_UP_TICKS
            self._physics_ticks += due - MAX_CATCH_UP_TICKS
            due = MAX_CATCH_UP_TICKS
        for _ in range(max(due, 0)):
            self._physics_tick()
            if self._physics_ticks % self.publish_every == 0:
                self._publish_state()

    def _on_lockstep_timer(self) -> None:
        now = time.monotonic()
        if self.state == SETTLING and now >= self._settle_until_wall and self._subscribers_ready():
            self.state = WAITING
        if self.state == WAITING and now - self._announced_at >= LOCKSTEP_REPEAT_S:
            # announce, then the first observation a moment later: the policy has cleared its history by then
            self._announced_at = now
            self._observe_at = now + LOCKSTEP_ANNOUNCE_LEAD_S
            self.start_pub.publish(Int32(data=self.episode))
            # the new episode's vector values go out with the announcement: the policy keeps the last
            # values it got, the previous episode's, until they arrive
            self._publish_vectors()
        if self.state == WAITING and now >= getattr(self, "_observe_at", math.inf):
            self._observe_at = math.inf
            self._publish_state()
        if self.state == RUNNING and now >= self._state_due:
            self._state_due = math.inf
            self._publish_joint_state()

    def _lockstep_control_period(self) -> None:
        """One control period of physics with the command just received, then the next observation."""
        for _ in range(self.ticks_per_control):
            self.clock_s += self.dt
            self._step_sim()
            if self.sim.done[0]:
                break
        self._path.append(self.sim.ee_position()[0].copy())
        if self.sim.done[0]:
            self._end_episode()
        elif self._publish_vectors():
            # a vector changed: it goes out now, the observation that triggers the policy a moment later
            self._state_due = time.monotonic() + LOCKSTEP_ANNOUNCE_LEAD_S
        else:
            self._publish_joint_state()

    def _physics_tick(self) -> None:
        self._physics_ticks += 1
        self.clock_s += self.dt
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=self._stamp()))
        if self.state == SETTLING and self.clock_s >= self._settle_until and self._subscribers_ready():
            self.state = WAITING
        if self.state == WAITING and self.clock_s - self._announced_at >= 0.5:
            # repeated while waiting, so a policy node that starts late still clears its history
            self._announced_at = self.clock_s
            self.start_pub.publish(Int32(data=self.episode))
        if self.state != RUNNING:
            return
        self._step_sim()
        if int(self.sim.ticks[0]) % self.ticks_per_control == 0:
            self._path.append(self.sim.ee_position()[0].copy())
        if self.sim.done[0]:
            self._path.append(self.sim.ee_position()[0].copy())
            self._end_episode()

    def _step_sim(self) -> None:
        if self.velocity_interface:
            self.sim.step_velocity(self.velocity[None])
        else:
            self.sim.step_physics(self._current_target()[None])

    def _stamp(self):
        sec = int(self.clock_s)
        return Time(sec=sec, nanosec=int((self.clock_s - sec) * 1e9))

    def _publish_vectors(self) -> bool:
        """Publish the task's vector observation fields; whether any value differs from the last one sent."""
        if not self.vector_fields:
            return False
        values = self.sim.vector_observations(0)
        changed = False
        for obs_field in self.vector_fields:
            data = [float(v) for v in values[obs_field.name]]
            changed |= self._published_vectors.get(obs_field.name) != data
            self._published_vectors[obs_field.name] = data
            self.vector_pubs[obs_field.name].publish(Float64MultiArray(data=data))
        return changed

    def _publish_state(self) -> None:
        """The task's vector fields, then ``joint_states``."""
        self._publish_vectors()
        self._publish_joint_state()

    def _publish_joint_state(self) -> None:
        msg = JointState(name=list(self.joint_names), position=self.sim.q[0].tolist(),
                         velocity=self.sim.qdot[0].tolist())
        msg.header.stamp = self.get_clock().now().to_msg() if self.lockstep else self._stamp()
        self.joint_pub.publish(msg)


def main(args=None) -> int:
    return run_node(ArmSimNode, "arm_sim", args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
