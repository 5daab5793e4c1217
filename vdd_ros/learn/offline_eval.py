"""How good is a mixture policy without a simulator: numbers on held-out demonstrations.

For every mixture model (VDD student, EM baseline) at the states of a held-out dataset:

- **log-likelihood** of the demonstrated action chunk, exact (``MixtureOfExpertsPolicy.log_prob``),
  divided by the chunk's number of entries (horizon x joints): in the model's *normalised* action
  units (what it was trained in) and in *physical* joint units (rad, m), which adds
  ``-mean(log act_std)`` over the chunk's entries and is comparable between models whatever their
  normalisation;
- **action errors** (RMSE over the chunk's entries, physical units) of the expert mean closest to
  the demonstrated chunk (closest in normalised units, among the experts that carry weight at that
  state: can the mixture represent what the demonstrator did?), of a chunk sampled from the full
  mixture, and of the deployed policy's chunk (an expert drawn from the gating, its mean);
- **experts in use**: per state the number of experts with gating weight > ``weight_threshold`` and
  the effective number ``exp(entropy of the weights)``, averaged over states;
- **energy distance** between model samples and teacher samples at ``n_states`` held-out states
  (``n_samples`` of each per state), next to the same distance between two independent teacher
  sample sets (the noise floor: what two sample sets of one distribution give at this sample size).

States are clustered with k-means on the (normalised) observation windows; the energy-distance
states are drawn evenly from the clusters, and per cluster the teacher's and each model's samples
are projected on the two main PCA directions of the teacher's samples (``plot_clusters``).

Pure functions on arrays and models; ``evaluate_offline`` ties them together for ``vdd eval
--dataset``. Everything runs on CPU in seconds for the shipped models.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.spec import ModelSpec

WEIGHT_THRESHOLD = 0.02
# spec fields a model depends on besides its observation fields (history and horizon are the model's own)
INTERFACE_KEYS = ("joint_names", "joint_lower", "joint_upper", "joint_velocity_limits", "action_kind",
                  "control_rate_hz")
UNITS = {
    "log_likelihood_per_dim_normalised": "nats per chunk entry, in the model's normalised action units",
    "log_likelihood_per_dim_physical": "nats per chunk entry, in the joints' own units (rad or m)",
    "rmse": "joint units (rad or m), over every entry of the chunk",
    "energy_distance": "teacher-normalised action units (each joint divided by its std in the teacher's "
                       "normalisation), whole chunks; V-statistic, mean over states",
}


class OfflineEvalError(ValueError):
    """A held-out dataset or model that cannot be evaluated (one line naming both sides)."""


# --- the dataset against a model -----------------------------------------------------------
def dataset_fit_problems(dataset_spec: ModelSpec, model_spec: ModelSpec) -> list[str]:
    """``field: expected <model's>, got <dataset's>`` for each interface field that differs.

    The dataset may hold more observation fields than the model reads; each field the model reads
    must be in it, identical.
    """
    problems = []
    mine, theirs = model_spec.to_dict(), dataset_spec.to_dict()
    for key in INTERFACE_KEYS:
        if mine[key] != theirs[key]:
            problems.append(f"{key}: expected {mine[key]!r}, got {theirs[key]!r}")
    available = {f.name: f for f in dataset_spec.observation_fields}
    for obs_field in model_spec.observation_fields:
        found = available.get(obs_field.name)
        if found is None:
            problems.append(f"observation_fields: expected a field '{obs_field.name}', got only "
                            f"{sorted(available)}")
        elif found != obs_field:
            problems.append(f"observation_fields.{obs_field.name}: expected {obs_field.to_dict()}, "
                            f"got {found.to_dict()}")
    return problems


def check_dataset_fits(dataset_spec: ModelSpec, model_spec: ModelSpec, dataset_name: str, model_name: str) -> None:
    problems = dataset_fit_problems(dataset_spec, model_spec)
    if problems:
        raise OfflineEvalError(f"{dataset_name} does not fit {model_name} (expected = model, got = dataset): "
                               + "; ".join(problems))


@dataclass
class HeldOut:
    """One model's view of the held-out steps (every step of every episode, in dataset order)."""

    spec: ModelSpec
    observations: np.ndarray  # [N, history*obs_step_dim] float32, normalised with the model's spec
    actions: np.ndarray  # [N, act_dim] float32, normalised
    chunks: np.ndarray  # [N, act_dim] float64, physical units (the demonstrated chunk, flattened)


