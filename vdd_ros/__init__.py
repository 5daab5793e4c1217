"""vdd_ros: Variational Diffusion Distillation of diffusion policies for ROS 2."""
import os

# onnxruntime >= 1.31 uploads usage telemetry (a DNS lookup and HTTPS upload ~9 s after its first
# session), which sends bytes off the machine. It reads this switch once, when onnxruntime is imported,
# so it is set here, before any vdd_ros module imports onnxruntime. A caller's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
