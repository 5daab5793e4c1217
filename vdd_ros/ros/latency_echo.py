"""The DDS floor of ``vdd bench ros``: a bare rclpy node that answers every ``joint_states`` message with a
``commands`` message at once (no model, no checks), so the benchmark's harness, message types and QoS are those
of the policy node and the difference is the node's own share."""
from __future__ import annotations

import sys

from rcl_interfaces.msg import ParameterType
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from vdd_ros.ros.spin import EXECUTORS, JOINT_STATES_QOS, parameter_descriptor, run_node


class LatencyEcho(Node):
    def __init__(self, node_name: str = "latency_echo"):
        super().__init__(node_name)
        self.declare_parameter("executor", "single_threaded", parameter_descriptor(
            ParameterType.PARAMETER_STRING, "The rclpy executor the process spins.", choices=EXECUTORS))
        self.executor_kind = self.get_parameter("executor").value
        self._pub = self.create_publisher(Float64MultiArray, "commands", 10)
        self._msg = Float64MultiArray()
        self.create_subscription(JointState, "joint_states", self._on_joint_state, JOINT_STATES_QOS)

    def _on_joint_state(self, msg: JointState) -> None:
        self._msg.data = list(msg.position)
        self._pub.publish(self._msg)


def main(args=None) -> int:
    return run_node(LatencyEcho, "latency_echo", args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
