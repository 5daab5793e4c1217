"""The policy node's safety logic, without ROS: enable / e-stop latch, joint-limit and step-limit clipping,
the start-up ramp, the fault latch and the deadline watchdog. Pure numpy, so property-based tests can drive
it with thousands of generated event sequences (test/test_safety.py).

Rules (the README's "Safety" table lists them with their parameters):

- Nothing is commanded unless enabled. ``estop(True)`` disables at once and latches; ``enable(True)``
  succeeds only while the e-stop is released, and it clears a fault latch.
- A command is the model's target clipped to the joint limits, then moved from the reference by at most
  ``max_step`` per joint. The reference is the previous command, or the measured position for the first
  command after enabling (and after a hold): the start-up ramp. A measured position outside the limits is
  left toward the limits, never by more than ``max_step``.
- A target with a NaN or Inf is never commanded; ``max_consecutive_faults`` of them in a row disable and
  latch (like the e-stop, ``enable(True)`` clears it).
- Velocity commands (``joint_velocity`` models, ``velocity``): each joint's velocity is clipped to
  ``max_velocity`` and, from the measured position, to what keeps it inside the position limits for one
  period ``period_s`` (at or beyond a limit: 0 toward it); non-finite targets are refused as by ``command``.
  Where the node cannot command a velocity (disabled, stale data, holds, a refused target) it commands zero.
- ``integrate_deltas``: a ``joint_delta`` chunk as position targets, the first from the measured position,
  each next one from the previous target; they then go through ``command``/``trajectory`` like positions.
- ``DeadlineWatchdog``: more than ``max_misses`` deadline misses within ``window_s`` asks the node to hold.
- ``ObservationEnvelope``: how far a live frame lies outside the training observations, in standard
  deviations beyond their range (per dimension, the largest); the node holds above ``ood_threshold``.
"""
from __future__ import annotations

from collections import deque

import numpy as np

REASON_ESTOP = "e-stop"
REASON_FAULTS = "non-finite model outputs"


class SafetyError(ValueError):
    """Limits that cannot be used (wrong length, lower above upper, non-positive step)."""


