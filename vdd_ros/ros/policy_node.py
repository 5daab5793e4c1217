"""The policy node: runs an exported model (VDD student or diffusion teacher) in a control loop.

A managed (lifecycle) node. configure loads the model and checks its spec against the
parameters; activate starts the control loop; deactivate stops commanding and holds;
cleanup releases the model. With ``autostart`` (default) it walks itself to active.

Subscribes: ``joint_states`` (sensor_msgs/JointState), the vector topics the model's spec
names, ``episode_start`` (std_msgs/Int32: clears history and chunk, sent by arm_sim_node).
Publishes: ``commands`` (std_msgs/Float64MultiArray) or ``joint_trajectory``
(trajectory_msgs/JointTrajectory), ``~/expert`` (std_msgs/Int32, -1 for the teacher),
``~/inference_time`` (std_msgs/Float64, seconds per model call), ``/diagnostics``.
Services: ``~/reset`` (std_srvs/Trigger: clear history, chunk and expert hold), ``~/enable``
(std_srvs/SetBool: enable or disable commanding).
Safety (vdd_ros.ros.safety, README "Safety"): nothing is commanded unless enabled (``start_enabled``,
``~/enable``); ``estop`` (std_msgs/Bool) true disables at once and latches until it is false again and
``~/enable`` is called; every command is clipped to the joint limits (less ``joint_limit_margin``) and
moves at most ``max_joint_step`` from the previous one (from the measured position after enabling: the
start-up ramp); non-finite model outputs are never published and ``max_consecutive_faults`` of them
disable the node; stale observations hold or stop (``on_stale``); observations whose stamps go backwards
are dropped; more than ``max_deadline_misses`` late ticks within ``deadline_window_s`` hold.
Action kinds (the model spec's ``action_kind``): ``joint_position`` targets are commanded as they are;
``joint_delta`` increments are integrated into position targets (the first of each chunk from the measured
position at planning time, each next one from the previous target) and then limited exactly like positions,
for both outputs; ``joint_velocity`` velocities (rad/s) go out on ``commands`` for a velocity
forward_command_controller, clipped to the spec's joint velocity limits and stopped at the position limits
(``SafetyLayer.velocity``), and wherever a position model would hold or go silent (e-stop, disable, stale data
in both ``on_stale`` modes, deadline or OOD holds, a refused output, deactivate) the node commands zero
velocity once; output ``joint_trajectory`` refuses a velocity model at configure.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from array import array
from collections import deque

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PointStamped, PoseStamped
from rcl_interfaces.msg import ParameterType
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.subscription import Subscription
from rclpy.timer import Timer
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64, Float64MultiArray, Int32, MultiArrayDimension
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from vdd_ros.ros.command_executor import ChunkExecutor, ExpertHold
from vdd_ros.ros.observation import ObservationAssembler, ObservationError, ObservationHistory, spec_mismatches
from vdd_ros.ros.realtime import freeze_gc, lock_memory, quantiles, unfreeze_gc, unlock_memory
from vdd_ros.ros.safety import (
    DeadlineWatchdog,
    ObservationEnvelope,
    SafetyError,
    SafetyLayer,
    integrate_deltas,
    per_joint,
)
from vdd_ros.ros.spin import (
    EXECUTORS,
    JOINT_STATES_QOS,
    ThrottledWarnings,
    parameter_descriptor,
    run_node,
    stamp_seconds,
)

TRIGGERS = ("timer", "observation")
OUTPUTS = ("commands", "joint_trajectory")
EXPERT_SELECTIONS = ("sample", "greedy")
DEVICES = ("auto", "cpu", "cuda")
ON_STALE = ("hold", "stop")
DEADLINE_SHARE = 0.1  # max_deadline_misses 0: this share of the ticks in deadline_window_s
OOD_THRESHOLD = 3.0  # std beyond the training range; docs/safety.md: what normal runs reach
WARN_PERIOD_S = 2.0
# a tick later than this many periods after the previous one counts as a deadline miss
LATE_TICK_FACTOR = 1.5
DIAGNOSTICS_WINDOW = 1000  # samples behind the rate and latency figures on /diagnostics


def default_model_path() -> str:
    try:
        from vdd_ros.paths import model_file
        return str(model_file("student.onnx"))
    except FileNotFoundError:
        return ""


# name: (default, descriptor); config/policy.yaml holds the same defaults
PARAMETERS = {
    "model": ("", parameter_descriptor(
        ParameterType.PARAMETER_STRING, "Path of the exported .onnx model (student or teacher); "
        "empty: models/student.onnx in the package's share directory.")),
    "device": ("cpu", parameter_descriptor(ParameterType.PARAMETER_STRING,
                                   "onnxruntime execution provider: cpu (fastest for one robot: one call of "
                                   "a small model costs far less than GPU kernel launches), cuda or cuda:N, "
                                   "or auto (CUDA when available).",
                                   choices=DEVICES)),
    "intra_op_threads": (1, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                        "onnxruntime threads per model call (1 is fastest for small models).",
                                        int_range=(1, 64))),
    "seed": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER, "Seed of the sampling random generator.",
                            int_range=(0, 2**31 - 1))),
    "joint_names": ([""], parameter_descriptor(ParameterType.PARAMETER_STRING_ARRAY,
                                      "Joints the robot commands, in command order; must equal the model's "
                                      "joint names. Empty (['']) = the model's.")),
    "control_rate_hz": (0.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                         "Control loop rate; 0 = the rate the model was trained for. Another "
                                         "rate is refused unless allow_rate_override.", float_range=(0.0, 10000.0))),
    "allow_rate_override": (False, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                               "Run at control_rate_hz even if the model was trained for another "
                                               "rate (benchmarks).")),
    "trigger": ("timer", parameter_descriptor(ParameterType.PARAMETER_STRING,
                                     "What starts a control tick: a timer at the control rate, or each new "
                                     "JointState.", choices=TRIGGERS)),
    "output": ("commands", parameter_descriptor(ParameterType.PARAMETER_STRING,
                                       "commands: std_msgs/Float64MultiArray on 'commands', one action per tick; "
                                       "joint_trajectory: the action chunk as a trajectory_msgs/JointTrajectory on "
                                       "'joint_trajectory' at each replan.", choices=OUTPUTS)),
    "replan_every": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                    "Ticks between model calls (actions of a chunk executed before replanning); "
                                    "0 = the model's execute_steps, else its action horizon.", int_range=(0, 1000))),
    "expert_selection": ("sample", parameter_descriptor(ParameterType.PARAMETER_STRING,
                                               "sample: draw the expert from the gating and the action from it; "
                                               "greedy: the most likely expert's mean.", choices=EXPERT_SELECTIONS)),
    "expert_hold_ticks": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                         "Keep a chosen expert at least this many control ticks (0 = off).",
                                         int_range=(0, 100000))),
    "expert_hold_min_weight": (0.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                                "After expert_hold_ticks, keep the expert while its gating weight "
                                                "stays >= this (0 = off).", float_range=(0.0, 1.0))),
    "noise_scale": (0.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                     "Student only: 0 acts with the chosen expert's mean (VDD's policy); > 0 adds "
                                     "noise_scale times the expert's own noise. The teacher requires 0.",
                                     float_range=(0.0, 10.0))),
    "max_observation_age_s": (0.5, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                               "Observations older than this give no command (warning).",
                                               float_range=(0.0, 3600.0))),
    "on_stale": ("hold", parameter_descriptor(ParameterType.PARAMETER_STRING,
                                     "When observations are stale: hold (command the last measured position once, "
                                     "then nothing) or stop (command nothing).", choices=ON_STALE)),
    "start_enabled": (False, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                         "Command as soon as active; false: wait for ~/enable true (a physical "
                                         "arm). config/policy.yaml (the simulated arm) sets true.")),
    "max_joint_step": ([0.0], parameter_descriptor(ParameterType.PARAMETER_DOUBLE_ARRAY,
                                          "Largest change of a joint's command per command (rad): one number or "
                                          "one per joint; [0.0] = each joint's velocity limit / control rate. "
                                          "Larger model outputs are clipped toward the target.")),
    "joint_limit_margin": (0.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                            "Commands stay this far (rad) inside the model spec's joint position "
                                            "limits.", float_range=(0.0, 10.0))),
    "max_consecutive_faults": (3, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                              "Non-finite model outputs in a row that disable commanding "
                                              "(latched until ~/enable true).", int_range=(1, 1000000))),
    "max_deadline_misses": (0, parameter_descriptor(ParameterType.PARAMETER_INTEGER,
                                           "More late ticks than this within deadline_window_s: hold (no "
                                           "commands) until they drop below it; 0 = a tenth of the window's ticks "
                                           "(at least 3); -1 = never hold.", int_range=(-1, 1000000))),
    "deadline_window_s": (1.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                           "Window of max_deadline_misses.", float_range=(0.001, 3600.0))),
    "ood_threshold": (OOD_THRESHOLD, parameter_descriptor(
        ParameterType.PARAMETER_DOUBLE, "Hold (no commands) while the observation lies further than this many "
        "standard deviations outside the training observations' range (the largest over its dimensions); "
        "0 = off.", float_range=(0.0, 1000.0))),
    "executor": ("single_threaded", parameter_descriptor(
        ParameterType.PARAMETER_STRING, "The rclpy executor the process spins (read at start-up): "
        "single_threaded, or events (rclpy's experimental EventsExecutor; docs/benchmarks.md).", choices=EXECUTORS)),
    "diagnostics_period_s": (1.0, parameter_descriptor(ParameterType.PARAMETER_DOUBLE,
                                              "Period of the /diagnostics message.", float_range=(0.01, 3600.0))),
    "autostart": (True, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                    "Configure and activate at start-up (else wait for lifecycle transitions).")),
    "gc_freeze": (True, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                    "At activate: one garbage collection, then gc.freeze() of everything alive "
                                    "(model, entities, imports), so no full collection walks them during the control "
                                    "loop (one took 14-19 ms, 7-10 periods at 500 Hz); unfrozen at deactivate. "
                                    "Process-wide.")),
    "lock_memory": (False, parameter_descriptor(ParameterType.PARAMETER_BOOL,
                                      "At activate: mlockall(MCL_CURRENT|MCL_FUTURE), all pages resident (about "
                                      "+225 MiB RSS for the student), no page faults in the loop; needs "
                                      "CAP_IPC_LOCK or a memlock limit, else a warning and unlocked memory. "
                                      "Unlocked at deactivate. Process-wide.")),
}


class PolicyNode(LifecycleNode):
    """``stats_window``: how many recent tick periods / inference times the statistics keep
    (None: all, for benchmarks)."""

    def __init__(self, node_name: str = "policy_node", stats_window: int | None = 2000, **kwargs):
        super().__init__(node_name, **kwargs)
        self.stats_window = stats_window
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self.executor_kind = self._param("executor")  # run_node builds this executor
        if self.executor_kind not in EXECUTORS:
            self.get_logger().error(f"parameter executor: expected one of {list(EXECUTORS)}, got "
                                    f"'{self.executor_kind}': using single_threaded")
            self.executor_kind = "single_threaded"
        self.policy = None
        self._entities = []  # publishers, subscriptions, timers, services made at configure
        self._timer = None
        self._reset_service = self.create_service(Trigger, "~/reset", self._on_reset)
        # enable and e-stop work in every lifecycle state; the e-stop latches even before configure
        self._enable_service = self.create_service(SetBool, "~/enable", self._on_enable)
        self._estop_sub = self.create_subscription(Bool, "estop", self._on_estop, 10)
        self._estop_seen = False
        self.safety: SafetyLayer | None = None
        self._warn = ThrottledWarnings(self.get_logger(), WARN_PERIOD_S)
        self._active = False
        self._diag_timer = None
        self._diag_in_tick = False
        self.gc_frozen = False
        self.memory_locked = False
        self._reset_stats()

    # --- parameters ----------------------------------------------------------------
    def _param(self, name):
        return self.get_parameter(name).value

    def _read_parameters(self) -> list[str]:
        """Copy the parameters into attributes; returns problems (one line each)."""
        problems = []
        choices = {"device": DEVICES, "trigger": TRIGGERS, "output": OUTPUTS, "expert_selection": EXPERT_SELECTIONS,
                   "on_stale": ON_STALE}
        for name, allowed in choices.items():
            value = self._param(name)
            if value not in allowed and not (name == "device" and value.startswith("cuda:")):
                problems.append(f"parameter {name}: expected one of {list(allowed)}, got '{self._param(name)}'")
        self.joint_names_param = [j for j in self._param("joint_names") if j]
        self.trigger = self._param("trigger")
        self.output = self._param("output")
        self.greedy = self._param("expert_selection") == "greedy"
        self.max_age = float(self._param("max_observation_age_s"))
        self.on_stale = self._param("on_stale")
        return problems

    def _make_safety(self, spec) -> SafetyLayer:
        """The safety layer for ``spec`` and the parameters; raises SafetyError naming the parameter."""
        n = spec.n_joints
        margin = float(self._param("joint_limit_margin"))
        step = [float(v) for v in self._param("max_joint_step")]
        if step in ([], [0.0]):
            step = np.asarray(spec.joint_velocity_limits, dtype=np.float64) / self.rate_hz
        lower = np.asarray(spec.joint_lower, dtype=np.float64) + margin
        upper = np.asarray(spec.joint_upper, dtype=np.float64) - margin
        safety = SafetyLayer(lower, per_joint("upper", upper, n), per_joint("max_joint_step", step, n),
                             int(self._param("max_consecutive_faults")),
                             start_enabled=bool(self._param("start_enabled")),
                             max_velocity=spec.joint_velocity_limits, period_s=1.0 / self.rate_hz)
        if self._estop_seen:  # an e-stop that went true before configure still holds
            safety.estop(self._estop_seen)
        return safety

    # --- lifecycle -------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        problems = self._read_parameters()
        model_path = self._param("model") or default_model_path()
        if problems:
            for line in problems:
                self.get_logger().error(line)
            return TransitionCallbackReturn.FAILURE
        if not model_path:
            self.get_logger().error("parameter model: no model path given and no shipped student found")
            return TransitionCallbackReturn.FAILURE
        from vdd_ros.runtime import load_policy  # onnxruntime loads here, not at import
        try:
            policy = load_policy(model_path, device=self._param("device"),
                                 intra_op_threads=int(self._param("intra_op_threads")),
                                 noise_scale=float(self._param("noise_scale")))
        except (OSError, ValueError) as err:
            self.get_logger().error(f"cannot load model '{model_path}': {err}")
            return TransitionCallbackReturn.FAILURE
        spec = policy.spec
        problems = spec_mismatches(spec, self.joint_names_param, float(self._param("control_rate_hz")),
                                   bool(self._param("allow_rate_override")), output=self.output)
        replan_every = int(self._param("replan_every")) or int(spec.model_info.get("execute_steps", 0)) \
            or spec.action_horizon
        if replan_every > spec.action_horizon:
            problems.append(f"replan_every: parameter {replan_every} > model action horizon {spec.action_horizon}")
        if problems:
            for line in problems:
                self.get_logger().error(f"model '{model_path}' does not fit the parameters: {line}")
            return TransitionCallbackReturn.FAILURE
        self.policy = policy
        self.spec = spec
        self.action_kind = spec.action_kind
        self.velocity_interface = spec.action_kind == "joint_velocity"
        self.rate_hz = float(self._param("control_rate_hz")) or spec.control_rate_hz
        self.period = 1.0 / self.rate_hz
        self.assembler = ObservationAssembler(spec)
        self.history = ObservationHistory(spec.history, spec.obs_step_dim)
        self.chunk = ChunkExecutor(spec.action_horizon, replan_every)
        self.hold = ExpertHold(int(self._param("expert_hold_ticks")), float(self._param("expert_hold_min_weight")))
        self.rng = np.random.default_rng(int(self._param("seed")))
        try:
            safety = self._make_safety(spec)
            window = float(self._param("deadline_window_s"))
            misses = int(self._param("max_deadline_misses"))
            if misses == 0:
                misses = max(3, int(DEADLINE_SHARE * self.rate_hz * window))
            watchdog = DeadlineWatchdog(max(misses, 0), window)
        except SafetyError as err:
            self.policy = None
            self.get_logger().error(f"safety parameters: {err}")
            return TransitionCallbackReturn.FAILURE
        if self.safety is not None:  # a reconfigure keeps the enable state and the e-stop latch
            safety.enabled, safety.latched = self.safety.enabled, self.safety.latched
            safety.estop_active, safety.disabled_reason = self.safety.estop_active, self.safety.disabled_reason
        self.safety, self.watchdog = safety, watchdog
        self.envelope, envelope_source = ObservationEnvelope.from_spec(spec)
        self.ood_threshold = float(self._param("ood_threshold"))
        policy.warmup()
        self._make_entities()
        self._reset_stats()
        self.get_logger().info(
            f"configured: model '{model_path}' ({policy.kind}, {policy.n_experts} experts, provider "
            f"{policy.provider}), joints {list(spec.joint_names)}, {self.rate_hz:g} Hz, history {spec.history}, "
            f"horizon {spec.action_horizon}, replan every {replan_every} ticks, output '{self.output}' "
            f"({self._action_line()}); "
            f"max_joint_step {np.round(safety.max_step, 4).tolist()} rad, limits {np.round(safety.lower, 3).tolist()}"
            f"..{np.round(safety.upper, 3).tolist()}, deadline hold "
            f"{f'past {watchdog.max_misses} misses in {watchdog.window_s:g} s' if watchdog.max_misses else 'off'}, "
            f"ood_threshold {self.ood_threshold:g} std beyond "
            f"{envelope_source}, {safety.state}")
        return TransitionCallbackReturn.SUCCESS

    def _action_line(self) -> str:
        if self.action_kind == "joint_velocity":
            limits = np.round(np.asarray(self.spec.joint_velocity_limits, dtype=np.float64), 4).tolist()
            return f"joint_velocity: velocities within +-{limits} rad/s, zero velocity on every stop"
        if self.action_kind == "joint_delta":
            return "joint_delta: increments integrated from the measured position into position targets"
        return "joint_position targets"

    def _make_entities(self) -> None:
        if self.output == "commands":
            self.command_pub = self.create_lifecycle_publisher(Float64MultiArray, "commands", 10)
        else:
            self.command_pub = self.create_lifecycle_publisher(JointTrajectory, "joint_trajectory", 10)
        self.expert_pub = self.create_lifecycle_publisher(Int32, "~/expert", 10)
        self.latency_pub = self.create_lifecycle_publisher(Float64, "~/inference_time", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._command_msg, self._expert_msg, self._latency_msg = Float64MultiArray(), Int32(), Float64()
        self._monitoring_due = False
        self._entities = [self.command_pub, self.expert_pub, self.latency_pub, self.diag_pub]
        # depth 1: a node that falls behind answers the freshest observation, not a queue of old ones
        self._entities.append(self.create_subscription(JointState, "joint_states", self._on_joint_state,
                                                       JOINT_STATES_QOS))
        self._entities.append(self.create_subscription(Int32, "episode_start", self._on_episode_start, 10))
        for field in self.assembler.vector_fields:
            msg_type = {"std_msgs/Float64MultiArray": Float64MultiArray, "geometry_msgs/PointStamped": PointStamped,
                        "geometry_msgs/PoseStamped": PoseStamped}[field.msg_type]
            self._entities.append(self.create_subscription(
                msg_type, field.topic, lambda msg, name=field.name: self._on_vector(name, msg), 10))
        self._diag_period = float(self._param("diagnostics_period_s"))
        self._diag_timer = self.create_timer(self._diag_period, self._publish_diagnostics)
        self._entities.append(self._diag_timer)

    def _destroy_entities(self) -> None:
        for entity in self._entities:
            if isinstance(entity, Timer):
                self.destroy_timer(entity)
            elif isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            elif entity is self.diag_pub:
                self.destroy_publisher(entity)
            else:
                self.destroy_lifecycle_publisher(entity)
        self._entities = []
        self._diag_timer = None

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self._reset_policy_state()
        self._velocity_stopped = False  # a velocity model's first stop (or disabled tick) commands zero
        if self.trigger == "timer":
            self._timer = self.create_timer(self.period, self._control_tick)
            # /diagnostics goes out from the control tick, after its command: a timer of its own would fire
            # at a fixed phase of the control period and could hold a tick back by its whole run time
            # (on the timer's own schedule: the period keeps its phase across activate)
            self._next_diag = time.perf_counter() + self._diag_timer.time_until_next_call() * 1e-9
            self._diag_timer.cancel()
            self._diag_in_tick = True
        self._enter_realtime()
        self._active = True
        self.get_logger().info(f"active: commanding at {self.rate_hz:g} Hz ({self.trigger} trigger); "
                               f"{self.safety.state}")
        return super().on_activate(state)

    def _enter_realtime(self) -> None:
        """Everything the loop needs exists now: freeze the heap and lock memory (as the parameters ask)."""
        if self._param("lock_memory") and not self.memory_locked:
            self.memory_locked, line = lock_memory()
            if self.memory_locked:  # (rclpy refuses two severities from one call site)
                self.get_logger().info(line)
            else:
                self.get_logger().warning(line)
        if self._param("gc_freeze"):
            frozen, seconds = freeze_gc()
            self.gc_frozen = True
            self.get_logger().info(f"garbage collector: {frozen} objects frozen ({seconds * 1e3:.1f} ms)")

    def _leave_realtime(self) -> None:
        if self.gc_frozen:
            unfreeze_gc()
            self.gc_frozen = False
        if self.memory_locked:
            unlock_memory()
            self.memory_locked = False

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_control_loop()
        self._diagnostics_by_timer()
        self._leave_realtime()
        if self.velocity_interface:
            self._stop_velocity(force=True)
            self.get_logger().info("inactive: zero velocity commanded, no further commands")
            return super().on_deactivate(state)
        if self.safety.enabled:
            self._publish_hold()
        self.get_logger().info("inactive: holding the last measured position, no commands")
        return super().on_deactivate(state)

    def _stop_control_loop(self) -> None:
        self._active = False
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None

    def _diagnostics_by_timer(self) -> None:
        self._diag_in_tick = False
        if self._diag_timer is not None and self._diag_timer.is_canceled():
            self._diag_timer.reset()

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._stop_control_loop()
        self._leave_realtime()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._leave_realtime()  # a node destroyed while active leaves no frozen heap or locked memory behind
        super().destroy_node()

    def _release(self) -> None:
        self._destroy_entities()
        self.policy = None

    # --- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """With ``autostart``: configure, then activate (run_node calls this before spinning)."""
        self._read_parameters()
        if not self._param("autostart"):
            self.get_logger().info("autostart is false: waiting for lifecycle transitions")
            return
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            self.get_logger().error("configure failed: staying unconfigured (fix the parameters, then "
                                    "'ros2 lifecycle set <node> configure')")
            return
        self.trigger_activate()

    # --- state ---------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._tick = 0
        self._last_tick_time: float | None = None
        self.tick_periods: deque[float] = deque(maxlen=self.stats_window)
        self.tick_work_times: deque[float] = deque(maxlen=self.stats_window)
        self.inference_times: deque[float] = deque(maxlen=self.stats_window)
        self.deadline_misses = 0
        self.stale_skips = 0
        self.invalid_inputs = 0
        self.backwards_stamps = 0
        self.duplicate_stamps = 0
        self.watchdog_holds = 0
        self.ood_holds = 0
        self.ood_distance = 0.0
        self.ood_distance_max = 0.0
        self.commands_sent = 0
        self.zero_velocity_commands = 0
        self._velocity_stopped = False
        self._last_age = math.inf
        self._last_joint_stamp = -math.inf
        self._holding = ""  # why the last tick held ("stale", "deadline"): a hold is commanded once
        self._reported_catch_up = False

    def _reset_policy_state(self) -> None:
        if self.policy is None:
            return
        self.history.clear()
        self.chunk.clear()
        self.hold.clear()
        self.safety.restart_ramp()  # a new episode (the arm may have been moved): ramp from where it is

    def _on_reset(self, request, response):
        self._reset_policy_state()
        response.success = self.policy is not None
        response.message = "cleared history, action chunk and expert hold" if response.success \
            else "not configured: nothing to clear"
        return response

    def _on_enable(self, request, response):
        if self.safety is None:
            response.success, response.message = False, "not configured: no model, nothing to enable"
            return response
        response.success, response.message = self.safety.enable(bool(request.data))
        if response.success and request.data:
            self.chunk.clear()  # a fresh plan from the current observation, ramped from the measured position
            self._reported_catch_up = False
        elif response.success:
            self._stop_velocity()
        line = f"~/enable {bool(request.data)}: {response.message}"
        if response.success:  # (rclpy refuses two severities from one call site)
            self.get_logger().info(line)
        else:
            self.get_logger().warning(line)
        return response

    def _on_estop(self, msg: Bool) -> None:
        self._estop_seen = bool(msg.data)
        if self.safety is None:
            return
        if self.safety.estop(bool(msg.data)):
            self._stop_velocity()  # at once, not at the next tick
            self.get_logger().warning("e-stop: commanding disabled (latched until estop is false and ~/enable "
                                      "is called with true)")

    def _on_episode_start(self, msg: Int32) -> None:
        self._reset_policy_state()
        self.get_logger().debug(f"episode {msg.data} starts: history and chunk cleared")

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # --- inputs --------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState) -> None:
        if self.policy is None:
            return
        stamp = stamp_seconds(msg.header.stamp) or self._now()
        if stamp <= self._last_joint_stamp:
            if stamp == self._last_joint_stamp:
                self.duplicate_stamps += 1
            else:
                self.backwards_stamps += 1
            self._warn("stamp order", f"dropped JointState: stamp {stamp:.6f} s is not after the previous "
                       f"{self._last_joint_stamp:.6f} s")
            return
        try:
            self.assembler.update_joint_state(msg.name, msg.position, msg.velocity, stamp)
        except ObservationError as err:
            self.invalid_inputs += 1
            self._warn(str(err), f"ignored JointState on {self.resolve_topic_name('joint_states')}: {err}")
            return
        self._last_joint_stamp = stamp
        # trigger timer: a burst of messages gives one command per tick (the latest message); trigger
        # observation: one command per message by design (lockstep simulation), each within the step limit
        if self._active and self.trigger == "observation":
            self._control_tick()

    def _on_vector(self, field_name: str, msg) -> None:
        if isinstance(msg, Float64MultiArray):
            values, stamp = msg.data, self._now()
        elif isinstance(msg, PointStamped):
            values, stamp = (msg.point.x, msg.point.y, msg.point.z), stamp_seconds(msg.header.stamp)
        else:
            p, o = msg.pose.position, msg.pose.orientation
            values, stamp = (p.x, p.y, p.z, o.x, o.y, o.z, o.w), stamp_seconds(msg.header.stamp)
        try:
            self.assembler.update_vector(field_name, values, stamp or self._now())
        except ObservationError as err:
            self.invalid_inputs += 1
            self._warn(str(err), f"ignored observation: {err}")

    # --- control loop ----------------------------------------------------------------
    def _control_tick(self) -> None:
        if not self._active or self.policy is None:
            return
        started = time.perf_counter()
        self._tick_work(started)
        if self._diag_in_tick and started >= self._next_diag:
            self._next_diag += self._diag_period
            if self._next_diag <= started:  # far behind (a stall): one period from now, no burst to catch up
                self._next_diag = started + self._diag_period
            self._publish_diagnostics()

    def _tick_work(self, started: float) -> None:
        """Observation, model call, command: what the deadline is about (timed as tick work)."""
        if self._last_tick_time is not None:
            period = started - self._last_tick_time
            self.tick_periods.append(period)
            if period > LATE_TICK_FACTOR * self.period:
                self._deadline_miss(started)
        self._last_tick_time = started
        age = self.assembler.age(self._now())
        self._last_age = age
        if age > self.max_age:
            self.stale_skips += 1
            missing = self.assembler.missing()
            reason = f"no message yet on {missing}" if missing else \
                f"observation is {age:.3f} s old > max_observation_age_s {self.max_age}"
            held = " (zero velocity)" if self.velocity_interface else " (holding the last measured position)" \
                if self.on_stale == "hold" and not missing else ""
            self._warn("stale", f"no command: {reason}{held}")
            # (a velocity model: zero velocity in both modes; silence would keep the arm moving)
            self._hold_once("stale", publish=self.on_stale == "hold" or self.velocity_interface)
            return
        frame = self.assembler.frame()
        self.history.push(frame)
        self.ood_distance = distance = self.envelope.distance(frame)
        self.ood_distance_max = max(self.ood_distance_max, distance)
        safety = self.safety
        if not safety.enabled:
            self.chunk.clear()  # the first plan after enabling starts from the observation of that tick
            self._holding = ""
            self._stop_velocity()  # (a fault latch, start_enabled false: zero once)
            return
        if self.watchdog.tripped(started):
            self._warn("deadline", f"holding: {self.watchdog.recent(started)} deadline misses in the last "
                       f"{self.watchdog.window_s:g} s > max_deadline_misses {self.watchdog.max_misses}")
            if self._holding != "deadline":
                self.watchdog_holds += 1
            self._hold_once("deadline", publish=True)
            return
        if self.ood_threshold and distance > self.ood_threshold:
            self._warn("ood", f"holding: the observation is {distance:.2f} std outside the training data "
                       f"> ood_threshold {self.ood_threshold:g}: {np.round(frame, 4).tolist()}")
            if self._holding != "ood":
                self.ood_holds += 1
            self._hold_once("ood", publish=True)
            return
        self._holding = ""
        measured = self.assembler.joint_positions()
        if self.chunk.needs_plan:
            if not self._plan(measured):
                self._stop_velocity()
                self._record_work(started)
                return
            if self.output == "joint_trajectory":
                points = safety.trajectory(self.chunk.remaining(), measured)
                if points is not None:
                    self._publish_trajectory(points)
                    self.commands_sent += 1
                self._report_catch_up()
                self._publish_monitoring()
        action = self.chunk.next_action()
        if self.output == "commands":
            if self.velocity_interface:
                command = safety.velocity(action, measured)
                if command is None:
                    self._stop_velocity()
                else:
                    self._velocity_stopped = False
            else:
                command = safety.command(action, measured)
            if command is not None:
                # one message object for every command: its data set from an array('d'), no per-element checks
                self._command_msg.data = array("d", command.tobytes())
                self.command_pub.publish(self._command_msg)
                self.commands_sent += 1
                self._report_catch_up()
        self._publish_monitoring()
        self._tick += 1
        self._record_work(started)

    def _record_work(self, started: float) -> None:
        work = time.perf_counter() - started
        self.tick_work_times.append(work)
        if work > self.period:
            self._deadline_miss(started)

    def _deadline_miss(self, now: float) -> None:
        self.deadline_misses += 1
        self.watchdog.miss(now)

    def _hold_once(self, reason: str, publish: bool) -> None:
        """Stale data, too many deadline misses, an OOD observation: command the measured position once
        (``publish``; within the step limit), then nothing until the cause is gone."""
        if self._holding != reason:
            self._holding = reason
            self.chunk.clear()
            if publish and self.safety.enabled:
                self._publish_hold()

    def _report_catch_up(self) -> None:
        if self.safety.caught_up and not self._reported_catch_up:
            self._reported_catch_up = True
            self.get_logger().info(f"ramp: caught up with the model's output (step clips so far: "
                                   f"{self.safety.step_clips})")

    def _plan(self, measured) -> bool:
        window = self.history.window()
        held = self.hold.candidate(self._tick) if self.policy.n_experts else None
        t0 = time.perf_counter()
        out = self.policy.act_detailed(window, self.rng, greedy=self.greedy, expert=held)
        if held is not None and not self.hold.keeps(self._tick, out.gating):
            # the held expert's weight dropped below the threshold here: choose afresh
            self.hold.release()
            held = None
            out = self.policy.act_detailed(window, self.rng, greedy=self.greedy, expert=None)
        elapsed = time.perf_counter() - t0
        self.inference_times.append(elapsed)
        if not np.all(np.isfinite(out.actions)):
            # never published; counted (and, repeated, latched) by the safety layer
            self.safety.fault()
            self.get_logger().error(
                f"model output is not finite (expert {out.expert}): {np.asarray(out.actions).tolist()} for the "
                f"observation window {np.asarray(window).tolist()}; {self.safety.state}",
                throttle_duration_sec=WARN_PERIOD_S)
            self.chunk.clear()
            return False
        actions = out.actions
        if self.action_kind == "joint_delta":
            # increments -> position targets: the first from the position measured now, each next from the last
            actions = integrate_deltas(actions, measured)
        self.chunk.load(actions)
        if out.expert >= 0:
            self.hold.record(self._tick, out.expert, held=held is not None)
        # ~/expert and ~/inference_time go out after this tick's command (_publish_monitoring): not in its path
        self._expert_msg.data = int(out.expert)
        self._latency_msg.data = elapsed
        self._monitoring_due = True
        return True

    def _publish_monitoring(self) -> None:
        if self._monitoring_due:
            self._monitoring_due = False
            self.expert_pub.publish(self._expert_msg)
            self.latency_pub.publish(self._latency_msg)

    def _publish_trajectory(self, actions: np.ndarray) -> None:
        msg = JointTrajectory()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.joint_names = list(self.spec.joint_names)
        for i, action in enumerate(actions):
            # action i is the target held during [i, i+1) control periods: it is due at their end
            due = Duration(nanoseconds=int(round((i + 1) * self.period * 1e9))).to_msg()
            msg.points.append(JointTrajectoryPoint(positions=action.tolist(), time_from_start=due))
        self.command_pub.publish(msg)

    def _publish_hold(self) -> None:
        """Deactivate, stale data, watchdog, OOD: command the last measured position so the arm stops where it
        is (reached from the previous command within max_joint_step: ``SafetyLayer.hold``)."""
        if self.policy is None:
            return
        if self.velocity_interface:
            self._stop_velocity(force=True)
            return
        q = self.safety.hold(self.assembler.joint_positions())
        if q is None:
            return
        if self.output == "commands":
            msg = Float64MultiArray(data=q.tolist())
            dim = MultiArrayDimension(label="joints", size=len(q), stride=len(q))
            msg.layout.dim.append(dim)
        else:
            msg = JointTrajectory(joint_names=list(self.spec.joint_names),
                                  points=[JointTrajectoryPoint(positions=q.tolist())])
            msg.header.stamp = self.get_clock().now().to_msg()
        # lifecycle publishers are still enabled here: super().on_deactivate disables them afterwards
        self.command_pub.publish(msg)

    def _stop_velocity(self, force: bool = False) -> None:
        """A velocity model: command zero velocity, once per stop (``force``: even if the last command was
        zero, and while deactivating); nothing for a position model."""
        if not getattr(self, "velocity_interface", False) or self.policy is None:
            return
        if not force and (self._velocity_stopped or not self._active):
            return
        n = self.spec.n_joints
        msg = Float64MultiArray(data=[0.0] * n)
        msg.layout.dim.append(MultiArrayDimension(label="joints", size=n, stride=n))
        # lifecycle publishers are still enabled here: super().on_deactivate disables them afterwards
        self.command_pub.publish(msg)
        self._velocity_stopped = True
        self.zero_velocity_commands += 1

    # --- diagnostics -----------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: policy", hardware_id="vdd_ros")
        # the latest samples only: the benchmark keeps them all, and sorting those would stall the loop; this
        # callback shares the control loop's thread, so it stays cheap (nearest-rank quantiles, one partition)
        periods = np.fromiter(itertools.islice(reversed(self.tick_periods), DIAGNOSTICS_WINDOW), np.float64)
        latency = np.fromiter(itertools.islice(reversed(self.inference_times), DIAGNOSTICS_WINDOW), np.float64)
        p50, p99 = quantiles(latency, (0.5, 0.99))
        values = {
            "model_kind": self.policy.kind if self.policy else "none",
            "provider": self.policy.provider if self.policy else "none",
            "active": str(self._active),
            "control_rate_target_hz": f"{getattr(self, 'rate_hz', 0.0):.3f}",
            "control_rate_achieved_hz": f"{1.0 / periods.mean():.3f}" if periods.size else "0",
            "inference_p50_ms": f"{p50 * 1e3:.3f}" if latency.size else "nan",
            "inference_p99_ms": f"{p99 * 1e3:.3f}" if latency.size else "nan",
            "observation_age_s": f"{self._last_age:.4f}",
            "deadline_misses": str(self.deadline_misses),
            "stale_skips": str(self.stale_skips),
            "invalid_inputs": str(self.invalid_inputs),
            "commands_sent": str(self.commands_sent),
            "enabled": str(bool(self.safety and self.safety.enabled)),
            "safety_state": self.safety.state if self.safety else "not configured",
            "estop": str(bool(self.safety and self.safety.estop_active)),
            "action_kind": getattr(self, "action_kind", "none") if self.policy else "none",
            "limit_clips": str(self.safety.limit_clips if self.safety else 0),
            "velocity_clips": str(self.safety.velocity_clips if self.safety else 0),
            "zero_velocity_commands": str(self.zero_velocity_commands),
            "step_clips": str(self.safety.step_clips if self.safety else 0),
            "ramp_caught_up": str(bool(self.safety and self.safety.caught_up)),
            "invalid_outputs": str(self.safety.invalid_outputs if self.safety else 0),
            "backwards_stamps": str(self.backwards_stamps),
            "duplicate_stamps": str(self.duplicate_stamps),
            "deadline_misses_in_window": str(self.watchdog.recent(time.perf_counter()) if self.safety else 0),
            "watchdog_holds": str(self.watchdog_holds),
            "ood_distance": f"{self.ood_distance:.3f}",
            "ood_distance_max": f"{self.ood_distance_max:.3f}",
            "ood_holds": str(self.ood_holds),
            "gc_frozen": str(self.gc_frozen),
            "memory_locked": str(self.memory_locked),
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        recent = self.watchdog.recent(time.perf_counter()) if self.safety else 0
        if not self._active:
            status.level, status.message = DiagnosticStatus.WARN, "inactive"
        elif not self.safety.enabled:
            status.level, status.message = DiagnosticStatus.WARN, self.safety.state
        elif self.watchdog.max_misses and recent > self.watchdog.max_misses:
            status.level, status.message = DiagnosticStatus.ERROR, \
                f"holding: {recent} deadline misses in {self.watchdog.window_s:g} s"
        elif self._holding == "ood":
            status.level, status.message = DiagnosticStatus.ERROR, \
                f"holding: observation {self.ood_distance:.2f} std outside the training data"
        elif recent:
            status.level, status.message = DiagnosticStatus.WARN, f"{recent} deadline misses in the window"
        elif self.stale_skips or self.invalid_inputs:
            status.level, status.message = DiagnosticStatus.WARN, "skipped ticks (stale or invalid observations)"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(array)


def main(args=None) -> int:
    return run_node(PolicyNode, "policy_node", args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
