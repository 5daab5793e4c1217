"""``vdd render``: plot the demonstrations of a dataset as a PNG."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "render", help="plot a demonstration dataset as a PNG",
        description="Plot a dataset's demonstrations (arm_avoid: end-effector paths coloured by route, "
        "obstacles and finish line; arm_sort: paths coloured by visiting order, the three targets) and save "
        "the figure as a PNG.")
    parser.add_argument("--dataset", required=True, help="dataset .npz written by 'vdd demos'")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--max-episodes", type=int, default=None,
                        help="plot only the first N episodes (default: all)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vdd_ros.cli.main import UserError
    from vdd_ros.tasks.registry import TASKS, load_dataset, task_module

    if not args.out.endswith(".png"):
        raise ValueError(f"--out: expected a path ending in .png, got '{args.out}'")
    if args.max_episodes is not None and args.max_episodes < 1:
        raise ValueError(f"--max-episodes: expected an integer >= 1, got {args.max_episodes}")
    dataset = load_dataset(args.dataset)
    if dataset.task not in TASKS or not hasattr(task_module(dataset.task), "plot_dataset"):
        raise ValueError(f"dataset {args.dataset}: task: expected a task with a plot "
                         f"({sorted(TASKS)}), got '{dataset.task}'")
    try:
        task_module(dataset.task).plot_dataset(dataset, args.out, max_episodes=args.max_episodes)
    except OSError as err:
        raise UserError(f"--out: cannot write '{args.out}' ({err.strerror or err})") from None
    print(f"wrote {args.out} ({min(args.max_episodes or dataset.n_episodes, dataset.n_episodes)} of "
          f"{dataset.n_episodes} episodes)")
    return 0
