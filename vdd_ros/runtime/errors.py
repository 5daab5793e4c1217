"""One-line exceptions of the runtime (all ValueErrors, so ``vdd`` prints them without a trace)."""
from __future__ import annotations

from vdd_ros.validation import FieldError


class PolicyError(ValueError):
    """Base class of every error the runtime raises on purpose."""


class ModelLoadError(PolicyError):
    """A model file that cannot be used: missing, not ONNX, not ours, or of another format version."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model file does not exist."""


class DeviceError(ModelLoadError):
    """The requested execution device is not usable on this machine."""


class InputError(PolicyError):
    """An observation (or another argument of act) of the wrong shape, dtype or value."""


class SettingError(ModelLoadError, FieldError):
    """A loading setting out of range, as ``<field>: expected <what>, got <actual>`` (a ModelLoadError)."""


class ArgumentError(InputError, FieldError):
    """An argument out of range, as ``<field>: expected <what>, got <actual>`` (an InputError)."""
