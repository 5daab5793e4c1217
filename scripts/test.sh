#!/usr/bin/env bash
# Command 2 of the README: set everything up, lint, and run the tests.
#   bash scripts/test.sh                  # everything (what CI runs: .ci/run)
#   bash scripts/test.sh -m "not slow"    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${VDD_VENV:-.venv}/bin/activate"
# lint first (rules in ruff.toml): a finding fails the run before the tests start
echo "test: ruff check ."
ruff check .
# every rclpy process started by the tests keeps DDS on this machine
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
cd test
# -rs: the summary names every skipped test and its reason
python -m pytest -q -rs "$@"
