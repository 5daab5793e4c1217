"""2-D check with more experts than modes (issue 11, not yet met, so not in the test suite).

Five modes with unequal weights (0.35-0.05) and widths (0.2-0.45), uneven placement, 8 experts, the gmm2d
preset, 10 seeds (two worker processes, about 150 s on 2 cores). Criteria: the experts within 0.15 of a mode
carry its weight within 0.04, and no expert with more than 0.02 weight sits farther than 0.3 from every mode.
Measured: docs/results.md.   .venv/bin/python scripts/check_2d_coverage.py
"""
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from vdd_ros.learn.teacher_protocol import AnalyticTeacher
from vdd_ros.learn.vdd import VDDConfig, distill
from vdd_ros.tasks.gmm2d import GaussianMixture

FIVE_MODES = GaussianMixture(np.array([[-2.0, 1.5], [1.8, 2.0], [0.3, -0.2], [2.2, -1.8], [-1.5, -2.2]]),
                             np.array([0.45, 0.3, 0.2, 0.35, 0.25]), np.array([0.35, 0.25, 0.2, 0.15, 0.05]))
NEAR, FAR, WEIGHT_TOLERANCE, STRAY_WEIGHT = 0.15, 0.3, 0.04, 0.02


def mode_coverage(teacher: AnalyticTeacher, model, eval_observations) -> tuple[float, float]:
    """``(weight error, stray weight)``, worst over the observation rows: the largest gap between a mode's
    weight and the summed weights of the experts within NEAR of its mean, and the largest weight of an
    expert farther than FAR from every mode."""
    obs = torch.as_tensor(eval_observations, dtype=torch.float32)
    with torch.no_grad():
        weights, means = model.weights_and_means(obs)
    modes = teacher.means(obs)
    weight_error, stray = 0.0, 0.0
    for row in range(obs.shape[0]):
        distances = torch.cdist(modes[row], means[row].to(torch.float64))  # [K, Z]
        near = (distances < NEAR).to(torch.float64) @ weights[row].to(torch.float64)
        weight_error = max(weight_error, float((near - teacher._weights).abs().max()))
        far = distances.min(0).values > FAR
        stray = max(stray, float(weights[row][far].max()) if bool(far.any()) else 0.0)
    return weight_error, stray


def coverage_run(teacher, n_experts: int, seed: int, eval_observations):
    config = VDDConfig.preset("gmm2d", n_experts=n_experts, seed=seed)
    obs = np.zeros((65536, teacher.obs_dim), np.float32)
    actions = teacher.sample(torch.as_tensor(obs), generator=torch.Generator().manual_seed(seed + 54321)).numpy()
    model = distill(teacher, obs, actions, config, progress=False)
    return (seed, *mode_coverage(teacher, model, eval_observations))


def run_coverage(jobs):
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(coverage_run, *zip(*jobs)))


def coverage_summary(results) -> str:
    errors, strays = np.array([r[1] for r in results]), np.array([r[2] for r in results])
    return (f"weight error mean {errors.mean():.3f} worst {errors.max():.3f} (within {WEIGHT_TOLERANCE}: "
            f"{int((errors <= WEIGHT_TOLERANCE).sum())}/{len(results)} seeds); stray weight mean {strays.mean():.3f} "
            f"worst {strays.max():.3f}")


def main() -> int:
    """Weights 0.35-0.05, stds 0.2-0.45, uneven placement, 8 experts, 10 seeds: no expert with more than
    0.02 weight farther than 0.3 from every mode. The weight-sum criterion (experts within 0.15 of a mode
    carry its weight within 0.04) is measured and printed, not asserted: it held in 8 of 10 seeds (in
    seeds 5 and 6 a wide mode's weight sits on experts 0.15-0.3 from its mean; docs/results.md, issue 11)."""
    teacher = AnalyticTeacher(FIVE_MODES, obs_dim=1)
    results = run_coverage([(teacher, 8, seed, np.zeros((1, 1))) for seed in range(10)])
    print("\n" + coverage_summary(results))
    for seed, error, stray in results:
        print(f"seed {seed}: weight error {error:.3f}, stray weight {stray:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
