"""``vdd bench runtime``: per-call latency of the exported student against the teacher's N-step sampler.

Every model is called through ``Policy.act`` exactly as the policy node calls it (input
checks, random draws, output copy included). Calls are interleaved in rounds, so a burst of
load on a shared machine hits every model alike and the teacher/student ratio stays fair.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from vdd_ros.files import save_figure, write_json
from vdd_ros.ros.node_bench import describe_machine, machine_line

ROUNDS = 20  # the calls of each model are spread over this many interleaved rounds


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (runtime latency, policy node rate, soak)",
                                   description="Benchmarks of vdd_ros components.")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    benches.required = True
    runtime = benches.add_parser(
        "runtime", help="latency of the ONNX student vs the teacher sampler at several step counts",
        description="Measure per-call latency (p50/p99/max), calls per second and the teacher/student ratio "
        "of the exported models through vdd_ros.runtime, print a table, and save a latency histogram PNG "
        "(and JSON). Teachers with several step counts are exported from the teacher checkpoint to a "
        "temporary folder when torch is installed; otherwise the given teacher .onnx files are used.")
    runtime.add_argument("--student", default=None,
                         help="student .onnx (default: the shipped models/student.onnx)")
    runtime.add_argument("--extra", action="append", default=[],
                         help="another student-like .onnx to include, e.g. models/em.onnx (repeatable; "
                         "default: models/em.onnx when shipped and --student is not given)")
    runtime.add_argument("--teacher-checkpoint", default=None,
                         help="teacher checkpoint to export at each --steps (default: models/teacher.pt when "
                         "it exists and torch is installed)")
    runtime.add_argument("--teacher", action="append", default=[],
                         help="exported teacher sampler .onnx to include as is (repeatable; default when no "
                         "checkpoint is used: the shipped models/teacher.onnx)")
    runtime.add_argument("--steps", default="1,4,8,16,32",
                         help="comma-separated sampler step counts to export from the checkpoint "
                         "(default: 1,4,8,16,32)")
    runtime.add_argument("--calls", type=int, default=5000,
                         help="timed calls per model after warm-up (default: 5000)")
    runtime.add_argument("--warmup", type=int, default=200, help="untimed calls per model first (default: 200)")
    runtime.add_argument("--threads", type=int, default=1,
                         help="onnxruntime intra-op threads per session (default: 1)")
    runtime.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    runtime.add_argument("--json", default=None, help="also write the results to this JSON file")
    runtime.add_argument("--plot", default="bench_runtime.png",
                         help="latency histogram PNG (default: bench_runtime.png; empty string: no plot)")
    runtime.add_argument("--seed", type=int, default=0, help="seed of the observations and noise (default: 0)")
    runtime.set_defaults(func=run_runtime)

    from vdd_ros.ros import node_bench  # rclpy is imported inside run(), not here (as in describe_machine)

    node = benches.add_parser("node", help="the policy node at a high control rate (deadline misses)",
                              description=node_bench.__doc__)
    node_bench.add_arguments(node)
    node.set_defaults(func=node_bench.run)

    from vdd_ros.ros import latency_bench

    ros = benches.add_parser("ros", help="end-to-end latency over ROS 2 at control rates, student vs teacher",
                             description=latency_bench.__doc__)
    ros.add_argument("--student", default=None, help="student .onnx (default: the shipped models/student.onnx)")
    ros.add_argument("--teacher-checkpoint", default=None,
                     help="teacher checkpoint exported at each --steps (default: models/teacher.pt when torch is "
                     "installed)")
    ros.add_argument("--teacher", action="append", default=[],
                     help="exported teacher sampler .onnx to include as is (repeatable; default without a checkpoint: "
                     "the shipped models/teacher.onnx)")
    ros.add_argument("--steps", default="4,8,16,32", help="teacher step counts (default: 4,8,16,32)")
    ros.add_argument("--rates", default="50,100,250,500,1000", help="control rates in Hz (default: %(default)s)")
    ros.add_argument("--triggers", default="timer,observation",
                     help="comma-separated: timer, observation (default: %(default)s)")
    ros.add_argument("--duration", type=float, default=30.0, help="measured seconds per cell (default: 30)")
    ros.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring each cell (default: 2)")
    ros.add_argument("--quick", action="store_true",
                     help="smoke run: the student and the 16-step teacher, 100 and 1000 Hz, observation trigger, 3 s")
    ros.add_argument("--no-floor", action="store_true", help="skip the bare-rclpy DDS floor")
    ros.add_argument("--executor", default="single_threaded", choices=("single_threaded", "events"),
                     help="the rclpy executor of the policy node and the echo (default: %(default)s, the node's)")
    ros.add_argument("--attach", default=None, metavar="NODE",
                     help="measure this already running policy node (e.g. /arm/student_policy) for --duration s "
                     "instead of starting any: latency from its joint_states stamps to its commands")
    ros.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: the environment's, else 44)")
    ros.add_argument("--json", default=None, help="also write the results to this JSON file")
    ros.add_argument("--plot", default="bench_ros.png", help="latency CDFs and achieved rates (PNG; '' = none)")
    ros.set_defaults(func=run_ros)

    from vdd_ros.ros import soak

    soak_parser = benches.add_parser("soak", help="the policy node for minutes at a high rate (memory, misses, "
                                     "shared-memory files)", description=soak.__doc__)
    soak.add_arguments(soak_parser)
    soak_parser.set_defaults(func=soak.run)


def _parse_steps(text: str) -> list[int]:
    from vdd_ros.cli.main import UserError

    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--steps: expected comma-separated integers >= 1, got '{text}'") from None
    if not steps or min(steps) < 1:
        raise UserError(f"--steps: expected comma-separated integers >= 1, got '{text}'")
    return sorted(set(steps))


def _export_teachers(checkpoint: Path, steps: list[int], folder: Path) -> list[Path]:
    import torch
    from tqdm import tqdm

    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.learn.export import export_teacher_sampler

    torch.set_num_threads(1)
    loaded = load_checkpoint(checkpoint)
    if loaded.kind != "diffusion_teacher":
        from vdd_ros.cli.main import UserError
        raise UserError(f"--teacher-checkpoint: expected a diffusion_teacher checkpoint, {checkpoint} holds a "
                        f"{loaded.kind}")
    spec = loaded.spec.replace(model_kind=loaded.kind)
    paths = []
    for n in tqdm(steps, desc="export teacher", unit="sampler"):
        paths.append(export_teacher_sampler(loaded.model, spec, folder / f"teacher_{n}steps.onnx", n,
                                            loaded.config).path)
    return paths


def _windows(spec, count: int, rng):
    import numpy as np

    norm = spec.normalization
    return (np.asarray(norm.obs_mean) + np.asarray(norm.obs_std)
            * rng.standard_normal((count, spec.history, spec.obs_step_dim)))


def measure(policies: dict, calls: int, warmup: int, seed: int) -> dict:
    """Per-call latencies (seconds) of ``policies`` (label -> Policy), interleaved in rounds."""
    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    windows = {label: _windows(p.spec, 64, rng) for label, p in policies.items()}
    for label, policy in policies.items():
        for i in range(warmup):
            policy.act(windows[label][i % 64], rng)
    per_round = max(1, calls // ROUNDS)
    samples = {label: np.empty(per_round * ROUNDS) for label in policies}
    clock = time.perf_counter_ns
    for r in tqdm(range(ROUNDS), desc="bench", unit="round"):
        for label, policy in policies.items():
            obs, out = windows[label], samples[label]
            for i in range(r * per_round, (r + 1) * per_round):
                window = obs[i % 64]
                start = clock()
                policy.act(window, rng)
                out[i] = clock() - start
    return {label: values * 1e-9 for label, values in samples.items()}


def summarise(policies: dict, latencies: dict, student_label: str) -> list[dict]:
    import numpy as np

    student_p50 = float(np.percentile(latencies[student_label], 50))
    student_mean = float(np.mean(latencies[student_label]))
    rows = []
    for label, policy in policies.items():
        values = latencies[label]
        p50 = float(np.percentile(values, 50))
        rows.append({
            "model": label, "kind": policy.kind, "file": str(policy.path),
            "network_evaluations": policy.network_evaluations, "provider": policy.provider,
            "calls": int(values.size), "p50_us": p50 * 1e6, "p99_us": float(np.percentile(values, 99)) * 1e6,
            "max_us": float(values.max()) * 1e6, "mean_us": float(values.mean()) * 1e6,
            "calls_per_s": 1.0 / float(values.mean()),
            "actions_per_call": policy.spec.action_horizon,
            "p50_vs_student": p50 / student_p50, "mean_vs_student": float(values.mean()) / student_mean})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<22} {'NFE':>4} {'p50 us':>9} {'p99 us':>9} {'max us':>9} {'calls/s':>9} {'x student':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<22} {row['network_evaluations']:>4} {row['p50_us']:>9.1f} {row['p99_us']:>9.1f} "
              f"{row['max_us']:>9.1f} {row['calls_per_s']:>9.0f} {row['p50_vs_student']:>10.1f}")


def plot(latencies: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    everything = np.concatenate(list(latencies.values())) * 1e6
    bins = np.geomspace(max(everything.min(), 1.0), everything.max() * 1.01, 80)
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, values in latencies.items():
        ax.hist(values * 1e6, bins=bins, histtype="step", linewidth=1.5,
                label=f"{label} (p50 {np.percentile(values, 50) * 1e6:.0f} us)")
    ax.set_xscale("log")
    ax.set_xlabel("latency per act() call [us] (log scale)")
    ax.set_ylabel("calls")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run_runtime(args) -> int:
    from vdd_ros.cli.main import UserError
    from vdd_ros.paths import model_file
    from vdd_ros.runtime import load_policy

    if args.calls < ROUNDS:
        raise UserError(f"--calls: expected an integer >= {ROUNDS}, got {args.calls}")
    if args.warmup < 0:
        raise UserError(f"--warmup: expected an integer >= 0, got {args.warmup}")
    steps = _parse_steps(args.steps)
    for option, value in (("--json", args.json), ("--plot", args.plot)):
        if value and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
            raise UserError(f"{option}: folder of '{value}' does not exist")
    machine = describe_machine()  # the load average before the benchmark itself loads the machine
    student_path = Path(args.student) if args.student else model_file("student.onnx")
    if not student_path.is_file():
        raise FileNotFoundError(f"student {student_path}: no such file (pass --student, or export one: "
                                f"vdd export models/student.pt --out models/student.onnx)")
    extras = [Path(p) for p in args.extra]
    if not args.extra and not args.student and model_file("em.onnx").is_file():
        extras = [model_file("em.onnx")]
    checkpoint = Path(args.teacher_checkpoint) if args.teacher_checkpoint else model_file("teacher.pt")
    use_checkpoint = checkpoint.is_file() and not args.teacher
    if args.teacher_checkpoint and not checkpoint.is_file():
        raise FileNotFoundError(f"--teacher-checkpoint {checkpoint}: no such file")
    if use_checkpoint:
        if importlib.util.find_spec("torch") is None:
            use_checkpoint = False
            print(f"torch is not installed: using exported teacher files instead of {checkpoint}")

    with tempfile.TemporaryDirectory(prefix="vdd_bench_") as folder:
        if use_checkpoint:
            # in a child process: the measuring process stays torch-free, like the robot's (measured: a
            # model loaded after an in-process torch export ran 40% slower than the same file loaded again)
            pool = multiprocessing.get_context("spawn").Pool(1)
            try:
                teacher_paths = pool.apply(_export_teachers, (checkpoint, steps, Path(folder)))
            finally:
                pool.close()  # a clean exit of the worker (terminate() would leak its semaphores)
                pool.join()
        else:
            teacher_paths = [Path(p) for p in args.teacher] or [model_file("teacher.onnx")]
            missing = [str(p) for p in teacher_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"teacher {missing[0]}: no such file (pass --teacher FILE.onnx or "
                                        f"--teacher-checkpoint FILE.pt)")
        policies = {}
        student = load_policy(student_path, device=args.device, intra_op_threads=args.threads)
        if student.kind == "diffusion_teacher":
            raise UserError(f"--student: expected a student model, {student_path} holds a diffusion_teacher")
        policies[f"student ({student.kind})"] = student
        student_label = next(iter(policies))
        for path in extras:
            extra = load_policy(path, device=args.device, intra_op_threads=args.threads)
            label = f"{path.stem} ({extra.kind})"
            if label in policies:  # e.g. --extra models/student.onnx next to another student.onnx
                label = f"{path} ({extra.kind})"
            if label in policies:
                raise UserError(f"--extra {path}: this file is already in the benchmark")
            policies[label] = extra
        for path in teacher_paths:
            teacher = load_policy(path, device=args.device, intra_op_threads=args.threads)
            if teacher.kind != "diffusion_teacher":
                raise UserError(f"teacher file {path}: expected a diffusion_teacher sampler, got {teacher.kind}")
            policies[f"teacher {teacher.network_evaluations}-step"] = teacher
        latencies = measure(policies, args.calls, args.warmup, args.seed)
    rows = summarise(policies, latencies, student_label)
    setup = f"{student.provider}, {args.threads} intra-op thread(s)"
    print(f"\nper-call latency of Policy.act ({rows[0]['calls']} calls each; {setup})")
    print(machine_line(machine))
    print_table(rows)
    student_row = rows[0]
    teacher16 = next((r for r in rows if r["kind"] == "diffusion_teacher" and r["network_evaluations"] == 16), None)
    line = f"\nstudent p50 {student_row['p50_us']:.1f} us ({student_row['calls_per_s']:.0f} calls/s)"
    if teacher16 is not None:
        line += f"; 16-step teacher p50 {teacher16['p50_us']:.1f} us = {teacher16['p50_vs_student']:.1f}x the student"
    print(line)
    if args.json:
        write_json(args.json, {"machine": machine, "setup": setup, "calls": args.calls, "warmup": args.warmup,
                               "rows": rows})
        print(f"wrote {args.json}")
    if args.plot:
        plot(latencies, args.plot, f"vdd_ros runtime latency ({setup})\n{machine_line(machine)}")
        print(f"wrote {args.plot}")
    return 0


def run_ros(args) -> int:
    from vdd_ros.cli.main import UserError
    from vdd_ros.paths import model_file
    from vdd_ros.ros import latency_bench
    from vdd_ros.runtime import load_policy

    if args.quick:
        args.steps, args.rates, args.triggers, args.duration = "16", "100,1000", "observation", 3.0
    steps = _parse_steps(args.steps)
    rates = latency_bench.parse_list("--rates", args.rates)
    triggers = [t.strip() for t in args.triggers.split(",") if t.strip()]
    if not triggers or set(triggers) - {"timer", "observation"}:
        raise UserError(f"--triggers: expected timer and/or observation, got '{args.triggers}'")
    if args.duration <= 0 or args.warmup < 0:
        raise UserError(f"--duration must be > 0 and --warmup >= 0, got {args.duration} and {args.warmup}")
    machine = describe_machine()
    domain = args.domain_id if args.domain_id is not None else int(os.environ.get("ROS_DOMAIN_ID", "44"))
    if args.attach:
        result = latency_bench.attach(domain, args.duration, args.attach)
        result["machine"] = machine
        latency_bench.report(result, machine_line(machine), args.json, args.plot)
        return 0
    student = Path(args.student) if args.student else model_file("student.onnx")
    if not student.is_file():
        raise FileNotFoundError(f"student {student}: no such file")
    checkpoint = Path(args.teacher_checkpoint) if args.teacher_checkpoint else model_file("teacher.pt")
    use_checkpoint = checkpoint.is_file() and not args.teacher and importlib.util.find_spec("torch") is not None
    with tempfile.TemporaryDirectory(prefix="vdd_bench_ros_") as folder:
        if use_checkpoint:
            pool = multiprocessing.get_context("spawn").Pool(1)  # this process stays torch-free
            try:
                teachers = pool.apply(_export_teachers, (checkpoint, steps, Path(folder)))
            finally:
                pool.close()
                pool.join()
        else:
            teachers = [Path(p) for p in args.teacher] or [model_file("teacher.onnx")]
        models = {"student": student}
        for path in teachers:
            policy = load_policy(path)
            models[f"teacher {policy.network_evaluations}-step"] = path
        print(f"vdd bench ros: {list(models)} at {rates} Hz, triggers {triggers}, {args.duration:g} s per cell\n"
              f"{machine_line(machine)}", flush=True)
        result = latency_bench.run_sweep(models, rates, triggers, args.duration, args.warmup, domain,
                                         floor=not args.no_floor, executor=args.executor)
    result["machine"] = machine
    latency_bench.report(result, machine_line(machine), args.json, args.plot)
    return 0


def latency_bench_main(argv=None) -> int:
    """``ros2 run vdd_ros latency_bench [options]``: the same as ``vdd bench ros``."""
    import sys

    from vdd_ros.cli.main import main

    return main(["bench", "ros", *(sys.argv[1:] if argv is None else argv)])
