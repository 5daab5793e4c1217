"""Import speed: ``vdd import-bag`` on an hour of 200 Hz JointState + 20 Hz commands (target: < 30 s).

    python scripts/bench_import.py [--minutes 60] [--storage mcap|sqlite3] [--repeats 1] [--json FILE]

Writes the bag (the 7-joint arm of examples/franka_robot.yaml, positions and velocities, one
episode per minute separated by 1 s pauses) to a temporary folder with rosbags' writer, then times
``import_bags`` on it (reading, checking, resampling and splitting; not the .npz write) and prints
each run, p50 and max, the messages per second and the ratio to the 30 s target.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_S = 30.0


def write_hour_bag(path: str, robot, minutes: float, storage: str) -> int:
    from vdd_ros.data.bag_write import BagRecorder

    names = list(robot.spec.joint_names)
    lower, upper = np.array(robot.spec.joint_lower), np.array(robot.spec.joint_upper)
    middle, amplitude = (lower + upper) / 2, (upper - lower) / 4
    phase = np.arange(len(names))
    count = 0
    with BagRecorder(path, storage) as bag:
        for episode in range(int(np.ceil(minutes))):
            t0 = 1_700_000_000.0 + episode * 61.0  # 60 s episodes, 1 s apart
            ticks = int(round(min(60.0, (minutes - episode) * 60.0) * 200))
            for k in range(ticks):
                t = k / 200.0
                q = middle + amplitude * np.sin(0.5 * t + phase)
                dq = 0.5 * amplitude * np.cos(0.5 * t + phase)
                bag.joint_state(t0 + t, names, q, dq, receive=t0 + t + 0.0003)
                count += 1
                if k % 10 == 0:
                    bag.float_array(t0 + t + 0.002, middle + amplitude * np.sin(0.5 * (t + 0.05) + phase),
                                    robot.command_topic)
                    count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="recorded minutes (default: %(default)s)")
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--repeats", type=int, default=1, help="timed imports (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import yaml

    from vdd_ros.data.bag_import import import_bags
    from vdd_ros.data.robot import robot_from_dict

    with open(os.path.join(ROOT, "examples", "franka_robot.yaml"), encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    data["observations"] = ["joint_position", "joint_velocity"]
    robot = robot_from_dict(data, "examples/franka_robot.yaml (without the goal topic)")
    with tempfile.TemporaryDirectory() as folder:
        bag = os.path.join(folder, "hour")
        started = time.perf_counter()
        messages = write_hour_bag(bag, robot, args.minutes, args.storage)
        size_mb = sum(os.path.getsize(os.path.join(bag, f)) for f in os.listdir(bag)) / 1e6
        print(f"wrote {messages} messages ({args.minutes:g} min, {args.storage}, {size_mb:.0f} MB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            dataset, report = import_bags([bag], robot)
            runs.append(time.perf_counter() - started)
            print(f"import: {runs[-1]:.2f} s, {dataset.n_episodes} episodes, {dataset.n_steps} steps", flush=True)
    p50, worst = float(np.median(runs)), float(np.max(runs))
    figures = {"minutes": args.minutes, "storage": args.storage, "messages": messages, "runs_s": runs,
               "p50_s": p50, "max_s": worst, "messages_per_s": messages / p50, "target_s": TARGET_S * args.minutes / 60}
    print(f"import {args.minutes:g} min of 200 Hz JointState + 20 Hz commands: p50 {p50:.2f} s, max {worst:.2f} s, "
          f"{messages / p50 / 1e3:.0f}k messages/s; {worst / figures['target_s']:.2f} of the "
          f"{figures['target_s']:.0f} s target")
    if args.json:
        from vdd_ros.files import write_json

        write_json(args.json, figures)
    return 0 if worst < figures["target_s"] else 1


if __name__ == "__main__":
    sys.exit(main())
