"""Every training config and its defaults, in one place: one definition per field (default, type, meaning).

``TeacherConfig`` (diffusion teacher), ``VDDConfig`` (distillation), ``EMConfig`` (EM baseline) and
the nested ``BackboneConfig`` declare each field with :func:`knob`, which stores its one-line
meaning in the field's metadata. This module needs neither torch nor the training code, so the
CLI builds its per-field flags from it without importing torch.
Everything a user reads about a field comes from there: ``vdd <command> --help`` lists every
field with its type, default and meaning, and the YAML files in ``config/`` are the defaults
written out by :func:`render_yaml` (a test fails when a file and its dataclass differ). The
defaults are the shipped models' recipe; a task that needs another recipe names it as a preset
(``VDDConfig.preset("gmm2d")``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from vdd_ros.tasks.registry import TASKS
from vdd_ros.validation import FieldError, check_bool, check_choice, check_float, check_int, fail

BACKBONE_KINDS = ("mlp", "transformer")
COVARIANCES = ("full", "diagonal")
GATINGS = ("detached_features", "own_mlp", "detached_mlp")
ACTIVATIONS = ("mish", "relu", "silu")
LR_DECAYS = ("linear", "none")


def knob(default: Any, help: str) -> Any:  # noqa: A002 - "help" is what argparse and tyro call it
    """A dataclass field with ``default`` (copied per instance when mutable) and its one-line meaning."""
    if "\n" in help or not help.strip():
        raise ValueError(f"knob help: expected one non-empty line, got {help!r}")
    metadata = {"help": help.strip()}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    name: str  # dotted for nested fields: "backbone.hidden"
    type_name: str
    default: Any
    help: str


class ConfigBase:
    """Shared behaviour of the config dataclasses: dicts in and out, presets, field documentation."""

    PRESETS: ClassVar[dict[str, dict]] = {}

    def validate(self):  # pragma: no cover - every subclass defines its checks
        raise NotImplementedError

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None):
        """Build and validate from a (partial) dict; unknown keys are refused by name."""
        source = source or cls.__name__
        if not isinstance(data, dict):
            raise FieldError(source, f"a mapping of {cls.__name__} fields", type(data).__name__)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}; {cls.__name__} has {sorted(known)}")
        values = {}
        for config_field in dataclasses.fields(cls):
            if config_field.name not in data:
                continue
            value = data[config_field.name]
            nested = _nested_class(cls, config_field.name)
            if nested is not None and isinstance(value, dict):
                value = _nested_from_dict(cls, config_field.name, value, f"{source}.{config_field.name}")
            values[config_field.name] = value
        return cls(**values).validate()

    @classmethod
    def preset(cls, name: str, **changes):
        """The named recipe (``cls.PRESETS[name]``: the fields it changes), with ``changes`` on top."""
        if name not in cls.PRESETS:
            raise FieldError(f"{cls.__name__}.preset", f"one of {sorted(cls.PRESETS)}", name)
        values = {**cls.PRESETS[name], **changes}
        for key, value in list(values.items()):
            nested = _nested_class(cls, key)
            if nested is not None and isinstance(value, dict):
                values[key] = _nested_from_dict(cls, key, value, f"{cls.__name__}.{key}")
        return cls(**values).validate()

    @classmethod
    def field_docs(cls) -> list[FieldDoc]:
        """Every field (nested ones dotted) with its type, default and meaning, in declaration order."""
        hints = typing.get_type_hints(cls)
        defaults = cls()
        docs = []
        for config_field in dataclasses.fields(cls):
            help_text = config_field.metadata.get("help")
            if help_text is None:
                raise TypeError(f"{cls.__name__}.{config_field.name} has no help text (declare it with knob())")
            hint = hints[config_field.name]
            nested = hint if isinstance(hint, type) and issubclass(hint, ConfigBase) else None
            if nested is not None:
                docs.append(FieldDoc(config_field.name, nested.__name__, None, help_text))
                nested_default = getattr(defaults, config_field.name)  # this config's default, not the class's
                for doc in nested.field_docs():
                    value = nested_default
                    for part in doc.name.split("."):
                        value = getattr(value, part)
                    docs.append(dataclasses.replace(doc, name=f"{config_field.name}.{doc.name}",
                                                    default=None if isinstance(value, ConfigBase) else value))
                continue
            docs.append(FieldDoc(config_field.name, type_name(hints[config_field.name]),
                                 getattr(defaults, config_field.name), help_text))
        return docs


def _nested_from_dict(cls, name: str, data: dict, source: str):
    """A nested config from a partial dict, on top of ``cls``'s own default for that field (the student's
    backbone default is not the class default of BackboneConfig)."""
    default = getattr(cls(), name)
    base = default.to_dict() if isinstance(default, ConfigBase) else {}
    return _nested_class(cls, name).from_dict({**base, **data}, source)


def _nested_class(cls, name: str):
    hint = typing.get_type_hints(cls).get(name)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint
    return None


def type_name(hint) -> str:
    """``int``, ``float | None``, ``list[str]`` ... for help texts."""
    origin = typing.get_origin(hint)
    if origin is None:
        return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{inner}]"


# --- YAML -----------------------------------------------------------------------------------
def yaml_value(value) -> str:
    """One YAML scalar or flow list that reads back as ``value`` (PyYAML needs '1.0e-05', not '1e-05')."""
    import yaml

    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
        if yaml.safe_load(text) != value:
            mantissa, _, exponent = f"{value:e}".partition("e")
            text = f"{float(mantissa)!r}e{exponent}"
    elif isinstance(value, str):
        text = value if value and yaml.safe_load(value) == value and ":" not in value else json.dumps(value)
    else:
        raise TypeError(f"yaml_value: cannot write a {type(value).__name__}")
    if yaml.safe_load(f"x: {text}")["x"] != (list(value) if isinstance(value, tuple) else value) and not (
            isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"yaml_value: {value!r} does not read back from {text!r}")
    return text


COMMENT_COLUMN = 30


def render_yaml(cls, header: list[str]) -> str:
    """The defaults of ``cls`` as a YAML file: ``header`` comment lines, then one line per field with
    its meaning as the comment (nested configs as indented sections)."""
    lines = [f"# {line}" if line else "#" for line in header]
    docs = cls.field_docs()
    sections = {doc.name for doc in docs if any(other.name.startswith(doc.name + ".") for other in docs)}
    for doc in docs:
        depth = doc.name.count(".")
        key = doc.name.rsplit(".", 1)[-1]
        text = "  " * depth + (f"{key}:" if doc.name in sections else f"{key}: {yaml_value(doc.default)}")
        lines.append(f"{text.ljust(COMMENT_COLUMN - 2)}  # {doc.help}")
    return "\n".join(lines) + "\n"


def yaml_comments(text: str) -> dict[str, str]:
    """``{dotted field: its trailing comment}`` of a file written by :func:`render_yaml`."""
    comments, stack = {}, []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        key = stripped.split(":", 1)[0]
        stack = stack[:depth] + [key]
        _, sep, comment = line.partition("  # ")
        comments[".".join(stack)] = comment.strip() if sep else ""
    return comments


# --- the configs ------------------------------------------------------------------------------
@dataclass
class BackboneConfig(ConfigBase):
    """Which backbone reads the observation window, and its size."""

    kind: str = knob("mlp", "mlp or transformer (causal, one token per observation frame)")
    hidden: int = knob(256, "MLP width (transformer: its feed-forward width)")
    mlp_layers: int = knob(3, "hidden layers of the MLP")
    embed_dim: int = knob(72, "transformer token width (a multiple of heads)")
    transformer_layers: int = knob(4, "transformer blocks")
    heads: int = knob(4, "attention heads per transformer block")
    activation: str = knob("mish", "activation of the MLP layers: mish, relu or silu")

    def validate(self) -> BackboneConfig:
        check_choice("BackboneConfig.kind", self.kind, BACKBONE_KINDS)
        check_choice("BackboneConfig.activation", self.activation, ACTIVATIONS)
        for name in ("hidden", "mlp_layers", "embed_dim", "transformer_layers", "heads"):
            check_int(f"BackboneConfig.{name}", getattr(self, name), 1)
        if self.embed_dim % self.heads != 0:
            fail("BackboneConfig.embed_dim", f"a multiple of heads={self.heads}", self.embed_dim)
        return self


def check_sampling(sigma_min, sigma_max, rho, n_steps, sigma_data, owner: str = "DiffusionTeacher") -> None:
    check_float(f"{owner}.sigma_data", sigma_data, 0.0, strict_low=True)
    check_float(f"{owner}.sigma_min", sigma_min, 0.0, strict_low=True)
    check_float(f"{owner}.sigma_max", sigma_max, sigma_min, strict_low=True)
    check_float(f"{owner}.rho", rho, 0.0, strict_low=True)
    check_int(f"{owner}.n_steps", n_steps, 1)


@dataclass
class TeacherConfig(ConfigBase):
    """Everything that defines a teacher training run; defaults: the shipped teacher (``config/teacher.yaml``)."""

    backbone: BackboneConfig = knob(BackboneConfig(), "the network reading the window, noisy chunk and noise level")
    noise_embed_dim: int = knob(16, "width of the sinusoidal embedding of c_noise = ln(sigma)/4 (even)")
    sigma_data: float = knob(0.5, "EDM preconditioning: assumed std of the normalised actions")
    P_mean: float = knob(-1.2, "training noise levels: ln(sigma) ~ N(P_mean, P_std^2)")
    P_std: float = knob(1.2, "std of ln(sigma) during training")
    sigma_min: float = knob(0.002, "smallest noise level of the Karras sampling schedule")
    sigma_max: float = knob(10.0, "largest noise level (start of the Euler sampler)")
    rho: float = knob(7.0, "Karras schedule curvature")
    n_steps: int = knob(16, "Euler steps (denoiser evaluations) per action chunk")
    lr: float = knob(0.003, "AdamW learning rate, cosine-decayed to 10% over the run")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    batch_size: int = knob(256, "samples per optimiser step")
    iterations: int = knob(60000, "optimiser steps")
    ema_decay: float = knob(0.999, "decay of the exponential moving average of the weights (the EMA copy is saved)")
    history: int = knob(2, "observation frames in the window")
    horizon: int = knob(0, "actions per predicted chunk (0: 0.8 s at the demonstrations' control rate)")
    execute_steps: int = knob(0, "actions of each chunk executed before re-planning (0: half the horizon)")
    observation_fields: list[str] = knob([], "frame fields the model reads ([]: all but joint velocities)")
    relative_to: str = knob("", "joint-position field the chunk is denoised relative to (empty: absolute)")
    obs_noise: float = knob(0.0, "std of Gaussian noise on the normalised observations while training")
    seed: int = knob(0, "seeds initialisation, batches and noise")
    dataset: str = knob("", "demonstration .npz (empty: generate demonstrations of the built-in task)")
    task: str = knob("arm_avoid", "built-in task whose demonstrations are generated when dataset is empty")
    episodes: int = knob(1000, "generated demonstrations (dataset empty)")
    dataset_seed: int = knob(0, "seed of the generated demonstrations")
    checkpoint_every: int = knob(5000, "iterations between periodic checkpoints (0: only at the end)")

    def validate(self) -> TeacherConfig:
        owner = "TeacherConfig"
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone, f"{owner}.backbone")
        if not isinstance(self.backbone, BackboneConfig):
            fail(f"{owner}.backbone", "a BackboneConfig", self.backbone)
        self.backbone.validate()
        check_sampling(self.sigma_min, self.sigma_max, self.rho, self.n_steps, self.sigma_data, owner)
        for name in ("noise_embed_dim", "batch_size", "iterations", "history", "episodes"):
            check_int(f"{owner}.{name}", getattr(self, name), 1)
        for name in ("checkpoint_every", "seed", "dataset_seed", "horizon", "execute_steps"):
            check_int(f"{owner}.{name}", getattr(self, name), 0)
        if self.noise_embed_dim % 2:
            fail(f"{owner}.noise_embed_dim", "an even integer", self.noise_embed_dim)
        check_data_choice_fields(self, owner)
        for name in ("lr", "P_std"):
            check_float(f"{owner}.{name}", getattr(self, name), 0.0, strict_low=True)
        for name in ("weight_decay", "obs_noise"):
            check_float(f"{owner}.{name}", getattr(self, name), 0.0)
        check_float(f"{owner}.P_mean", self.P_mean)
        check_float(f"{owner}.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay >= 1.0:
            fail(f"{owner}.ema_decay", "a number in [0, 1)", self.ema_decay)
        if not isinstance(self.relative_to, str):
            fail(f"{owner}.relative_to", "an observation field name or ''", self.relative_to)
        if not isinstance(self.dataset, str):
            fail(f"{owner}.dataset", "a path string", self.dataset)
        return self


def check_data_choice_fields(config, owner: str) -> None:
    """Checks of the data-choosing fields TeacherConfig and EMConfig share (0 / [] are resolved
    against the demonstrations by ``learn.pipeline.choose_data``)."""
    if config.horizon and config.execute_steps > config.horizon:
        fail(f"{owner}.execute_steps", f"<= horizon={config.horizon}", config.execute_steps)
    if not isinstance(config.observation_fields, (list, tuple)) or not all(
            isinstance(name, str) and name for name in config.observation_fields):
        fail(f"{owner}.observation_fields", "a list of field names", config.observation_fields)
    check_choice(f"{owner}.task", config.task, sorted(TASKS))


def validate_mixture_fields(config, owner: str) -> None:
    """Checks of the fields VDDConfig and EMConfig share; errors name ``<owner>.<field>``."""
    for name in ("n_experts", "iterations", "expert_steps_per_iter"):
        check_int(f"{owner}.{name}", getattr(config, name), 1)
    for name in ("gating_steps_per_iter", "seed", "gating_hidden", "gating_layers"):
        check_int(f"{owner}.{name}", getattr(config, name), 0)
    for name in ("expert_lr", "gating_lr", "min_std", "init_std"):
        check_float(f"{owner}.{name}", getattr(config, name), 0.0, strict_low=True)
    for name in ("mean_init_spread", "dead_expert_threshold"):
        check_float(f"{owner}.{name}", getattr(config, name), 0.0)
    check_choice(f"{owner}.lr_decay", config.lr_decay, LR_DECAYS)
    check_float(f"{owner}.lr_final_fraction", config.lr_final_fraction, 0.0, 1.0)
    check_choice(f"{owner}.covariance", config.covariance, COVARIANCES)
    check_choice(f"{owner}.gating", config.gating, GATINGS)
    if config.init_std <= config.min_std:
        fail(f"{owner}.init_std", f"a number > min_std={config.min_std}", config.init_std)
    if config.dead_expert_threshold >= 1.0 / config.n_experts:
        fail(f"{owner}.dead_expert_threshold", f"a number < 1/n_experts={1.0 / config.n_experts:g}",
             config.dead_expert_threshold)
    if not isinstance(config.backbone, BackboneConfig):
        fail(f"{owner}.backbone", "a BackboneConfig", config.backbone)
    config.backbone.validate()
    if config.num_threads is not None:
        check_int(f"{owner}.num_threads", config.num_threads, 1)
    import torch  # only here: the rest of this module works without torch

    try:
        torch.device(config.device)
    except (RuntimeError, TypeError):
        fail(f"{owner}.device", "a torch device such as 'cpu' or 'cuda:0'", config.device)


# The student's (and its EM baseline's) default backbone: 128x3 ReLU. One network evaluation of it is a
# small fraction of a 16-step teacher's 16 (docs/benchmarks.md#the-students-size); the 2-D presets
# keep 256 Mish.
STUDENT_BACKBONE = BackboneConfig(hidden=128, activation="relu")


@dataclass
class VDDConfig(ConfigBase):
    """Every knob of a VDD run. Defaults: the shipped arm-task student; ``preset("gmm2d")``: the 2-D check."""

    n_experts: int = knob(8, "Z, number of Gaussian experts")
    iterations: int = knob(6000, "E-step/M-step rounds (after the warm start)")
    batch_size: int = knob(32, "states per expert M-step")
    samples_per_expert: int = knob(16, "V, reparameterised samples per expert and state")
    antithetic: bool = knob(True, "draw the V samples in pairs (eps, -eps): lower-variance expert gradients (V even)")
    gating_batch_size: int = knob(256, "(state, action) pairs per gating M-step and per EM warm-start iteration")
    expert_lr: float = knob(0.003, "Adam learning rate of the backbone and expert heads")
    gating_lr: float = knob(0.003, "Adam learning rate of the gating network")
    expert_steps_per_iter: int = knob(1, "expert M-steps per iteration (each on a fresh batch)")
    gating_steps_per_iter: int = knob(1, "gating M-steps per iteration (each on a fresh batch)")
    lr_decay: str = knob("linear", "linear (both rates fall to lr_final_fraction at the last iteration) or none")
    lr_final_fraction: float = knob(0.01, "learning-rate multiplier at the last iteration (linear decay)")
    sigma_min: float = knob(0.03, "teacher query noise: sigma ~ U[sigma_min, sigma_max] (at the start if annealed)")
    sigma_max: float = knob(0.1, "upper end of the query noise range (arm task: larger blurs chunk modes ~0.3 apart)")
    sigma_anneal: bool = knob(False, "move the sigma range linearly to [sigma_final_min, sigma_final_max]")
    sigma_final_min: float = knob(0.01, "sigma_anneal: lower end of the final range")
    sigma_final_max: float = knob(0.03, "sigma_anneal: upper end of the final range")
    sigma_anneal_fraction: float = knob(0.5, "sigma_anneal: fraction of the iterations over which sigma moves")
    covariance: str = knob("diagonal", "full (lower-triangular Cholesky factors) or diagonal")
    min_std: float = knob(0.0001, "floor added to the softplus of the Cholesky diagonal")
    init_std: float = knob(0.2, "initial expert standard deviation (normalised units)")
    mean_init_spread: float = knob(1.0, "initial expert means spread over [-b, b]^A (a grid in 2-D)")
    gating: str = knob("detached_mlp", "detached_mlp (MLP head on the detached features), own_mlp or detached_features")
    gating_hidden: int = knob(128, "detached_mlp/own_mlp: width of the gating MLP (0: backbone.hidden)")
    gating_layers: int = knob(2, "detached_mlp/own_mlp: hidden layers of the gating MLP (0: backbone.mlp_layers)")
    backbone: BackboneConfig = knob(STUDENT_BACKBONE, "the network that reads the observation window")
    gating_warmup_fraction: float = knob(0.0, "fraction of the run in which the experts see uniform gating")
    freeze_gating_fraction: float | None = knob(0.7, "gating M-steps stop after this fraction (null: never)")
    dead_expert_threshold: float = knob(0.001, "an expert whose mean gating weight is below this is reported dead")
    reinit_fractions: list[float] = knob([], "when duplicate or dead experts are re-initialised ([]: never)")
    reinit_distance: float = knob(10.0, "duplicate: mean gap below this many of its stds, averaged over states")
    reinit_batch_size: int = knob(4096, "actions scored to find the worst-explained region")
    merge_fractions: list[float] = knob([], "when experts on one mode are merged into identical duplicates ([]: never)")
    merge_distance: float = knob(1.5, "merge: a lighter expert's mean within this many stds of a heavier one's")
    merge_tolerance: float = knob(0.05, "merge: largest loss of the group's log-likelihood (nats per action dim)")
    merge_batch_size: int = knob(2048, "merge: (state, action) pairs the merge is decided on")
    warm_start_iterations: int = knob(3000, "EM iterations on the demonstrations before VDD (0: no warm start)")
    lr_warmup_iterations: int = knob(0, "after a warm start: VDD iterations over which both rates ramp up from 0")
    validation_every: int = knob(500, "guard: iterations between validation-signal evaluations (0: no guard)")
    validation_states: int = knob(256, "guard: dataset states at which the validation signal is measured")
    validation_episodes: int = knob(200, "guard: closed-loop episodes per evaluation where the task has a simulator "
                                    "(then success + entropy decide; 0: the NLL decides)")
    guard_keep_best: bool = knob(True, "guard: return the latest validation state within one standard error of the "
                                 "best closed-loop score (NLL only: the best, if the run degraded its start)")
    seed: int = knob(0, "seeds parameters, batches, samples and sigma draws")
    device: str = knob("cpu", "torch device of the run")
    num_threads: int | None = knob(1, "torch threads for the run (null: leave torch's setting)")
    checkpoint_every: int = knob(500, "vdd distill: iterations between periodic checkpoints (0: only at the end)")
    dataset: str = knob("", "vdd distill: demonstration .npz (empty: the teacher's own training data)")
    episodes: int | None = knob(None, "vdd distill: generated demonstrations (null: as many as the teacher's)")
    dataset_seed: int | None = knob(None, "vdd distill: seed of generated demonstrations (null: the teacher's)")

    PRESETS: ClassVar[dict[str, dict]] = {
        # the paper's 8-mode ring and the other 2-D checks (test/test_vdd_2d.py, scripts/figure_2d.py)
        "gmm2d": dict(iterations=1000, samples_per_expert=64, gating_batch_size=1024, expert_lr=1e-2, gating_lr=1e-2,
                      sigma_min=0.2, sigma_max=0.5, sigma_anneal=True, sigma_final_max=0.05,
                      covariance="full", init_std=1.0, mean_init_spread=1.5, gating="detached_features",
                      backbone=dict(hidden=256, activation="mish"), gating_warmup_fraction=0.7,
                      reinit_fractions=[0.15, 0.3, 0.45], reinit_distance=1.0, warm_start_iterations=0,
                      merge_fractions=[0.8]),
    }

    def validate(self) -> VDDConfig:
        """Raise ValueError naming the field, the expected and the actual value."""
        owner = "VDDConfig"
        validate_mixture_fields(self, owner)
        for name in ("batch_size", "samples_per_expert", "gating_batch_size", "reinit_batch_size", "merge_batch_size"):
            check_int(f"{owner}.{name}", getattr(self, name), 1)
        check_int(f"{owner}.validation_states", self.validation_states, 1)
        check_bool(f"{owner}.guard_keep_best", self.guard_keep_best)
        for name in ("warm_start_iterations", "checkpoint_every", "lr_warmup_iterations", "validation_every",
                     "validation_episodes"):
            check_int(f"{owner}.{name}", getattr(self, name), 0)
        check_bool(f"{owner}.antithetic", self.antithetic)
        check_bool(f"{owner}.sigma_anneal", self.sigma_anneal)
        if self.antithetic and self.samples_per_expert % 2 != 0:
            fail(f"{owner}.samples_per_expert", "an even number (antithetic=True pairs the samples)",
                 self.samples_per_expert)
        for name in ("sigma_min", "sigma_final_min"):
            check_float(f"{owner}.{name}", getattr(self, name), 0.0)
        check_float(f"{owner}.sigma_max", self.sigma_max, 0.0, strict_low=True)
        check_float(f"{owner}.sigma_final_max", self.sigma_final_max, 0.0, strict_low=self.sigma_anneal)
        if self.sigma_min > self.sigma_max:
            fail(f"{owner}.sigma_min", f"<= sigma_max={self.sigma_max}", self.sigma_min)
        if self.sigma_final_min > self.sigma_final_max:
            fail(f"{owner}.sigma_final_min", f"<= sigma_final_max={self.sigma_final_max}", self.sigma_final_min)
        check_float(f"{owner}.sigma_anneal_fraction", self.sigma_anneal_fraction, 0.0, 1.0, strict_low=True)
        check_float(f"{owner}.reinit_distance", self.reinit_distance, 0.0, strict_low=True)
        if not isinstance(self.reinit_fractions, (tuple, list)):
            fail(f"{owner}.reinit_fractions", "a list of numbers in (0, 1)", self.reinit_fractions)
        for value in self.reinit_fractions:
            check_float(f"{owner}.reinit_fractions", value, 0.0, strict_low=True)
            if value >= 1:
                fail(f"{owner}.reinit_fractions", "numbers in (0, 1)", list(self.reinit_fractions))
        check_float(f"{owner}.merge_distance", self.merge_distance, 0.0, strict_low=True)
        check_float(f"{owner}.merge_tolerance", self.merge_tolerance, 0.0)
        if not isinstance(self.merge_fractions, (tuple, list)):
            fail(f"{owner}.merge_fractions", "a list of numbers in (0, 1)", self.merge_fractions)
        for value in self.merge_fractions:
            check_float(f"{owner}.merge_fractions", value, 0.0, 1.0, strict_low=True)
            if value >= 1:
                fail(f"{owner}.merge_fractions", "numbers in (0, 1)", list(self.merge_fractions))
        check_float(f"{owner}.gating_warmup_fraction", self.gating_warmup_fraction, 0.0, 1.0)
        if self.freeze_gating_fraction is not None:
            check_float(f"{owner}.freeze_gating_fraction", self.freeze_gating_fraction, 0.0, 1.0)
        if not isinstance(self.dataset, str):
            fail(f"{owner}.dataset", "a path string ('' for the teacher's data)", self.dataset)
        if self.episodes is not None:
            check_int(f"{owner}.episodes", self.episodes, 1)
        if self.dataset_seed is not None:
            check_int(f"{owner}.dataset_seed", self.dataset_seed, 0)
        return self

    def sigma_range(self, iteration: int) -> tuple[float, float]:
        """The teacher query noise range ``[low, high]`` used at ``iteration``."""
        if not self.sigma_anneal:
            return self.sigma_min, self.sigma_max
        progress = min(1.0, iteration / max(1.0, self.sigma_anneal_fraction * self.iterations))
        return (self.sigma_min + progress * (self.sigma_final_min - self.sigma_min),
                self.sigma_max + progress * (self.sigma_final_max - self.sigma_max))

    @property
    def gating_warmup_iterations(self) -> int:
        """Iterations in which the experts see uniform gating."""
        return round(self.gating_warmup_fraction * self.iterations)

    @property
    def gating_iterations(self) -> int:
        """Iterations in which the gating is trained (its learning rate decays over these)."""
        if self.freeze_gating_fraction is None:
            return self.iterations
        return max(1, round(self.freeze_gating_fraction * self.iterations))


@dataclass
class EMConfig(ConfigBase):
    """Every knob of an EM run on demonstrations, and the data ``vdd train-em`` fits it to."""

    n_experts: int = knob(8, "Z, number of Gaussian experts")
    iterations: int = knob(3000, "E-step/M-step rounds")
    batch_size: int = knob(256, "(state, action) pairs per iteration")
    expert_lr: float = knob(0.003, "Adam learning rate of the backbone and expert heads")
    gating_lr: float = knob(0.003, "Adam learning rate of the gating network")
    expert_steps_per_iter: int = knob(1, "expert M-steps per E-step (same batch and responsibilities)")
    gating_steps_per_iter: int = knob(1, "gating M-steps per E-step")
    lr_decay: str = knob("linear", "linear (both rates fall to lr_final_fraction at the last iteration) or none")
    lr_final_fraction: float = knob(0.01, "learning-rate multiplier at the last iteration (linear decay)")
    covariance: str = knob("diagonal", "full (lower-triangular Cholesky factors) or diagonal")
    min_std: float = knob(0.0001, "floor added to the softplus of the Cholesky diagonal")
    init_std: float = knob(0.2, "initial expert standard deviation (normalised units)")
    mean_init_spread: float = knob(1.0, "initial expert means spread over [-b, b]^A (a grid in 2-D)")
    gating: str = knob("detached_mlp", "detached_mlp (MLP head on the detached features), own_mlp or detached_features")
    gating_hidden: int = knob(128, "detached_mlp/own_mlp: width of the gating MLP (0: backbone.hidden)")
    gating_layers: int = knob(2, "detached_mlp/own_mlp: hidden layers of the gating MLP (0: backbone.mlp_layers)")
    backbone: BackboneConfig = knob(STUDENT_BACKBONE, "the network that reads the observation window")
    history: int = knob(2, "observation frames in the window (the teacher's, for a fair comparison)")
    dead_expert_threshold: float = knob(0.001, "an expert whose mean gating weight is below this is reported dead")
    seed: int = knob(0, "seeds parameters and batches")
    device: str = knob("cpu", "torch device of the run")
    num_threads: int | None = knob(1, "torch threads for the run (null: leave torch's setting)")
    horizon: int = knob(0, "vdd train-em: actions per chunk (0: 0.8 s at the demonstrations' control rate)")
    execute_steps: int = knob(0, "vdd train-em: actions executed per chunk before re-planning (0: half the horizon)")
    observation_fields: list[str] = knob([], "vdd train-em: frame fields the model reads ([]: all but joint "
                                         "velocities)")
    dataset: str = knob("", "vdd train-em: demonstration .npz (empty: generate demonstrations of the built-in task)")
    task: str = knob("arm_avoid", "vdd train-em: built-in task whose demonstrations are generated (dataset empty)")
    episodes: int = knob(1000, "vdd train-em: generated demonstrations (dataset empty)")
    dataset_seed: int = knob(0, "vdd train-em: seed of the generated demonstrations")

    PRESETS: ClassVar[dict[str, dict]] = {
        # the 2-D checks (test/test_em.py, scripts/figure_2d.py): one state-independent frame
        "gmm2d": dict(iterations=1000, expert_lr=1e-2, gating_lr=1e-2, covariance="full", init_std=1.0,
                      mean_init_spread=1.5, gating="detached_features", backbone=dict(hidden=256, activation="mish"),
                      history=1),
    }

    def validate(self) -> EMConfig:
        owner = "EMConfig"
        validate_mixture_fields(self, owner)
        for name in ("batch_size", "history", "episodes"):
            check_int(f"{owner}.{name}", getattr(self, name), 1)
        for name in ("dataset_seed", "horizon", "execute_steps"):
            check_int(f"{owner}.{name}", getattr(self, name), 0)
        check_data_choice_fields(self, owner)
        if not isinstance(self.dataset, str):
            fail(f"{owner}.dataset", "a path string ('' to generate demonstrations)", self.dataset)
        return self
