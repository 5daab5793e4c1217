"""``vdd train-teacher``, ``vdd distill``, ``vdd train-em`` and ``vdd eval``.

Every run reads a YAML config (``config/teacher.yaml``, ``config/distill.yaml``, ``config/em.yaml``)
whose fields can each be overridden with ``--set key=value`` (repeatable; nested fields with a
dot, e.g. ``--set backbone.hidden=128``; values are parsed as YAML). The whole config is
validated before any work starts. Checkpoints hold the spec (with the fitted normalisation)
and the config, and are written atomically, periodically during training.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

# keys of distill.yaml / em.yaml that choose the data rather than the learner
DATA_KEYS = ("dataset", "episodes", "dataset_seed")
DEFAULT_OUT = {"teacher": "models/teacher.pt", "student": "models/student.pt", "em": "models/em.pt"}


# --- config handling ------------------------------------------------------------------
def parse_overrides(items: list[str] | None) -> dict:
    """``["a=1", "backbone.hidden=64"]`` -> ``{"a": 1, "backbone": {"hidden": 64}}`` (values parsed as YAML)."""
    import yaml

    result: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value, got '{item}'")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: value '{text}' is not valid YAML ({str(err).splitlines()[0]})") from None
        parts = key.strip().split(".")
        target = result
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {key}: '{part}' is set both as a value and as a section")
        target[parts[-1]] = value
    return result


def merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | None, default_name: str, overrides: list[str] | None) -> tuple[dict, str]:
    """The config file (or the package's ``config/<default_name>``) with ``--set`` overrides applied."""
    import yaml

    if path is None:
        from vdd_ros.paths import config_file

        path = str(config_file(default_name))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of field: value, got {type(data).__name__}")
    return merge(data, parse_overrides(overrides)), path


def dataclass_config(cls, data: dict, source: str):
    """Build and validate ``cls`` (a config dataclass with an optional ``backbone`` field) from a dict."""
    from dataclasses import fields

    from vdd_ros.learn.backbones import BackboneConfig

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}; {cls.__name__} has {sorted(known)}")
    values = dict(data)
    if isinstance(values.get("backbone"), dict):
        values["backbone"] = BackboneConfig.from_dict(values["backbone"])
    try:
        config = cls(**values)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def split_data_keys(data: dict, defaults: dict) -> tuple[dict, dict]:
    learner = {k: v for k, v in data.items() if k not in DATA_KEYS}
    chosen = {k: data.get(k, defaults[k]) for k in DATA_KEYS}
    if not isinstance(chosen["dataset"], str) and chosen["dataset"] is not None:
        raise ValueError(f"dataset: expected a path string or empty, got {chosen['dataset']!r}")
    chosen["dataset"] = chosen["dataset"] or ""
    for key in ("episodes", "dataset_seed"):
        value = chosen[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "episodes" else 0):
            raise ValueError(f"{key}: expected an integer >= {1 if key == 'episodes' else 0}, got {value!r}")
    return learner, chosen


