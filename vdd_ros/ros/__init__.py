"""ROS 2 nodes of vdd_ros."""
