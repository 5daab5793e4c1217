"""arm_sort: a planar 2-joint arm with inertia touches three targets in any order.

A task of another kind than arm_avoid: 2 joints ("shoulder", "elbow"), second-order dynamics, a
10 Hz control rate and three successive decisions (which target first, which second, the last).

Geometry (metres, the arm's base at the origin, y points away from the base): three fixed
targets ``TARGET_NAMES`` (left, top, right) around the start region. A target is visited when
the end effector (EE) comes within ``target_radius`` of its centre; the episode succeeds when
all three are visited, in any order. The route is the visiting order: one of the 3! = 6
permutations (``ROUTES``; route id = index in that list), so behaviour entropy is over 6 routes.
An episode fails by collision when a joint reaches its limit and by timeout when the time runs
out first (a stalling policy).

Dynamics: each of ``PHYSICS_RATE_HZ`` ticks per second, every joint's commanded position is
tracked by a PD controller acting on an inertia: ``qddot = clip(kp * (target - q) - kd * qdot,
-amax, amax)``, ``qdot`` clipped to the velocity limits, semi-implicit Euler. The arm lags its
command and, underdamped, overshoots a step. The policy runs at ``CONTROL_RATE_HZ``; each command
is held for ``TICKS_PER_CONTROL`` ticks.

Observation frame: joint positions (2) and ``visited`` (3 flags, 1.0 = target done; a ``vector``
field on topic ``task_state``, std_msgs/Float64MultiArray), so the state is Markov given two
frames (positions and their change). Actions: absolute joint position targets.

Module API as arm_avoid: ``task_spec``, ``generate_demonstrations``, ``rollout`` ->
``RolloutResult``, ``replay_actions``, ``evaluate_dataset``, ``plot_rollouts``, ``plot_dataset``,
``initial_frames``, ``ArmSim`` (the batched simulator the simulated-arm node drives).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.files import save_figure
from vdd_ros.spec import ModelSpec, Normalization, ObservationField
from vdd_ros.tasks.rollout import closed_loop
from vdd_ros.validation import check_int, fail

TASK_NAME = "arm_sort"
JOINT_NAMES = ("shoulder", "elbow")
PHYSICS_RATE_HZ = 100
CONTROL_RATE_HZ = 10
TICKS_PER_CONTROL = PHYSICS_RATE_HZ // CONTROL_RATE_HZ
TARGET_NAMES = ("left", "top", "right")
N_TARGETS = len(TARGET_NAMES)
ROUTES = tuple(itertools.permutations(range(N_TARGETS)))
N_ROUTES = len(ROUTES)
# the default chunk of this task (the teacher config's horizon and execute_steps are the recipe's)
DEFAULT_HORIZON = 8
DEFAULT_EXECUTE_STEPS = 4
STATE_TOPIC = "task_state"


@dataclass(frozen=True)
class ArmSortConfig:
    link_lengths: tuple[float, float] = (0.5, 0.4)
    joint_lower: tuple[float, float] = (-0.5, 0.4)
    joint_upper: tuple[float, float] = (2.3, 2.7)
    joint_velocity_limits: tuple[float, float] = (2.0, 2.0)  # rad/s
    joint_acceleration_limits: tuple[float, float] = (12.0, 12.0)  # rad/s^2
    kp: float = 50.0  # 1/s^2: natural frequency sqrt(kp) ~ 7.1 rad/s
    kd: float = 7.0  # 1/s: damping ratio kd / (2 sqrt(kp)) ~ 0.5, a step overshoots ~16 %
    targets: tuple[tuple[float, float], ...] = ((-0.45, 0.45), (0.0, 0.78), (0.45, 0.45))
    target_radius: float = 0.05
    start_ee: tuple[float, float] = (0.0, 0.42)
    start_q_noise: float = 0.05  # rad, uniform +- per joint around the IK of start_ee
    max_episode_s: float = 12.0

    @property
    def start_q(self) -> np.ndarray:
        return inverse_kinematics(np.asarray(self.start_ee), self)


DEFAULT_CONFIG = ArmSortConfig()


# --- kinematics --------------------------------------------------------------------------
def forward_kinematics(q: np.ndarray, config: ArmSortConfig = DEFAULT_CONFIG) -> np.ndarray:
    """EE position ``[..., 2]`` for joint positions ``[..., 2]`` (the elbow angle relative to the upper arm)."""
    q = np.asarray(q, dtype=np.float64)
    l1, l2 = config.link_lengths
    a1, a12 = q[..., 0], q[..., 0] + q[..., 1]
    return np.stack([l1 * np.cos(a1) + l2 * np.cos(a12), l1 * np.sin(a1) + l2 * np.sin(a12)], axis=-1)


def joint_points(q: np.ndarray, config: ArmSortConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Base, elbow and EE ``[..., 3, 2]`` (for drawing the arm)."""
    q = np.asarray(q, dtype=np.float64)
    l1 = config.link_lengths[0]
    elbow = np.stack([l1 * np.cos(q[..., 0]), l1 * np.sin(q[..., 0])], axis=-1)
    return np.stack([np.zeros_like(elbow), elbow, forward_kinematics(q, config)], axis=-2)