def _add_common(parser, default_config: str, out_key: str) -> None:
    parser.add_argument("--config", default=None,
                        help=f"YAML config file (default: the package's config/{default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (repeatable; nested: backbone.hidden=128)")
    parser.add_argument("--out", default=DEFAULT_OUT[out_key],
                        help="checkpoint to write (default: %(default)s); periodic checkpoints replace it atomically")
    parser.add_argument("--dataset", default=None,
                        help="demonstration .npz file (default: the config's dataset, else generated demos)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    teacher = subparsers.add_parser(
        "train-teacher", help="train the diffusion-policy teacher on demonstrations",
        description="Train the EDM/BESO-style diffusion teacher on demonstrations (a .npz dataset or the "
        "built-in arm task's generated demos) and write a checkpoint with spec and config.")
    _add_common(teacher, "teacher.yaml", "teacher")
    teacher.set_defaults(func=run_train_teacher)

    distill = subparsers.add_parser(
        "distill", help="distil a teacher checkpoint into a mixture-of-experts student (VDD)",
        description="Variational Diffusion Distillation of a teacher checkpoint into a mixture of Gaussian "
        "experts, on the states of the teacher's training data.")
    distill.add_argument("--teacher", default=None,
                         help="teacher checkpoint (default: models/teacher.pt here, else the package's)")
    _add_common(distill, "distill.yaml", "student")
    distill.set_defaults(func=run_distill)

    em = subparsers.add_parser(
        "train-em", help="train the EM mixture-of-experts baseline directly on demonstrations",
        description="Fit a mixture of Gaussian experts to demonstrations by expectation-maximisation "
        "(the baseline VDD is compared with).")
    _add_common(em, "em.yaml", "em")
    em.set_defaults(func=run_train_em)

    evaluate = subparsers.add_parser(
        "eval", help="roll out teacher/student/EM checkpoints on the built-in task and compare them",
        description="Closed-loop rollouts of any mix of checkpoints on the built-in arm task. Prints one "
        "table (success, route entropy, collisions, network evaluations and time per action), writes it "
        "as JSON and the rollouts as a PNG (one panel per model, paths coloured by route).")
    evaluate.add_argument("--teacher", help="diffusion teacher checkpoint")
    evaluate.add_argument("--student", help="VDD student checkpoint")
    evaluate.add_argument("--em", help="EM baseline checkpoint")
    evaluate.add_argument("--episodes", type=int, default=100, help="episodes per model (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=1000,
                          help="seed of the start states and of the policies' sampling (default: %(default)s)")
    evaluate.add_argument("--n-steps", type=int, default=None,
                          help="teacher denoising steps (default: the teacher's n_steps)")
    evaluate.add_argument("--sampler", choices=("euler", "ancestral"), default=None,
                          help="teacher sampler (default: the teacher's)")
    evaluate.add_argument("--greedy", action="store_true",
                          help="mixtures take the most probable expert instead of sampling one")
    evaluate.add_argument("--execute-steps", type=int, default=None,
                          help="actions of each chunk executed before re-planning (default: from the checkpoint)")
    evaluate.add_argument("--timing-repeats", type=int, default=100,
                          help="single-observation calls timed per model (default: %(default)s)")
    evaluate.add_argument("--json", default="eval.json", help="table as JSON (default: %(default)s)")
    evaluate.add_argument("--plot", default="eval_rollouts.png", help="rollout figure (default: %(default)s)")
    evaluate.set_defaults(func=run_eval)


# --- shared helpers ------------------------------------------------------------------
def _torch_setup():
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small models: one thread is fastest and keeps shared machines usable
    return torch


def _existing_model(path: str | None, name: str) -> str:
    if path:
        return path
    local = Path(DEFAULT_OUT[name])
    if local.is_file():
        return str(local)
    from vdd_ros.paths import model_file

    return str(model_file(f"{name}.pt"))


def _dataset_for(path_option: str | None, data_keys: dict, progress: bool):
    from vdd_ros.learn.pipeline import load_demonstrations

    path = path_option if path_option is not None else data_keys["dataset"]
    return load_demonstrations(path, data_keys["episodes"], data_keys["dataset_seed"], progress=progress), path


def _save(path: str, model, kind: str, spec, config: dict, history: dict) -> None:
    from vdd_ros.learn.checkpoint import save_checkpoint

    save_checkpoint(path, model, kind, spec, config, history)


def _summary(**values) -> None:
    print(" ".join(f"{key}={value}" for key, value in values.items()))


def _jsonable(history: dict) -> dict:
    return json.loads(json.dumps(history, default=float))


