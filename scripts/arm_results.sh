#!/usr/bin/env bash
# The arm-task numbers of docs/results.md: trains teacher, VDD student and EM baseline with the default
# configs over 3 seeds, evaluates them on the same episodes and prints mean ± std.
#   bash scripts/arm_results.sh            # results in results/arm/
#   bash scripts/arm_results.sh --install  # also refresh models/ and docs/figures/arm_*.png
# Options are passed to scripts/arm_results.py (--seeds, --teacher-seeds, --episodes, --reuse, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${VDD_PYTHON:-.venv/bin/python}" scripts/arm_results.py "$@"
