"""Executing action chunks across control ticks, and holding a chosen expert: pure logic.

A model predicts ``horizon`` actions per call. The node runs them one per control tick and
asks for a new chunk every ``replan_every`` ticks (``replan_every <= horizon``), which is
what the offline rollouts do with ``execute_steps``.
"""
from __future__ import annotations

import numpy as np

from vdd_ros.validation import check_float, check_int, fail


class ChunkExecutor:
    """Hands out one action per tick from the latest chunk; says when to replan."""

    def __init__(self, horizon: int, replan_every: int):
        check_int("horizon", horizon, 1)
        check_int("replan_every", replan_every, 1, horizon)  # at most the action horizon
        self.horizon = horizon
        self.replan_every = replan_every
        self._chunk: np.ndarray | None = None
        self._step = 0

    @property
    def needs_plan(self) -> bool:
        return self._chunk is None or self._step >= self.replan_every

    @property
    def step(self) -> int:
        """Index in the current chunk of the action the next tick runs."""
        return self._step

    def load(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] != self.horizon:
            fail("action chunk", f"shape [{self.horizon}, n_joints]", list(chunk.shape))
        if not np.all(np.isfinite(chunk)):
            fail("action chunk", "finite numbers", chunk.tolist())
        self._chunk = chunk
        self._step = 0

    def remaining(self) -> np.ndarray:
        """The actions from the current step to the end of the chunk (``[k, n_joints]``)."""
        if self._chunk is None:
            raise ValueError("no action chunk loaded")
        return self._chunk[self._step:]

    def next_action(self) -> np.ndarray:
        """The action for this tick; advances by one. Call ``load`` first when ``needs_plan``."""
        if self.needs_plan:
            raise ValueError("the chunk is used up: load a new one first")
        action = self._chunk[self._step]
        self._step += 1
        return action

    def clear(self) -> None:
        self._chunk = None
        self._step = 0


class ExpertHold:
    """Keeps a chosen mixture expert so the arm does not switch modes every plan.

    The expert is kept for ``hold_ticks`` control ticks after it was chosen; after that, if
    ``min_weight > 0``, it is kept for as long as its gating weight at the current
    observation stays at or above ``min_weight``. Both 0: a fresh choice every plan.

    Use per plan: ``expert = hold.candidate(tick)`` (None: free choice), run the model with
    it, then ``if expert is not None and not hold.keeps(tick, gating): hold.release()`` and
    run again freely; finally ``hold.record(tick, chosen_expert, held=<kept the candidate>)``.
    """

    def __init__(self, hold_ticks: int = 0, min_weight: float = 0.0):
        check_int("expert_hold_ticks", hold_ticks, 0)
        check_float("expert_hold_min_weight", min_weight, 0.0, 1.0)
        self.hold_ticks = hold_ticks
        self.min_weight = min_weight
        self.expert: int | None = None
        self._chosen_tick = 0

    def candidate(self, tick: int) -> int | None:
        if self.expert is None or self.expert < 0:
            return None
        if tick - self._chosen_tick < self.hold_ticks or self.min_weight > 0.0:
            return self.expert
        return None

    def keeps(self, tick: int, gating: np.ndarray | None) -> bool:
        """Whether the held expert may stay, given the gating weights at this observation."""
        if self.expert is None:
            return False
        if tick - self._chosen_tick < self.hold_ticks:
            return True
        if self.min_weight > 0.0 and gating is not None:
            return float(gating[self.expert]) >= self.min_weight
        return False

    def record(self, tick: int, expert: int, held: bool) -> None:
        """Note the expert the plan used; ``held``: it came from ``candidate`` and was kept.

        A fresh choice (even of the same expert) restarts the hold.
        """
        if not held or expert != self.expert:
            self.expert = int(expert)
            self._chosen_tick = tick

    def release(self) -> None:
        self.expert = None

    def clear(self) -> None:
        self.expert = None
        self._chosen_tick = 0