def inverse_kinematics(points: np.ndarray, config: ArmSortConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Closed-form IK (the elbow-positive branch): joint positions ``[..., 2]`` for EE points ``[..., 2]``.

    Raises ValueError for a point out of reach or a solution outside the joint limits.
    """
    points = np.asarray(points, dtype=np.float64)
    l1, l2 = config.link_lengths
    x, y = points[..., 0], points[..., 1]
    cos_elbow = (x ** 2 + y ** 2 - l1 ** 2 - l2 ** 2) / (2 * l1 * l2)
    if np.any(np.abs(cos_elbow) > 1.0):
        fail("inverse_kinematics point", f"within reach {abs(l1 - l2):.2f}..{l1 + l2:.2f} m of the base",
             points[np.abs(cos_elbow) > 1.0].tolist())
    elbow = np.arccos(cos_elbow)
    shoulder = np.arctan2(y, x) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
    q = np.stack([shoulder, elbow], axis=-1)
    lower, upper = np.asarray(config.joint_lower), np.asarray(config.joint_upper)
    if np.any(q < lower) or np.any(q > upper):
        fail("inverse_kinematics solution", f"inside joint limits {list(config.joint_lower)}.."
             f"{list(config.joint_upper)}", q[np.any((q < lower) | (q > upper), -1)].tolist())
    return q


# --- routes and metrics ---------------------------------------------------------------------
def route_from_order(order: Sequence[int]) -> int | None:
    """Route id of a visiting order (None unless it is a permutation of all targets)."""
    order = tuple(int(t) for t in order)
    return ROUTES.index(order) if order in ROUTES else None


def visit_order(path: np.ndarray, config: ArmSortConfig = DEFAULT_CONFIG) -> list[int]:
    """Targets in the order an EE path ``[n, 2]`` first comes within ``target_radius`` of them."""
    path = np.asarray(path, dtype=np.float64)
    dist = np.linalg.norm(path[:, None, :] - np.asarray(config.targets)[None], axis=-1)  # [n, targets]
    inside = dist < config.target_radius
    first = [int(np.argmax(inside[:, t])) if inside[:, t].any() else None for t in range(N_TARGETS)]
    return [t for _, t in sorted((f, t) for t, f in enumerate(first) if f is not None)]


def classify_route(path: np.ndarray, config: ArmSortConfig = DEFAULT_CONFIG) -> int | None:
    """Route id of an EE path ``[n, 2]`` (None if it does not visit all three targets)."""
    return route_from_order(visit_order(path, config))


def behaviour_entropy(route_ids: Sequence[int | None], n_routes: int = N_ROUTES) -> float:
    """Normalised entropy ``-sum p log p / log n_routes`` of the routes taken (None ignored)."""
    ids = [int(r) for r in route_ids if r is not None]
    if not ids:
        return 0.0
    counts = np.bincount(ids, minlength=n_routes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(n_routes)) + 0.0


# --- simulator ---------------------------------------------------------------------------------
class ArmSim:
    """Batch of ``batch`` independent episodes, stepped together; finished ones stay frozen."""

    def __init__(self, config: ArmSortConfig | None = None, batch: int = 1):
        self.config = config or DEFAULT_CONFIG
        self.batch = int(batch)
        self._lower = np.asarray(self.config.joint_lower)
        self._upper = np.asarray(self.config.joint_upper)
        self._vmax = np.asarray(self.config.joint_velocity_limits)
        self._amax = np.asarray(self.config.joint_acceleration_limits)
        self._targets = np.asarray(self.config.targets)
        self._start_q = self.config.start_q
        self._dt = 1.0 / PHYSICS_RATE_HZ
        self.reset(np.random.default_rng(0))

    def sample_start(self, rng: np.random.Generator, n: int) -> np.ndarray:
        noise = rng.uniform(-self.config.start_q_noise, self.config.start_q_noise, size=(n, len(JOINT_NAMES)))
        return self._start_q + noise

    def reset(self, rng: np.random.Generator, q0: np.ndarray | None = None) -> None:
        """Start every episode at rest: ``q0`` ``[B, 2]`` (or ``[2]``) or a random start."""
        b = self.batch
        if q0 is None:
            q0 = self.sample_start(rng, b)
        q0 = np.broadcast_to(np.asarray(q0, dtype=np.float64), (b, len(JOINT_NAMES)))
        self.q = np.clip(q0, self._lower, self._upper).copy()
        self.qdot = np.zeros_like(self.q)
        self.time = np.zeros(b)
        self.ticks = np.zeros(b, dtype=np.int64)
        self.done = np.zeros(b, dtype=bool)
        self.success = np.zeros(b, dtype=bool)
        self.collision = np.zeros(b, dtype=bool)
        self.timeout = np.zeros(b, dtype=bool)
        self.visited = np.zeros((b, N_TARGETS), dtype=bool)
        self.orders: list[list[int]] = [[] for _ in range(b)]
        ee = self.ee_position()
        self._path = [ee.copy()]
        self._check_events(ee, ~self.done)

    def ee_position(self) -> np.ndarray:
        return forward_kinematics(self.q, self.config)

    def observation_frame(self) -> np.ndarray:
        """``[B, 5]``: joint positions then the visited flags."""
        return np.concatenate([self.q, self.visited.astype(np.float64)], axis=-1)

    def vector_observations(self, i: int) -> dict[str, list[float]]:
        """Episode ``i``'s vector observation fields by name (what the simulated-arm node publishes)."""
        return {"visited": self.visited[i].astype(np.float64).tolist()}

    def step_physics(self, q_target: np.ndarray) -> None:
        """One physics tick of the PD-tracked joints towards targets ``[B, 2]`` (clipped to the joint limits)."""
        target = np.clip(np.asarray(q_target, dtype=np.float64), self._lower, self._upper)
        if target.shape != self.q.shape:
            fail("q_target", f"shape {list(self.q.shape)}", list(target.shape))
        if not np.all(np.isfinite(target[~self.done])):
            fail("q_target", "finite joint targets", target[~self.done].tolist())
        active = ~self.done
        cfg = self.config
        qddot = np.clip(cfg.kp * (target - self.q) - cfg.kd * self.qdot, -self._amax, self._amax)
        qdot = np.clip(self.qdot + qddot * self._dt, -self._vmax, self._vmax)
        q = self.q + qdot * self._dt
        # a joint that reaches its limit stops there: the episode ends in a collision
        at_limit = np.any((q <= self._lower) | (q >= self._upper), axis=-1)
        q = np.clip(q, self._lower, self._upper)
        self.q = np.where(active[:, None], q, self.q)
        self.qdot = np.where(active[:, None], qdot, 0.0 * self.qdot)
        self.time = np.where(active, self.time + self._dt, self.time)
        self.ticks = self.ticks + active
        self.collision |= active & at_limit
        self.done |= active & at_limit
        ee = self.ee_position()
        self._check_events(ee, active & ~at_limit)
        self._path.append(ee.copy())

    def _check_events(self, ee: np.ndarray, active: np.ndarray) -> None:
        inside = np.linalg.norm(ee[:, None, :] - self._targets[None], axis=-1) < self.config.target_radius
        new = inside & ~self.visited & active[:, None]
        for i, t in zip(*np.nonzero(new)):
            self.orders[i].append(int(t))
        self.visited |= new
        finished = active & self.visited.all(-1)
        timed_out = active & ~finished & (self.time >= self.config.max_episode_s - 1e-9)
        self.success |= finished
        self.timeout |= timed_out
        self.done |= finished | timed_out

    def route(self, i: int) -> int | None:
        """Route id of episode ``i`` (None unless it succeeded)."""
        return route_from_order(self.orders[i]) if self.success[i] else None

    def ee_path(self, i: int) -> np.ndarray:
        """EE positions ``[n, 2]`` of episode ``i`` at every physics tick, up to its end."""
        return np.stack([p[i] for p in self._path[: self.ticks[i] + 1]])

    def ee_paths(self) -> list[np.ndarray]:
        stacked = np.stack(self._path, axis=1)
        return [stacked[i, : self.ticks[i] + 1] for i in range(self.batch)]


# --- spec -----------------------------------------------------------------------------------------
def task_spec(history: int, horizon: int, normalization: Normalization | None = None,
              model_kind: str = "none", config: ArmSortConfig | None = None) -> ModelSpec:
    config = config or DEFAULT_CONFIG
    n = len(JOINT_NAMES)
    return ModelSpec(
        joint_names=JOINT_NAMES,
        joint_lower=tuple(config.joint_lower),
        joint_upper=tuple(config.joint_upper),
        joint_velocity_limits=tuple(config.joint_velocity_limits),
        observation_fields=(ObservationField("joint_position", "joint_position", n, JOINT_NAMES),
                            ObservationField("visited", "vector", N_TARGETS, topic=STATE_TOPIC,
                                             msg_type="std_msgs/Float64MultiArray")),
        history=history,
        action_kind="joint_position",
        action_horizon=horizon,
        control_rate_hz=float(CONTROL_RATE_HZ),
        normalization=normalization or Normalization.identity(n + N_TARGETS, n),
        model_kind=model_kind,
        task=TASK_NAME,
    )


def initial_frames(n: int, seed: int) -> np.ndarray:
    """``n`` observation frames at random start poses (for latency measurements)."""
    starts = ArmSim(batch=1).sample_start(np.random.default_rng(seed), n)
    return np.concatenate([starts, np.zeros((n, N_TARGETS))], axis=-1)


# --- rollouts -----------------------------------------------------------------------------------
@dataclass
class RolloutResult:
    success: np.ndarray  # [E] bool
    collision: np.ndarray  # [E] bool
    routes: list  # [E] route id, or None where the episode failed
    time_to_finish: np.ndarray  # [E] seconds, NaN where it failed
    ee_paths: list = field(repr=False)  # [E] arrays [n, 2]
    timeout: np.ndarray | None = None  # [E] bool (default: neither success nor collision)
    targets_visited: np.ndarray | None = None  # [E] how many targets each episode reached

    def __post_init__(self):
        if self.timeout is None:
            self.timeout = ~np.asarray(self.success, bool) & ~np.asarray(self.collision, bool)

    @property
    def n_episodes(self) -> int:
        return len(self.routes)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.n_episodes else 0.0

    @property
    def collision_rate(self) -> float:
        return float(np.mean(self.collision)) if self.n_episodes else 0.0

    @property
    def timeout_rate(self) -> float:
        return float(np.mean(self.timeout)) if self.n_episodes else 0.0

    @property
    def entropy(self) -> float:
        return behaviour_entropy(self.routes)

    @property
    def routes_covered(self) -> int:
        return len({r for r in self.routes if r is not None})

    @property
    def mean_time_to_finish(self) -> float:
        return float(np.nanmean(self.time_to_finish)) if np.any(self.success) else float("nan")

    def to_dict(self) -> dict:
        counts = np.bincount([r for r in self.routes if r is not None], minlength=N_ROUTES)
        mean_time = self.mean_time_to_finish
        data = {"episodes": self.n_episodes, "success_rate": self.success_rate,
                "collision_rate": self.collision_rate, "timeout_rate": self.timeout_rate,
                "entropy": self.entropy, "routes_covered": self.routes_covered, "n_routes": N_ROUTES,
                "route_counts": [int(c) for c in counts],
                "mean_time_to_finish_s": None if math.isnan(mean_time) else mean_time}
        if self.targets_visited is not None and self.n_episodes:
            data["mean_targets_visited"] = float(np.mean(self.targets_visited))
        return data


def _result_from_sim(sim: ArmSim) -> RolloutResult:
    return RolloutResult(success=sim.success.copy(), collision=sim.collision.copy(),
                         routes=[sim.route(i) for i in range(sim.batch)],
                         time_to_finish=np.where(sim.success, sim.time, np.nan), ee_paths=sim.ee_paths(),
                         timeout=sim.timeout.copy(), targets_visited=sim.visited.sum(-1))


def _concat_results(parts: Sequence[RolloutResult]) -> RolloutResult:
    return RolloutResult(success=np.concatenate([p.success for p in parts]),
                         collision=np.concatenate([p.collision for p in parts]),
                         routes=[r for p in parts for r in p.routes],
                         time_to_finish=np.concatenate([p.time_to_finish for p in parts]),
                         ee_paths=[e for p in parts for e in p.ee_paths],
                         timeout=np.concatenate([p.timeout for p in parts]),
                         targets_visited=np.concatenate([p.targets_visited for p in parts]))


def rollout(policy: Callable[[np.ndarray], np.ndarray], n_episodes: int, seed: int, history: int,
            execute_steps: int | None = None, batch_size: int = 128, config: ArmSortConfig | None = None,
            progress: bool = False) -> RolloutResult:
    """Run ``policy`` closed-loop on ``n_episodes`` seeded episodes (as ``arm_avoid.rollout``).

    ``policy(obs_windows [B, history, 5]) -> actions [B, H, 2]`` (raw joint targets); the first
    ``execute_steps`` actions of each chunk (default: all) are executed, one control period each.
    Start states depend only on ``seed``; a policy with ``start_batch(n, rng)`` is told of each batch.
    """
    config = config or DEFAULT_CONFIG
    sims = closed_loop(policy, n_episodes, seed, history, execute_steps, batch_size, progress,
                       lambda n: ArmSim(config, n), len(JOINT_NAMES), TICKS_PER_CONTROL)
    parts = [_result_from_sim(sim) for sim in sims]
    if not parts:
        return RolloutResult(np.zeros(0, bool), np.zeros(0, bool), [], np.zeros(0), [], np.zeros(0, bool),
                             np.zeros(0, np.int64))
    return _concat_results(parts)


def replay_actions(start_q: np.ndarray, actions: Sequence[np.ndarray],
                   config: ArmSortConfig | None = None) -> RolloutResult:
    """Replay recorded target sequences (one ``[T_i, 2]`` per episode) from their start postures at rest.

    Each episode keeps its last target once its sequence ends (it times out unless finished).
    """
    config = config or DEFAULT_CONFIG
    sim = ArmSim(config, len(actions))
    sim.reset(np.random.default_rng(0), np.asarray(start_q))
    longest = max((len(a) for a in actions), default=0)
    padded = np.stack([np.concatenate([a, np.repeat(a[-1:], longest - len(a), 0)]) for a in actions])
    step = 0
    while not sim.done.all():
        target = padded[:, min(step, longest - 1)]
        for _ in range(TICKS_PER_CONTROL):
            sim.step_physics(target)
        step += 1
    return _result_from_sim(sim)


# --- scripted demonstrator ----------------------------------------------------------------------
@dataclass
class JointPlan:
    """A joint-space path through the targets of one route: smooth segments between rest points.

    Segment k runs from ``knots[k]`` to ``knots[k + 1]`` during ``[starts[k], starts[k] + durations[k]]``
    with a minimum-jerk time profile and a sideways bulge ``bulges[k] * sin(pi s)``; it rests at each
    knot (the target) until the next segment starts.
    """

    knots: np.ndarray  # [4, 2]: start posture, then the IK of each target in visiting order
    starts: np.ndarray  # [3] s
    durations: np.ndarray  # [3] s
    bulges: np.ndarray  # [3, 2] rad

    def at(self, t: float) -> np.ndarray:
        for k in range(len(self.starts)):
            if t < self.starts[k] + self.durations[k]:
                s = float(np.clip((t - self.starts[k]) / self.durations[k], 0.0, 1.0))
                p = s ** 3 * (10 - 15 * s + 6 * s ** 2)
                return self.knots[k] + p * (self.knots[k + 1] - self.knots[k]) + self.bulges[k] * math.sin(math.pi * p)
        return self.knots[-1].copy()


def plan_route(start_q: np.ndarray, route: int, rng: np.random.Generator, config: ArmSortConfig = DEFAULT_CONFIG,
               target_jitter: float = 0.012, speed_range: tuple[float, float] = (0.7, 1.0),
               dwell_range: tuple[float, float] = (0.0, 0.25), bulge: float = 0.1) -> JointPlan:
    """A random smooth joint-space plan from ``start_q`` through the targets of ``route``.

    Randomness: each target point is jittered within ``target_jitter`` m (well inside the radius),
    each segment's duration is ``0.4 s + largest joint distance / speed`` with speed drawn from
    ``speed_range`` (rad/s), the rest at a target from ``dwell_range`` and the bulge (a via point
    off the straight joint-space line) uniform within ``+-bulge`` rad per joint.
    """
    check_int("route", route, 0, N_ROUTES - 1)
    targets = np.asarray(config.targets)[list(ROUTES[route])]
    angles = rng.uniform(0.0, 2 * math.pi, N_TARGETS)
    radii = target_jitter * np.sqrt(rng.uniform(0.0, 1.0, N_TARGETS))
    points = targets + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    knots = np.concatenate([np.asarray(start_q, dtype=np.float64)[None], inverse_kinematics(points, config)])
    distance = np.abs(np.diff(knots, axis=0)).max(-1)
    durations = 0.4 + distance / rng.uniform(*speed_range, N_TARGETS)
    dwells = rng.uniform(*dwell_range, N_TARGETS)
    starts = np.concatenate([[dwells[0] * 0.5], np.cumsum(durations + dwells)[:-1] + dwells[0] * 0.5])
    bulges = rng.uniform(-bulge, bulge, (N_TARGETS, len(JOINT_NAMES)))
    return JointPlan(knots=knots, starts=starts, durations=durations, bulges=bulges)


def command_lead(config: ArmSortConfig = DEFAULT_CONFIG) -> float:
    """How far ahead of the plan the demonstrator commands: the PD lag on a ramp (kd / kp) plus half a period."""
    return config.kd / config.kp + 0.5 / CONTROL_RATE_HZ


class ScriptedPolicy:
    """The demonstrator as a policy for ``rollout``: each episode follows a random route.

    At its first query in a batch it plans every episode from the observed start posture, then
    returns the plan's joint targets, time-indexed (it advances ``execute_steps`` control steps per query).
    """

    def __init__(self, horizon: int = DEFAULT_HORIZON, execute_steps: int | None = None,
                 config: ArmSortConfig | None = None):
        self.horizon = horizon
        self.execute_steps = execute_steps or horizon
        self.config = config or DEFAULT_CONFIG
        self.plans = None

    def start_batch(self, n: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.routes = rng.integers(0, N_ROUTES, n)
        self.plans = None
        self.step = 0

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        if self.plans is None:
            q_now = windows[:, -1, : len(JOINT_NAMES)]
            self.plans = [plan_route(q_now[i], int(r), self.rng, self.config) for i, r in enumerate(self.routes)]
        lead = command_lead(self.config)
        chunk = [[plan.at((self.step + k) / CONTROL_RATE_HZ + lead) for plan in self.plans]
                 for k in range(self.horizon)]
        self.step += self.execute_steps
        return np.asarray(chunk).transpose(1, 0, 2)


def generate_demonstrations(n_episodes: int, seed: int, config: ArmSortConfig | None = None,
                            progress: bool = False, batch_size: int = 256) -> DemoDataset:
    """Scripted, multimodal demonstrations run through ``ArmSim``: returns a ``DemoDataset``.

    Routes are balanced (each of the 6 orders appears ``n_episodes / 6`` times, rounded) in a
    shuffled order. Each control step records the observation frame and the commanded target:
    the plan ``command_lead`` seconds ahead, so the lagging arm tracks the plan.
    """
    check_int("n_episodes", n_episodes, 1)
    config = config or DEFAULT_CONFIG
    rng = np.random.default_rng(seed)
    routes = rng.permutation(np.resize(np.arange(N_ROUTES), n_episodes))
    starts = ArmSim(config, 1).sample_start(rng, n_episodes)
    lead = command_lead(config)
    observations, actions, episode_ends, kept_routes = [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_episodes, desc="demos", unit="ep")
    total = 0
    for begin in range(0, n_episodes, batch_size):
        idx = np.arange(begin, min(begin + batch_size, n_episodes))
        sim = ArmSim(config, len(idx))
        sim.reset(rng, starts[idx])
        plans = [plan_route(sim.q[j], int(routes[i]), rng, config) for j, i in enumerate(idx)]
        obs_steps, act_steps, alive = [], [], []
        step = 0
        while not sim.done.all():
            q_cmd = np.stack([plan.at(step / CONTROL_RATE_HZ + lead) for plan in plans])
            alive.append(~sim.done)
            obs_steps.append(sim.observation_frame())
            act_steps.append(q_cmd)
            for _ in range(TICKS_PER_CONTROL):
                sim.step_physics(q_cmd)
            step += 1
        alive, obs_steps, act_steps = np.stack(alive, 1), np.stack(obs_steps, 1), np.stack(act_steps, 1)
        for j in range(len(idx)):
            n = int(alive[j].sum())
            observations.append(obs_steps[j, :n])
            actions.append(act_steps[j, :n])
            total += n
            episode_ends.append(total)
            route = sim.route(j)
            kept_routes.append(-1 if route is None else route)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return DemoDataset(observations=np.concatenate(observations), actions=np.concatenate(actions),
                       episode_ends=np.asarray(episode_ends), spec=task_spec(1, 1, config=config),
                       routes=np.asarray(kept_routes), task=TASK_NAME)


# --- plots -----------------------------------------------------------------------------------------
def route_label(route: int) -> str:
    """``"L-T-R"``: the visiting order of a route by the targets' initials."""
    return "-".join(TARGET_NAMES[t][0].upper() for t in ROUTES[route])


def route_colors():
    """One colour per route (tab10 without its red, grey and the colours that read as it)."""
    import matplotlib

    return [matplotlib.colormaps["tab10"](i) for i in (0, 1, 2, 4, 8, 9)]


def draw_workspace(ax, config: ArmSortConfig = DEFAULT_CONFIG, q_start: np.ndarray | None = None) -> None:
    """The targets (radius drawn), the start region's centre posture of the arm and its reach."""
    import matplotlib.patches as patches

    for name, (x, y) in zip(TARGET_NAMES, config.targets):
        ax.add_patch(patches.Circle((x, y), config.target_radius, color="0.8", zorder=1))
        ax.text(x, y + config.target_radius + 0.02, name, ha="center", fontsize=8)
    arm = joint_points(np.asarray(config.start_q if q_start is None else q_start), config)
    ax.plot(arm[:, 0], arm[:, 1], "-o", color="0.5", lw=3, ms=4, zorder=1)
    ax.set_aspect("equal")
    ax.set_xlim(-0.65, 0.65)
    ax.set_ylim(-0.05, 0.92)
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")


def plot_rollouts(paths_by_label, path: str, title: str = "arm_sort rollouts",
                  config: ArmSortConfig | None = None) -> str:
    """Save a PNG with one workspace panel per label; EE paths coloured by route (visiting order), failures red.

    ``paths_by_label``: a ``RolloutResult``, or a mapping label -> ``RolloutResult`` or ``(ee_paths, routes)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    config = config or DEFAULT_CONFIG
    if not isinstance(paths_by_label, Mapping):
        paths_by_label = {"": paths_by_label}
    panels = {}
    for label, value in paths_by_label.items():
        if isinstance(value, RolloutResult):
            panels[label] = (value.ee_paths, value.routes)
        else:
            ee_paths, routes = value
            panels[label] = (list(ee_paths), list(routes))
    colors = route_colors()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.2), squeeze=False)
    for ax, (label, (ee_paths, routes)) in zip(axes[0], panels.items()):
        draw_workspace(ax, config)
        for ee_path, route in zip(ee_paths, routes):
            ee_path = np.asarray(ee_path)
            style = dict(color=colors[route], lw=0.8, alpha=0.6) if route is not None else \
                dict(color="red", lw=1.0, alpha=0.8)
            ax.plot(ee_path[:, 0], ee_path[:, 1], zorder=3, **style)
            if route is None:
                ax.plot(ee_path[-1, 0], ee_path[-1, 1], "x", color="red", zorder=4)
        ok = [r for r in routes if r is not None]
        ax.set_title(f"{label}\n{len(ok)}/{len(routes)} success, "
                     f"{len(set(ok))}/{N_ROUTES} routes, entropy {behaviour_entropy(ok):.2f}", fontsize=10)
    handles = [Line2D([], [], color=colors[r], label=route_label(r)) for r in range(N_ROUTES)]
    axes[0][0].legend(handles=handles, loc="lower left", fontsize=7, title="order", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


# --- datasets (used by `vdd demos` and `vdd render`) -------------------------------------------------
def evaluate_dataset(dataset) -> RolloutResult:
    """Task metrics of a dataset: replay each episode's recorded targets from its first posture."""
    starts = dataset.observations[dataset.episode_starts, : len(JOINT_NAMES)]
    return replay_actions(starts, [dataset.episode(i)[1] for i in range(dataset.n_episodes)])


def plot_dataset(dataset, path: str, max_episodes: int | None = None, title: str | None = None) -> str:
    """Plot the EE paths of a dataset's episodes (at the control rate), coloured by route."""
    n = dataset.n_episodes if max_episodes is None else min(max_episodes, dataset.n_episodes)
    ee_paths, routes = [], []
    for i in range(n):
        obs, _ = dataset.episode(i)
        ee_paths.append(forward_kinematics(obs[:, : len(JOINT_NAMES)]))
        routes.append(int(dataset.routes[i]) if dataset.routes[i] >= 0 else None)
    label = f"{n} of {dataset.n_episodes} demonstrations"
    return plot_rollouts({label: (ee_paths, routes)}, path, title=title or "arm_sort demonstrations")
