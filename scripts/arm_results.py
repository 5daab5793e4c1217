"""The arm-task results of docs/results.md in one command: teacher, VDD student and EM baseline over seeds,
on the built-in task ``--task`` (arm_avoid, the shipped models' task, or arm_sort).

For every seed it trains (or reuses) the models with the default configs, evaluates them with
``vdd eval`` on the same start states, and writes per-seed JSON and PNG files plus a summary
(mean and standard deviation over seeds, student/teacher and EM/teacher ratios, the teacher's
Euler sampler at several step counts) to ``--out``. Every checkpoint is written to ``--out``
with an explicit ``--out FILE``; nothing in models/ changes unless ``--install`` is given, which
copies the first seed's models to models/ (teacher.pt, student.pt, em.pt, metrics.json),
exports them there (teacher.onnx with teacher_denoiser.onnx, student.onnx, em.onnx) and copies
the figures to docs/figures/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vdd_ros.files import copy_file, save_figure, write_json  # noqa: E402  (after the checkout joins sys.path)


def vdd(*argv) -> None:
    """Run one ``vdd`` subcommand in this process; a non-zero exit status stops the script."""
    from vdd_ros.cli import main as cli_main

    argv = [str(a) for a in argv]
    print("$ vdd " + " ".join(argv), flush=True)
    code = cli_main.main(argv)
    if code != 0:
        raise SystemExit(f"vdd {argv[0]} failed with exit status {code}")


def train(kind: str, path: Path, seed: int, reuse: bool, extra=()) -> None:
    if reuse and path.is_file():
        print(f"reusing {path}")
        return
    command = {"teacher": "train-teacher", "student": "distill", "em": "train-em"}[kind]
    vdd(command, "--out", path, "--set", f"seed={seed}", "--quiet", *extra)


def mean_std(values):
    import numpy as np

    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return None, None
    return float(array.mean()), float(array.std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of distillation and EM (default: 0 1 2)")
    parser.add_argument("--teacher-seeds", type=int, nargs="+", default=[0],
                        help="teacher seeds; with one, every student distils that teacher (default: 0)")
    parser.add_argument("--episodes", type=int, default=200,
                        help="evaluation episodes per model and seed (default: 200)")
    parser.add_argument("--steps-sweep", type=int, nargs="*", default=[4, 8, 16, 32],
                        help="Euler steps of the first teacher to compare (default: 4 8 16 32; none given: skip)")
    parser.add_argument("--task", default="arm_avoid", choices=("arm_avoid", "arm_sort"),
                        help="built-in task (default: arm_avoid, the shipped models' task)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: results/arm for arm_avoid, results/TASK otherwise)")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --out")
    parser.add_argument("--install", action="store_true",
                        help="copy the first seed's models to models/ (and export them to .onnx there), the figures to "
                        "docs/figures/")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes: expected an integer >= 1, got {args.episodes}")
    if any(n < 1 for n in args.steps_sweep):
        parser.error(f"--steps-sweep: expected integers >= 1, got {args.steps_sweep}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.teacher_seeds)) != len(args.teacher_seeds):
        parser.error(f"--seeds/--teacher-seeds: expected distinct seeds, got {args.seeds} and {args.teacher_seeds}")
    if args.install and args.task != "arm_avoid":
        parser.error(f"--install: the shipped models are arm_avoid's, got --task {args.task}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out or ROOT / "results" / ("arm" if args.task == "arm_avoid" else args.task))
    task_set = ("--set", f"task={args.task}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teachers = {}
    for seed in args.teacher_seeds:
        teachers[seed] = out / f"teacher_s{seed}.pt"
        train("teacher", teachers[seed], seed, args.reuse, task_set)
    runs = []
    for index, seed in enumerate(args.seeds):
        teacher = teachers[args.teacher_seeds[index % len(args.teacher_seeds)]]
        student, em = out / f"student_s{seed}.pt", out / f"em_s{seed}.pt"
        train("student", student, seed, args.reuse, ("--teacher", teacher))
        train("em", em, seed, args.reuse, task_set)
        report = out / f"eval_s{seed}.json"
        vdd("eval", "--teacher", teacher, "--student", student, "--em", em, "--episodes", args.episodes,
            "--seed", 1000 + seed, "--json", report, "--plot", out / f"rollouts_s{seed}.png")
        runs.append({"seed": seed, "teacher": str(teacher), "rows": json.loads(report.read_text())["models"]})

    summary = summarise(runs)
    from vdd_ros.learn.checkpoint import load_checkpoint

    summary["training_wall_time_s"] = {
        name: mean_std([load_checkpoint(path).history.get("wall_time_s") for path in paths])[0]
        for name, paths in (("teacher", list(teachers.values())),
                            ("student", [out / f"student_s{s}.pt" for s in args.seeds]),
                            ("em", [out / f"em_s{s}.pt" for s in args.seeds]))}
    if args.steps_sweep:
        summary["teacher_steps_sweep"] = steps_sweep(teachers[args.teacher_seeds[0]], args.steps_sweep,
                                                     args.episodes, out, args.task)
    summary.update(task=args.task, seeds=args.seeds, teacher_seeds=args.teacher_seeds, episodes=args.episodes,
                   total_wall_time_s=time.perf_counter() - started)
    write_json(out / "summary.json", summary)
    print(format_summary(summary))
    if args.install:
        install(out, args.seeds[0], args.teacher_seeds[0], summary)
    return 0


def summarise(runs) -> dict:
    keys = ("success_rate", "entropy", "collision_rate", "routes_covered", "time_per_action_ms",
            "time_per_action_p50_ms", "network_evaluations_per_action")
    models = {}
    for label in ("teacher", "student", "em"):
        rows = [row for run in runs for row in run["rows"] if row["model"] == label]
        models[label] = {key: dict(zip(("mean", "std"), mean_std([row[key] for row in rows]))) for key in keys}
        models[label]["per_seed_success"] = [row["success_rate"] for row in rows]
    return {"models": models, "ratios": ratios(models)}


def ratios(models: dict) -> dict:
    """Student/teacher and EM/teacher ratios of the mean success rate and behaviour entropy (None: no teacher value)."""
    def ratio(label, key):
        value, reference = models[label][key]["mean"], models["teacher"][key]["mean"]
        return None if value is None or not reference else value / reference

    return {f"{label}_vs_teacher_{name}": ratio(label, key)
            for label in ("student", "em") for name, key in (("success", "success_rate"), ("entropy", "entropy"))}


def steps_sweep(teacher: Path, steps: list[int], episodes: int, out: Path, task: str) -> list[dict]:
    """Teacher success and entropy against the number of Euler steps (the exported sampler's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(set(steps))
    results = []
    for n_steps in steps:
        report = out / f"teacher_euler_{n_steps}.json"
        vdd("eval", "--teacher", teacher, "--n-steps", n_steps, "--episodes", episodes,
            "--seed", 1000, "--json", report, "--plot", out / f"teacher_euler_{n_steps}.png")
        row = json.loads(report.read_text())["models"][0]
        results.append({"sampler": "euler", "n_steps": n_steps, "success_rate": row["success_rate"],
                        "entropy": row["entropy"], "time_per_action_ms": row["time_per_action_ms"]})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(steps, [r["success_rate"] for r in results], "o-", color="C0", label="success rate")
    ax.plot(steps, [r["entropy"] for r in results], "s-", color="C1", label="behaviour entropy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("Euler steps N (network evaluations per action)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"diffusion teacher on {task} vs sampling steps", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "teacher_steps.png", dpi=110)
    return results


def format_summary(summary: dict) -> str:
    lines = ["model    success        entropy        collision      NFE  ms/action",
             "-------  -------------  -------------  -------------  ---  ---------"]
    def cell(metrics, key, digits=3):
        value = metrics[key]
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}" if value["mean"] is not None else "n/a"

    for label, metrics in summary["models"].items():
        lines.append(f"{label:<8} {cell(metrics, 'success_rate'):<14} {cell(metrics, 'entropy'):<14} "
                     f"{cell(metrics, 'collision_rate'):<14} "
                     f"{metrics['network_evaluations_per_action']['mean']:<4.0f} "
                     f"{metrics['time_per_action_ms']['mean']:.2f}")
    lines.append("mean over seeds, relative to the teacher: " + ", ".join(
        f"{key.replace('_vs_teacher_', ' ')} {value:.3f}" if value is not None else f"{key} n/a"
        for key, value in summary["ratios"].items()))
    lines.append("training wall time [s]: " + ", ".join(
        f"{k}={v:.0f}" for k, v in summary["training_wall_time_s"].items() if v is not None))
    return "\n".join(lines)


