"""Model checkpoints: one torch file with the model, its spec, its config and its training history.

A checkpoint holds plain data only (no pickled classes): ``format``, ``kind``, ``spec`` (JSON
text, with the fitted normalisation and ``model_kind`` set), ``config`` (dict), ``model_args``
(the constructor arguments: ``model.init_kwargs``
or ``model.hyperparameters``), ``state_dict`` and ``history``. It loads
with ``torch.load(weights_only=True)``.

Files are written atomically (``vdd_ros.files.atomic_path``), so an interrupted write (Ctrl-C,
crash) leaves the previous complete file.

Files written before the ancestral sampler was dropped name ``sampler`` in the teacher's
constructor arguments, config and ``spec.model_info`` (a student's spec inherited it): it is
removed on loading (the weights do not depend on it), and a teacher that named ``ancestral``
loads with a warning: it now samples with Euler, the sampler its exported graph always unrolled.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdd_ros.files import atomic_path
from vdd_ros.spec import ModelSpec, SpecError

CHECKPOINT_FORMAT = 1
# kind -> (module, class) of the model it holds; imported only when a file of that kind is loaded
MODEL_CLASSES = {
    "diffusion_teacher": ("vdd_ros.learn.diffusion", "DiffusionTeacher"),
    "vdd_mixture": ("vdd_ros.learn.moe", "MixtureOfExpertsPolicy"),
    "em_mixture": ("vdd_ros.learn.moe", "MixtureOfExpertsPolicy"),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (one-line message naming the file)."""


@dataclass
class Checkpoint:
    kind: str
    spec: ModelSpec
    config: dict
    model: nn.Module
    history: dict


def _plain(value):
    """Nested containers of Python scalars only (numpy scalars and tuples converted): what
    ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint entries must be plain data (dict, list, number, string), got {type(value).__name__}")


def _model_args(model: nn.Module) -> dict:
    """Constructor arguments: ``init_kwargs`` (teacher) or ``hyperparameters`` (mixture policy)."""
    args = getattr(model, "init_kwargs", None)
    if args is None:
        args = getattr(model, "hyperparameters", None)
    if not isinstance(args, dict):
        raise TypeError(f"{type(model).__name__} has no 'init_kwargs' or 'hyperparameters' dict: a checkpoint "
                        f"needs the constructor arguments to rebuild the model")
    return dict(args)


def _rebuild(model_class, args: dict) -> nn.Module:
    builder = getattr(model_class, "from_hyperparameters", None)
    return builder(args) if builder is not None else model_class(**args)


def save_checkpoint(path, model: nn.Module, kind: str, spec: ModelSpec, config: dict,
                    history: dict | None = None) -> Path:
    """Write ``model`` (its current weights) atomically to ``path``; returns the path.

    ``spec.model_kind`` is set to ``kind``; ``config`` is the training config as a dict.
    """
    if kind not in MODEL_CLASSES:
        raise ValueError(f"checkpoint kind: expected one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    module_name, class_name = MODEL_CLASSES[kind]
    if type(model).__name__ != class_name:
        raise TypeError(f"checkpoint kind {kind!r} holds a {class_name}, got a {type(model).__name__}")
    path = Path(path)
    spec = spec.replace(model_kind=kind)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "spec": spec.to_json(),
        "config": _plain(dict(config)),
        "model_args": _plain(_model_args(model)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "history": _plain(dict(history or {})),
    }
    with atomic_path(path) as tmp_name:  # Ctrl-C included: the old checkpoint stays
        torch.save(payload, tmp_name)
    return path


def load_checkpoint(path, expected_spec: ModelSpec | None = None) -> Checkpoint:
    """Read a checkpoint; the model comes back in eval mode.

    With ``expected_spec`` a checkpoint for a different robot interface is refused, and the
    error names every differing field (``ModelSpec.interface_differences``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file raises anything from zip to unpickler errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable vdd_ros checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected a vdd_ros checkpoint of format {CHECKPOINT_FORMAT}, "
                              f"got format {found!r}")
    missing = [key for key in ("kind", "spec", "config", "model_args", "state_dict") if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing entries {missing}")
    kind = payload["kind"]
    if kind not in MODEL_CLASSES:
        raise CheckpointError(f"checkpoint {path}: kind expected one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    try:
        spec = ModelSpec.from_json(payload["spec"])
    except SpecError as err:
        raise CheckpointError(f"checkpoint {path}: invalid spec ({err})") from None
    if expected_spec is not None:
        differences = expected_spec.interface_differences(spec)
        if differences:
            raise CheckpointError(f"checkpoint {path} was made for a different spec (this = expected, "
                                  f"other = checkpoint): " + "; ".join(differences))
    config, model_args = dict(payload["config"]), dict(payload["model_args"])
    spec, config, model_args = _without_sampler(path, kind, spec, config, model_args)
    module_name, class_name = MODEL_CLASSES[kind]
    model_class = getattr(importlib.import_module(module_name), class_name)
    try:
        model = _rebuild(model_class, model_args)
        model.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: cannot rebuild the {class_name} ({first_line})") from None
    return Checkpoint(kind=kind, spec=spec, config=config, model=model.eval(),
                      history=dict(payload.get("history") or {}))


def _without_sampler(path: Path, kind: str, spec: ModelSpec, config: dict, model_args: dict
                     ) -> tuple[ModelSpec, dict, dict]:
    """A file of an older version without its ``sampler`` entries (Euler is the only sampler; a
    student's spec inherited its teacher's)."""
    named = {source.get("sampler") for source in (spec.model_info, config, model_args)} - {None}
    if not named:
        return spec, config, model_args
    if named != {"euler"} and kind == "diffusion_teacher":
        warnings.warn(f"checkpoint {path}: sampler {sorted(named)} is no longer offered; this teacher samples with "
                      f"Euler, the sampler its exported ONNX graph unrolls (the weights are unchanged)",
                      UserWarning, stacklevel=3)
    info = {k: v for k, v in spec.model_info.items() if k != "sampler"}
    return (spec.replace(model_info=info), {k: v for k, v in config.items() if k != "sampler"},
            {k: v for k, v in model_args.items() if k != "sampler"})
