"""``vdd train-teacher``, ``vdd distill``, ``vdd train-em`` and ``vdd eval``.

A training run starts from its config dataclass's defaults (``TeacherConfig``, ``VDDConfig``,
``EMConfig`` in ``vdd_ros.learn.configs``: the shipped models' recipe, which ``config/*.yaml``
write out), then applies, in this order: ``--config FILE`` (a YAML file of fields to change),
``--set key=value`` (repeatable; nested fields with a dot, values parsed as YAML) and the
per-field flags (``--iterations 6000``, ``--backbone.hidden 128``) that ``--help`` lists with
type, default and meaning. The whole config is validated before any work starts.

``--robot robot.yaml`` (train-teacher, distill, train-em; and vdd export) ties a run to a robot
(``vdd_ros.data.robot``): the dataset's (and teacher's, checkpoint's) spec must match the robot's
interface, else one error line lists each difference and names both files; the robot's history and
horizon (when non-zero) sit under the config (above its defaults, below ``--config``/``--set``/flags),
and each value printed says where it came from. Without ``--robot`` nothing changes.

Outputs: a fresh run folder ``runs/<command>-<YYYYmmdd-HHMMSS>/<teacher|student|em>.pt`` by
default, ``--out FILE``, or ``--replace-shipped`` for the package's ``models/<name>.pt``.
Checkpoints hold the spec (with the fitted normalisation) and the config, and are written
atomically, periodically during training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vdd_ros.learn.configs import ConfigBase, EMConfig, TeacherConfig, VDDConfig, render_yaml, yaml_value

RUNS_FOLDER = "runs"
# command -> (config class, YAML file that writes out its defaults, checkpoint name, header of that file)
COMMANDS = {
    "train-teacher": (TeacherConfig, "teacher.yaml", "teacher",
                      "vdd train-teacher: the EDM/BESO-style diffusion teacher on the built-in arm task."),
    "distill": (VDDConfig, "distill.yaml", "student",
                "vdd distill: Variational Diffusion Distillation of a teacher into a mixture of experts."),
    "train-em": (EMConfig, "em.yaml", "em",
                 "vdd train-em: the EM mixture-of-experts baseline, fitted directly to the demonstrations."),
}


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
        _put(result, key.strip(), value, f"--set {key}")
    return result


def _put(target: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"{source}: '{part}' is set both as a value and as a section")
    target[parts[-1]] = value


def merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str) -> dict:
    """The fields a YAML config file sets (any subset of the config's fields)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def _flag_dest(name: str) -> str:
    return "field:" + name


def add_config_flags(parser: argparse.ArgumentParser, cls: type[ConfigBase], yaml_name: str) -> None:
    """One ``--<field>`` flag per field of ``cls`` (nested: ``--backbone.hidden``), help from the field."""
    group = parser.add_argument_group(
        f"config fields ({cls.__name__}; defaults = config/{yaml_name}; values are YAML, e.g. "
        f"--observation-fields '[joint_position]')")
    docs = cls.field_docs()
    for doc in docs:
        if any(other.name.startswith(doc.name + ".") for other in docs):
            continue  # a section: its fields have flags of their own
        dashed = "--" + doc.name.replace("_", "-")
        help_text = f"{doc.help} (default: {yaml_value(doc.default)})".replace("%", "%%")
        group.add_argument(dashed, dest=_flag_dest(doc.name), metavar=doc.type_name.replace(" ", "").upper(),
                           default=argparse.SUPPRESS, help=help_text)
        if "_" in doc.name:  # the YAML spelling works too
            group.add_argument("--" + doc.name, dest=_flag_dest(doc.name), default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)


def flag_values(args, cls: type[ConfigBase]) -> dict:
    """The per-field flags given on the command line, as a nested dict (text fields kept as typed)."""
    import yaml

    result: dict = {}
    for doc in cls.field_docs():
        dest = _flag_dest(doc.name)
        if not hasattr(args, dest):
            continue
        text = getattr(args, dest)
        if doc.type_name == "str":
            value = text
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError as err:
                raise ValueError(f"--{doc.name}: value '{text}' is not valid YAML "
                                 f"({str(err).splitlines()[0]})") from None
        _put(result, doc.name, value, f"--{doc.name}")
    return result


def build_config(cls: type[ConfigBase], args, base: dict | None = None):
    """Defaults, then ``base`` (``--robot``'s history and horizon), ``--config``, ``--set`` and the
    per-field flags; validated."""
    data, source = {}, None
    if args.config is not None:
        data, source = read_config_file(args.config), f"config {args.config}"
    data = merge(merge(merge(base or {}, data), parse_overrides(args.overrides)), flag_values(args, cls))
    try:
        return cls.from_dict(data, cls.__name__)
    except ValueError as err:
        raise ValueError(f"{source}: {err}" if source else str(err)) from None


def output_path(args, command: str) -> Path:
    """``--out``, ``--replace-shipped`` (the package's models/<name>.pt) or a new run folder."""
    name = COMMANDS[command][2]
    if args.out and args.replace_shipped:
        raise ValueError(f"--out and --replace-shipped: expected one of them, got both ('{args.out}')")
    if args.out:
        return Path(args.out)
    if args.replace_shipped:
        from vdd_ros.paths import model_file

        return model_file(f"{name}.pt")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = Path(RUNS_FOLDER) / f"{command}-{stamp}", 1
    while folder.exists():  # two runs in the same second
        n += 1
        folder = Path(RUNS_FOLDER) / f"{command}-{stamp}-{n}"
    return folder / f"{name}.pt"


def _add_common(parser, command: str) -> None:
    cls, yaml_name, name, _ = COMMANDS[command]
    parser.add_argument("--config", default=None,
                        help=f"YAML file of config fields to change (config/{yaml_name} lists every field "
                        "with its default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one config field (repeatable; nested: backbone.hidden=128; values are YAML)")
    parser.add_argument("--out", default=None,
                        help=f"checkpoint to write (default: a new {RUNS_FOLDER}/{command}-<YYYYmmdd-HHMMSS>/"
                        f"{name}.pt); periodic checkpoints replace it atomically")
    parser.add_argument("--replace-shipped", action="store_true",
                        help=f"write the package's shipped models/{name}.pt instead of a run folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_robot_flag(parser, "the teacher's and the dataset's specs must match its interface (the teacher fixes "
                   "history and horizon)" if command == "distill" else "the dataset's spec must match its "
                   "interface; its history and horizon (when non-zero) replace the config defaults (--config, "
                   "--set and the flags still win)")
    add_config_flags(parser, cls, yaml_name)


def register(subparsers) -> None:
    teacher = subparsers.add_parser(
        "train-teacher", help="train the diffusion-policy teacher on demonstrations",
        description="Train the EDM/BESO-style diffusion teacher on demonstrations (a .npz dataset or the "
        "built-in arm task's generated demos) and write a checkpoint with spec and config.")
    _add_common(teacher, "train-teacher")
    teacher.set_defaults(func=run_train_teacher)

    distill = subparsers.add_parser(
        "distill", help="distil a teacher checkpoint into a mixture-of-experts student (VDD)",
        description="Variational Diffusion Distillation of a teacher checkpoint into a mixture of Gaussian "
        "experts, on the states of the teacher's training data. The student reads the teacher's "
        "observation window.")
    distill.add_argument("--teacher", default=None,
                         help="teacher checkpoint (default: models/teacher.pt here, else the package's shipped one)")
    add_external_teacher_flags(distill)
    _add_common(distill, "distill")
    distill.set_defaults(func=run_distill)

    em = subparsers.add_parser(
        "train-em", help="train the EM mixture-of-experts baseline directly on demonstrations",
        description="Fit a mixture of Gaussian experts to demonstrations by expectation-maximisation "
        "(the baseline VDD is compared with).")
    _add_common(em, "train-em")
    em.set_defaults(func=run_train_em)

    evaluate = subparsers.add_parser(
        "eval", help="roll out teacher/student/EM checkpoints on their built-in task, or score them on held-out "
        "demonstrations (--dataset), and compare them",
        description="Closed-loop rollouts of any mix of checkpoints of one built-in task (the task named in "
        "their spec: arm_avoid or arm_sort). Prints one table (success, route entropy, routes covered, "
        "collisions, timeouts, network evaluations and time per action; under a mixture its greedy policy "
        "and each expert forced alone, on --expert-episodes episodes), writes it as JSON and the rollouts "
        "as a PNG (one panel per model, paths coloured by route). The teacher samples with Euler steps, "
        "as its exported ONNX graph does. With --dataset held_out.npz: offline numbers on held-out "
        "demonstrations instead, for any task (no simulator); add --rollouts for both.")
    evaluate.add_argument("--teacher", help="diffusion teacher checkpoint")
    evaluate.add_argument("--student", help="VDD student checkpoint")
    evaluate.add_argument("--em", help="EM baseline checkpoint")
    evaluate.add_argument("--episodes", type=int, default=100, help="episodes per model (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=1000,
                          help="seed of the start states and of the policies' sampling (default: %(default)s)")
    evaluate.add_argument("--n-steps", type=int, default=None,
                          help="teacher Euler steps (default: the teacher's n_steps)")
    evaluate.add_argument("--greedy", action="store_true",
                          help="mixtures take the most probable expert instead of sampling one")
    evaluate.add_argument("--execute-steps", type=int, default=None,
                          help="actions of each chunk executed before re-planning (default: from the checkpoint)")
    evaluate.add_argument("--timing-repeats", type=int, default=100,
                          help="single-observation calls timed per model (default: %(default)s)")
    evaluate.add_argument("--expert-episodes", type=int, default=50,
                          help="episodes of a mixture's greedy policy and of each expert forced alone, rows "
                          "under the mixture's (0: none; default: %(default)s)")
    evaluate.add_argument("--json", default="eval.json", help="table as JSON (default: %(default)s)")
    evaluate.add_argument("--plot", default="eval_rollouts.png", help="rollout figure (default: %(default)s)")
    offline = evaluate.add_argument_group(
        "offline evaluation on held-out demonstrations (--dataset; any task, no simulator)")
    offline.add_argument("--dataset", default=None, metavar="NPZ",
                         help="held-out demonstrations (.npz from vdd demos / import-bag / import-hdf5 / "
                         "import-lerobot, not used in training): per mixture the exact log-likelihood of the "
                         "demonstrated chunks, the RMSE of the closest expert mean and of a sampled chunk, the "
                         "experts in use, and (with --teacher) the energy distance of its samples to the "
                         "teacher's beside the teacher-vs-teacher noise floor. Without --rollouts no rollouts run")
    offline.add_argument("--rollouts", action="store_true",
                         help="with --dataset: also the closed-loop rollouts (built-in tasks only), their success "
                         "and entropy beside the offline numbers")
    offline.add_argument("--states", type=int, default=64,
                         help="held-out states of the energy distances, an equal share per cluster "
                         "(default: %(default)s)")
    offline.add_argument("--samples", type=int, default=64,
                         help="samples per state of each model and of each teacher set (default: %(default)s)")
    offline.add_argument("--clusters", type=int, default=4,
                         help="k-means clusters of the held-out states, one plot each (default: %(default)s)")
    offline.add_argument("--weight-threshold", type=float, default=0.02,
                         help="an expert carries weight at a state above this gating weight (default: %(default)s)")
    offline.add_argument("--max-states", type=int, default=5000,
                         help="per-state numbers on at most this many held-out steps, a random subset "
                         "(default: %(default)s)")
    offline.add_argument("--offline-plots", default="eval_offline", metavar="PREFIX",
                         help="per-cluster figures PREFIX_cluster<k>.png: teacher vs model samples on the teacher "
                         "samples' two main PCA directions (default: %(default)s)")
    offline.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=run_eval)


# --- --robot robot.yaml -------------------------------------------------------------------
def add_robot_flag(parser, what: str) -> None:
    parser.add_argument("--robot", default=None, metavar="ROBOT_YAML",
                        help=f"robot.yaml of the robot the model is for: {what}")


def _user_sources(cls: type[ConfigBase], args) -> dict:
    """``{top-level field: (where the user set it, value)}`` for --config, --set and the per-field flags."""
    layers = []
    if getattr(args, "config", None) is not None:
        layers.append((f"--config {args.config}", read_config_file(args.config)))
    layers.append(("--set", parse_overrides(getattr(args, "overrides", []))))
    layers.extend((f"--{key.replace('_', '-')}", {key: value}) for key, value in flag_values(args, cls).items())
    sources = {}
    for where, data in layers:
        sources.update({key: (where, value) for key, value in data.items()})
    return sources


class RobotOption:
    """``--robot robot.yaml`` for every command that takes it (one helper, not one copy per command).

    Without ``--robot`` every method does nothing. With it: ``config_base`` gives the robot's history
    and horizon (horizon when non-zero) as the layer under the user's config, printing where each value
    came from; ``check`` refuses a dataset's or checkpoint's spec that does not fit the robot's
    interface (one line listing each difference, naming both files); ``note_fixed`` says where the
    window and chunk of a run come from when they are fixed by something else (distill: the teacher).
    """

    def __init__(self, command: str, path: str | None):
        from vdd_ros.cli.imports import load_robot_arg

        self.command = command
        self.robot = load_robot_arg(path) if path else None

    @classmethod
    def from_args(cls, args, command: str) -> RobotOption:
        return cls(command, getattr(args, "robot", None))

    def _note(self, text: str) -> None:
        print(f"vdd {self.command}: {text}", flush=True)

    def _values(self) -> dict:
        """The config fields robot.yaml sets (horizon 0: not set, the config's own default applies)."""
        return {"history": self.robot.spec.history, "horizon": self.robot.horizon}

    def config_base(self, config_cls: type[ConfigBase], args) -> dict:
        if self.robot is None:
            return {}
        import dataclasses

        names = {f.name for f in dataclasses.fields(config_cls)}
        given = _user_sources(config_cls, args)
        base = {}
        for key, value in self._values().items():
            if key not in names or not value:
                continue
            if key in given:
                where, mine = given[key]
                self._note(f"{key} {yaml_value(mine)} from {where} (robot {self.robot.path} says {value})")
            else:
                base[key] = value
                self._note(f"{key} {value} from robot {self.robot.path}")
        return base

    def note_fixed(self, spec, source: str) -> None:
        if self.robot is None:
            return
        mine = {"history": spec.history, "horizon": spec.action_horizon}
        for key, value in self._values().items():
            if value:
                said = "" if mine[key] == value else f" (robot {self.robot.path} says {value})"
                self._note(f"{key} {mine[key]} from {source}{said}")

    def check(self, spec, what: str, label: str) -> None:
        """``what`` names the file (``dataset x.npz``); ``label`` its side in each difference (``dataset=``)."""
        if self.robot is None:
            return
        problems = [p.replace(" model=", f" {label}=", 1) for p in self.robot.interface_problems(spec)]
        if problems:
            raise ValueError(f"{what} does not fit the interface of robot {self.robot.path}: " + "; ".join(problems))
        self._note(f"{what} fits robot {self.robot.path} ({self.robot.name}: {list(self.robot.spec.joint_names)})")


def _dataset_name(dataset_path: str, task: str) -> str:
    return f"dataset {dataset_path}" if dataset_path else f"the generated {task} demonstrations"


# --- shared helpers ------------------------------------------------------------------
def _torch_setup():
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small models: one thread is fastest and keeps shared machines usable
    return torch


def _shipped_teacher(path: str | None) -> str:
    if path:
        return path
    local = Path("models") / "teacher.pt"
    if local.is_file():
        return str(local)
    from vdd_ros.paths import model_file

    return str(model_file("teacher.pt"))


def _save(path: Path, model, kind: str, spec, config: dict, history: dict) -> None:
    from vdd_ros.learn.checkpoint import save_checkpoint

    save_checkpoint(path, model, kind, spec, config, history)


def _summary(**values) -> None:
    print(" ".join(f"{key}={value}" for key, value in values.items()))


def _jsonable(history: dict) -> dict:
    return json.loads(json.dumps(history, default=float))


def _teacher_task(teacher) -> str:
    """The built-in task whose generated demonstrations the teacher was trained on (used when no dataset)."""
    return teacher.config.get("task") or teacher.spec.task or TeacherConfig().task


def _choose_data(command: str, spec, config):
    """The config's chunk and observation fields resolved against the demonstrations (derived ones printed)."""
    from vdd_ros.learn.pipeline import choose_data

    choices = choose_data(spec, config.horizon, config.execute_steps, config.observation_fields)
    for note in choices.notes:
        print(f"vdd {command}: {note}", flush=True)
    return choices


# --- train-teacher -------------------------------------------------------------------
def run_train_teacher(args) -> int:
    robot = RobotOption.from_args(args, "train-teacher")
    config = build_config(TeacherConfig, args, robot.config_base(TeacherConfig, args))
    out = output_path(args, "train-teacher")
    _torch_setup()
    from vdd_ros.learn.diffusion import train_teacher
    from vdd_ros.learn.pipeline import action_reference, load_demonstrations, prepare_training_data

    dataset = load_demonstrations(config.dataset, config.episodes, config.dataset_seed, config.task,
                                  progress=not args.quiet)
    robot.check(dataset.spec, _dataset_name(config.dataset, config.task), "dataset")
    choices = _choose_data("train-teacher", dataset.spec, config)
    training = prepare_training_data(dataset, config.history, choices.horizon, "diffusion_teacher",
                                     observation_fields=choices.observation_fields)
    reference = action_reference(training.spec, config.relative_to)
    spec = training.spec.replace(model_info={"execute_steps": choices.execute_steps, "n_steps": config.n_steps})
    saved = dict(config.to_dict(), **choices.as_config())
    print(f"vdd train-teacher: writing {out}", flush=True)

    def periodic(model, history):
        _save(out, model, "diffusion_teacher", spec, saved, _jsonable(history))

    started = time.perf_counter()
    model, history = train_teacher(training.observations, training.actions, config, progress=not args.quiet,
                                   on_checkpoint=periodic, action_reference=reference)
    seconds = time.perf_counter() - started
    history = dict(history, wall_time_s=seconds, samples=int(len(training.observations)))
    _save(out, model, "diffusion_teacher", spec, saved, _jsonable(history))
    _summary(out=out, samples=len(training.observations), iterations=config.iterations,
             final_loss=round(history["loss"][-1], 5), seconds=round(seconds, 1))
    return 0


# --- distill ---------------------------------------------------------------------------
def add_external_teacher_flags(parser) -> None:
    """The flags of a teacher trained elsewhere (docs/external_teacher.md); values are checked by
    ``vdd_ros.learn.external_teacher.ExternalTeacherConfig`` (errors name these flags)."""
    group = parser.add_argument_group(
        "a teacher trained elsewhere (instead of --teacher; needs --dataset; docs/external_teacher.md)")
    group.add_argument("--teacher-denoiser", default=None, metavar="FILE",
                       help="TorchScript (.pt) or ONNX (.onnx) file: ddpm_eps: eps = model(x, obs, t [B] int64); "
                       "edm_denoiser: denoised = model(x, obs, sigma [B]); x [B, horizon*joints] and obs "
                       "[B, history*frame] in the teacher's normalised units")
    group.add_argument("--teacher-kind", default="", help="ddpm_eps (noise prediction) or edm_denoiser")
    group.add_argument("--teacher-norm", default="", metavar="FILE",
                       help="the teacher's normalisation: .json/.npz with obs_mean+obs_std | obs_min+obs_max | "
                       "obs_scale+obs_offset and the same for action_ (per frame entry / joint, or per window / "
                       "chunk entry), or 'identity'")
    group.add_argument("--teacher-history", type=int, default=0,
                       help="observation frames the teacher reads (default: robot.yaml's history)")
    group.add_argument("--teacher-horizon", type=int, default=0,
                       help="actions per chunk the teacher predicts (default: robot.yaml's horizon)")
    group.add_argument("--teacher-obs-fields", default="", metavar="NAMES",
                       help="comma-separated observation fields of the dataset frame the teacher reads, kept in "
                       "the frame's order (default: all)")
    group.add_argument("--teacher-layout", default="flat",
                       help="flat: x [B, H*J], obs [B, T*D]; sequence: x [B, H, J], obs [B, T, D] (default: flat)")
    group.add_argument("--execute-steps", type=int, default=0,
                       help="actions of each chunk executed before re-planning, recorded for eval/export "
                       "(default: half the horizon)")
    group.add_argument("--schedule", default="", help="ddpm_eps: beta schedule, linear, scaled_linear or "
                       "squaredcos_cap_v2 (diffusers' names)")
    group.add_argument("--train-steps", type=int, default=0,
                       help="ddpm_eps: number of diffusion steps it was trained with (t = 0..N-1)")
    group.add_argument("--beta-start", type=float, default=1e-4,
                       help="ddpm_eps linear/scaled_linear: first beta (default: %(default)s)")
    group.add_argument("--beta-end", type=float, default=0.02,
                       help="ddpm_eps linear/scaled_linear: last beta (default: %(default)s)")
    group.add_argument("--clip-sample", action="store_true",
                       help="ddpm_eps sampling: clip the clean-chunk estimate to [-1, 1] (diffusers' clip_sample)")
    group.add_argument("--teacher-sample-steps", type=int, default=0,
                       help="teacher sampling (guard, rollouts): ddpm_eps 0 = ancestral over every step, N = "
                       "DDIM with N steps; edm_denoiser Euler steps (0: 18)")
    group.add_argument("--edm-output", default="denoised",
                       help="edm_denoiser: denoised (the model returns D(x; sigma)) or network (the raw F of "
                       "Karras et al., preconditioned here with --sigma-data) (default: denoised)")
    group.add_argument("--sigma-data", type=float, default=0.5,
                       help="edm_denoiser with --edm-output network: sigma_data of its preconditioning "
                       "(default: %(default)s)")
    group.add_argument("--edm-sigma-max", type=float, default=80.0,
                       help="edm_denoiser sampling: first noise level of the Karras schedule (default: %(default)s)")


def _external_teacher_setup(args, config, robot):
    """``(teacher, training data, student spec, saved config, teacher path)`` for --teacher-denoiser."""
    from vdd_ros.learn.external_teacher import ExternalTeacherConfig, load_external_teacher
    from vdd_ros.learn.pipeline import field_columns, load_demonstrations, prepare_training_data

    path = args.teacher_denoiser
    if args.teacher:
        raise ValueError(f"--teacher and --teacher-denoiser: expected one of them, got both ('{args.teacher}', "
                         f"'{path}')")
    if not config.dataset:
        raise ValueError("--dataset: expected the demonstrations .npz whose states the student is distilled on "
                         "(a teacher trained elsewhere brings no data), got none")
    dataset = load_demonstrations(config.dataset)
    robot.check(dataset.spec, _dataset_name(config.dataset, ""), "dataset")
    values = {"history": args.teacher_history, "horizon": args.teacher_horizon}
    for key, value in values.items():
        if not value and robot.robot is not None:
            values[key] = {"history": robot.robot.spec.history, "horizon": robot.robot.horizon}[key]
            if values[key]:
                print(f"vdd distill: teacher {key} {values[key]} from robot {robot.robot.path}", flush=True)
        if not isinstance(values[key], int) or values[key] < 1:
            what = "frames the teacher reads" if key == "history" else "actions per chunk"
            raise ValueError(f"--teacher-{key}: expected an integer >= 1 ({what}; or --robot robot.yaml with a "
                             f"{key}), got {values[key] or 'none'}")
    history, horizon = values["history"], values["horizon"]
    names = [n.strip() for n in args.teacher_obs_fields.split(",") if n.strip()]
    try:
        fields = [f.name for f in field_columns(dataset.spec.observation_fields, names)[0]]
    except ValueError as err:
        raise ValueError(f"--teacher-obs-fields: {str(err).split(': ', 1)[1]}") from None
    execute_steps = args.execute_steps or max(1, horizon // 2)
    if not 1 <= execute_steps <= horizon:
        raise ValueError(f"--execute-steps: expected an integer in 1..{horizon} (the horizon), got {execute_steps}")
    training = prepare_training_data(dataset, history, horizon, "vdd_mixture", observation_fields=fields)
    external = ExternalTeacherConfig(
        path=path, kind=args.teacher_kind, history=history, horizon=horizon, observation_fields=tuple(fields),
        norm=args.teacher_norm, layout=args.teacher_layout, schedule=args.schedule, train_steps=args.train_steps,
        beta_start=args.beta_start, beta_end=args.beta_end, clip_sample=args.clip_sample,
        sample_steps=args.teacher_sample_steps, edm_output=args.edm_output, sigma_data=args.sigma_data,
        sigma_max=args.edm_sigma_max)
    teacher = load_external_teacher(external, training.spec)
    print(f"vdd distill: {teacher.summary()}", flush=True)
    low, high = config.sigma_range(0)
    print(f"vdd distill: {teacher.query_range(low, high)}; observation fields {fields}, history {history}, "
          f"horizon {horizon}, execute_steps {execute_steps}", flush=True)
    spec = training.spec.replace(model_info={"execute_steps": execute_steps, "teacher": os.path.basename(path),
                                             "teacher_kind": external.kind})
    saved = dict(config.to_dict(), teacher=path, dataset=config.dataset, history=history, horizon=horizon,
                 execute_steps=execute_steps, observation_fields=fields, external_teacher=teacher.describe())
    return teacher, training, spec, saved, path


def run_distill(args) -> int:
    robot = RobotOption.from_args(args, "distill")
    config = build_config(VDDConfig, args, robot.config_base(VDDConfig, args))
    out = output_path(args, "distill")
    _torch_setup()
    from vdd_ros.learn.vdd import distill

    if getattr(args, "teacher_denoiser", None):
        teacher_model, training, spec, saved, teacher_path = _external_teacher_setup(args, config, robot)
    else:
        teacher_model, training, spec, saved, teacher_path = _checkpoint_teacher_setup(args, config, robot)
    print(f"vdd distill: writing {out}", flush=True)

    def periodic(iteration, model, record):
        every = config.checkpoint_every
        if every and (iteration + 1) % every == 0 and iteration + 1 < config.iterations:
            _save(out, model, "vdd_mixture", spec, saved, {"iteration": iteration})

    from vdd_ros.learn.pipeline import closed_loop_check

    rollout = closed_loop_check(spec, config.validation_episodes) if config.validation_every else None
    if rollout is not None:
        print(f"vdd distill: guard on {config.validation_episodes} closed-loop {spec.task} episodes every "
              f"{config.validation_every} iterations (success + route entropy decide)", flush=True)
    started = time.perf_counter()
    model = distill(teacher_model, training.observations, training.actions, config, progress=not args.quiet,
                    callback=periodic, rollout=rollout)
    seconds = time.perf_counter() - started
    history = _jsonable(dict(getattr(model, "training_history", {}), wall_time_s=seconds))
    _save(out, model, "vdd_mixture", spec, saved, history)
    weights = history.get("mean_gating_weights", [])
    _summary(out=out, teacher=teacher_path, states=len(training.observations), iterations=config.iterations,
             dead_experts=len(history.get("dead_experts", [])),
             gating_weights="[" + ",".join(f"{w:.3f}" for w in weights) + "]", seconds=round(seconds, 1))
    return 0


def _checkpoint_teacher_setup(args, config, robot):
    """``(teacher, training data, student spec, saved config, teacher path)`` for a vdd_ros teacher checkpoint."""
    teacher_path = _shipped_teacher(args.teacher)
    from vdd_ros.learn.checkpoint import CheckpointError, load_checkpoint
    from vdd_ros.learn.pipeline import field_columns, load_demonstrations, prepare_training_data

    teacher = load_checkpoint(teacher_path)
    if teacher.kind != "diffusion_teacher":
        raise ValueError(f"--teacher {teacher_path}: expected a diffusion_teacher checkpoint, got {teacher.kind}")
    robot.check(teacher.spec, f"--teacher {teacher_path}", "teacher")
    robot.note_fixed(teacher.spec, f"the teacher {teacher_path}")
    # the teacher's own data unless the config names other data: same file, or the same generated demos
    teacher_defaults = TeacherConfig()
    dataset_path = config.dataset or teacher.config.get("dataset", teacher_defaults.dataset) or ""
    episodes = config.episodes if config.episodes is not None else teacher.config.get(
        "episodes", teacher_defaults.episodes)
    dataset_seed = config.dataset_seed if config.dataset_seed is not None else teacher.config.get(
        "dataset_seed", teacher_defaults.dataset_seed)
    dataset = load_demonstrations(dataset_path, episodes, dataset_seed, _teacher_task(teacher),
                                  progress=not args.quiet)
    robot.check(dataset.spec, _dataset_name(dataset_path, _teacher_task(teacher)), "dataset")
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
    saved = dict(config.to_dict(), teacher=teacher_path, dataset=dataset_path, episodes=episodes,
                 dataset_seed=dataset_seed)
    return teacher.model, training, spec, saved, teacher_path


# --- train-em ------------------------------------------------------------------------------
def run_train_em(args) -> int:
    robot = RobotOption.from_args(args, "train-em")
    config = build_config(EMConfig, args, robot.config_base(EMConfig, args))
    out = output_path(args, "train-em")
    _torch_setup()
    from vdd_ros.learn.em import train_em
    from vdd_ros.learn.pipeline import load_demonstrations, prepare_training_data

    dataset = load_demonstrations(config.dataset, config.episodes, config.dataset_seed, config.task,
                                  progress=not args.quiet)
    robot.check(dataset.spec, _dataset_name(config.dataset, config.task), "dataset")
    choices = _choose_data("train-em", dataset.spec, config)
    training = prepare_training_data(dataset, config.history, choices.horizon, "em_mixture",
                                     observation_fields=choices.observation_fields)
    spec = training.spec.replace(model_info={"execute_steps": choices.execute_steps})
    print(f"vdd train-em: writing {out}", flush=True)
    started = time.perf_counter()
    model = train_em(training.observations, training.actions, config, progress=not args.quiet)
    seconds = time.perf_counter() - started
    history = _jsonable(dict(getattr(model, "training_history", {}), wall_time_s=seconds))
    _save(out, model, "em_mixture", spec, dict(config.to_dict(), **choices.as_config()), history)
    _summary(out=out, samples=len(training.observations), seconds=round(seconds, 1))
    return 0


# --- eval -----------------------------------------------------------------------------------
def run_eval(args) -> int:
    chosen = [(label, path) for label, path in (("teacher", args.teacher), ("student", args.student),
                                                ("em", args.em)) if path]
    if not chosen:
        raise ValueError("eval: expected at least one of --teacher, --student, --em, got none")
    offline = getattr(args, "dataset", None)
    rollouts = not offline or args.rollouts
    if getattr(args, "rollouts", False) and not offline:
        raise ValueError("--rollouts: expected --dataset too (without it eval runs the rollouts alone)")
    for name, value, low in (("--episodes", args.episodes, 1), ("--seed", args.seed, 0),
                             ("--timing-repeats", args.timing_repeats, 1),
                             ("--expert-episodes", args.expert_episodes, 0)):
        if value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    if args.n_steps is not None and args.n_steps < 1:
        raise ValueError(f"--n-steps: expected an integer >= 1, got {args.n_steps}")
    if args.execute_steps is not None and args.execute_steps < 1:
        raise ValueError(f"--execute-steps: expected an integer >= 1, got {args.execute_steps}")
    if rollouts and not args.plot.endswith(".png"):
        raise ValueError(f"--plot: expected a path ending in .png, got '{args.plot}'")
    if offline:
        _offline_options(args)  # bad numbers fail before any model is loaded
        if chosen == [("teacher", args.teacher)]:
            raise ValueError("--dataset: expected a mixture to score (--student or --em), got only --teacher")
    _torch_setup()
    from vdd_ros.files import write_json
    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.tasks.registry import TASKS, task_module

    expected_kind = {"teacher": ("diffusion_teacher",), "student": ("vdd_mixture", "em_mixture"),
                     "em": ("em_mixture", "vdd_mixture")}
    loaded = []
    for label, path in chosen:
        checkpoint = load_checkpoint(path)
        if checkpoint.kind not in expected_kind[label]:
            raise ValueError(f"--{label} {path}: expected a {' or '.join(expected_kind[label])} checkpoint, "
                             f"got {checkpoint.kind}")
        task = checkpoint.spec.task
        if rollouts and task not in TASKS:
            hint = " (for any task: --dataset held_out.npz without --rollouts)" if offline else \
                " (for any task: --dataset held_out.npz, offline numbers on held-out demonstrations)"
            raise ValueError(f"--{label} {path}: expected a model of a built-in task {sorted(TASKS)} for "
                             f"rollouts, got '{task}'{hint}")
        if rollouts and loaded and task != loaded[0][2].spec.task:
            raise ValueError(f"--{label} {path}: expected a model of task '{loaded[0][2].spec.task}' (as "
                             f"--{loaded[0][0]}), got '{task}'")
        loaded.append((label, path, checkpoint))
    report: dict = {}
    rows: list[dict] = []
    written = []
    if rollouts:
        task = task_module(loaded[0][2].spec.task)
        rows, results = evaluate_checkpoints(loaded, args)
        print(format_table(rows, task.N_ROUTES))
        report.update({"task": task.TASK_NAME, "episodes": args.episodes, "seed": args.seed,
                       "expert_episodes": args.expert_episodes, "models": rows})
        # the run's settings go into each panel title (a figure title would overlap them)
        task.plot_rollouts({f"{row['model']} ({row['kind']}, NFE {row['network_evaluations_per_action']}), "
                            f"seed {args.seed}": result for row, result in zip(rows, results)}, args.plot, title="")
        written.append(args.plot)
    if offline:
        result, plots = evaluate_offline_checkpoints(loaded, args)
        from vdd_ros.learn.offline_eval import format_offline_table

        if rows:
            print()
        print(format_offline_table(result, rows))
        report["offline"] = dict(result.to_dict(), plots=plots)
        written.extend(plots)
    write_json(args.json, report)
    print(f"wrote {args.json} and {', '.join(written)}")
    return 0


def _offline_options(args):
    from vdd_ros.learn.offline_eval import OfflineOptions

    for name, value, low in (("--states", args.states, 1), ("--samples", args.samples, 2),
                             ("--clusters", args.clusters, 1), ("--max-states", args.max_states, 1)):
        if value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    if not 0.0 <= args.weight_threshold < 1.0:
        raise ValueError(f"--weight-threshold: expected a number in [0, 1), got {args.weight_threshold}")
    return OfflineOptions(n_states=args.states, n_samples=args.samples, n_clusters=args.clusters,
                          weight_threshold=args.weight_threshold, max_states=args.max_states, seed=args.seed,
                          teacher_steps=args.n_steps, progress=not args.quiet)


def evaluate_offline_checkpoints(loaded, args):
    """``vdd eval --dataset``: the offline numbers of ``loaded`` (``[(label, path, checkpoint)]``) on the
    held-out demonstrations; ``(OfflineResult, written plot paths)``. Each checkpoint must fit the
    dataset's interface (one error line naming each field with the model's and the dataset's value)."""
    from vdd_ros.learn.offline_eval import check_dataset_fits, evaluate_offline, plot_clusters
    from vdd_ros.tasks.registry import load_dataset

    dataset = load_dataset(args.dataset)
    for label, path, checkpoint in loaded:
        check_dataset_fits(dataset.spec, checkpoint.spec, f"dataset {args.dataset}", f"--{label} {path}")
    by_label = {label: (label, checkpoint) for label, _, checkpoint in loaded}
    paths = {label: path for label, path, _ in loaded}
    mixtures = [by_label[label] for label in ("student", "em") if label in by_label]
    started = time.perf_counter()
    result = evaluate_offline(dataset, mixtures, by_label.get("teacher"), _offline_options(args),
                              dataset_name=f"dataset {args.dataset}")
    result.summary["dataset"] = args.dataset
    for row in result.rows:
        row["checkpoint"] = str(paths[row["model"]])
    result.summary["seconds"] = round(time.perf_counter() - started, 2)
    return result, plot_clusters(result, args.offline_plots)


def _rollout_row(result) -> dict:
    data = result.to_dict()
    data.pop("n_routes", None)
    # arm_avoid's result has no timeout field: an episode that neither succeeded nor collided timed out
    data.setdefault("timeout_rate", float(max(0.0, 1.0 - data["success_rate"] - data["collision_rate"])))
    return data


def evaluate_checkpoints(loaded, args):
    """Rollouts and single-observation latency of every checkpoint; ``(rows, rollout results)``.

    The task is the checkpoint's own (``spec.task``). A mixture's row also holds ``greedy`` (the
    argmax expert at every state) and ``experts`` (each expert forced alone) over
    ``args.expert_episodes`` episodes (0: none): success / collision / timeout of each.
    """
    from vdd_ros.learn.pipeline import policy_for_checkpoint, time_per_action
    from vdd_ros.tasks.registry import task_module

    expert_episodes = getattr(args, "expert_episodes", 0)
    rows, results = [], []
    for label, path, checkpoint in loaded:
        spec = checkpoint.spec
        task = task_module(spec.task)
        if checkpoint.kind == "diffusion_teacher":
            options = {"n_steps": args.n_steps}
        else:
            options = {"greedy": args.greedy}
        frame_fields = task.task_spec(1, 1).observation_fields
        policy = policy_for_checkpoint(checkpoint, seed=args.seed, frame_fields=frame_fields, **options)
        execute = min(args.execute_steps or int(spec.model_info.get("execute_steps", spec.action_horizon)),
                      spec.action_horizon)
        result = task.rollout(policy, args.episodes, args.seed, spec.history, execute)
        # latency of one action chunk for one observation (what the robot waits for)
        frames = task.initial_frames(16, args.seed)
        windows = frames[:, None, :].repeat(spec.history, axis=1)
        timing = time_per_action(policy, windows, repeats=args.timing_repeats)
        row = {"model": label, "kind": checkpoint.kind, "checkpoint": path, "task": spec.task,
               **_rollout_row(result),
               "network_evaluations_per_action": policy.evaluations_per_action,
               "execute_steps": execute, "time_per_action_ms": timing["mean_ms"],
               "time_per_action_p50_ms": timing["p50_ms"], "time_per_action_p99_ms": timing["p99_ms"]}
        if checkpoint.kind != "diffusion_teacher" and expert_episodes > 0:
            setting = (task, checkpoint, frame_fields, expert_episodes, args.seed, execute)
            row["greedy"] = _forced_rollout(*setting, greedy=True)
            row["experts"] = [{"expert": k, **_forced_rollout(*setting, forced_expert=k)}
                              for k in range(checkpoint.model.n_experts)]
        rows.append(row)
        results.append(result)
    return rows, results


EXPERT_KEYS = ("success_rate", "collision_rate", "timeout_rate", "entropy", "routes_covered")


def _forced_rollout(task, checkpoint, frame_fields, episodes: int, seed: int, execute: int, **choice) -> dict:
    """Rates of a mixture rolled out with one way of choosing the expert (``greedy`` or ``forced_expert``)."""
    from vdd_ros.learn.pipeline import policy_for_checkpoint

    policy = policy_for_checkpoint(checkpoint, seed=seed, frame_fields=frame_fields, **choice)
    result = task.rollout(policy, episodes, seed, checkpoint.spec.history, execute)
    return {"episodes": episodes, **{k: v for k, v in _rollout_row(result).items() if k in EXPERT_KEYS}}


def format_table(rows: list[dict], n_routes: int = 16) -> str:
    """The eval table: one line per model; under a mixture its greedy policy and each expert forced alone."""
    header = ("model", "success", "entropy", "routes", "collision", "timeout", "NFE/action", "ms/action", "p50 ms")
    lines = [header]

    def rates(row):
        return (f"{row['success_rate']:.3f}", f"{row['entropy']:.3f}", f"{row['routes_covered']}/{n_routes}",
                f"{row['collision_rate']:.3f}", f"{row['timeout_rate']:.3f}")

    for row in rows:
        lines.append((row["model"], *rates(row), str(row["network_evaluations_per_action"]),
                      f"{row['time_per_action_ms']:.2f}", f"{row['time_per_action_p50_ms']:.2f}"))
        if "greedy" in row:
            lines.append((f"  greedy ({row['greedy']['episodes']} ep)", *rates(row["greedy"]), "", "", ""))
        for expert in row.get("experts", []):
            lines.append((f"  expert {expert['expert']} alone", *rates(expert), "", "", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


# --- the YAML files that write out the defaults ------------------------------------------
def default_config_text(command: str) -> str:
    """``config/<file>.yaml`` as it must read: the dataclass defaults with each field's meaning."""
    cls, yaml_name, _, title = COMMANDS[command]
    return render_yaml(cls, [
        title,
        f"The defaults of {cls.__module__}.{cls.__name__} (the shipped model's recipe), one field a line.",
        f"Change a field: vdd {command} --iterations 500 --backbone.hidden 128 (or --set iterations=500),",
        "or copy this file, edit it and pass --config FILE. Regenerate: python -m vdd_ros.cli.learn config/",
    ])


def write_default_configs(folder) -> list[str]:
    from vdd_ros.files import write_text

    return [write_text(Path(folder) / COMMANDS[command][1], default_config_text(command)) for command in COMMANDS]


if __name__ == "__main__":
    for written in write_default_configs(sys.argv[1] if len(sys.argv) > 1 else "config"):
        print(f"wrote {written}")
