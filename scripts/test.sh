#!/usr/bin/env bash
# Command 2 of the README: set everything up and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${VDD_VENV:-.venv}/bin/activate"
# every rclpy process started by the tests keeps DDS on this machine
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
cd test
python -m pytest -q "$@"
