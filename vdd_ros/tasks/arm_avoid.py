"""arm_avoid: a planar 3-joint arm steers its end effector through a pyramid of obstacles.

Modelled on D3IL "Avoiding", but in joint space: the policy sees joint positions and
velocities and commands absolute joint position targets, never the end effector.

Geometry (metres, the arm's base at the origin, y points away from the base):
- obstacle row k (k = 1..4) holds k circular obstacles centred on the y axis, ``obstacle_spacing``
  apart, rows ``row_spacing`` apart; row k's gaps lie exactly below row k+1's obstacles, so at
  every row the end effector (EE) must turn left or right: 4 rows give 2**4 = 16 routes;
- an episode succeeds when the EE centre crosses the finish line ``y = finish_y`` and fails
  when the EE disk touches an obstacle or time runs out;
- only the EE collides: the links move below the obstacle plane (like D3IL's pillars, which
  only the end effector can hit).

Simulation: ``PHYSICS_RATE_HZ`` ticks per second; each tick every joint tracks its target as a
rate-limited first-order servo ``qdot = clip(gain * (target - q), -vmax, vmax)`` with targets and
positions clipped to the joint limits. The policy runs at ``CONTROL_RATE_HZ``; each command is
held for ``PHYSICS_RATE_HZ // CONTROL_RATE_HZ`` ticks. ``ArmSim`` steps a batch of episodes at once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.files import save_figure
from vdd_ros.spec import ModelSpec, Normalization, ObservationField
from vdd_ros.tasks.rollout import closed_loop
from vdd_ros.validation import check_int, fail

TASK_NAME = "arm_avoid"
JOINT_NAMES = ("joint_1", "joint_2", "joint_3")
PHYSICS_RATE_HZ = 200
CONTROL_RATE_HZ = 20
TICKS_PER_CONTROL = PHYSICS_RATE_HZ // CONTROL_RATE_HZ
N_ROWS = 4
N_ROUTES = 2 ** N_ROWS


@dataclass(frozen=True)
class ArmAvoidConfig:
    link_lengths: tuple[float, ...] = (0.55, 0.45, 0.35)
    joint_lower: tuple[float, ...] = (-0.5, 0.2, 0.0)
    joint_upper: tuple[float, ...] = (1.8, 2.6, 2.5)
    joint_velocity_limits: tuple[float, ...] = (2.0, 2.5, 3.0)  # rad/s
    servo_gain: float = 12.0  # 1/s: the servo lags a ramp by 1/gain seconds
    # small disks: a path that averages two routes still hits the obstacle between them dead centre,
    # while a learned policy's few-centimetre lateral error does not
    ee_radius: float = 0.01
    obstacle_radius: float = 0.012
    obstacle_spacing: float = 0.16  # between neighbours in a row (= gap centre spacing)
    first_row_y: float = 0.40
    row_spacing: float = 0.14
    finish_y: float = 0.93
    start_ee: tuple[float, float] = (0.0, 0.26)
    # the joint posture that puts the EE at start_ee; episodes start near it
    start_q: tuple[float, ...] = (0.29707, 1.95205, 1.69371)
    start_q_noise: float = 0.03  # rad, uniform +- per joint
    max_episode_s: float = 8.0

    @property
    def row_y(self) -> np.ndarray:
        return self.first_row_y + self.row_spacing * np.arange(N_ROWS)

    def obstacle_x(self, row: int) -> np.ndarray:
        """x of the obstacles in 0-based ``row`` (it holds row + 1 obstacles)."""
        return (np.arange(row + 1) - row / 2.0) * self.obstacle_spacing

    def gap_x(self, row: int, gap: int) -> float:
        """Centre of gap ``gap`` (0 = leftmost, row + 1 = rightmost) in 0-based ``row``."""
        return (gap - (row + 1) / 2.0) * self.obstacle_spacing

    @property
    def obstacles(self) -> np.ndarray:
        """All obstacle centres ``[n_obstacles, 2]``."""
        return np.array([(x, y) for row, y in enumerate(self.row_y) for x in self.obstacle_x(row)])


DEFAULT_CONFIG = ArmAvoidConfig()


# --- kinematics ------------------------------------------------------------------
def forward_kinematics(q: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG) -> np.ndarray:
    """EE position ``[..., 2]`` for joint positions ``[..., 3]`` (relative joint angles)."""
    q = np.asarray(q, dtype=np.float64)
    angles = np.cumsum(q, axis=-1)
    lengths = np.asarray(config.link_lengths)
    return np.stack([(lengths * np.cos(angles)).sum(-1), (lengths * np.sin(angles)).sum(-1)], axis=-1)


def joint_points(q: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Base, elbow joints and EE ``[..., 4, 2]`` (for drawing the arm)."""
    q = np.asarray(q, dtype=np.float64)
    angles = np.cumsum(q, axis=-1)
    lengths = np.asarray(config.link_lengths)
    steps = np.stack([lengths * np.cos(angles), lengths * np.sin(angles)], axis=-1)
    zeros = np.zeros(q.shape[:-1] + (1, 2))
    return np.concatenate([zeros, np.cumsum(steps, axis=-2)], axis=-2)


