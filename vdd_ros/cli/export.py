"""``vdd export``: a training checkpoint -> self-contained ONNX file(s) for the torch-free runtime."""
from __future__ import annotations

from pathlib import Path

from vdd_ros.cli.learn import RobotOption, add_robot_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint (student or teacher) to ONNX",
        description="Export a checkpoint to ONNX for vdd_ros.runtime and the policy node. A student "
        "(vdd_mixture / em_mixture) becomes one graph: raw observation window in, raw action chunk, expert, "
        "gating and every expert's mean out. A teacher (diffusion_teacher) becomes its whole N-step Euler "
        "sampler unrolled into one graph, plus (unless --no-denoiser) the single-step denoiser as a second "
        "file. Every file passes onnx.checker and an onnxruntime-vs-torch parity check before it is written.")
    parser.add_argument("checkpoint", help="checkpoint file (.pt) written by training")
    parser.add_argument("--out", required=True, help="output .onnx path (the student, or the teacher's sampler)")
    parser.add_argument("--steps", type=int, default=None,
                        help="teacher only: denoiser evaluations unrolled into the sampler (default: the "
                        "teacher's own n_steps)")
    parser.add_argument("--denoiser-out", default=None,
                        help="teacher only: where to write the single-step denoiser (default: OUT with "
                        "'_denoiser' before .onnx)")
    parser.add_argument("--no-denoiser", action="store_true",
                        help="teacher only: write the sampler file only")
    add_robot_flag(parser, "the checkpoint's spec must match its interface (else nothing is written)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vdd_ros.cli.main import UserError

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UserError(f"--out: expected a path ending in .onnx, got '{args.out}'")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: expected an integer >= 1, got {args.steps}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint}: no such file")
    robot = RobotOption.from_args(args, "export")  # a bad robot.yaml fails before torch loads
    import torch

    from vdd_ros.learn.checkpoint import load_checkpoint
    from vdd_ros.learn.export import export_checkpoint

    torch.set_num_threads(1)
    # only a teacher has a denoiser: peek at the kind before choosing the second file
    checkpoint = load_checkpoint(args.checkpoint)
    kind = checkpoint.kind
    robot.check(checkpoint.spec, f"checkpoint {args.checkpoint}", "checkpoint")
    denoiser = None
    if kind == "diffusion_teacher" and not args.no_denoiser:
        denoiser = Path(args.denoiser_out) if args.denoiser_out else out.with_name(out.stem + "_denoiser.onnx")
    elif kind != "diffusion_teacher" and (args.denoiser_out or args.no_denoiser):
        raise UserError(f"--denoiser-out/--no-denoiser: only a diffusion_teacher checkpoint has a denoiser, "
                        f"{args.checkpoint} holds a {kind}")
    for report in export_checkpoint(args.checkpoint, out, n_steps=args.steps, denoiser_path=denoiser):
        print(f"wrote {report.summary()} in {report.seconds:.1f} s")
    return 0
