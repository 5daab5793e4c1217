"""The ``vdd`` command: one subcommand per module in this package.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func``; heavy imports (torch, rclpy) happen inside the function it runs, so ``vdd --help``
stays fast and the robot-side commands work without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, ...) in the order ``vdd --help`` lists them
SUBCOMMAND_MODULES = (
    "vdd_ros.cli.demos",
    "vdd_ros.cli.imports",
    "vdd_ros.cli.render",
    "vdd_ros.cli.learn",
    "vdd_ros.cli.export",
    "vdd_ros.cli.bench",
    "vdd_ros.cli.demo",
)


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdd", description="Variational Diffusion Distillation for ROS 2: demonstrations, "
        "teacher training, distillation, export, evaluation and the ROS 2 demo.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("vdd: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, ValueError) as err:
        # one line, no stack trace: the message names what, where, expected vs actual
        print(f"vdd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
