"""From demonstrations to training arrays, and from checkpoints to rollout policies.

Training works on normalised, flattened arrays: ``obs [N, history*obs_step_dim]`` (the window
ending at each step) and ``act [N, horizon*n_joints]`` (the chunk starting there). The
normalisation is fitted on the dataset's frames and actions and travels in the spec.

The policy wrappers turn raw observation windows ``[B, history, obs_step_dim]`` into raw
action chunks ``[B, horizon, n_joints]`` for ``tasks.*.rollout`` and count the network
evaluations they make.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from vdd_ros.data.dataset import DemoDataset, action_chunks
from vdd_ros.spec import ModelSpec, Normalization


@dataclass
class TrainingData:
    spec: ModelSpec  # the task's interface, with the fitted normalisation
    observations: np.ndarray  # [N, history*obs_step_dim] float32, normalised
    actions: np.ndarray  # [N, horizon*n_joints] float32, normalised
    dataset: DemoDataset


def load_demonstrations(dataset: str = "", episodes: int = 200, dataset_seed: int = 0, task: str = "arm_avoid",
                        progress: bool = False) -> DemoDataset:
    """The demonstrations in ``dataset`` (a .npz file), or ``episodes`` generated ones of the built-in task."""
    from vdd_ros.tasks.registry import load_dataset, task_module

    if dataset:
        return load_dataset(dataset)
    return task_module(task).generate_demonstrations(episodes, dataset_seed, progress=progress)


CHUNK_SECONDS = 0.8  # default chunk length in time: 16 actions at 20 Hz (arm_avoid), 8 at 10 Hz (arm_sort)


@dataclass(frozen=True)
class DataChoices:
    """The chunk and observation fields a training run uses, with how each was chosen."""

    horizon: int
    execute_steps: int
    observation_fields: tuple[str, ...]
    notes: tuple[str, ...]  # one line per derived value, printed by the CLI

    def as_config(self) -> dict:
        return {"horizon": self.horizon, "execute_steps": self.execute_steps,
                "observation_fields": list(self.observation_fields)}


def choose_data(spec: ModelSpec, horizon: int = 0, execute_steps: int = 0,
                observation_fields: list[str] | tuple[str, ...] = ()) -> DataChoices:
    """Resolve the task-dependent data choices of a config against the demonstrations' spec.

    ``horizon`` 0: ``CHUNK_SECONDS`` at the spec's control rate (at least 1 action).
    ``execute_steps`` 0: half the horizon (at least 1).
    ``observation_fields`` empty: every field of the frame except joint velocities (a window of
    positions already carries the velocity, and reading measured velocities invited an unstable
    copycat loop on the arm task).
    """
    notes = []
    rate = float(spec.control_rate_hz)
    if not horizon:
        horizon = max(1, round(CHUNK_SECONDS * rate))
        notes.append(f"horizon {horizon} actions ({CHUNK_SECONDS:g} s at the demonstrations' {rate:g} Hz)")
    if not execute_steps:
        execute_steps = max(1, horizon // 2)
        notes.append(f"execute_steps {execute_steps} (half the horizon)")
    if execute_steps > horizon:
        raise ValueError(f"execute_steps: expected <= horizon={horizon}, got {execute_steps}")
    names = [f.name for f in spec.observation_fields]
    if observation_fields:
        field_columns(spec.observation_fields, observation_fields)  # unknown names fail here, by name
        chosen = tuple(n for n in names if n in set(observation_fields))
    else:
        chosen = tuple(f.name for f in spec.observation_fields if f.kind != "joint_velocity")
        left_out = [n for n in names if n not in chosen]
        notes.append(f"observation fields {list(chosen)}"
                     + (f" (left out: {left_out}, joint velocities)" if left_out else ""))
    if not chosen:
        raise ValueError(f"observation_fields: expected at least one field of {names}, got none")
    return DataChoices(horizon, execute_steps, chosen, tuple(notes))


def field_columns(fields, names) -> tuple[tuple, list[int]]:
    """The observation fields named ``names`` (all when empty, in frame order) and their columns in a frame."""
    names = list(names or [])
    known = [f.name for f in fields]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"observation_fields: expected names from {known}, got unknown {unknown}")
    chosen, columns, offset = [], [], 0
    for obs_field in fields:
        if not names or obs_field.name in names:
            chosen.append(obs_field)
            columns.extend(range(offset, offset + obs_field.size))
        offset += obs_field.size
    return tuple(chosen), columns


def prepare_training_data(dataset: DemoDataset, history: int, horizon: int, model_kind: str = "none",
                          normalization: Normalization | None = None,
                          observation_fields: list[str] | tuple[str, ...] = ()) -> TrainingData:
    """Windows of the dataset, normalised (fitted here unless ``normalization`` is given) and flattened.

    ``observation_fields`` picks the frame fields the model reads (empty: all); the spec lists only those.
    ``joint_delta`` datasets get chunks of increments as the policy node integrates them (``action_chunks``);
    ``vdd_ros.data.dataset.convert_action_kind`` makes delta and velocity datasets from position ones.
    """
    fields, columns = field_columns(dataset.spec.observation_fields, observation_fields)
    obs_idx, act_idx = dataset.window_indices(history, horizon)
    obs_windows = dataset.observations[obs_idx][..., columns]
    act_chunks = action_chunks(dataset, act_idx)
    if normalization is None:
        # joint_delta: the statistics of the chunks' increments (a chunk's first one and the later ones differ)
        actions = act_chunks.reshape(-1, act_chunks.shape[-1]) if dataset.spec.action_kind == "joint_delta" \
            else dataset.actions
        fitted = Normalization.fit(dataset.observations[:, columns], actions)
        normalization = Normalization(*(tuple(float(v) for v in values) for values in
                                        (fitted.obs_mean, fitted.obs_std, fitted.act_mean, fitted.act_std)))
    frames = dataset.observations[:, columns]
    # the envelope of the training observations: the policy node holds when a live frame leaves it
    # (ood_threshold), and the exported spec carries it
    envelope = {"observation_low": [float(v) for v in frames.min(0)],
                "observation_high": [float(v) for v in frames.max(0)]}
    spec = dataset.spec.replace(history=history, action_horizon=horizon, normalization=normalization,
                                model_kind=model_kind, observation_fields=fields,
                                model_info={**dataset.spec.model_info, **envelope})
    obs = spec.normalize_obs(obs_windows).reshape(len(obs_windows), -1).astype(np.float32)
    act = spec.normalize_action(act_chunks).reshape(len(act_chunks), -1).astype(np.float32)
    return TrainingData(spec=spec, observations=obs, actions=act, dataset=dataset)


def action_reference(spec: ModelSpec, field_name: str) -> dict | None:
    """Constants for ``DiffusionTeacher(action_reference=...)``: the observation field ``field_name``
    (joint positions, one per joint in the spec's joint order) is the reference of joint-position chunks.
    ``""`` means none (the chunk is modelled in absolute normalised units)."""
    if not field_name:
        return None
    if spec.action_kind != "joint_position":
        raise ValueError(f"relative_to: a reference needs action_kind 'joint_position', got '{spec.action_kind}'")
    offset = 0
    for obs_field in spec.observation_fields:
        if obs_field.name == field_name:
            joints = tuple(obs_field.joints) or spec.joint_names
            if obs_field.kind != "joint_position" or joints != spec.joint_names:
                raise ValueError(f"relative_to: field '{field_name}' must hold the positions of joints "
                                 f"{list(spec.joint_names)}, got kind '{obs_field.kind}' joints {list(joints)}")
            index = list(range(offset, offset + obs_field.size))
            norm = spec.normalization
            return {"obs_index": index, "obs_mean": [float(norm.obs_mean[i]) for i in index],
                    "obs_std": [float(norm.obs_std[i]) for i in index],
                    "act_mean": [float(v) for v in norm.act_mean], "act_std": [float(v) for v in norm.act_std]}
        offset += obs_field.size
    raise ValueError(f"relative_to: expected one of the observation fields "
                     f"{[f.name for f in spec.observation_fields]} or '', got '{field_name}'")


class _PolicyBase:
    """Raw windows -> raw chunks around a normalised-space model; counts calls and evaluations."""

    evaluations_per_action = 1

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, seed: int = 0, frame_fields=None):
        """``frame_fields``: the observation fields of the frames callers pass (default: the spec's own);
        the model reads the spec's fields out of them."""
        self.model = model.eval()
        self.spec = spec
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        frame_fields = tuple(frame_fields or spec.observation_fields)
        offsets, offset = {}, 0
        for obs_field in frame_fields:
            offsets[obs_field.name] = (offset, obs_field)
            offset += obs_field.size
        self.frame_width = offset
        self.columns = []
        for obs_field in spec.observation_fields:
            if obs_field.name not in offsets or offsets[obs_field.name][1] != obs_field:
                raise ValueError(f"observation field '{obs_field.name}' of the model is not in the frames "
                                 f"{[f.name for f in frame_fields]}")
            start = offsets[obs_field.name][0]
            self.columns.extend(range(start, start + obs_field.size))

    def normalised_actions(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, obs_windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(obs_windows, dtype=np.float64)
        expected = (self.spec.history, self.frame_width)
        if windows.ndim != 3 or windows.shape[1:] != expected:
            raise ValueError(f"observation windows: expected shape [B, {expected[0]}, {expected[1]}], "
                             f"got {list(windows.shape)}")
        windows = windows[..., self.columns]
        obs = torch.as_tensor(self.spec.normalize_obs(windows).reshape(len(windows), -1), dtype=torch.float32)
        with torch.no_grad():
            act = self.normalised_actions(obs).numpy().astype(np.float64)
        self.calls += 1
        chunks = act.reshape(len(windows), self.spec.action_horizon, self.spec.n_joints)
        return self.spec.denormalize_action(chunks)


class TeacherPolicy(_PolicyBase):
    """Samples the diffusion teacher with ``n_steps`` Euler steps (denoiser evaluations) per action chunk."""

    def __init__(self, model, spec: ModelSpec, seed: int = 0, n_steps: int | None = None, frame_fields=None):
        super().__init__(model, spec, seed, frame_fields)
        self.n_steps = n_steps or model.n_steps
        self.evaluations_per_action = self.n_steps

    def normalised_actions(self, obs: torch.Tensor) -> torch.Tensor:
        return self.model.sample(obs, n_steps=self.n_steps, generator=self.generator)


class MixturePolicy(_PolicyBase):
    """One forward pass of the mixture: an expert drawn from the gating (or its argmax), its mean.

    ``forced_expert`` (an index) replaces the gating's choice by that expert at every state, as
    the exported student's ``forced_expert`` input does: how the expert behaves alone.
    """

    def __init__(self, model, spec: ModelSpec, seed: int = 0, greedy: bool = False, frame_fields=None,
                 forced_expert: int | None = None):
        super().__init__(model, spec, seed, frame_fields)
        self.greedy = greedy
        n_experts = int(model.n_experts)
        if forced_expert is not None and not (isinstance(forced_expert, int) and 0 <= forced_expert < n_experts):
            raise ValueError(f"forced_expert: expected an expert index 0..{n_experts - 1} or None, "
                             f"got {forced_expert!r}")
        self.forced_expert = forced_expert

    def normalised_actions(self, obs: torch.Tensor) -> torch.Tensor:
        if self.forced_expert is not None:
            _, means = self.model.weights_and_means(obs)
            return means[:, self.forced_expert]
        return self.model.act(obs, greedy=self.greedy, generator=self.generator)


def policy_for_checkpoint(checkpoint, seed: int = 0, **options) -> _PolicyBase:
    """The rollout policy of a loaded checkpoint (``vdd_ros.learn.checkpoint.Checkpoint``)."""
    if checkpoint.kind == "diffusion_teacher":
        return TeacherPolicy(checkpoint.model, checkpoint.spec, seed=seed, **options)
    return MixturePolicy(checkpoint.model, checkpoint.spec, seed=seed, **options)


def closed_loop_check(spec: ModelSpec, episodes: int, seed: int = 123457):
    """``check(model) -> {"success_rate", "entropy"}``: ``episodes`` closed-loop episodes of the spec's built-in
    task with a mixture in normalised units (an expert drawn from the gating, its mean), the same start states
    and sampling stream on every call; ``None`` when the spec names no built-in task (no simulator)."""
    from vdd_ros.tasks.registry import TASKS, task_module

    if episodes < 1 or spec.task not in TASKS:
        return None
    task = task_module(spec.task)
    frame_fields = task.task_spec(1, 1).observation_fields
    execute = min(int(spec.model_info.get("execute_steps") or spec.action_horizon), spec.action_horizon)

    def check(model) -> dict:
        was_training = model.training
        policy = MixturePolicy(model, spec, seed=seed, frame_fields=frame_fields)
        try:
            result = task.rollout(policy, episodes, seed, spec.history, execute)
        finally:
            model.train(was_training)
        return {"success_rate": float(result.success_rate), "entropy": float(result.entropy)}

    return check


def time_per_action(policy: _PolicyBase, windows: np.ndarray, repeats: int = 100) -> dict:
    """Latency of one action chunk for one observation window (batch 1): mean, p50 and p99 in ms."""
    rows = np.asarray(windows)
    policy(rows[:1])  # warm-up
    durations = []
    for i in range(repeats):
        row = rows[i % len(rows)][None]
        start = time.perf_counter()
        policy(row)
        durations.append((time.perf_counter() - start) * 1e3)
    values = np.asarray(durations)
    return {"mean_ms": float(values.mean()), "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99))}
