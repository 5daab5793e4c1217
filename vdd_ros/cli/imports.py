"""``vdd import-bag``: demonstrations of your robot from rosbag2 bags -> .npz.

Each reads the robot's interface from ``--robot robot.yaml`` (``vdd_ros.data.robot``), writes
the dataset atomically (nothing is written when the import fails) and prints a report; ``--json
FILE`` writes the report too.
"""
from __future__ import annotations

from vdd_ros.data.bag_import import DEFAULT_MAX_GAP_S, DEFAULT_MIN_STEPS


def _common(parser) -> None:
    parser.add_argument("--robot", required=True, help="robot.yaml describing joints, observations and actions")
    parser.add_argument("--out", required=True, help="output dataset path, ending in .npz")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the import report as JSON here")


def register(subparsers) -> None:
    bag = subparsers.add_parser(
        "import-bag", help="import demonstrations from rosbag2 bags (MCAP or SQLite3)",
        description="Read rosbag2 bags (MCAP or SQLite3, no ROS needed): JointState matched by joint name, the "
        "robot's vector observation topics and its command topic (Float64MultiArray, or JointTrajectory's first "
        "point; none: the next measured joint positions), resampled to the control rate by header stamp (receive "
        "time when stamps are zero), split into episodes (one per bag, a marker topic, or gaps), and written as "
        "one .npz dataset. Prints one row per episode and topic: messages, rate, dropped (missing from the "
        "stream's own rate) and duplicated (same stamp) messages, stamp jitter and the largest gap.")
    bag.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folders (or .mcap / .db3 files)")
    _common(bag)
    bag.add_argument("--episode-topic", default="",
                     help="marker topic: std_msgs/Bool (true while an episode runs) or std_msgs/Int32 (episode "
                     "number, < 0 between episodes); default: one episode per bag")
    bag.add_argument("--max-gap", type=float, default=DEFAULT_MAX_GAP_S, metavar="SECONDS",
                     help="split an episode where any stream pauses longer than this (default: %(default)s)")
    bag.add_argument("--min-steps", type=int, default=DEFAULT_MIN_STEPS,
                     help="drop episodes with fewer control steps (default: %(default)s)")
    bag.set_defaults(func=run_bag)


def load_robot_arg(path: str):
    """``--robot FILE`` -> Robot (errors name the file and key); for every command that takes ``--robot``."""
    from vdd_ros.data.robot import load_robot

    return load_robot(path)


def _check_out(args) -> None:
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out: expected a path ending in .npz, got '{args.out}'")


def _write(args, dataset, report: dict) -> None:
    from vdd_ros.cli.main import UserError
    from vdd_ros.files import write_json

    try:
        if args.json:
            write_json(args.json, report)
        dataset.save(args.out)
    except OSError as err:
        raise UserError(f"cannot write '{args.out}' or '{args.json}' ({err.strerror or err})") from None


def run_bag(args) -> int:
    from vdd_ros.data.bag_import import import_bags

    _check_out(args)
    robot = load_robot_arg(args.robot)
    print(robot.describe(), flush=True)
    dataset, report = import_bags(args.bags, robot, marker_topic=args.episode_topic, max_gap_s=args.max_gap,
                                  min_steps=args.min_steps)
    print(report.format())
    _write(args, dataset, dict(report.to_dict(), out=args.out, robot=args.robot))
    print(f"wrote {args.out}: {dataset.n_episodes} episodes, {dataset.n_steps} steps"
          + (f", report {args.json}" if args.json else ""))
    return 0
