#!/usr/bin/env bash
# The arm-task numbers of docs/results.md: trains teacher, VDD student and EM baseline with the default
# configs over 3 seeds, evaluates them on the same episodes and prints mean ± std.
#   bash scripts/arm_results.sh            # results in results/arm/
#   bash scripts/arm_results.sh --install  # also refresh models/ and docs/figures/arm_*.png
#   bash scripts/arm_results.sh --task arm_sort   # the second built-in task, results in results/arm_sort/
# Options are passed to scripts/arm_results.py (--task, --seeds, --teacher-seeds, --episodes, --reuse, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${VDD_PYTHON:-.venv/bin/python}" scripts/arm_results.py "$@"
