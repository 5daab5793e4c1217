"""Bring up the policy node (VDD student or diffusion teacher), optionally the teacher beside it, and the
simulated arm.

    ros2 launch vdd_ros policy.launch.py                              # student drives the simulated arm
    ros2 launch vdd_ros policy.launch.py with_teacher:=true           # + teacher in shadow, same observations
    ros2 launch vdd_ros policy.launch.py with_teacher:=true driver:=teacher
    ros2 launch vdd_ros policy.launch.py use_sim:=false namespace:=arm model:=/path/to/student.onnx
    ros2 service call /arm/student_policy/enable std_srvs/srv/SetBool "{data: true}"   # then it commands
    ros2 launch vdd_ros policy.launch.py task:=arm_sort model:=/path/to/arm_sort_student.onnx  # no shipped model

Topics (relative to ``namespace``): ``joint_states`` in, ``commands`` (or ``joint_trajectory``) out.
The driving policy node publishes the arm's ``commands``; the shadow one publishes the same kind of
message on its private ``~/commands`` / ``~/joint_trajectory``, so both can be compared live
(``~/expert``, ``~/inference_time`` and ``/diagnostics`` of each node).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "vdd_ros"
ROLES = ("student", "teacher")


def _flag(context, name: str) -> bool:
    value = LaunchConfiguration(name).perform(context).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"launch argument {name}: expected true or false, got '{value}'")
    return value == "true"


def _policy_node(role: str, driving: bool, model: str, params_file: str, device: str, namespace: str,
                 use_sim: bool) -> Node:
    # the shadow's command outputs go to its own private topics, away from the arm
    remappings = [] if driving else [("commands", "~/commands"), ("joint_trajectory", "~/joint_trajectory")]
    overrides = {"model": model, "device": device}
    if not use_sim:  # a physical arm: nothing moves until `ros2 service call <node>/enable` with data: true
        overrides["start_enabled"] = False
    return Node(package=PACKAGE, executable="policy_node", name=f"{role}_policy", namespace=namespace,
                parameters=[params_file, overrides], remappings=remappings,
                output="screen", emulate_tty=True)


def _nodes(context):
    driver = LaunchConfiguration("driver").perform(context)
    if driver not in ROLES:
        raise ValueError(f"launch argument driver: expected one of {list(ROLES)}, got '{driver}'")
    namespace = LaunchConfiguration("namespace").perform(context)
    params_file = LaunchConfiguration("params_file").perform(context)
    device = LaunchConfiguration("device").perform(context)
    models = {"student": LaunchConfiguration("model").perform(context),
              "teacher": LaunchConfiguration("teacher_model").perform(context)}
    roles = ROLES if _flag(context, "with_teacher") else (driver,)
    use_sim = _flag(context, "use_sim")
    actions = [_policy_node(role, role == driver, models[role], params_file, device, namespace, use_sim)
               for role in roles]
    if use_sim:
        actions.append(Node(package=PACKAGE, executable="arm_sim_node", name="arm_sim", namespace=namespace,
                            # the first episode waits for every policy node, the shadow included
                            parameters=[LaunchConfiguration("sim_params_file").perform(context),
                                        {"wait_for_subscribers": len(roles),
                                         "task": LaunchConfiguration("task").perform(context)}],
                            output="screen", emulate_tty=True))
    shadow = [role for role in roles if role != driver]
    actions.append(LogInfo(msg=f"vdd_ros: {driver} drives" + (f", {shadow[0]} in shadow" if shadow else "")))
    return actions


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("model", default_value=os.path.join(share, "models", "student.onnx"),
                              description="Exported student (.onnx)"),
        DeclareLaunchArgument("teacher_model", default_value=os.path.join(share, "models", "teacher.onnx"),
                              description="Exported diffusion teacher (.onnx)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "policy.yaml"),
                              description="Parameters of the policy node(s)"),
        DeclareLaunchArgument("sim_params_file", default_value=os.path.join(share, "config", "arm_sim.yaml"),
                              description="Parameters of the simulated arm"),
        DeclareLaunchArgument("use_sim", default_value="true", choices=["true", "false"],
                              description="Start the simulated arm (arm_sim_node)"),
        DeclareLaunchArgument("with_teacher", default_value="false", choices=["true", "false"],
                              description="Run student and teacher side by side on the same observations"),
        DeclareLaunchArgument("driver", default_value="student", choices=list(ROLES),
                              description="Which model commands the arm (the other runs in shadow)"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of all nodes"),
        DeclareLaunchArgument("task", default_value="arm_avoid", choices=["arm_avoid", "arm_sort"],
                              description="Built-in task the simulated arm runs (arm_sort: give model:= a model "
                              "of that task; the shipped models are arm_avoid's)"),
        DeclareLaunchArgument("device", default_value="cpu", choices=["auto", "cpu", "cuda"],
                              description="onnxruntime execution provider of the policy nodes"),
    ]
    return LaunchDescription(arguments + [OpaqueFunction(function=_nodes)])
