"""``vdd import-bag`` / ``import-hdf5`` / ``import-lerobot``: demonstrations of your robot -> .npz.

From rosbag2 bags, robomimic-layout HDF5 files and LeRobotDataset v3 folders. Each reads the robot's
interface from ``--robot robot.yaml`` (``vdd_ros.data.robot``), writes the dataset atomically (nothing
is written when the import fails) and prints a report; ``--json FILE`` writes the report too.
"""
from __future__ import annotations

from vdd_ros.data.bag_import import DEFAULT_MAX_GAP_S
from vdd_ros.data.import_common import DEFAULT_MIN_STEPS


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

    hdf5 = subparsers.add_parser(
        "import-hdf5", help="import demonstrations from a robomimic-layout HDF5 file",
        description="Read a robomimic-layout HDF5 file (data/demo_N/obs/<key>, data/demo_N/actions; one "
        "demonstration per episode, one sample per control step at the robot's control rate, which "
        "data.attrs['env_args'] env_kwargs.control_freq must match where present) and write one .npz dataset. "
        "Obs keys fill the robot's observation fields by --key or robot.yaml's hdf5_keys (a field left unmapped "
        "reads the obs key of its own name); actions are taken as robot.yaml's action.kind.")
    hdf5.add_argument("file", metavar="FILE", help="the .hdf5 file")
    _common(hdf5)
    _keys_and_min_steps(hdf5, "SRC", "hdf5_keys", "an obs key")
    hdf5.set_defaults(func=run_hdf5)

    lerobot = subparsers.add_parser(
        "import-lerobot", help="import demonstrations from a LeRobotDataset v3 folder",
        description="Read a LeRobotDataset v3 folder (meta/info.json, data/chunk-*/file-*.parquet with "
        "episode_index, frame_index, timestamp, action and observation columns; no images or videos) and write "
        "one .npz dataset. Frames are not resampled: meta/info.json's fps must equal the robot's control rate. "
        "Columns fill the robot's observation fields by --key or robot.yaml's lerobot_keys (a field left "
        "unmapped reads the column of its own name); action is taken as robot.yaml's action.kind.")
    lerobot.add_argument("folder", metavar="FOLDER", help="the dataset folder (holding meta/ and data/)")
    _common(lerobot)
    _keys_and_min_steps(lerobot, "COL", "lerobot_keys", "a column")
    lerobot.set_defaults(func=run_lerobot)


def _keys_and_min_steps(parser, source: str, section: str, what: str) -> None:
    parser.add_argument("--key", action="append", default=[], metavar=f"{source}=FIELD[,FIELD]",
                        help=f"{what} filling these observation fields of robot.yaml (several: its numbers one "
                        f"field after another); repeat for each; replaces robot.yaml's {section}")
    parser.add_argument("--min-steps", type=int, default=DEFAULT_MIN_STEPS,
                        help="drop episodes with fewer control steps (default: %(default)s)")


def parse_keys(entries: list[str]) -> dict | None:
    """``["SRC=FIELD[,FIELD]", ...]`` -> ``{SRC: [FIELD, ...]}`` (None when none are given)."""
    if not entries:
        return None
    mapping = {}
    for entry in entries:
        source, sep, targets = entry.rpartition("=")
        fields = [t.strip() for t in targets.split(",")]
        if not sep or not source or not all(fields):
            raise ValueError(f"--key: expected SOURCE=FIELD[,FIELD], got '{entry}'")
        if source in mapping:
            raise ValueError(f"--key: expected each source once, got '{source}' twice")
        mapping[source] = fields
    return mapping


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


def _report(args, dataset, report) -> int:
    print(report.format())
    _write(args, dataset, dict(report.to_dict(), out=args.out, robot=args.robot))
    print(f"wrote {args.out}: {dataset.n_episodes} episodes, {dataset.n_steps} steps"
          + (f", report {args.json}" if args.json else ""))
    return 0


def _robot(args):
    _check_out(args)
    robot = load_robot_arg(args.robot)
    print(robot.describe(), flush=True)
    return robot


def run_bag(args) -> int:
    from vdd_ros.data.bag_import import import_bags

    robot = _robot(args)
    dataset, report = import_bags(args.bags, robot, marker_topic=args.episode_topic, max_gap_s=args.max_gap,
                                  min_steps=args.min_steps)
    return _report(args, dataset, report)


def run_hdf5(args) -> int:
    from vdd_ros.data.hdf5_import import import_hdf5

    keys = parse_keys(args.key)
    robot = _robot(args)
    dataset, report = import_hdf5(args.file, robot, keys=keys, min_steps=args.min_steps)
    return _report(args, dataset, report)


def run_lerobot(args) -> int:
    from vdd_ros.data.lerobot_import import import_lerobot

    keys = parse_keys(args.key)
    robot = _robot(args)
    dataset, report = import_lerobot(args.folder, robot, keys=keys, min_steps=args.min_steps)
    return _report(args, dataset, report)
