#!/usr/bin/env bash
# A transformer-backbone teacher and student on the built-in arm task, for the latency benchmarks
# (`vdd bench runtime`, `vdd bench ros`): the transformer is where a teacher's cost per denoising step is largest.
# Short training runs (a few minutes on 2 cores): latency depends on the network's shape, not on its training;
# the task figures of such a pair are printed but are not the shipped models' (docs/benchmarks.md).
#   bash scripts/transformer_pair.sh                 # writes runs/transformer_pair/{teacher,student}.{pt,onnx}
#   TEACHER_ITERATIONS=20000 bash scripts/transformer_pair.sh   # a longer teacher run
# Then:
#   vdd bench runtime --student runs/transformer_pair/student.onnx \
#       --teacher-checkpoint runs/transformer_pair/teacher.pt --steps 1,4,16
#   vdd bench ros --student runs/transformer_pair/student.onnx \
#       --teacher-checkpoint runs/transformer_pair/teacher.pt --steps 4,16
set -euo pipefail
cd "$(dirname "$0")/.."
source "${VDD_VENV:-.venv}/bin/activate"
out="${OUT:-runs/transformer_pair}"
mkdir -p "$out"
# the student gets the teacher's transformer (same width, depth, heads): models of equal size
backbone=(--set backbone.kind=transformer --set backbone.hidden=256)
vdd train-teacher "${backbone[@]}" --iterations "${TEACHER_ITERATIONS:-3000}" --out "$out/teacher.pt" --quiet
vdd distill --teacher "$out/teacher.pt" "${backbone[@]}" --iterations "${DISTILL_ITERATIONS:-600}" \
    --set warm_start_iterations="${WARM_START_ITERATIONS:-300}" --set validation_every=100 \
    --out "$out/student.pt" --quiet
vdd export "$out/teacher.pt" --out "$out/teacher.onnx"
vdd export "$out/student.pt" --out "$out/student.onnx"
vdd eval --teacher "$out/teacher.pt" --student "$out/student.pt" --episodes "${EPISODES:-50}" --expert-episodes 0 \
    --json "$out/eval.json" --plot "$out/eval_rollouts.png" --quiet
echo "transformer pair: $out/teacher.pt, $out/student.pt (and .onnx)"
