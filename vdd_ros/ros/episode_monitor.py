"""Scores runs over ROS: collects arm_sim_node's episode outcomes and the policy nodes' latencies.

Used by ``vdd demo`` and the integration tests; runs in the caller's process with its own
rclpy context, so the caller picks the ROS domain.
"""
from __future__ import annotations

import json
import time

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import Float64, Float64MultiArray, Int32, String

from vdd_ros.ros.arm_sim_node import RESULT_QOS
from vdd_ros.tasks.registry import TASKS, task_module


class EpisodeMonitor:
    """Listens on ``episode_result`` and on each watched policy node's ``~/inference_time``, ``~/expert``
    and command topic. ``policy_nodes``: label -> (fully qualified node name, command topic)."""

    def __init__(self, domain_id: int, sim_namespace: str = "", policy_nodes: dict | None = None):
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node("episode_monitor", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.results: list[dict] = []
        self.latencies: dict[str, list[float]] = {}
        self.experts: dict[str, list[int]] = {}
        self.episode_ends: dict[str, list[int]] = {}  # len(experts[label]) at each episode result
        self.commands: dict[str, list[tuple[float, list[float]]]] = {}
        prefix = sim_namespace.rstrip("/")
        self.node.create_subscription(String, f"{prefix}/episode_result", self._on_result, RESULT_QOS)
        self.watched_topics = []
        for label, (node_name, command_topic) in (policy_nodes or {}).items():
            self.watched_topics += [f"{node_name}/inference_time", f"{node_name}/expert", command_topic]
            self.latencies[label], self.experts[label], self.commands[label] = [], [], []
            self.episode_ends[label] = []
            self.node.create_subscription(Float64, f"{node_name}/inference_time",
                                          lambda m, k=label: self.latencies[k].append(m.data), 100)
            self.node.create_subscription(Int32, f"{node_name}/expert",
                                          lambda m, k=label: self.experts[k].append(m.data), 100)
            self.node.create_subscription(Float64MultiArray, command_topic,
                                          lambda m, k=label: self.commands[k].append((time.monotonic(),
                                                                                       list(m.data))), 100)

    def _on_result(self, msg: String) -> None:
        self.results.append(json.loads(msg.data))
        for label, plans in self.experts.items():
            self.episode_ends[label].append(len(plans))

    def experts_per_episode(self, label: str) -> list[list[int]]:
        """The experts a watched policy node chose, split into episodes at each episode result."""
        plans, ends = self.experts[label], self.episode_ends[label]
        return [plans[begin:end] for begin, end in zip([0, *ends], ends)]

    def spin_until(self, done, timeout: float, on_progress=None) -> bool:
        """Spin until ``done()`` or ``timeout`` seconds; ``on_progress(n_results)`` after each new result."""
        end = time.monotonic() + timeout
        seen = len(self.results)
        while time.monotonic() < end:
            if done():
                return True
            self.executor.spin_once(timeout_sec=0.1)
            if on_progress is not None and len(self.results) != seen:
                seen = len(self.results)
                on_progress(seen)
        return done()

    def wait_for_policy_nodes(self, timeout: float) -> list[str]:
        """Spin until every watched topic has a matched publisher; returns the topics still without one."""
        def unmatched():
            return [t for t in self.watched_topics if self.node.count_publishers(t) == 0]

        self.spin_until(lambda: not unmatched(), timeout)
        self.spin_until(lambda: False, 0.3)  # discovery done: give the matching a moment
        return unmatched()

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def summarize_results(results: list[dict], task: str = "arm_avoid") -> dict:
    """The offline rollout metrics (``RolloutResult.to_dict`` keys, and ``timeout_rate``) of episodes
    of the built-in ``task`` scored over ROS."""
    module = task_module(task)
    n_routes, behaviour_entropy = module.N_ROUTES, module.behaviour_entropy
    results = sorted(results, key=lambda r: r["episode"])
    routes = [r["route"] for r in results]
    n = len(results)
    times = [r["duration_s"] for r in results if r["success"]]
    counts = np.bincount([r for r in routes if r is not None], minlength=n_routes)
    return {"episodes": n,
            "success_rate": float(np.mean([r["success"] for r in results])) if n else 0.0,
            "collision_rate": float(np.mean([r["collision"] for r in results])) if n else 0.0,
            "timeout_rate": float(np.mean([r["timeout"] for r in results])) if n else 0.0,
            "entropy": behaviour_entropy(routes), "routes_covered": len({r for r in routes if r is not None}),
            "n_routes": n_routes, "route_counts": [int(c) for c in counts],
            "mean_time_to_finish_s": float(np.mean(times)) if times else None}


def latency_summary(seconds) -> dict:
    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    if arr.size == 0:
        return {"calls": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"calls": int(arr.size), "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max())}


def spec_task(spec) -> str:
    """The built-in task a model's spec names (a spec without a built-in task: arm_avoid, the default)."""
    return spec.task if spec.task in TASKS else "arm_avoid"


def task_frame_columns(spec) -> list[int]:
    """Columns of the task simulator's frame (arm_avoid: positions then velocities; arm_sort: positions
    then visited flags) that the model's fields read."""
    task = spec_task(spec)
    offsets, offset = {}, 0
    for task_field in task_module(task).task_spec(1, 1).observation_fields:
        offsets[task_field.name] = (offset, task_field)
        offset += task_field.size
    columns = []
    for model_field in spec.observation_fields:
        if model_field.name not in offsets or offsets[model_field.name][1].size != model_field.size:
            raise ValueError(f"observation field '{model_field.name}' (size {model_field.size}): the {task} "
                             f"simulator provides {[(n, f.size) for n, (_, f) in offsets.items()]}")
        start = offsets[model_field.name][0]
        columns.extend(range(start, start + model_field.size))
    return columns


def offline_rollout(policy, n_episodes: int, seed: int, greedy: bool, rng=None, batch_size: int = 128,
                    experts: list | None = None):
    """The ``rollout`` of the spec's task for a runtime Policy (``act_batch``), reading the fields its spec names.

    ``batch_size=1`` reproduces the node's single-observation calls bit for bit (onnxruntime's kernels,
    and so the float32 rounding, depend on the batch size, which can flip a near-tie between experts).
    ``experts`` (a student's rollout): a list that receives, per episode, the expert of each plan, in order
    (one episode at a time, as the node plans).
    """
    columns = task_frame_columns(policy.spec)
    rng = np.random.default_rng(seed) if rng is None else rng
    task = task_module(spec_task(policy.spec))
    execute_steps = policy.spec.model_info.get("execute_steps")
    if experts is None:
        return task.rollout(lambda windows: policy.act_batch(windows[..., columns], rng, greedy=greedy),
                            n_episodes, seed=seed, history=policy.spec.history, execute_steps=execute_steps,
                            batch_size=batch_size)

    class Recorder:
        def start_batch(self, _n, _rng):
            experts.append([])  # batch size 1: a new batch is a new episode

        def __call__(self, windows):
            out = policy.act_detailed(windows[0][..., columns], rng, greedy=greedy)
            experts[-1].append(int(out.expert))
            return out.actions[None]

    return task.rollout(Recorder(), n_episodes, seed=seed, history=policy.spec.history,
                        execute_steps=execute_steps, batch_size=1)


def expert_switches(episodes: list[list[int]]) -> tuple[int, int]:
    """(switches, plan pairs): how often consecutive plans of one episode chose different experts."""
    switches = sum(int(a != b) for plans in episodes for a, b in zip(plans, plans[1:]))
    return switches, sum(max(len(plans) - 1, 0) for plans in episodes)
