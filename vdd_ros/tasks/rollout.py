"""The closed-loop rollout loop every built-in task shares (numpy only).

A task's simulator provides ``sample_start(rng, n)``, ``reset(rng, q0)``, ``observation_frame()``,
``step_physics(targets)`` and a per-episode ``done`` array; the task turns the finished simulators
into its own result type.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vdd_ros.validation import check_int, fail


def closed_loop(policy: Callable[[np.ndarray], np.ndarray], n_episodes: int, seed: int, history: int,
                execute_steps: int | None, batch_size: int, progress: bool, new_sim: Callable[[int], object],
                n_joints: int, ticks_per_control: int) -> list:
    """Run ``policy`` on ``n_episodes`` seeded episodes in batches; returns the finished simulators.

    ``policy(obs_windows [B, history, D]) -> actions [B, H, n_joints]`` (raw joint targets). Rows keep
    their episode within a batch; finished episodes stay in the window but their actions are ignored.
    The first ``execute_steps`` actions of each chunk (default: all) are executed, each held for one
    control period (``ticks_per_control`` physics steps). Start states depend only on ``seed``. A policy
    with a ``start_batch(n, rng)`` method is told before each batch of ``n`` new episodes.
    """
    check_int("history", history, 1)
    if execute_steps is not None:
        check_int("execute_steps", execute_steps, 1)
    rng = np.random.default_rng(seed)
    starts = new_sim(1).sample_start(rng, n_episodes)
    sims = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_episodes, desc="rollout", unit="ep")
    for begin in range(0, n_episodes, batch_size):
        q0 = starts[begin:begin + batch_size]
        sim = new_sim(len(q0))
        sim.reset(rng, q0)
        if hasattr(policy, "start_batch"):
            policy.start_batch(len(q0), rng)
        frames = [sim.observation_frame()]
        while not sim.done.all():
            window = np.stack([frames[max(len(frames) - history + k, 0)] for k in range(history)], axis=1)
            actions = np.asarray(policy(window), dtype=np.float64)
            if actions.ndim != 3 or actions.shape[0] != len(q0) or actions.shape[2] != n_joints:
                fail("policy output", f"shape [{len(q0)}, H, {n_joints}]", list(actions.shape))
            steps = actions.shape[1] if execute_steps is None else min(execute_steps, actions.shape[1])
            for step in range(steps):
                for _ in range(ticks_per_control):
                    sim.step_physics(actions[:, step])
                frames.append(sim.observation_frame())
                if sim.done.all():
                    break
        sims.append(sim)
        if bar is not None:
            bar.update(len(q0))
    if bar is not None:
        bar.close()
    return sims
