"""Open an exported model: check the file, pick the execution provider, read and check the metadata.

onnxruntime's own exceptions carry multi-line native messages; every one of them is turned
into a one-line :class:`ModelLoadError` here, so no onnxruntime trace reaches a user.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from vdd_ros.runtime.errors import DeviceError, ModelLoadError, ModelNotFoundError, SettingError
from vdd_ros.runtime.format import (
    EXPORT_FORMAT_VERSION,
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    GRAPH_ROLES,
    META_FORMAT,
    META_ROLE,
    META_SPEC,
    ROLE_MODEL_KINDS,
)
from vdd_ros.spec import ModelSpec, SpecError
from vdd_ros.validation import check_int

LOG = logging.getLogger("vdd_ros.runtime")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass
class OpenedModel:
    """A live session plus what the file says about itself."""

    path: Path
    session: ort.InferenceSession
    provider: str  # the execution provider the session really runs on
    device_id: int  # CUDA device ordinal (0 on CPU)
    role: str
    spec: ModelSpec


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception message (native messages span many lines)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def native_reason(err: BaseException) -> str:
    """An onnxruntime error as one readable line: without its status prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(err))
    return re.sub(r"/\S+\.(?:cc|cpp|h):\d+ \S+\(.*\) ", " ", text)


def parse_device(device: str) -> tuple[str, int]:
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` -> (kind, device ordinal)."""
    match = _DEVICE_PATTERN.match(device) if isinstance(device, str) else None
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise DeviceError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return match.group(1), int(match.group(2) or 0)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for the lowest per-call latency of a small model on a busy CPU (measured: bench)."""
    intra_op_threads = check_int("intra_op_threads", intra_op_threads, 1, error=SettingError)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # worker threads that spin between calls steal the control loop's core; block instead
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: optimiser notes are not the user's business
    return options


def _create(path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises several native exception types
        raise ModelLoadError(f"model {path}: not a loadable ONNX model ({native_reason(err)})") from None


def cuda_provider(device_id: int) -> tuple[str, dict]:
    """The CUDA execution provider with the options every vdd_ros CUDA session uses.

    TF32 matrix products (the CUDA provider's default on Ampere and later) differ from the CPU by ~1e-3;
    off, CUDA and CPU actions agree within float32 rounding (measured on an H200).
    """
    return CUDA, {"device_id": device_id, "use_tf32": "0"}


def _cpu_instead(path: Path, options: ort.SessionOptions, device: str, kind: str, reason: str, log, verb: str
                 ) -> tuple[ort.InferenceSession, str, int]:
    """The CPU session when CUDA is not usable: an error if CUDA was asked for explicitly, else logged."""
    if kind == "cuda":
        raise DeviceError(f"device={device!r}: {reason}")
    log("model %s: %s %s: %s", path.name, verb, CPU, reason)
    return _create(path, options, [CPU]), CPU, 0


def _session_on_device(path: Path, device: str, intra_op_threads: int) -> tuple[ort.InferenceSession, str, int]:
    kind, device_id = parse_device(device)
    options = session_options(intra_op_threads)
    if kind == "cpu":
        LOG.info("model %s: using %s (requested)", path.name, CPU)
        return _create(path, options, [CPU]), CPU, 0
    available = ort.get_available_providers()
    if CUDA not in available:
        reason = f"onnxruntime {ort.__version__} has no {CUDA} (available: {available}; the GPU build is " \
                 f"the onnxruntime-gpu package)"
        return _cpu_instead(path, options, device, kind, reason, LOG.info, "using")
    # onnxruntime 1.31 logs a harmless "No registered plugin EP device found" warning on its default
    # logger for every CUDA session; the reason for a fallback is logged below instead
    ort.set_default_logger_severity(3)
    session = _create(path, options, [cuda_provider(device_id), CPU])
    active = session.get_providers()
    if active and active[0] == CUDA:
        LOG.info("model %s: using %s on device %d", path.name, CUDA, device_id)
        return session, CUDA, device_id
    # onnxruntime silently drops an EP whose libraries (CUDA, cuDNN) fail to load
    reason = f"{CUDA} is installed but the session could not use it (active providers {active}; " \
             f"are the CUDA and cuDNN libraries it needs installed and is GPU {device_id} present?)"
    return _cpu_instead(path, options, device, kind, reason, LOG.warning, "falling back to")


def read_metadata(path: Path, metadata: dict) -> tuple[str, ModelSpec]:
    """(graph role, spec) from a session's custom metadata, with one-line errors."""
    if META_SPEC not in metadata:
        raise ModelLoadError(f"model {path}: an ONNX model, but not one exported by vdd_ros (no '{META_SPEC}' "
                             f"metadata); export checkpoints with `vdd export`")
    version = metadata.get(META_FORMAT)
    if version != str(EXPORT_FORMAT_VERSION):
        raise ModelLoadError(f"model {path}: export format version {version!r} is not supported "
                             f"(this runtime reads version {EXPORT_FORMAT_VERSION}); re-export it with this "
                             f"version of vdd_ros")
    role = metadata.get(META_ROLE)
    if role not in GRAPH_ROLES:
        raise ModelLoadError(f"model {path}: metadata '{META_ROLE}' expected one of {list(GRAPH_ROLES)}, "
                             f"got {role!r}")
    try:
        spec = ModelSpec.from_json(metadata[META_SPEC])
    except SpecError as err:
        raise ModelLoadError(f"model {path}: invalid spec in the metadata ({err})") from None
    if spec.model_kind not in ROLE_MODEL_KINDS[role]:
        raise ModelLoadError(f"model {path}: a {role} graph must hold one of {list(ROLE_MODEL_KINDS[role])}, "
                             f"the spec says model_kind={spec.model_kind!r}")
    return role, spec


def _check_graph(path: Path, session: ort.InferenceSession, role: str) -> None:
    inputs = tuple(node.name for node in session.get_inputs())
    outputs = tuple(node.name for node in session.get_outputs())
    if inputs != GRAPH_INPUTS[role] or outputs != GRAPH_OUTPUTS[role]:
        raise ModelLoadError(f"model {path}: a {role} graph must have inputs {list(GRAPH_INPUTS[role])} and "
                             f"outputs {list(GRAPH_OUTPUTS[role])}, got {list(inputs)} and {list(outputs)}")


def open_model(path, device: str = "auto", intra_op_threads: int = 1) -> OpenedModel:
    """Open an exported vdd_ros ONNX file on ``device``; raises one-line ModelLoadErrors."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise ModelNotFoundError(f"model {path}: no such file")
    session, provider, device_id = _session_on_device(path, device, intra_op_threads)
    role, spec = read_metadata(path, dict(session.get_modelmeta().custom_metadata_map))
    _check_graph(path, session, role)
    return OpenedModel(path=path, session=session, provider=provider, device_id=device_id, role=role, spec=spec)
