"""Write rosbag2 bags (MCAP or SQLite3) of a robot's topics with ``rosbags``' writer.

For tests and the import benchmark: a bag recorded the way ``ros2 bag record`` would record the
robot (JointState, vector observations, commands, an episode marker), without ROS.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

NS = 1_000_000_000


class BagRecorder:
    """``with BagRecorder(path, "mcap") as bag: bag.joint_state(t, names, q, dq); bag.command(t, values)``.

    ``t`` is seconds (header stamp); ``receive`` (seconds, default ``t``) is the bag's receive time.
    """

    def __init__(self, path: str, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise ValueError(f"storage: expected one of {sorted(plugins)}, got '{storage}'")
        self.typestore = get_typestore(Stores.LATEST)
        self.types = self.typestore.types
        self.writer = Writer(os.fspath(path), version=9, storage_plugin=plugins[storage])
        self.connections: dict = {}

    def __enter__(self) -> BagRecorder:
        self.writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()

    def _stamp(self, t: float):
        ns = int(round(t * NS))
        return self.types["builtin_interfaces/msg/Time"](sec=ns // NS, nanosec=ns % NS)

    def _header(self, t: float):
        return self.types["std_msgs/msg/Header"](stamp=self._stamp(t), frame_id="")

    def write(self, topic: str, msgtype: str, msg, receive: float) -> None:
        """Any message (``msgtype`` like ``sensor_msgs/msg/JointState``) at receive time ``receive`` seconds."""
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
        self.writer.write(self.connections[topic], int(round(receive * NS)),
                          self.typestore.serialize_cdr(msg, msgtype))

    def joint_state(self, t: float, names: Sequence[str], position, velocity=(), topic: str = "/joint_states",
                    receive: float | None = None) -> None:
        msg = self.types["sensor_msgs/msg/JointState"](
            header=self._header(t), name=list(names), position=np.ascontiguousarray(position, dtype=np.float64),
            velocity=np.ascontiguousarray(velocity, dtype=np.float64), effort=np.zeros(0))
        self.write(topic, "sensor_msgs/msg/JointState", msg, t if receive is None else receive)

    def float_array(self, t: float, values, topic: str) -> None:
        """std_msgs/Float64MultiArray (no header: ``t`` is the receive time)."""
        types = self.types
        layout = types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
        data = np.ascontiguousarray(values, dtype=np.float64)
        msg = types["std_msgs/msg/Float64MultiArray"](layout=layout, data=data)
        self.write(topic, "std_msgs/msg/Float64MultiArray", msg, t)

    def trajectory(self, t: float, names: Sequence[str], positions, topic: str, receive: float | None = None) -> None:
        """trajectory_msgs/JointTrajectory with one point."""
        types = self.types
        duration = types["builtin_interfaces/msg/Duration"](sec=0, nanosec=50_000_000)
        point = types["trajectory_msgs/msg/JointTrajectoryPoint"](
            positions=np.ascontiguousarray(positions, dtype=np.float64), velocities=np.zeros(0),
            accelerations=np.zeros(0),
            effort=np.zeros(0), time_from_start=duration)
        msg = types["trajectory_msgs/msg/JointTrajectory"](header=self._header(t), joint_names=list(names),
                                                           points=[point])
        self.write(topic, "trajectory_msgs/msg/JointTrajectory", msg, t if receive is None else receive)

    def point(self, t: float, xyz, topic: str) -> None:
        types = self.types
        x, y, z = (float(v) for v in xyz)
        msg = types["geometry_msgs/msg/PointStamped"](header=self._header(t),
                                                      point=types["geometry_msgs/msg/Point"](x=x, y=y, z=z))
        self.write(topic, "geometry_msgs/msg/PointStamped", msg, t)

    def marker(self, t: float, value, topic: str) -> None:
        """std_msgs/Bool (a bool ``value``) or std_msgs/Int32 (an int)."""
        name = "std_msgs/msg/Bool" if isinstance(value, bool) else "std_msgs/msg/Int32"
        self.write(topic, name, self.types[name](data=value), t)