def held_out(dataset: DemoDataset, spec: ModelSpec) -> HeldOut:
    """Windows and chunks of ``dataset`` as the model of ``spec`` reads them (its normalisation)."""
    from vdd_ros.learn.pipeline import prepare_training_data

    data = prepare_training_data(dataset, spec.history, spec.action_horizon, spec.model_kind,
                                 normalization=spec.normalization,
                                 observation_fields=[f.name for f in spec.observation_fields])
    _, chunks = dataset.windows(spec.history, spec.action_horizon)
    return HeldOut(spec=spec, observations=data.observations, actions=data.actions,
                   chunks=chunks.reshape(len(chunks), -1))


# --- metrics on arrays ---------------------------------------------------------------------
def energy_distance(x, y) -> np.ndarray:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` of sample sets ``x [..., n, d]`` and ``y [..., m, d]``.

    The V-statistic (all pairs, the zero self-distances included): 0 for identical sample sets, > 0
    otherwise; for two independent sets of one distribution about ``E|X-X'| (1/n + 1/m) / 2``, the
    floor every comparison at this sample size sits on. Leading axes are batch axes (one value each).
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.dim() < 2 or y.dim() < 2 or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"energy_distance: expected x [..., n, d] and y [..., m, d] with the same batch axes and d, "
                         f"got {list(x.shape)} and {list(y.shape)}")
    between = torch.cdist(x, y).mean((-2, -1))
    within_x = torch.cdist(x, x).mean((-2, -1))
    within_y = torch.cdist(y, y).mean((-2, -1))
    return (2.0 * between - within_x - within_y).numpy()


def gaussian_mixture_log_density(x, weights, means, covariances) -> np.ndarray:
    """``log sum_z w_z N(x; mu_z, S_z)`` for ``x [N, d]``, ``weights [N, Z]``, ``means [N, Z, d]``,
    ``covariances [N, Z, d, d]`` (numpy, float64): the closed form the exact log-likelihood must equal."""
    x, weights, means, cov = (np.asarray(a, dtype=np.float64) for a in (x, weights, means, covariances))
    d = x.shape[-1]
    diff = x[:, None, :] - means
    solved = np.linalg.solve(cov, diff[..., None])[..., 0]
    _, log_det = np.linalg.slogdet(cov)
    log_n = -0.5 * (diff * solved).sum(-1) - 0.5 * log_det - 0.5 * d * np.log(2.0 * np.pi)
    terms = np.log(weights) + log_n
    top = terms.max(-1, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(-1, keepdims=True)))[:, 0]


def expert_usage(weights, threshold: float = WEIGHT_THRESHOLD) -> dict:
    """How many experts carry weight: per state the count with weight > ``threshold`` and
    ``exp(entropy)``, both averaged over states; experts above the threshold at some state; mean weights."""
    w = np.asarray(weights, dtype=np.float64)
    entropy = -(w * np.log(np.clip(w, 1e-300, None))).sum(-1)
    return {"experts_with_weight": float((w > threshold).sum(-1).mean()),
            "effective_experts": float(np.exp(entropy).mean()),
            "experts_used_anywhere": int((w.max(0) > threshold).sum()),
            "n_experts": int(w.shape[-1]),
            "mean_gating_weights": [float(v) for v in w.mean(0)]}


def closest_expert(means, targets, weights=None, threshold: float = WEIGHT_THRESHOLD) -> np.ndarray:
    """Index ``[N]`` of the expert mean ``means [N, Z, A]`` nearest (Euclidean) to ``targets [N, A]``.

    With ``weights [N, Z]`` only experts with weight > ``threshold`` compete (the most probable one
    always does): an expert the gating never picks there does not count as representing the chunk.
    """
    means, targets = np.asarray(means, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    distance = ((means - targets[:, None, :]) ** 2).sum(-1)
    if weights is not None:
        w = np.asarray(weights)
        eligible = w > threshold
        eligible[np.arange(len(w)), w.argmax(-1)] = True
        distance = np.where(eligible, distance, np.inf)
    return distance.argmin(-1)


def chunk_rmse(predicted, targets, n_joints: int) -> dict:
    """RMSE over all entries of flattened chunks ``[N, horizon*n_joints]``, and per joint."""
    error = (np.asarray(predicted, dtype=np.float64) - np.asarray(targets, dtype=np.float64)) ** 2
    per_joint = error.reshape(len(error), -1, n_joints).mean((0, 1))
    return {"rmse": float(np.sqrt(error.mean())), "per_joint": [float(v) for v in np.sqrt(per_joint)]}


def kmeans(x, k: int, seed: int = 0, iterations: int = 50, restarts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ starts on ``x [N, d]``: ``(labels [N], centres [k', d])``, k' = min(k, N).

    The best of ``restarts`` starts (least within-cluster squared distance); deterministic for a seed;
    clusters are numbered by decreasing size.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans: expected points [N, d] with N >= 1, got shape {list(x.shape)}")
    k = max(1, min(int(k), len(x)))
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, restarts)):
        labels, centres = _lloyd(x, k, rng, iterations)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, centres)
    _, labels, centres = best
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    return relabel[labels], centres[order]


def _lloyd(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):  # k-means++: the next start far from the ones chosen
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for step in range(iterations):
        new = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                centres[j] = x[labels == j].mean(0)
    return labels, centres


def choose_states(labels, n_states: int, seed: int = 0) -> np.ndarray:
    """About ``n_states`` state indices, an equal share from each cluster (all of a smaller cluster), sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    clusters = np.unique(labels)
    share = max(1, n_states // len(clusters))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=min(share, int((labels == c).sum())), replace=False)
              for c in clusters]
    return np.sort(np.concatenate(chosen))


def pca_directions(points, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [d], directions [n, d])``: the ``n`` main principal directions of ``points [N, d]``."""
    points = np.asarray(points, dtype=np.float64)
    mean = points.mean(0)
    _, _, vt = np.linalg.svd(points - mean, full_matrices=False)
    directions = vt[:n]
    if len(directions) < n:  # fewer points than directions asked for
        directions = np.vstack([directions, np.zeros((n - len(directions), points.shape[1]))])
    return mean, directions


# --- model passes (batched, no gradients) ----------------------------------------------------
def _batches(n: int, size: int, progress: bool = False, desc: str = ""):
    from tqdm import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, mininterval=0.5, leave=False)


@torch.no_grad()
def mixture_outputs(model, observations, actions, batch_size: int = 2048, seed: int = 0) -> dict:
    """Per state: ``log_prob [N]`` (normalised units, whole chunk), ``weights [N, Z]``, ``means [N, Z, A]``,
    ``sample [N, A]`` (from the full mixture) and ``policy [N, A]`` (a gating-drawn expert's mean)."""
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    act = torch.as_tensor(np.asarray(actions), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {"log_prob": [], "weights": [], "means": [], "sample": [], "policy": []}
    for start in range(0, len(obs), batch_size):
        o, a = obs[start:start + batch_size], act[start:start + batch_size]
        weights, means = model.weights_and_means(o)
        parts["log_prob"].append(model.log_prob(a, o))
        parts["weights"].append(weights)
        parts["means"].append(means)
        parts["sample"].append(model.sample(o, generator=generator))
        parts["policy"].append(model.act(o, generator=generator))
    return {key: torch.cat(values).double().numpy() for key, values in parts.items()}


@torch.no_grad()
def teacher_samples(teacher, observations, n_steps: int | None = None, seed: int = 0, batch_size: int = 4096,
                    progress: bool = False, desc: str = "teacher samples") -> np.ndarray:
    """One diffusion sample ``[N, A]`` (normalised units) per row of ``observations [N, obs_dim]``."""
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    out = [teacher.sample(obs[start:start + batch_size], n_steps=n_steps, generator=generator)
           for start in _batches(len(obs), batch_size, progress, desc)]
    return torch.cat(out).double().numpy()


@torch.no_grad()
def mixture_samples(model, observations, seed: int = 0, batch_size: int = 8192, policy: bool = False) -> np.ndarray:
    """One sample ``[N, A]`` (normalised units) per row of ``observations``: of the full mixture, or with
    ``policy`` the deployed policy's chunk (an expert drawn from the gating, its mean)."""
    obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    draw = model.act if policy else model.sample
    return torch.cat([draw(obs[s:s + batch_size], generator=generator)
                      for s in range(0, len(obs), batch_size)]).double().numpy()


def _physical(spec: ModelSpec, flat_normalised: np.ndarray) -> np.ndarray:
    shape = flat_normalised.shape
    chunks = flat_normalised.reshape(*shape[:-1], spec.action_horizon, spec.n_joints)
    return spec.denormalize_action(chunks).reshape(shape)


def _reference_units(spec: ModelSpec, flat_physical: np.ndarray) -> np.ndarray:
    """Physical chunks in ``spec``'s normalised units (the common units of the energy distances)."""
    shape = flat_physical.shape
    chunks = flat_physical.reshape(*shape[:-1], spec.action_horizon, spec.n_joints)
    return spec.normalize_action(chunks).reshape(shape)


# --- the whole evaluation ------------------------------------------------------------------------
@dataclass
class OfflineOptions:
    n_states: int = 64  # states of the energy distances (drawn evenly from the clusters)
    n_samples: int = 64  # samples per state, of each model and of each teacher set
    n_clusters: int = 4
    weight_threshold: float = WEIGHT_THRESHOLD
    max_states: int = 5000  # per-state metrics on at most this many held-out steps (a random subset)
    seed: int = 0
    teacher_steps: int | None = None  # teacher Euler steps (default: its own n_steps)
    progress: bool = False

    def validate(self) -> OfflineOptions:
        for name, low in (("n_states", 1), ("n_samples", 2), ("n_clusters", 1), ("max_states", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not 0.0 <= self.weight_threshold < 1.0:
            raise ValueError(f"weight_threshold: expected a number in [0, 1), got {self.weight_threshold!r}")
        if self.teacher_steps is not None and self.teacher_steps < 1:
            raise ValueError(f"teacher_steps: expected an integer >= 1, got {self.teacher_steps!r}")
        return self


@dataclass
class OfflineResult:
    """``rows``: one dict per model (teacher first when given); ``summary``: the setting; ``clusters``:
    per cluster its size and energy distances; ``plot_sets``: per cluster the samples the plots show
    (reference units)."""

    rows: list[dict]
    summary: dict
    clusters: list[dict]
    plot_sets: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {**self.summary, "models": self.rows, "clusters": self.clusters}


def evaluate_offline(dataset: DemoDataset, mixtures, teacher=None, options: OfflineOptions | None = None,
                     dataset_name: str = "dataset") -> OfflineResult:
    """Offline numbers of each mixture in ``mixtures`` (``[(label, checkpoint)]``) on ``dataset``.

    ``teacher``: ``(label, checkpoint)`` of a diffusion teacher or None (then no energy distances;
    its row holds the error of its sampled chunk). Every checkpoint must fit the dataset's interface
    (``check_dataset_fits``). A mixture whose chunk (horizon, joints) differs from the teacher's gets
    no energy distance.
    """
    options = (options or OfflineOptions()).validate()
    models = ([teacher] if teacher else []) + list(mixtures)
    if not mixtures:
        raise ValueError("evaluate_offline: expected at least one mixture model, got none")
    for label, checkpoint in models:
        check_dataset_fits(dataset.spec, checkpoint.spec, dataset_name, f"--{label} ({checkpoint.kind})")
    views = {label: held_out(dataset, checkpoint.spec) for label, checkpoint in models}
    rng = np.random.default_rng(options.seed)
    n_steps = dataset.n_steps
    subset = np.sort(rng.choice(n_steps, options.max_states, replace=False)) if n_steps > options.max_states \
        else np.arange(n_steps)
    # clusters of the states, in the reference model's input space (the teacher's when given)
    ref_label, ref_checkpoint = models[0]
    ref_spec = ref_checkpoint.spec
    labels, _ = kmeans(views[ref_label].observations[subset], options.n_clusters, options.seed)
    n_clusters = int(labels.max()) + 1
    states = subset[choose_states(labels, options.n_states, options.seed)]
    state_cluster = labels[np.searchsorted(subset, states)]
    n, s = len(states), options.n_samples

    rows, model_sets = [], {}
    teacher_sets = None
    if teacher:
        t_label, t_checkpoint = teacher
        view = views[t_label]
        obs = view.observations
        sample = teacher_samples(t_checkpoint.model, obs[subset], options.teacher_steps, options.seed,
                                 progress=options.progress, desc=f"{t_label}: samples at held-out states")
        error = chunk_rmse(_physical(t_checkpoint.spec, sample), view.chunks[subset], t_checkpoint.spec.n_joints)
        repeated = np.repeat(obs[states], s, axis=0)
        both = teacher_samples(t_checkpoint.model, np.concatenate([repeated, repeated]), options.teacher_steps,
                               options.seed + 1, progress=options.progress,
                               desc=f"{t_label}: 2 x {s} samples at {n} states")
        both = _reference_units(ref_spec, _physical(t_checkpoint.spec, both)).reshape(2, n, s, -1)
        teacher_sets = both
        floor = energy_distance(both[0], both[1])
        rows.append({"model": t_label, "kind": t_checkpoint.kind, "states": int(len(subset)),
                     "sampled_rmse": error["rmse"],
                     "sampled_rmse_per_joint": error["per_joint"],
                     "energy_distance": float(floor.mean()),
                     "energy_distance_se": float(floor.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
                     "energy_distance_is_noise_floor": True})
        floor_by_cluster = [float(floor[state_cluster == c].mean()) if np.any(state_cluster == c) else None
                            for c in range(n_clusters)]
    for label, checkpoint in mixtures:
        spec, view = checkpoint.spec, views[label]
        out = mixture_outputs(checkpoint.model, view.observations[subset], view.actions[subset],
                              seed=options.seed)
        entries = spec.act_dim
        log_std = float(np.log(np.asarray(spec.normalization.act_std)).mean())
        per_dim = out["log_prob"] / entries
        usage = expert_usage(out["weights"], options.weight_threshold)
        closest = closest_expert(out["means"], view.actions[subset], out["weights"], options.weight_threshold)
        closest_means = out["means"][np.arange(len(closest)), closest]
        targets = view.chunks[subset]
        errors = {name: chunk_rmse(_physical(spec, values), targets, spec.n_joints)
                  for name, values in (("closest_expert", closest_means), ("sampled", out["sample"]),
                                       ("policy", out["policy"]))}
        row = {"model": label, "kind": checkpoint.kind, "states": int(len(subset)),
               "log_likelihood_per_dim_normalised": float(per_dim.mean()),
               "log_likelihood_per_dim_physical": float(per_dim.mean() - log_std),
               "log_likelihood_per_dim_normalised_median": float(np.median(per_dim)),
               "log_likelihood_per_dim_physical_median": float(np.median(per_dim) - log_std)}
        for name, error in errors.items():
            row[f"{name}_rmse"] = error["rmse"]
            row[f"{name}_rmse_per_joint"] = error["per_joint"]
        row.update(usage)
        same_chunk = teacher is not None and (spec.action_horizon, spec.n_joints) == (
            teacher[1].spec.action_horizon, teacher[1].spec.n_joints)
        if same_chunk:
            samples = mixture_samples(checkpoint.model, np.repeat(view.observations[states], s, axis=0),
                                      options.seed + 2)
            samples = _reference_units(ref_spec, _physical(spec, samples)).reshape(n, s, -1)
            model_sets[label] = samples
            distance = energy_distance(samples, teacher_sets[0])
            row["energy_distance"] = float(distance.mean())
            row["energy_distance_se"] = float(distance.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
            row["energy_distance_noise_floor"] = rows[0]["energy_distance"]
            row["energy_distance_ratio"] = row["energy_distance"] / max(rows[0]["energy_distance"], 1e-12)
            executed = mixture_samples(checkpoint.model, np.repeat(view.observations[states], s, axis=0),
                                       options.seed + 3, policy=True)
            executed = _reference_units(ref_spec, _physical(spec, executed)).reshape(n, s, -1)
            row["energy_distance_policy"] = float(energy_distance(executed, teacher_sets[0]).mean())
            row["energy_distance_by_cluster"] = [
                float(distance[state_cluster == c].mean()) if np.any(state_cluster == c) else None
                for c in range(n_clusters)]
        elif teacher is not None:
            row["energy_distance_note"] = (f"chunk {spec.action_horizon}x{spec.n_joints} differs from the "
                                           f"teacher's {teacher[1].spec.action_horizon}x{teacher[1].spec.n_joints}")
        rows.append(row)

    clusters, plot_sets = [], []
    for c in range(n_clusters):
        members = state_cluster == c
        info = {"cluster": c, "held_out_states": int((labels == c).sum()), "energy_states": int(members.sum())}
        if teacher:
            info["energy_distance_noise_floor"] = floor_by_cluster[c]
            info["energy_distance"] = {r["model"]: r["energy_distance_by_cluster"][c] for r in rows
                                       if "energy_distance_by_cluster" in r}
        clusters.append(info)
        demos = _reference_units(ref_spec, views[ref_label].chunks[states[members]])
        plot_sets.append({
            "cluster": c, "demos": demos,
            "reference": teacher_sets[0][members].reshape(-1, demos.shape[-1]) if teacher else demos,
            "reference_label": teacher[0] if teacher else "held-out demonstrations",
            "models": {label: samples[members].reshape(-1, demos.shape[-1]) for label, samples in model_sets.items()},
            "floor": info.get("energy_distance_noise_floor"), "distances": info.get("energy_distance", {})})
    summary = {"dataset": dataset_name, "task": dataset.task, "episodes": dataset.n_episodes,
               "held_out_steps": n_steps, "evaluated_steps": int(len(subset)), "energy_states": int(n),
               "samples_per_state": s, "n_clusters": n_clusters, "weight_threshold": options.weight_threshold,
               "seed": options.seed, "teacher_steps": options.teacher_steps or (
                   int(teacher[1].model.n_steps) if teacher else None), "units": UNITS}
    return OfflineResult(rows=rows, summary=summary, clusters=clusters, plot_sets=plot_sets)


# --- output ------------------------------------------------------------------------------
def format_offline_table(result: OfflineResult, rollout_rows: list[dict] | None = None) -> str:
    """One line per model; with ``rollout_rows`` (closed-loop rows of the same models) success and
    entropy beside the offline numbers."""
    rollouts = {row["model"]: row for row in rollout_rows or []}
    header = ["model", "LL/dim norm", "LL/dim phys", "closest RMSE", "sampled RMSE", "experts>w", "eff. experts",
              "energy dist", "/ floor"]
    if rollouts:
        header += ["success", "entropy"]
    lines = [header]

    def number(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    for row in result.rows:
        is_floor = row.get("energy_distance_is_noise_floor", False)
        energy = number(row, "energy_distance", ".3f")
        if energy != "-":
            energy += f" ±{row['energy_distance_se']:.3f}"
        cells = [row["model"], number(row, "log_likelihood_per_dim_normalised", ".3f"),
                 number(row, "log_likelihood_per_dim_physical", ".3f"), number(row, "closest_expert_rmse", ".4f"),
                 number(row, "sampled_rmse", ".4f"), number(row, "experts_with_weight", ".2f"),
                 number(row, "effective_experts", ".2f"), energy + (" (floor)" if is_floor else ""),
                 "1" if is_floor else number(row, "energy_distance_ratio", ".2f")]
        if rollouts:
            closed = rollouts.get(row["model"], {})
            cells += [number(closed, "success_rate", ".3f"), number(closed, "entropy", ".3f")]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    summary = result.summary
    notes = [f"held-out: {summary['dataset']} ({summary['episodes']} episodes, {summary['evaluated_steps']} of "
             f"{summary['held_out_steps']} steps evaluated)",
             "LL/dim: exact log-likelihood of the demonstrated chunk per chunk entry (norm: the model's normalised "
             "units, phys: joint units); RMSE in joint units",
             f"experts>w: experts with gating weight > {summary['weight_threshold']:g} (mean over states); "
             f"eff. experts: exp(entropy of the weights)"]
    if any("energy_distance" in row for row in result.rows):
        notes.append(f"energy dist: model vs teacher samples, {summary['samples_per_state']} each at "
                     f"{summary['energy_states']} states (teacher-normalised units, ± standard error); "
                     f"floor: two independent teacher sample sets")
    return table + "\n" + "\n".join(notes)


def plot_clusters(result: OfflineResult, prefix: str) -> list[str]:
    """One PNG per state cluster, ``<prefix>_cluster<k>.png``: per mixture model a panel of the reference
    samples (teacher's, or the demonstrated chunks without a teacher) and the model's samples projected
    on the reference's two main PCA directions, the demonstrated chunks as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vdd_ros.files import save_figure

    paths = []
    for plot in result.plot_sets:
        reference = plot["reference"]
        if len(reference) == 0:
            continue
        mean, directions = pca_directions(reference)
        models = plot["models"] or {"": np.zeros((0, reference.shape[1]))}
        fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.8), squeeze=False, sharex=True,
                                 sharey=True)
        for ax, (label, samples) in zip(axes[0], models.items()):
            ref_2d = (reference - mean) @ directions.T
            ax.scatter(ref_2d[:, 0], ref_2d[:, 1], s=5, alpha=0.35, color="0.45", label=plot["reference_label"])
            if len(samples):
                model_2d = (samples - mean) @ directions.T
                ax.scatter(model_2d[:, 0], model_2d[:, 1], s=5, alpha=0.35, color="tab:orange", label=label)
            demos_2d = (plot["demos"] - mean) @ directions.T
            ax.scatter(demos_2d[:, 0], demos_2d[:, 1], s=28, marker="x", color="black", label="demonstrated")
            title = f"cluster {plot['cluster']}: {label or 'samples'}"
            if label in plot["distances"] and plot["floor"] is not None:
                title += f"\nenergy distance {plot['distances'][label]:.3f} (floor {plot['floor']:.3f})"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PC 1 of the reference samples")
            ax.set_ylabel("PC 2")
            ax.legend(fontsize=8, markerscale=2, loc="best")
        fig.tight_layout()
        path = f"{prefix}_cluster{plot['cluster']}.png"
        save_figure(fig, path, dpi=100)
        paths.append(path)
    return paths
