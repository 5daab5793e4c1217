"""Writing files atomically (standard library only, usable from every layer).

Every file the package writes (checkpoints, datasets, exports, JSON reports, figures, copies
of shipped models) goes through :func:`atomic_path`: the content is written to a temporary
name in the destination folder and renamed into place, so a failed or interrupted write
(exception, Ctrl-C) leaves no partial file and an earlier file at the same path intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the process umask (mkstemp's 0600 hides files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success it is renamed to ``path``.

    The temporary name keeps ``path``'s extension (``np.savez`` and ``fig.savefig`` look at it).
    Missing parent folders are created. Returns nothing; the final path is ``os.path.abspath(path)``.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    suffix = "".join(part for part in [os.path.splitext(name)[1]] if part)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())  # mkstemp makes the file private; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns the absolute path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return os.path.abspath(os.fspath(path))


def write_text(path, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the absolute path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, data, indent: int = 2) -> str:
    """Write ``data`` as JSON (NaN/Inf refused, numpy scalars as floats) to ``path`` atomically."""
    text = json.dumps(data, indent=indent, allow_nan=False, default=_json_default) + "\n"
    return write_text(path, text)


def copy_file(source, path) -> str:
    """Copy ``source`` to ``path`` atomically (the destination is never half-copied)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return os.path.abspath(os.fspath(path))


def save_figure(fig, path, dpi: int = 110) -> str:
    """Save a matplotlib figure as ``path`` atomically, then close it; returns the absolute path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return os.path.abspath(os.fspath(path))


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return float(value)
