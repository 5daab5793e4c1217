"""The arm-task results of the README in one command: teacher, VDD student and EM baseline over seeds.

For every seed it trains (or reuses) the models with the default configs, evaluates them with
``vdd eval`` on the same start states, and writes per-seed JSON and PNG files plus a summary
(mean and standard deviation over seeds, the targets checked) to ``--out``. ``--install``
copies the seed-0 models to models/ (teacher.pt, student.pt, em.pt, metrics.json) and the
figures to docs/figures/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vdd(*argv) -> None:
    from vdd_ros.cli import main as cli_main

    if "vdd_ros.cli.learn" not in cli_main.SUBCOMMAND_MODULES:
        cli_main.SUBCOMMAND_MODULES = cli_main.SUBCOMMAND_MODULES + ("vdd_ros.cli.learn",)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of distillation and EM (default: 0 1 2)")
    parser.add_argument("--teacher-seeds", type=int, nargs="+", default=[0],
                        help="teacher seeds; with one, every student distils that teacher (default: 0)")
    parser.add_argument("--episodes", type=int, default=200, help="evaluation episodes per model and seed")
    parser.add_argument("--steps-sweep", type=int, nargs="*", default=[4, 8, 16, 32],
                        help="teacher denoising steps to compare on the seed-0 teacher (empty: skip)")
    parser.add_argument("--out", default=str(ROOT / "results" / "arm"), help="output folder")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --out")
    parser.add_argument("--install", action="store_true",
                        help="copy the seed-0 models to models/ and the figures to docs/figures/")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teachers = {}
    for seed in args.teacher_seeds:
        teachers[seed] = out / f"teacher_s{seed}.pt"
        train("teacher", teachers[seed], seed, args.reuse)
    runs = []
    for index, seed in enumerate(args.seeds):
        teacher = teachers[args.teacher_seeds[index % len(args.teacher_seeds)]]
        student, em = out / f"student_s{seed}.pt", out / f"em_s{seed}.pt"
        train("student", student, seed, args.reuse, ("--teacher", teacher))
        train("em", em, seed, args.reuse)
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
                                                     args.episodes, out)
    summary.update(seeds=args.seeds, teacher_seeds=args.teacher_seeds, episodes=args.episodes,
                   total_wall_time_s=time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    teacher, student = models["teacher"], models["student"]
    targets = {
        "teacher_success>=0.9": teacher["success_rate"]["mean"] >= 0.9,
        "teacher_entropy>=0.8": teacher["entropy"]["mean"] >= 0.8,
        "student_success>=0.95*teacher": student["success_rate"]["mean"] >= 0.95 * teacher["success_rate"]["mean"],
        "student_entropy>=0.9*teacher": student["entropy"]["mean"] >= 0.9 * teacher["entropy"]["mean"],
    }
    return {"models": models, "targets_met": targets}


def steps_sweep(teacher: Path, steps: list[int], episodes: int, out: Path) -> list[dict]:
    """Teacher success and entropy against the number of denoising steps, for both samplers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for sampler in ("euler", "ancestral"):
        for n_steps in steps:
            report = out / f"teacher_{sampler}_{n_steps}.json"
            vdd("eval", "--teacher", teacher, "--n-steps", n_steps, "--sampler", sampler, "--episodes", episodes,
                "--seed", 1000, "--json", report, "--plot", out / f"teacher_{sampler}_{n_steps}.png")
            row = json.loads(report.read_text())["models"][0]
            results.append({"sampler": sampler, "n_steps": n_steps, "success_rate": row["success_rate"],
                            "entropy": row["entropy"], "time_per_action_ms": row["time_per_action_ms"]})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for sampler, style in (("euler", "-"), ("ancestral", "--")):
        rows = [r for r in results if r["sampler"] == sampler]
        ax.plot(steps, [r["success_rate"] for r in rows], "o" + style, color="C0", label=f"success ({sampler})")
        ax.plot(steps, [r["entropy"] for r in rows], "s" + style, color="C1", label=f"entropy ({sampler})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("denoising steps N (network evaluations per action)")
    ax.set_ylim(0, 1.02)
    ax.set_title("diffusion teacher on arm_avoid vs sampling steps", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "teacher_steps.png", dpi=110)
    plt.close(fig)
    return results


def format_summary(summary: dict) -> str:
    lines = ["model    success        entropy        collision      NFE  ms/action",
             "-------  -------------  -------------  -------------  ---  ---------"]
    for label, metrics in summary["models"].items():
        def cell(key, digits=3):
            value = metrics[key]
            return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}" if value["mean"] is not None else "n/a"
        lines.append(f"{label:<8} {cell('success_rate'):<14} {cell('entropy'):<14} {cell('collision_rate'):<14} "
                     f"{metrics['network_evaluations_per_action']['mean']:<4.0f} "
                     f"{metrics['time_per_action_ms']['mean']:.2f}")
    lines.append("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in summary["targets_met"].items()))
    lines.append("training wall time [s]: " + ", ".join(
        f"{k}={v:.0f}" for k, v in summary["training_wall_time_s"].items() if v is not None))
    return "\n".join(lines)


def install(out: Path, seed: int, teacher_seed: int, summary: dict) -> None:
    models = ROOT / "models"
    figures = ROOT / "docs" / "figures"
    models.mkdir(exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    for source, name in ((out / f"teacher_s{teacher_seed}.pt", "teacher.pt"),
                         (out / f"student_s{seed}.pt", "student.pt"), (out / f"em_s{seed}.pt", "em.pt")):
        tmp = models / f".{name}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, models / name)
    (models / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.copyfile(out / f"rollouts_s{seed}.png", figures / "arm_rollouts.png")
    if (out / "teacher_steps.png").is_file():
        shutil.copyfile(out / "teacher_steps.png", figures / "arm_teacher_steps.png")
    print(f"installed models/teacher.pt, models/student.pt, models/em.pt, models/metrics.json, "
          f"docs/figures/arm_rollouts.png")


if __name__ == "__main__":
    sys.exit(main())
