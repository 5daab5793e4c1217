"""Where the package's shared files (launch/, config/, models/) live."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "vdd_ros"


def share_dir() -> Path:
    """The installed share directory, or the source checkout when running from one.

    A ROS 2 workspace or a pip install registers the package in the ament index
    (``AMENT_PREFIX_PATH``); a source checkout has package.xml beside the package folder.
    """
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "package.xml").is_file() and (checkout / "config").is_dir():
        return checkout
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        PackageNotFoundError = LookupError  # noqa: N806 - stands in for the missing class
        get_package_share_directory = None
    if get_package_share_directory is not None:
        try:
            return Path(get_package_share_directory(PACKAGE))
        except (PackageNotFoundError, LookupError, ValueError):
            pass
    for prefix in filter(None, [os.environ.get("VIRTUAL_ENV"), os.environ.get("CONDA_PREFIX"),
                                str(Path(os.sys.prefix))]):
        candidate = Path(prefix) / "share" / PACKAGE
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"share directory of {PACKAGE} not found: set AMENT_PREFIX_PATH to the install prefix "
        f"(for a virtual environment, AMENT_PREFIX_PATH=$VIRTUAL_ENV) or source the ROS 2 workspace")


def config_file(name: str) -> Path:
    return share_dir() / "config" / name


def model_file(name: str) -> Path:
    return share_dir() / "models" / name
