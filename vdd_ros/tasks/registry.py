"""Built-in tasks by name. Each module provides ``task_spec(history, horizon, ...)`` and
``generate_demonstrations(n_episodes, seed, progress=False) -> DemoDataset``."""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {
    "arm_avoid": "vdd_ros.tasks.arm_avoid",
}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got '{name}'")
    return importlib.import_module(TASKS[name])
