"""vdd_ros: distil diffusion policies into mixtures of Gaussian experts and run them in ROS 2.

Builds as an ament_python package with colcon, and installs with pip on a machine without
a ROS distribution (see README.md).
"""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vdd_ros"


def share(folder, pattern="*"):
    files = sorted(f for f in glob(os.path.join(folder, pattern)) if os.path.isfile(f))
    return (os.path.join("share", PACKAGE, folder), files)


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        share("launch"),
        share("config"),
        share("models"),
    ],
    install_requires=["setuptools", "numpy", "pyyaml"],
    extras_require={
        # robot computer: onnxruntime only (no torch)
        "deploy": ["onnxruntime"],
        "deploy-gpu": ["onnxruntime-gpu"],
        # workstation: training, distillation, export, plots
        "train": ["torch==2.13.0", "onnx", "onnxscript", "tqdm", "matplotlib"],
        # vdd import-bag, import-hdf5, import-lerobot and robot.yaml's urdf: (workstation)
        "import": ["rosbags==0.11.9", "h5py==3.16.0", "pyarrow==26.0.1", "yourdfpy==0.0.60"],
        "test": ["pytest", "pytest-timeout"],
    },
    zip_safe=True,
    maintainer="vdd_ros developers",
    maintainer_email="vdd-ros@example.org",
    description="Variational Diffusion Distillation of diffusion policies into mixture-of-experts ROS 2 policies",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vdd = vdd_ros.cli.main:main",
            "policy_node = vdd_ros.ros.policy_node:main",
            "arm_sim_node = vdd_ros.ros.arm_sim_node:main",
            "latency_bench = vdd_ros.cli.bench:latency_bench_main",
        ],
    },
)
