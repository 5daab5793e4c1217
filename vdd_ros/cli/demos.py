"""``vdd demos``: generate scripted demonstrations of a built-in task and save them as .npz."""
from __future__ import annotations

import json
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demos", help="generate demonstrations of a built-in task",
        description="Generate scripted multimodal demonstrations of a built-in task, save them as a "
        "compressed .npz dataset and print a one-line summary (episodes, steps, success, route entropy).")
    parser.add_argument("--task", default="arm_avoid", help="built-in task name (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=500, help="number of episodes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset "
                        "(default: %(default)s)")
    parser.add_argument("--out", required=True, help="output dataset path, ending in .npz")
    parser.add_argument("--plot", default=None, help="also save a PNG of the demonstrations here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vdd_ros.cli.main import UserError
    from vdd_ros.tasks.registry import task_module

    if args.episodes < 1:
        raise ValueError(f"--episodes: expected an integer >= 1, got {args.episodes}")
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out: expected a path ending in .npz, got '{args.out}'")
    if args.plot is not None and not args.plot.endswith(".png"):
        raise ValueError(f"--plot: expected a path ending in .png, got '{args.plot}'")
    task = task_module(args.task)
    started = time.perf_counter()
    dataset = task.generate_demonstrations(args.episodes, args.seed, progress=True)
    seconds = time.perf_counter() - started
    try:
        dataset.save(args.out)
    except OSError as err:
        raise UserError(f"--out: cannot write '{args.out}' ({err.strerror or err})") from None
    summary = {"task": args.task, "episodes": dataset.n_episodes, "steps": dataset.n_steps,
               "seconds": round(seconds, 2), "out": args.out}
    if hasattr(task, "evaluate_dataset"):
        metrics = task.evaluate_dataset(dataset)
        summary.update(success=metrics.success_rate, entropy=round(metrics.entropy, 4),
                       routes_covered=metrics.routes_covered)
    if args.plot is not None:
        try:
            task.plot_dataset(dataset, args.plot)
        except OSError as err:
            raise UserError(f"--plot: cannot write '{args.plot}' ({err.strerror or err})") from None
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary))
    else:
        print(" ".join(f"{key}={value}" for key, value in summary.items()))
    return 0
