"""2-D checks with more experts than modes (issue 11): the table of test/test_vdd_2d.py's coverage checks.

Cases (``vdd_ros.tasks.gmm2d``): five modes / 8 experts, six modes / 10 experts (weights 0.35-0.05, stds
0.2-0.45, uneven placement) and the five modes moved and re-weighted by a scalar state (8 experts, checked at
s = -0.5, 0, 0.5). Criteria per seed (``gmm2d.mode_coverage``, worst over the checked states): every mode's
experts within 0.15 of its mean carry its weight within 0.04 ("weight error"); no expert with more than 0.02
weight sits farther than 0.3 from every mode ("stray"). Prints mean and worst over the seeds and how many pass.

    .venv/bin/python scripts/check_2d_coverage.py                       # 10 seeds, the tests' configs
    .venv/bin/python scripts/check_2d_coverage.py --set merge_fractions=[]   # without the merge step
"""
import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import yaml

from vdd_ros.learn.vdd import COVERAGE_CASES, coverage_check

WEIGHT_TOLERANCE, STRAY_WEIGHT = 0.04, 0.02


def run_case(name: str, seed: int, changes: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    case = COVERAGE_CASES[name]
    return coverage_check(case.teacher(), case.config(seed, **changes), case.eval_observations,
                          observation_sampler=case.observation_sampler)


def table(results: dict) -> str:
    lines = ["| case | weight error mean / worst (seeds <= 0.04) | stray mean / worst (seeds <= 0.02) | "
             "seeds passing both | wall per seed |", "|---|---|---|---|---|"]
    for name, reports in results.items():
        errors = np.array([r["weight_error"] for r in reports])
        strays = np.array([r["stray"] for r in reports])
        both = int(((errors <= WEIGHT_TOLERANCE) & (strays <= STRAY_WEIGHT)).sum())
        lines.append(f"| {name} | {errors.mean():.3f} / {errors.max():.3f} ({int((errors <= WEIGHT_TOLERANCE).sum())}"
                     f"/{len(reports)}) | {strays.mean():.3f} / {strays.max():.3f} "
                     f"({int((strays <= STRAY_WEIGHT).sum())}/{len(reports)}) | {both}/{len(reports)} | "
                     f"{np.mean([r['wall_time_s'] for r in reports]):.1f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per case")
    parser.add_argument("--cases", nargs="+", default=list(COVERAGE_CASES), choices=list(COVERAGE_CASES))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="VDDConfig fields changed on top of each case's config (YAML values)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    changes = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set: expected FIELD=VALUE, got {item!r}")
        changes[field] = yaml.safe_load(value)
    jobs = [(name, seed) for name in args.cases for seed in range(args.seeds)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = list(pool.map(run_case, *zip(*jobs), [changes] * len(jobs)))
    results = {name: [r for (case, _), r in zip(jobs, reports) if case == name] for name in args.cases}
    for name, case_reports in results.items():
        for r in case_reports:
            merged = [(g["experts"], g["nll_change"], g["merged"]) for m in r["merged"] for g in m["groups"]]
            print(f"{name} seed {r['seed']}: weight error {r['weight_error']:.3f}, stray {r['stray']:.3f}, "
                  f"merged {merged}, dead {r['dead_experts']}")
    print(f"\nchanges: {changes or 'none'}; wall {time.perf_counter() - started:.0f} s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
