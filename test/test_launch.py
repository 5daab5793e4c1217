"""The launch file and parameter files.

Statically everywhere (the launch file is parsed with ``ast``, never imported: launch/launch_ros
are not installable without a ROS distribution); for real where launch_ros and an installed
vdd_ros (ament index) are available.
"""
import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from vdd_ros.paths import share_dir

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "policy.launch.py"
LAUNCH_ARGUMENTS = {"model", "teacher_model", "params_file", "sim_params_file", "use_sim", "with_teacher", "driver",
                    "namespace", "device", "task"}


def console_scripts() -> dict:
    """``name -> "module:function"`` from setup.py's entry_points, read with ast."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = [ast.literal_eval(item) for item in value.elts]
                    return dict(tuple(part.strip() for part in entry.split("=", 1)) for entry in entries)
    raise AssertionError("setup.py declares no console_scripts")


def launch_tree():
    return ast.parse(LAUNCH_FILE.read_text())


def module_constants(tree) -> dict:
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value, ast.Constant)}


def calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called == name:
                yield node


def keyword(call, name):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def test_every_launched_executable_is_a_console_script_of_this_package():
    tree = launch_tree()
    constants = module_constants(tree)
    scripts = console_scripts()
    nodes = list(calls(tree, "Node"))
    assert len(nodes) >= 2
    executables = set()
    for call in nodes:
        package, executable = keyword(call, "package"), keyword(call, "executable")
        package = constants.get(package.id) if isinstance(package, ast.Name) else ast.literal_eval(package)
        assert package == "vdd_ros"
        executables.add(ast.literal_eval(executable))
    assert executables == {"policy_node", "arm_sim_node"}
    for name in executables:
        assert name in scripts, f"{name} is launched but setup.py does not install it"
        module, function = scripts[name].split(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{scripts[name]}: {source} defines no {function}()"


def test_every_share_file_the_launch_file_names_exists():
    named = []
    for call in calls(launch_tree(), "join"):
        parts = call.args[1:]
        if parts and all(isinstance(p, ast.Constant) for p in parts):
            named.append(Path(*[p.value for p in parts]))
    assert {p.parts[0] for p in named} == {"config", "models"}
    share = share_dir()
    missing = [str(p) for p in named if not (share / p).is_file()]
    assert not missing, f"named by the launch file but not in {share}: {missing}"


def test_launch_arguments_and_their_defaults():
    declared = {}
    for call in calls(launch_tree(), "DeclareLaunchArgument"):
        name = ast.literal_eval(call.args[0])
        choices, default = keyword(call, "choices"), keyword(call, "default_value")
        assert keyword(call, "description") is not None, f"launch argument {name} has no description"
        if choices is not None:
            allowed = ast.literal_eval(choices) if not isinstance(choices, ast.Call) else None
            if allowed is not None:
                assert ast.literal_eval(default) in allowed, f"default of {name} is not one of its choices"
        declared[name] = default
    assert set(declared) == LAUNCH_ARGUMENTS


# the one value a file sets apart from the node's default: the simulated arm's config starts enabled, the
# node (on a physical arm) does not
FILE_VALUES = {"policy.yaml": {"start_enabled": True}}


@pytest.mark.parametrize("config_name, module_name", [("policy.yaml", "vdd_ros.ros.policy_node"),
                                                       ("arm_sim.yaml", "vdd_ros.ros.arm_sim_node")])
def test_parameter_files_hold_every_parameter_with_its_default(config_name, module_name):
    pytest.importorskip("rclpy")
    import importlib

    parameters = importlib.import_module(module_name).PARAMETERS
    data = yaml.safe_load((share_dir() / "config" / config_name).read_text())
    values = data["/**"]["ros__parameters"]
    assert set(values) == set(parameters)
    for name, (default, descriptor) in parameters.items():
        expected = FILE_VALUES.get(config_name, {}).get(name, default)
        assert values[name] == expected, f"{config_name}: {name} is {values[name]!r}, expected {expected!r}"
        assert descriptor.description, f"{name} has no description"


# --- for real, where ROS 2 launch is installed ------------------------------------------------------------
def _launch_available() -> str:
    """Why the launch cannot run here ('' when it can)."""
    try:
        import launch_ros  # noqa: F401
        from ament_index_python.packages import get_package_prefix
        prefix = Path(get_package_prefix("vdd_ros"))
    except Exception as err:  # ImportError, PackageNotFoundError
        return f"launch_ros / an installed vdd_ros are not available ({type(err).__name__}: {err})"
    if not (prefix / "lib" / "vdd_ros" / "policy_node").exists():
        return f"{prefix}/lib/vdd_ros/policy_node is not installed (colcon build the package)"
    return ""


RUN_LAUNCH = textwrap.dedent("""
    import sys
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    service = LaunchService()
    arguments = [tuple(a.split(":=", 1)) for a in sys.argv[2:]]
    service.include_launch_description(LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments=arguments)]))
    sys.exit(service.run())
""")


@pytest.mark.slow
def test_launch_runs_student_teacher_and_sim(tmp_path, domain_id):
    reason = _launch_available()
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node

    model = share_dir() / "models" / "student.onnx"
    teacher = share_dir() / "models" / "teacher.onnx"
    if not (model.is_file() and teacher.is_file()):
        pytest.skip("models/student.onnx and models/teacher.onnx are not shipped yet")
    domain = domain_id
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain))
    log = open(tmp_path / "launch.log", "w")
    process = subprocess.Popen([sys.executable, "-c", RUN_LAUNCH, str(LAUNCH_FILE), "with_teacher:=true",
                                "namespace:=arm", f"model:={model}", f"teacher_model:={teacher}"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    context = Context()
    rclpy.init(context=context, domain_id=domain)
    node = Node("launch_probe", context=context)
    try:
        wanted = {"/arm/joint_states", "/arm/commands", "/arm/teacher_policy/commands",
                  "/arm/student_policy/inference_time", "/arm/teacher_policy/inference_time"}
        end = time.monotonic() + 60
        publishers, names = {}, set()
        while time.monotonic() < end:
            time.sleep(0.2)  # the graph is discovered in the background
            publishers = {t: len(node.get_publishers_info_by_topic(t)) for t in wanted}
            names = {info.node_name for info in node.get_publishers_info_by_topic("/arm/commands")}
            if all(publishers.values()) and "_NODE_NAME_UNKNOWN_" not in names:
                break
        assert all(publishers.values()), f"topics without a publisher: {publishers}"
        # the shadow (teacher) must not command the arm: the arm's commands come from the student only
        assert names == {"student_policy"}
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        process.send_signal(signal.SIGINT)
        process.wait(30)
        log.close()
    text = (tmp_path / "launch.log").read_text()
    assert text.count("process has finished cleanly") == 3, text[-3000:]
