"""Test-wide environment: DDS stays on this machine, one thread per torch process."""
import os

# set before anything imports rclpy or torch; a caller's own choice wins
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# a test-run-unique domain keeps parallel runs on one machine apart (valid ids: 1..101)
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# onnxruntime telemetry would send DNS queries off the machine (tests import onnxruntime directly too)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