def per_joint(name: str, values, n_joints: int) -> np.ndarray:
    """One number or one per joint -> ``[n_joints]`` float64; raises SafetyError naming ``name``."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.size == 1:
        arr = np.full(n_joints, float(arr[0]))
    if arr.shape != (n_joints,):
        raise SafetyError(f"{name}: expected one number or {n_joints} (one per joint), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise SafetyError(f"{name}: expected finite numbers, got {arr.tolist()}")
    return arr


def integrate_deltas(deltas, measured) -> np.ndarray:
    """A ``joint_delta`` chunk ``[H, n_joints]`` (position increments) as position targets ``[H, n_joints]``:
    ``measured + cumsum(deltas)``: the first increment from the measured position ``[n_joints]``, each next
    one from the previous (unclipped) target. The safety layer clips the targets afterwards."""
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.ndim != 2:
        raise SafetyError(f"joint_delta chunk: expected shape [H, n_joints], got {list(deltas.shape)}")
    measured = np.asarray(measured, dtype=np.float64).reshape(-1)
    if measured.shape != (deltas.shape[1],):
        raise SafetyError(f"joint_delta chunk: expected a measured position of {deltas.shape[1]} joints, got "
                          f"{measured.size}")
    return measured[None] + np.cumsum(deltas, axis=0)


class SafetyLayer:
    """What the node may command. ``lower``/``upper`` are the (narrowed) position limits, ``max_step`` the
    largest change per command, all ``[n_joints]``. ``max_velocity`` (per joint, rad/s) and ``period_s`` (the
    control period) are needed only for velocity commands (``velocity``)."""

    def __init__(self, lower, upper, max_step, max_consecutive_faults: int = 3, start_enabled: bool = False,
                 max_velocity=None, period_s: float | None = None):
        self.lower = np.asarray(lower, dtype=np.float64).copy()
        n = self.lower.size
        self.upper = per_joint("upper", upper, n)
        self.max_step = per_joint("max_joint_step", max_step, n)
        if np.any(self.lower > self.upper):
            raise SafetyError(f"joint limits: lower {self.lower.tolist()} above upper {self.upper.tolist()} "
                              "(joint_limit_margin too large?)")
        if np.any(self.max_step <= 0):
            raise SafetyError(f"max_joint_step: expected > 0 for every joint, got {self.max_step.tolist()}")
        if int(max_consecutive_faults) < 1:
            raise SafetyError(f"max_consecutive_faults: expected >= 1, got {max_consecutive_faults}")
        self.max_consecutive_faults = int(max_consecutive_faults)
        self._neg_step = -self.max_step
        self.max_velocity = None
        self.period_s = None
        if max_velocity is not None:
            self.max_velocity = per_joint("joint_velocity_limits", max_velocity, n)
            if np.any(self.max_velocity <= 0):
                raise SafetyError(f"joint_velocity_limits: expected > 0 for every joint, got "
                                  f"{self.max_velocity.tolist()}")
            if period_s is None or not float(period_s) > 0 or not np.isfinite(float(period_s)):
                raise SafetyError(f"velocity commands: expected a control period > 0 s, got {period_s}")
            self.period_s = float(period_s)
            self._neg_velocity = -self.max_velocity
        self.enabled = bool(start_enabled)
        self.estop_active = False
        self.latched = ""  # why commanding stays off until enable(True): REASON_ESTOP or REASON_FAULTS
        self.disabled_reason = "" if start_enabled else "start_enabled is false: call ~/enable"
        self.previous: np.ndarray | None = None
        self.caught_up = False
        self.limit_clips = 0
        self.step_clips = 0
        self.invalid_outputs = 0
        self.consecutive_faults = 0
        self.velocity_clips = 0

    # --- enable / e-stop -------------------------------------------------------------
    def estop(self, active: bool) -> bool:
        """The e-stop topic's value; returns True when this call disabled commanding."""
        active = bool(active)
        was_enabled = self.enabled
        self.estop_active = active
        if active:
            self.enabled = False
            self.latched = REASON_ESTOP
            self.disabled_reason = "e-stop: estop went true (release it, then call ~/enable with true)"
        return was_enabled and not self.enabled

    def enable(self, on: bool) -> tuple[bool, str]:
        """``~/enable``: returns (success, message)."""
        if not on:
            self.enabled = False
            self.disabled_reason = "disabled by ~/enable"
            return True, "disabled"
        if self.estop_active:
            return False, "refused: the e-stop is active (estop is true); release it first"
        cleared = self.latched
        self.enabled = True
        self.latched = ""
        self.disabled_reason = ""
        self.consecutive_faults = 0
        self.restart_ramp()
        return True, "enabled" + (f" (cleared the {cleared} latch)" if cleared else "") + \
            ": ramping from the measured position"

    def restart_ramp(self) -> None:
        """The next command is limited against the measured position, not the previous command."""
        self.previous = None
        self.caught_up = False

    @property
    def state(self) -> str:
        return "enabled" if self.enabled else f"disabled: {self.disabled_reason}"

    # --- commands --------------------------------------------------------------------
    def fault(self) -> None:
        """A model output that cannot be commanded (non-finite): counted; repeated ones latch."""
        self.invalid_outputs += 1
        self.consecutive_faults += 1
        if self.consecutive_faults >= self.max_consecutive_faults and self.enabled:
            self.enabled = False
            self.latched = REASON_FAULTS
            self.disabled_reason = (f"{self.consecutive_faults} consecutive non-finite model outputs "
                                    "(max_consecutive_faults): call ~/enable with true")

    def _step(self, target: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool]:
        # (minimum/maximum rather than np.clip: a third of the cost on a handful of joints, every tick)
        inside = np.minimum(np.maximum(target, self.lower), self.upper)
        if not np.array_equal(inside, target):
            self.limit_clips += 1
        step = inside - reference
        limited = np.minimum(np.maximum(step, self._neg_step), self.max_step)
        clipped = not np.array_equal(limited, step)
        if clipped:
            self.step_clips += 1
        return reference + limited, clipped

    def command(self, target, measured) -> np.ndarray | None:
        """The command for the model's ``target`` ``[n_joints]``, or None (disabled, non-finite target, or
        no measured position to start the ramp from)."""
        if not self.enabled:
            return None
        target = np.asarray(target, dtype=np.float64)
        if not np.all(np.isfinite(target)):
            self.fault()
            return None
        self.consecutive_faults = 0
        reference = self.previous if self.previous is not None else measured
        if reference is None:
            return None
        command, clipped = self._step(target, np.asarray(reference, dtype=np.float64))
        if not clipped:
            self.caught_up = True
        self.previous = command
        return command

    def trajectory(self, targets, measured) -> np.ndarray | None:
        """A chunk ``[H, n_joints]`` as trajectory points: the first within ``max_step`` of the measured
        position, each next one within ``max_step`` of the one before; None as for ``command``."""
        if not self.enabled:
            return None
        targets = np.asarray(targets, dtype=np.float64)
        if not np.all(np.isfinite(targets)):
            self.fault()
            return None
        self.consecutive_faults = 0
        reference = measured if measured is not None else self.previous
        if reference is None:
            return None
        points = np.empty_like(targets)
        reference = np.asarray(reference, dtype=np.float64)
        any_clipped = False
        for i, target in enumerate(targets):
            reference, clipped = self._step(target, reference)
            any_clipped |= clipped
            points[i] = reference
        if not any_clipped:
            self.caught_up = True
        self.previous = points[-1].copy()
        return points

    def velocity(self, target, measured) -> np.ndarray | None:
        """The velocity command for the model's ``target`` velocity ``[n_joints]`` (rad/s), or None (disabled,
        non-finite target: counted as ``fault``, no finite measured position); the node commands zero
        velocity for a None. Each joint is clipped to ``max_velocity`` (counted in ``velocity_clips``), then
        so that one period from the measured position stays inside the position limits: at or beyond a limit
        nothing moves further out (counted in ``limit_clips``)."""
        if not self.enabled:
            return None
        if self.max_velocity is None:
            raise SafetyError("velocity commands: this safety layer has no max_velocity and period_s")
        target = np.asarray(target, dtype=np.float64)
        if not np.all(np.isfinite(target)):
            self.fault()
            return None
        self.consecutive_faults = 0
        if measured is None:
            return None
        q = np.asarray(measured, dtype=np.float64)
        if not np.all(np.isfinite(q)):
            return None
        limited = np.minimum(np.maximum(target, self._neg_velocity), self.max_velocity)
        clipped = not np.array_equal(limited, target)
        if clipped:
            self.velocity_clips += 1
        # what one period may cover without leaving [lower, upper]; outside them: 0 further out
        high = np.minimum(self.max_velocity, np.maximum((self.upper - q) / self.period_s, 0.0))
        low = np.maximum(self._neg_velocity, np.minimum((self.lower - q) / self.period_s, 0.0))
        command = np.minimum(np.maximum(limited, low), high)
        if not np.array_equal(command, limited):
            self.limit_clips += 1
            clipped = True
        if not clipped:
            self.caught_up = True
        return command

    def hold(self, measured) -> np.ndarray | None:
        """The command that stops the arm (stale data, watchdog, deactivate): the measured position, reached
        from the previous command by at most ``max_step`` (the measured position itself when there is no
        previous command); the next command ramps from it. None without a measured position."""
        if measured is None:
            return None
        measured = np.asarray(measured, dtype=np.float64)
        if self.previous is None:
            command = measured.copy()
        else:
            step = measured - self.previous
            command = self.previous + np.minimum(np.maximum(step, self._neg_step), self.max_step)
        self.previous = command
        return command