def install(out: Path, seed: int, teacher_seed: int, summary: dict) -> None:
    models = ROOT / "models"
    figures = ROOT / "docs" / "figures"
    installed = []
    for source, target in ((out / f"teacher_s{teacher_seed}.pt", models / "teacher.pt"),
                           (out / f"student_s{seed}.pt", models / "student.pt"),
                           (out / f"em_s{seed}.pt", models / "em.pt"),
                           (out / f"rollouts_s{seed}.png", figures / "arm_rollouts.png"),
                           (out / "teacher_steps.png", figures / "arm_teacher_steps.png")):
        if source.name == "teacher_steps.png" and not source.is_file():
            continue  # run with no --steps-sweep
        copy_file(source, target)
        installed.append(target.relative_to(ROOT))
    write_json(models / "metrics.json", summary)
    installed.append((models / "metrics.json").relative_to(ROOT))
    # the shipped ONNX files are exports of the shipped checkpoints: refresh them with the checkpoints
    for name in ("teacher", "student", "em"):
        vdd("export", models / f"{name}.pt", "--out", models / f"{name}.onnx")
        installed.append((models / f"{name}.onnx").relative_to(ROOT))
    print("installed " + ", ".join(str(path) for path in installed))


if __name__ == "__main__":
    sys.exit(main())