def jacobian(q: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG) -> np.ndarray:
    """d(EE)/dq ``[..., 2, 3]``."""
    angles = np.cumsum(np.asarray(q, dtype=np.float64), axis=-1)
    lengths = np.asarray(config.link_lengths)
    dx = -lengths * np.sin(angles)
    dy = lengths * np.cos(angles)
    # joint j moves every link from j outwards
    dx = np.flip(np.cumsum(np.flip(dx, -1), -1), -1)
    dy = np.flip(np.cumsum(np.flip(dy, -1), -1), -1)
    return np.stack([dx, dy], axis=-2)


def inverse_kinematics(targets: np.ndarray, q_init: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG,
                       iterations: int = 8, damping: float = 0.02, posture_gain: float = 0.1) -> np.ndarray:
    """Damped-least-squares IK for a batch: EE targets ``[B, 2]`` from postures ``[B, 3]``.

    Starts from ``q_init`` (the previous solution) so consecutive solutions stay continuous;
    the null space pulls gently towards ``config.start_q`` so the redundant joint does not drift.
    Raises ValueError if a target is missed by more than 1 mm or a joint limit is hit.
    """
    q = np.array(q_init, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    q_rest = np.asarray(config.start_q)
    eye = np.eye(2)
    for _ in range(iterations):
        error = targets - forward_kinematics(q, config)
        jac = jacobian(q, config)
        jac_t = np.swapaxes(jac, -1, -2)
        inv = np.linalg.inv(jac @ jac_t + damping ** 2 * eye)
        pinv = jac_t @ inv  # [B, 3, 2]
        null = np.eye(3) - pinv @ jac
        q = q + (pinv @ error[..., None])[..., 0] + posture_gain * (null @ (q_rest - q)[..., None])[..., 0]
    miss = np.linalg.norm(targets - forward_kinematics(q, config), axis=-1)
    if np.any(miss > 1e-3):
        raise ValueError(f"inverse kinematics: target missed by {miss.max():.4f} m (expected <= 0.001)")
    lower, upper = np.asarray(config.joint_lower), np.asarray(config.joint_upper)
    if np.any(q < lower) or np.any(q > upper):
        raise ValueError(f"inverse kinematics: solution {q[np.any((q < lower) | (q > upper), -1)][0].tolist()} "
                         f"outside joint limits {list(config.joint_lower)}..{list(config.joint_upper)}")
    return q


# --- routes and metrics ----------------------------------------------------------
def route_from_crossings(crossing_x: Sequence[float], config: ArmAvoidConfig = DEFAULT_CONFIG) -> int | None:
    """Route id from the EE x where it first crossed each row (NaN: not crossed).

    The gap at a row is the number of that row's obstacles left of the EE. A pyramid route
    moves from gap g at row k to gap g or g + 1 at row k + 1; the route id is the binary number
    of those right turns, first row most significant. Anything else gives None.
    """
    gaps = []
    for row, x in enumerate(crossing_x):
        if not np.isfinite(x):
            return None
        gaps.append(int(np.sum(config.obstacle_x(row) < x)))
    turns = np.diff([0] + gaps)
    if np.any((turns < 0) | (turns > 1)):
        return None
    return int(sum(int(t) << (N_ROWS - 1 - k) for k, t in enumerate(turns)))


def route_gaps(route: int) -> list[int]:
    """Gap index at each row for a route id (inverse of ``route_from_crossings``)."""
    check_int("route", route, 0, N_ROUTES - 1)
    turns = [(route >> (N_ROWS - 1 - k)) & 1 for k in range(N_ROWS)]
    return list(np.cumsum(turns))


def first_crossings(path: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG) -> np.ndarray:
    """x where a path ``[n, 2]`` first crosses each row's y going upwards (NaN if never)."""
    path = np.asarray(path, dtype=np.float64)
    out = np.full(N_ROWS, np.nan)
    y0, y1 = path[:-1, 1], path[1:, 1]
    for row, row_y in enumerate(config.row_y):
        hits = np.nonzero((y0 < row_y) & (y1 >= row_y))[0]
        if hits.size:
            i = hits[0]
            frac = (row_y - y0[i]) / (y1[i] - y0[i])
            out[row] = path[i, 0] + frac * (path[i + 1, 0] - path[i, 0])
    return out


def classify_route(path: np.ndarray, config: ArmAvoidConfig = DEFAULT_CONFIG) -> int | None:
    """Route id of an EE path ``[n, 2]`` (None if it is not a complete pyramid route)."""
    return route_from_crossings(first_crossings(path, config), config)


def behaviour_entropy(route_ids: Sequence[int | None], n_routes: int = N_ROUTES) -> float:
    """Normalised entropy ``-sum p log p / log n_routes`` of the routes taken (None ignored)."""
    ids = [int(r) for r in route_ids if r is not None]
    if not ids:
        return 0.0
    counts = np.bincount(ids, minlength=n_routes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    # + 0.0 turns the -0.0 of a single route into 0.0
    return float(-(p * np.log(p)).sum() / math.log(n_routes)) + 0.0


# --- simulator ---------------------------------------------------------------------
class ArmSim:
    """Batch of ``batch`` independent episodes, stepped together; finished ones stay frozen."""

    def __init__(self, config: ArmAvoidConfig | None = None, batch: int = 1):
        self.config = config or DEFAULT_CONFIG
        self.batch = int(batch)
        self._lower = np.asarray(self.config.joint_lower)
        self._upper = np.asarray(self.config.joint_upper)
        self._vmax = np.asarray(self.config.joint_velocity_limits)
        self._obstacles = self.config.obstacles
        self._row_y = self.config.row_y
        self._dt = 1.0 / PHYSICS_RATE_HZ
        self.reset(np.random.default_rng(0))

    def sample_start(self, rng: np.random.Generator, n: int) -> np.ndarray:
        noise = rng.uniform(-self.config.start_q_noise, self.config.start_q_noise, size=(n, len(JOINT_NAMES)))
        return np.asarray(self.config.start_q) + noise

    def reset(self, rng: np.random.Generator, q0: np.ndarray | None = None) -> None:
        """Start every episode: ``q0`` ``[B, 3]`` (or ``[3]``) or a random start near ``start_q``."""
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
        self.crossing_x = np.full((b, N_ROWS), np.nan)
        self._ee = self.ee_position()
        self._path = [self._ee.copy()]
        self._check_events(self._ee, self._ee)

    def ee_position(self) -> np.ndarray:
        return forward_kinematics(self.q, self.config)

    def observation_frame(self) -> np.ndarray:
        """``[B, 6]``: joint positions then joint velocities."""
        return np.concatenate([self.q, self.qdot], axis=-1)

    def step_physics(self, q_target: np.ndarray) -> None:
        """One physics tick towards targets ``[B, 3]`` (clipped to the joint limits)."""
        target = np.clip(np.asarray(q_target, dtype=np.float64), self._lower, self._upper)
        if target.shape != self.q.shape:
            fail("q_target", f"shape {list(self.q.shape)}", list(target.shape))
        if not np.all(np.isfinite(target[~self.done])):
            fail("q_target", "finite joint targets", target[~self.done].tolist())
        active = ~self.done
        qdot = np.clip(self.config.servo_gain * (target - self.q), -self._vmax, self._vmax)
        # gain * dt < 1 and the target is inside the limits, so q never overshoots a limit
        q_new = self.q + qdot * self._dt
        self._advance(q_new, qdot, active)

    def step_velocity(self, qdot_target: np.ndarray) -> None:
        """One physics tick at joint velocities ``[B, 3]`` (rad/s; a velocity command interface): each clipped
        to the joint's velocity limit, then integrated; a joint reaching a position limit stops there (its
        velocity then reads 0)."""
        velocity = np.asarray(qdot_target, dtype=np.float64)
        if velocity.shape != self.q.shape:
            fail("qdot_target", f"shape {list(self.q.shape)}", list(velocity.shape))
        active = ~self.done
        if not np.all(np.isfinite(velocity[active])):
            fail("qdot_target", "finite joint velocities", velocity[active].tolist())
        velocity = np.clip(velocity, -self._vmax, self._vmax)
        q_new = np.clip(self.q + velocity * self._dt, self._lower, self._upper)
        self._advance(q_new, (q_new - self.q) / self._dt, active)

    def _advance(self, q_new: np.ndarray, qdot: np.ndarray, active: np.ndarray) -> None:
        """The tick's new positions and velocities for the active episodes, then time, events and path."""
        self.q = np.where(active[:, None], q_new, self.q)
        self.qdot = np.where(active[:, None], qdot, 0.0 * self.qdot)
        self.time = np.where(active, self.time + self._dt, self.time)
        self.ticks = self.ticks + active
        ee_new = self.ee_position()
        self._check_events(self._ee, ee_new, active)
        self._ee = ee_new
        self._path.append(ee_new.copy())

    def _check_events(self, ee_old: np.ndarray, ee_new: np.ndarray, active: np.ndarray | None = None) -> None:
        if active is None:
            active = ~self.done
        cfg = self.config
        # first upward crossing of each row, interpolated between ticks
        up = (ee_old[:, None, 1] < self._row_y) & (ee_new[:, None, 1] >= self._row_y)
        dy = np.where(up, ee_new[:, None, 1] - ee_old[:, None, 1], 1.0)
        x_cross = ee_old[:, None, 0] + (self._row_y - ee_old[:, None, 1]) / dy \
            * (ee_new[:, None, 0] - ee_old[:, None, 0])
        record = up & np.isnan(self.crossing_x) & active[:, None]
        self.crossing_x = np.where(record, x_cross, self.crossing_x)
        dist = np.linalg.norm(ee_new[:, None, :] - self._obstacles[None], axis=-1)
        hit = active & np.any(dist < cfg.obstacle_radius + cfg.ee_radius, axis=-1)
        finished = active & ~hit & (ee_new[:, 1] >= cfg.finish_y)
        timed_out = active & ~hit & ~finished & (self.time >= cfg.max_episode_s - 1e-9)
        self.collision |= hit
        self.success |= finished
        self.timeout |= timed_out
        self.done |= hit | finished | timed_out

    def route(self, i: int) -> int | None:
        """Route id of episode ``i`` (None unless it finished successfully along a pyramid route)."""
        if not self.success[i]:
            return None
        return route_from_crossings(self.crossing_x[i], self.config)

    def ee_path(self, i: int) -> np.ndarray:
        """EE positions ``[n, 2]`` of episode ``i`` at every physics tick, up to its end."""
        return np.stack([p[i] for p in self._path[: self.ticks[i] + 1]])

    def ee_paths(self) -> list[np.ndarray]:
        """``ee_path(i)`` of every episode (one stacking for the whole batch)."""
        stacked = np.stack(self._path, axis=1)  # [B, ticks, 2]
        return [stacked[i, : self.ticks[i] + 1] for i in range(self.batch)]


# --- spec ---------------------------------------------------------------------------
def task_spec(history: int, horizon: int, normalization: Normalization | None = None,
              model_kind: str = "none", config: ArmAvoidConfig | None = None) -> ModelSpec:
    config = config or DEFAULT_CONFIG
    n = len(JOINT_NAMES)
    return ModelSpec(
        joint_names=JOINT_NAMES,
        joint_lower=tuple(config.joint_lower),
        joint_upper=tuple(config.joint_upper),
        joint_velocity_limits=tuple(config.joint_velocity_limits),
        observation_fields=(ObservationField("joint_position", "joint_position", n, JOINT_NAMES),
                            ObservationField("joint_velocity", "joint_velocity", n, JOINT_NAMES)),
        history=history,
        action_kind="joint_position",
        action_horizon=horizon,
        control_rate_hz=float(CONTROL_RATE_HZ),
        normalization=normalization or Normalization.identity(2 * n, n),
        model_kind=model_kind,
        task=TASK_NAME,
    )


def initial_frames(n: int, seed: int) -> np.ndarray:
    """``n`` observation frames at random start poses, at rest (for latency measurements)."""
    starts = ArmSim(batch=1).sample_start(np.random.default_rng(seed), n)
    return np.concatenate([starts, np.zeros_like(starts)], axis=-1)


# --- rollouts -----------------------------------------------------------------------
@dataclass
class RolloutResult:
    success: np.ndarray  # [E] bool
    collision: np.ndarray  # [E] bool
    routes: list  # [E] route id, or None where the episode failed
    time_to_finish: np.ndarray  # [E] seconds, NaN where it failed
    ee_paths: list = field(repr=False)  # [E] arrays [n, 2]

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
        return {"episodes": self.n_episodes, "success_rate": self.success_rate,
                "collision_rate": self.collision_rate, "entropy": self.entropy,
                "routes_covered": self.routes_covered, "n_routes": N_ROUTES,
                "route_counts": [int(c) for c in counts],
                "mean_time_to_finish_s": None if math.isnan(mean_time) else mean_time}


def _result_from_sim(sim: ArmSim) -> RolloutResult:
    b = sim.batch
    return RolloutResult(success=sim.success.copy(), collision=sim.collision.copy(),
                         routes=[sim.route(i) for i in range(b)],
                         time_to_finish=np.where(sim.success, sim.time, np.nan),
                         ee_paths=sim.ee_paths())


def _concat_results(parts: Sequence[RolloutResult]) -> RolloutResult:
    return RolloutResult(success=np.concatenate([p.success for p in parts]),
                         collision=np.concatenate([p.collision for p in parts]),
                         routes=[r for p in parts for r in p.routes],
                         time_to_finish=np.concatenate([p.time_to_finish for p in parts]),
                         ee_paths=[e for p in parts for e in p.ee_paths])


def rollout(policy: Callable[[np.ndarray], np.ndarray], n_episodes: int, seed: int, history: int,
            execute_steps: int | None = None, batch_size: int = 128, config: ArmAvoidConfig | None = None,
            progress: bool = False) -> RolloutResult:
    """Run ``policy`` closed-loop on ``n_episodes`` seeded episodes.

    ``policy(obs_windows [B, history, 6]) -> actions [B, H, 3]`` (raw joint targets). Rows keep their
    episode within a batch; finished episodes are still in the window but their actions are ignored.
    The first ``execute_steps`` actions of each chunk (default: all) are executed, each held for
    one control period, then the policy is asked again. Start states depend only on ``seed``.
    A policy with a ``start_batch(n, rng)`` method is told before each batch of ``n`` new episodes.
    """
    config = config or DEFAULT_CONFIG
    sims = closed_loop(policy, n_episodes, seed, history, execute_steps, batch_size, progress,
                       lambda n: ArmSim(config, n), len(JOINT_NAMES), TICKS_PER_CONTROL)
    parts = [_result_from_sim(sim) for sim in sims]
    return _concat_results(parts) if parts else RolloutResult(np.zeros(0, bool), np.zeros(0, bool), [],
                                                              np.zeros(0), [])


def replay_actions(start_q: np.ndarray, actions: Sequence[np.ndarray],
                   config: ArmAvoidConfig | None = None) -> RolloutResult:
    """Replay recorded target sequences (one ``[T_i, 3]`` per episode) from their start postures.

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


# --- scripted demonstrator ------------------------------------------------------------
def _pchip_slopes(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson slopes dx/dy at the knots: shape-preserving, no overshoot between knots."""
    h = np.diff(y)
    delta = np.diff(x) / h
    slopes = np.zeros_like(x)
    for i in range(1, len(x) - 1):
        if delta[i - 1] * delta[i] > 0:
            w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
            slopes[i] = (w1 + w2) / (w1 / delta[i - 1] + w2 / delta[i])
    slopes[0], slopes[-1] = 0.0, 0.0  # start and leave the field moving straight up
    return slopes


def _hermite(y_knots: np.ndarray, x_knots: np.ndarray, slopes: np.ndarray, y: np.ndarray) -> np.ndarray:
    i = np.clip(np.searchsorted(y_knots, y) - 1, 0, len(y_knots) - 2)
    h = y_knots[i + 1] - y_knots[i]
    t = (y - y_knots[i]) / h
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    return h00 * x_knots[i] + h10 * h * slopes[i] + h01 * x_knots[i + 1] + h11 * h * slopes[i + 1]


@dataclass
class PlannedPath:
    """EE path as a function of time: dense samples of time and position."""

    times: np.ndarray  # [n]
    points: np.ndarray  # [n, 2]

    def at(self, t: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(t, self.times, self.points[:, 0]), np.interp(t, self.times, self.points[:, 1])],
                        axis=-1)


def plan_path(start_ee: np.ndarray, route: int, rng: np.random.Generator,
              config: ArmAvoidConfig = DEFAULT_CONFIG, gap_jitter: float = 0.008,
              speed_range: tuple[float, float] = (0.2, 0.26), ramp_s: float = 0.6) -> PlannedPath:
    """Smooth EE path from ``start_ee`` through the gap centres of ``route`` and past the finish.

    x is a shape-preserving cubic of y through the (slightly jittered) gap centres, so the path
    never bulges towards an obstacle; the speed ramps up smoothly and then stays constant.
    """
    gaps = route_gaps(route)
    y_knots = np.concatenate([[start_ee[1]], config.row_y, [config.finish_y + 0.08]])
    gap_x = [config.gap_x(row, g) for row, g in enumerate(gaps)]
    x_knots = np.concatenate([[start_ee[0]], np.asarray(gap_x) + rng.uniform(-gap_jitter, gap_jitter, N_ROWS),
                              [gap_x[-1]]])
    slopes = _pchip_slopes(y_knots, x_knots)
    y = np.linspace(y_knots[0], y_knots[-1], 800)
    points = np.stack([_hermite(y_knots, x_knots, slopes, y), y], axis=-1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=-1))])
    speed = rng.uniform(*speed_range)
    # distance covered by a smoothstep speed ramp 0 -> speed over ramp_s, then constant speed
    t = np.linspace(0.0, ramp_s + arc[-1] / speed + 1.0, 2000)
    ramp = np.clip(t / ramp_s, 0.0, 1.0)
    ramp_distance = ramp_s * (ramp**3 - ramp**4 / 2.0)  # integral of smoothstep 3r^2 - 2r^3
    distance = speed * np.where(t <= ramp_s, ramp_distance, ramp_s / 2.0 + (t - ramp_s))
    distance = np.minimum(distance, arc[-1])
    samples = np.stack([np.interp(distance, arc, points[:, 0]), np.interp(distance, arc, points[:, 1])], axis=-1)
    return PlannedPath(times=t, points=samples)