class DeadlineWatchdog:
    """Counts deadline misses in a sliding time window; ``tripped`` while more than ``max_misses`` lie in it
    (``max_misses`` 0: never trips)."""

    def __init__(self, max_misses: int, window_s: float):
        if int(max_misses) < 0 or not window_s > 0:
            raise SafetyError(f"deadline watchdog: expected max_deadline_misses >= 0 and a window > 0 s, got "
                              f"{max_misses} and {window_s}")
        self.max_misses = int(max_misses)
        self.window_s = float(window_s)
        self._misses: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._misses and self._misses[0] <= now - self.window_s:
            self._misses.popleft()

    def miss(self, now: float) -> None:
        self._misses.append(float(now))
        self._expire(now)

    def recent(self, now: float) -> int:
        self._expire(now)
        return len(self._misses)

    def tripped(self, now: float) -> bool:
        return self.max_misses > 0 and self.recent(now) > self.max_misses


# without a recorded range (models exported before it was recorded) the envelope is mean +- this many std
FALLBACK_ENVELOPE_STD = 4.0


class ObservationEnvelope:
    """The training observations' per-dimension range ``[low, high]`` and std (frames ``[obs_step_dim]``).

    ``distance(frame)``: ``max_i max(0, low_i - x_i, x_i - high_i) / std_i``, 0 inside the range.
    """

    def __init__(self, low, high, std):
        self.std = np.asarray(std, dtype=np.float64)
        n = self.std.size
        self.low = per_joint("observation_low", low, n)
        self.high = per_joint("observation_high", high, n)
        if np.any(self.std <= 0) or np.any(self.low > self.high):
            raise SafetyError("observation envelope: expected std > 0 and low <= high")

    @classmethod
    def from_spec(cls, spec) -> tuple[ObservationEnvelope, str]:
        """The envelope of a model spec and where it came from (the recorded range, or mean +- 4 std)."""
        norm = spec.normalization
        mean, std = np.asarray(norm.obs_mean, np.float64), np.asarray(norm.obs_std, np.float64)
        info = spec.model_info
        if "observation_low" in info and "observation_high" in info:
            return cls(info["observation_low"], info["observation_high"], std), "the training data's range"
        return (cls(mean - FALLBACK_ENVELOPE_STD * std, mean + FALLBACK_ENVELOPE_STD * std, std),
                f"mean +- {FALLBACK_ENVELOPE_STD:g} std (the model records no range)")

    def distance(self, frame) -> float:
        x = np.asarray(frame, dtype=np.float64)
        beyond = np.maximum(np.maximum(self.low - x, x - self.high), 0.0) / self.std
        return float(beyond.max()) if beyond.size else 0.0