# --- train-teacher -------------------------------------------------------------------
def run_train_teacher(args) -> int:
    from vdd_ros.learn.diffusion import TeacherConfig

    data, source = load_config(args.config, "teacher.yaml", args.overrides)
    if args.dataset is not None:
        data["dataset"] = args.dataset
    config = dataclass_config(TeacherConfig, data, source)
    _torch_setup()
    from vdd_ros.learn.diffusion import train_teacher
    from vdd_ros.learn.pipeline import action_reference, load_demonstrations, prepare_training_data

    dataset = load_demonstrations(config.dataset, config.episodes, config.dataset_seed, progress=not args.quiet)
    training = prepare_training_data(dataset, config.history, config.horizon, "diffusion_teacher",
                                     observation_fields=config.observation_fields)
    reference = action_reference(training.spec, config.relative_to)
    spec = training.spec.replace(model_info={"execute_steps": config.execute_steps, "n_steps": config.n_steps,
                                             "sampler": config.sampler})
    saved = {"config": config.to_dict()}

    def periodic(model, history):
        _save(args.out, model, "diffusion_teacher", spec, saved["config"], _jsonable(history))

    started = time.perf_counter()
    model, history = train_teacher(training.observations, training.actions, config, progress=not args.quiet,
                                   on_checkpoint=periodic, action_reference=reference)
    seconds = time.perf_counter() - started
    history = dict(history, wall_time_s=seconds, samples=int(len(training.observations)))
    _save(args.out, model, "diffusion_teacher", spec, saved["config"], _jsonable(history))
    _summary(out=args.out, samples=len(training.observations), iterations=config.iterations,
             final_loss=round(history["loss"][-1], 5), seconds=round(seconds, 1))
    return 0


# --- distill ---------------------------------------------------------------------------
def run_distill(args) -> int:
    from vdd_ros.learn.vdd import VDDConfig

    data, source = load_config(args.config, "distill.yaml", args.overrides)
    checkpoint_every = data.pop("checkpoint_every", 0)
    teacher_path = _existing_model(args.teacher, "teacher")
    _torch_setup()
    from vdd_ros.learn.checkpoint import CheckpointError, load_checkpoint
    from vdd_ros.learn.pipeline import field_columns, prepare_training_data
    from vdd_ros.learn.vdd import distill

    teacher = load_checkpoint(teacher_path)
    if teacher.kind != "diffusion_teacher":
        raise ValueError(f"--teacher {teacher_path}: expected a diffusion_teacher checkpoint, got {teacher.kind}")
    # the teacher's own data by default: same file, or the same generated demos (same seed)
    defaults = {key: teacher.config.get(key, default) for key, default in
                (("dataset", ""), ("episodes", 200), ("dataset_seed", 0))}
    learner, data_keys = split_data_keys(data, defaults)
    if learner.setdefault("history", teacher.spec.history) != teacher.spec.history:
        raise ValueError(f"{source}: history: expected the teacher's history {teacher.spec.history}, "
                         f"got {learner['history']}")
    config = dataclass_config(VDDConfig, learner, source)
    _check_every(checkpoint_every)
    dataset, dataset_path = _dataset_for(args.dataset, data_keys, not args.quiet)
    field_names = [f.name for f in teacher.spec.observation_fields]
    comparable = dataset.spec.replace(history=teacher.spec.history, action_horizon=teacher.spec.action_horizon)
    if set(field_names) <= {f.name for f in dataset.spec.observation_fields}:
        comparable = comparable.replace(
            observation_fields=field_columns(dataset.spec.observation_fields, field_names)[0],
            normalization=teacher.spec.normalization)
    differences = comparable.interface_differences(teacher.spec)
    if differences:
        raise CheckpointError(f"--teacher {teacher_path}: made for a different spec than the dataset "
                              f"(this = dataset, other = teacher): " + "; ".join(differences))
    training = prepare_training_data(dataset, teacher.spec.history, teacher.spec.action_horizon, "vdd_mixture",
                                     normalization=teacher.spec.normalization, observation_fields=field_names)
    spec = teacher.spec.replace(model_kind="vdd_mixture", model_info=dict(
        teacher.spec.model_info, teacher=os.path.basename(teacher_path)))
    saved = dict(config.to_dict(), teacher=teacher_path, dataset=dataset_path or "",
                 episodes=data_keys["episodes"], dataset_seed=data_keys["dataset_seed"])

    def periodic(iteration, model, record):
        if checkpoint_every and (iteration + 1) % checkpoint_every == 0 and iteration + 1 < config.iterations:
            _save(args.out, model, "vdd_mixture", spec, saved, {"iteration": iteration})

    started = time.perf_counter()
    model = distill(teacher.model, training.observations, training.actions, config, progress=not args.quiet,
                    callback=periodic)
    seconds = time.perf_counter() - started
    history = _jsonable(dict(getattr(model, "training_history", {}), wall_time_s=seconds))
    _save(args.out, model, "vdd_mixture", spec, saved, history)
    weights = history.get("mean_gating_weights", [])
    _summary(out=args.out, teacher=teacher_path, states=len(training.observations), iterations=config.iterations,
             dead_experts=len(history.get("dead_experts", [])),
             gating_weights="[" + ",".join(f"{w:.3f}" for w in weights) + "]", seconds=round(seconds, 1))
    return 0