class ScriptedPolicy:
    """The demonstrator as a policy for ``rollout``: each episode follows a random route.

    At its first query in a batch it plans every episode's path from the observed start posture,
    then returns IK targets along the path, time-indexed like the demonstrations (it advances
    ``execute_steps`` control steps per query, so give it the value ``rollout`` gets).
    ``action_noise`` (rad) adds Gaussian noise to every target, to probe how robust the task is.
    """

    def __init__(self, horizon: int = 8, execute_steps: int | None = None, action_noise: float = 0.0,
                 config: ArmAvoidConfig | None = None):
        self.horizon = horizon
        self.execute_steps = execute_steps or horizon
        self.action_noise = action_noise
        self.config = config or DEFAULT_CONFIG
        self.paths = None

    def start_batch(self, n: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.routes = rng.integers(0, N_ROUTES, n)
        self.paths = None
        self.step = 0

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        q_now = windows[:, -1, : len(JOINT_NAMES)]
        if self.paths is None:
            start_ee = forward_kinematics(q_now, self.config)
            self.paths = [plan_path(start_ee[i], int(r), self.rng, self.config) for i, r in enumerate(self.routes)]
            self.q_cmd = q_now.copy()
        lead = 1.0 / self.config.servo_gain + 0.5 / CONTROL_RATE_HZ
        chunk, q_cmd = [], self.q_cmd
        for k in range(self.horizon):
            t = (self.step + k) / CONTROL_RATE_HZ + lead
            q_cmd = inverse_kinematics(np.stack([p.at(np.array(t)) for p in self.paths]), q_cmd, self.config)
            chunk.append(q_cmd)
            if k == self.execute_steps - 1:
                self.q_cmd = q_cmd
        self.step += self.execute_steps
        actions = np.stack(chunk, axis=1)
        if self.action_noise > 0:
            actions = actions + self.rng.normal(0.0, self.action_noise, actions.shape)
        return actions


def generate_demonstrations(n_episodes: int, seed: int, config: ArmAvoidConfig | None = None,
                            progress: bool = False, batch_size: int = 256):
    """Scripted, multimodal demonstrations run through ``ArmSim``: returns a ``DemoDataset``.

    Routes are balanced (each of the 16 appears ``n_episodes / 16`` times, rounded) in a
    shuffled order. Each control step records the sim's observation frame and the commanded
    joint target: the IK solution of the planned EE point one servo lag ahead, so the lagging
    servo tracks the planned path.
    """
    check_int("n_episodes", n_episodes, 1)
    config = config or DEFAULT_CONFIG
    rng = np.random.default_rng(seed)
    routes = rng.permutation(np.resize(np.arange(N_ROUTES), n_episodes))
    starts = ArmSim(config, 1).sample_start(rng, n_episodes)
    paths = [None] * n_episodes
    control_dt = 1.0 / CONTROL_RATE_HZ
    lead = 1.0 / config.servo_gain + control_dt / 2.0
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
        start_ee = sim.ee_position()
        for j, i in enumerate(idx):
            paths[i] = plan_path(start_ee[j], int(routes[i]), rng, config)
        q_cmd = sim.q.copy()
        obs_steps, act_steps, alive = [], [], []
        step = 0
        while not sim.done.all():
            t = step * control_dt + lead
            targets = np.stack([paths[i].at(np.array(t)) for i in idx])
            q_cmd = inverse_kinematics(targets, q_cmd, config)
            alive.append(~sim.done)
            obs_steps.append(sim.observation_frame())
            act_steps.append(q_cmd.copy())
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
            kept_routes.append(sim.route(j) if sim.success[j] else -1)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return DemoDataset(observations=np.concatenate(observations), actions=np.concatenate(actions),
                       episode_ends=np.asarray(episode_ends), spec=task_spec(1, 1, config=config),
                       routes=np.asarray(kept_routes), task=TASK_NAME)


# --- plots -------------------------------------------------------------------------------
def route_colors():
    """One colour per route: tab20 without its reds and greys, which would read as collisions and failures."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i) for i in range(20) if i not in (6, 7, 14, 15)][:N_ROUTES]


def route_label(route: int) -> str:
    return str(route)


def draw_workspace(ax, config: ArmAvoidConfig = DEFAULT_CONFIG, q_start: np.ndarray | None = None) -> None:
    """Obstacles (with the EE radius as a halo), finish line and the arm at its start posture."""
    import matplotlib.patches as patches

    for x, y in config.obstacles:
        ax.add_patch(patches.Circle((x, y), config.obstacle_radius + config.ee_radius, color="0.85", zorder=1))
        ax.add_patch(patches.Circle((x, y), config.obstacle_radius, color="black", zorder=2))
    half = (N_ROWS / 2.0 + 0.8) * config.obstacle_spacing
    ax.plot([-half, half], [config.finish_y] * 2, color="green", lw=2, ls="--", zorder=1, label="finish line")
    arm = joint_points(np.asarray(config.start_q if q_start is None else q_start), config)
    ax.plot(arm[:, 0], arm[:, 1], "-o", color="0.5", lw=3, ms=4, zorder=1)
    ax.set_aspect("equal")
    ax.set_xlim(min(-half, arm[:, 0].min() - 0.05), max(half, arm[:, 0].max() + 0.05))
    ax.set_ylim(-0.05, config.finish_y + 0.08)
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")


def plot_rollouts(paths_by_label, path: str, title: str = "arm_avoid rollouts",
                  config: ArmAvoidConfig | None = None) -> str:
    """Save a PNG with one workspace panel per label; EE paths coloured by route, failures red.

    ``paths_by_label``: a ``RolloutResult``, or a mapping label -> ``RolloutResult`` or
    label -> ``(ee_paths, routes)`` with routes None for failed episodes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5.8), squeeze=False)
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
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


# --- datasets (used by `vdd demos` and `vdd render`) ---------------------------------------
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
    return plot_rollouts({label: (ee_paths, routes)}, path, title=title or "arm_avoid demonstrations")
