#!/usr/bin/env bash
# Command 1 of the README: set everything up and run the main job on the built-in task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${VDD_VENV:-.venv}/bin/activate"
vdd demo "$@"
