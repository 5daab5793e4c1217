"""Writing result files atomically (standard library only, usable from every layer)."""
from __future__ import annotations

import os
import tempfile


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the process umask (mkstemp's 0600 hides files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_figure(fig, path, dpi: int = 110) -> str:
    """Save a matplotlib figure as ``path`` via a temp file and a rename, then close it.

    A failed or interrupted save leaves no partial file; an earlier file at ``path`` stays intact.
    """
    import matplotlib.pyplot as plt

    path = os.path.abspath(str(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".png", dir=os.path.dirname(path))
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