def _check_every(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint_every: expected an integer >= 0, got {value!r}")


# --- train-em ------------------------------------------------------------------------------
def run_train_em(args) -> int:
    from vdd_ros.learn.em import EMConfig

    data, source = load_config(args.config, "em.yaml", args.overrides)
    horizon = data.pop("horizon", 8)
    execute_steps = data.pop("execute_steps", 4)
    field_names = data.pop("observation_fields", [])
    if not isinstance(field_names, list) or not all(isinstance(n, str) for n in field_names):
        raise ValueError(f"{source}: observation_fields: expected a list of field names, got {field_names!r}")
    for name, value in (("horizon", horizon), ("execute_steps", execute_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {name}: expected an integer >= 1, got {value!r}")
    if execute_steps > horizon:
        raise ValueError(f"{source}: execute_steps: expected <= horizon={horizon}, got {execute_steps}")
    learner, data_keys = split_data_keys(data, {"dataset": "", "episodes": 200, "dataset_seed": 0})
    config = dataclass_config(EMConfig, learner, source)
    _torch_setup()
    from vdd_ros.learn.em import train_em
    from vdd_ros.learn.pipeline import prepare_training_data

    dataset, dataset_path = _dataset_for(args.dataset, data_keys, not args.quiet)
    training = prepare_training_data(dataset, config.history, horizon, "em_mixture",
                                     observation_fields=field_names)
    spec = training.spec.replace(model_info={"execute_steps": execute_steps})
    started = time.perf_counter()
    model = train_em(training.observations, training.actions, config, progress=not args.quiet)
    seconds = time.perf_counter() - started
    history = _jsonable(dict(getattr(model, "training_history", {}), wall_time_s=seconds))
    saved = dict(config.to_dict(), horizon=horizon, execute_steps=execute_steps, observation_fields=field_names,
                 dataset=dataset_path or "",
                 episodes=data_keys["episodes"], dataset_seed=data_keys["dataset_seed"])
    _save(args.out, model, "em_mixture", spec, saved, history)
    _summary(out=args.out, samples=len(training.observations), seconds=round(seconds, 1))
    return 0


# --- eval -----------------------------------------------------------------------------------
def run_eval(args) -> int:
    chosen = [(label, path) for label, path in (("teacher", args.teacher), ("student", args.student),
                                                ("em", args.em)) if path]
    if not chosen:
        raise ValueError("eval: expected at least one of --teacher, --student, --em, got none")
    for name, value, low in (("--episodes", args.episodes, 1), ("--seed", args.seed, 0),
                             ("--timing-repeats", args.timing_repeats, 1)):
        if value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    if args.n_steps is not None and args.n_steps < 1:
        raise ValueError(f"--n-steps: expected an integer >= 1, got {args.n_steps}")
    if args.execute_steps is not None and args.execute_steps < 1:
        raise ValueError(f"--execute-steps: expected an integer >= 1, got {args.execute_steps}")
    if not args.plot.endswith(".png"):
        raise ValueError(f"--plot: expected a path ending in .png, got '{args.plot}'")
    _torch_setup()
    from vdd_ros.learn.checkpoint import load_checkpoint

    expected_kind = {"teacher": ("diffusion_teacher",), "student": ("vdd_mixture", "em_mixture"),
                     "em": ("em_mixture", "vdd_mixture")}
    loaded = []
    for label, path in chosen:
        checkpoint = load_checkpoint(path)
        if checkpoint.kind not in expected_kind[label]:
            raise ValueError(f"--{label} {path}: expected a {' or '.join(expected_kind[label])} checkpoint, "
                             f"got {checkpoint.kind}")
        loaded.append((label, path, checkpoint))
    rows, results = evaluate_checkpoints(loaded, args)
    print(format_table(rows))
    write_json_atomic(args.json, {"episodes": args.episodes, "seed": args.seed, "models": rows})
    from vdd_ros.tasks.arm_avoid import plot_rollouts

    # the run's settings go into each panel title (a figure title would overlap them)
    plot_rollouts({f"{row['model']} ({row['kind']}, NFE {row['network_evaluations_per_action']}), "
                   f"seed {args.seed}": result for row, result in zip(rows, results)}, args.plot, title="")
    print(f"wrote {args.json} and {args.plot}")
    return 0


def evaluate_checkpoints(loaded, args):
    """Rollouts and single-observation latency of every checkpoint; ``(rows, rollout results)``."""
    import numpy as np

    from vdd_ros.learn.pipeline import policy_for_checkpoint, time_per_action
    from vdd_ros.tasks import arm_avoid

    rows, results = [], []
    for label, path, checkpoint in loaded:
        spec = checkpoint.spec
        if spec.task != arm_avoid.TASK_NAME:
            raise ValueError(f"--{label} {path}: expected a model of task '{arm_avoid.TASK_NAME}', got '{spec.task}'")
        options = {}
        if checkpoint.kind == "diffusion_teacher":
            options = {"n_steps": args.n_steps, "sampler": args.sampler}
        else:
            options = {"greedy": args.greedy}
        frame_fields = arm_avoid.task_spec(1, 1).observation_fields
        policy = policy_for_checkpoint(checkpoint, seed=args.seed, frame_fields=frame_fields, **options)
        execute = args.execute_steps or int(spec.model_info.get("execute_steps", spec.action_horizon))
        result = arm_avoid.rollout(policy, args.episodes, args.seed, spec.history, min(execute, spec.action_horizon))
        # latency of one action chunk for one observation (what the robot waits for)
        starts = arm_avoid.ArmSim(batch=1).sample_start(np.random.default_rng(args.seed), 16)
        frames = np.concatenate([starts, np.zeros_like(starts)], axis=-1)
        windows = np.repeat(frames[:, None, :], spec.history, axis=1)
        timing = time_per_action(policy, windows, repeats=args.timing_repeats)
        row = {"model": label, "kind": checkpoint.kind, "checkpoint": path,
               **{k: v for k, v in result.to_dict().items() if k != "n_routes"},
               "network_evaluations_per_action": policy.evaluations_per_action,
               "execute_steps": execute, "time_per_action_ms": timing["mean_ms"],
               "time_per_action_p50_ms": timing["p50_ms"], "time_per_action_p99_ms": timing["p99_ms"]}
        rows.append(row)
        results.append(result)
    return rows, results


def format_table(rows: list[dict]) -> str:
    header = ("model", "success", "entropy", "routes", "collision", "NFE/action", "ms/action", "p50 ms")
    lines = [header]
    for row in rows:
        lines.append((row["model"], f"{row['success_rate']:.3f}", f"{row['entropy']:.3f}",
                      f"{row['routes_covered']}/16", f"{row['collision_rate']:.3f}",
                      str(row["network_evaluations_per_action"]), f"{row['time_per_action_ms']:.2f}",
                      f"{row['time_per_action_p50_ms']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)


def write_json_atomic(path: str, data) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, allow_nan=False, default=float)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
