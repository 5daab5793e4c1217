"""Built-in tasks by name. Each module provides ``task_spec(history, horizon, ...)`` and
``generate_demonstrations(n_episodes, seed, progress=False) -> DemoDataset``.

Everything that needs a task by its name lives here, above ``data/`` (which knows no tasks):
the task's module, and loading a dataset checked against its task's interface.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from vdd_ros.data.dataset import DatasetError, DemoDataset
from vdd_ros.validation import check_choice

TASKS = {
    "arm_avoid": "vdd_ros.tasks.arm_avoid",
    "arm_sort": "vdd_ros.tasks.arm_sort",
}


def task_module(name: str) -> ModuleType:
    check_choice("task", name, sorted(TASKS))
    return importlib.import_module(TASKS[name])


def load_dataset(path: str, expected_task: str | None = None) -> DemoDataset:
    """``DemoDataset.load``, and a dataset of a built-in task must match that task's interface.

    The interface is what a deployment depends on (joints, limits, observation fields, rate);
    a mismatch is one DatasetError listing each differing field with both values. A dataset of
    a task that is not built in is checked against its own spec only.
    """
    dataset = DemoDataset.load(path, expected_task=expected_task)
    if dataset.task in TASKS:
        spec = dataset.spec
        expected = task_module(dataset.task).task_spec(spec.history, spec.action_horizon)
        differences = spec.interface_differences(expected)
        if differences:
            raise DatasetError("spec", f"the interface of task '{dataset.task}'", "; ".join(
                d.replace("this=", "dataset=").replace("other=", "task=") for d in differences),
                where=f"dataset {path}")
    return dataset

