#!/usr/bin/env python3
"""The paper's 2-D check as a figure: teacher vs VDD student vs EM baseline.

An 8-mode ring (std 0.5, radius 2) with an exact score is distilled into 8 experts by VDD, and
the same mixture is fitted to the teacher's samples by EM. Each panel shows the teacher's
density; the student panels add every expert's mean and 2-sigma covariance ellipse, opacity
by gating weight, plus student samples.

    PYTHONPATH=. .venv/bin/python scripts/figure_2d.py --out docs/figures/vdd_2d.png
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/vdd_2d.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of VDD, EM and the data (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=1000, help="VDD and EM iterations (default: %(default)s)")
    parser.add_argument("--demos", type=int, default=65536, help="teacher samples used as demonstrations "
                                                                 "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.demos < 1:
        parser.error(f"--iterations and --demos: expected integers >= 1, got {args.iterations}, {args.demos}")
    return args


def draw_mixture(ax, weights, means, chols, samples, title):
    from matplotlib.patches import Ellipse

    ax.scatter(samples[:, 0], samples[:, 1], s=1, c="tab:orange", alpha=0.25, label="student samples")
    alphas = 0.25 + 0.75 * weights / weights.max()
    for weight, mean, chol, alpha in zip(weights, means, chols, alphas):
        values, vectors = np.linalg.eigh(chol @ chol.T)
        angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1]))
        ax.add_patch(Ellipse(mean, 4 * np.sqrt(values[-1]), 4 * np.sqrt(values[0]), angle=angle, fill=False,
                             lw=2, color="tab:red", alpha=alpha))
        ax.plot(*mean, "x", color="tab:red", alpha=alpha, ms=8, mew=2)
        ax.annotate(f"{weight:.3f}", mean, textcoords="offset points", xytext=(6, 6), fontsize=7)
    ax.set_title(title, fontsize=10)


def main(argv=None) -> int:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from vdd_ros.files import save_figure
    from vdd_ros.learn.em import EMConfig, train_em
    from vdd_ros.learn.teacher_protocol import AnalyticTeacher
    from vdd_ros.learn.vdd import VDDConfig, distill
    from vdd_ros.tasks.gmm2d import GaussianMixture

    mixture = GaussianMixture.ring(n_modes=8, radius=2.0, std=0.5)
    teacher = AnalyticTeacher(mixture, obs_dim=1)
    rng = np.random.default_rng(args.seed)
    observations = np.zeros((args.demos, 1), np.float32)
    demos = mixture.sample(args.demos, rng).astype(np.float32)

    # the 2-D check's recipe is a named preset (the dataclass defaults are the arm task's)
    vdd = distill(teacher, observations, demos, VDDConfig.preset("gmm2d", seed=args.seed, iterations=args.iterations))
    em = train_em(observations, demos, EMConfig.preset("gmm2d", n_experts=8, seed=args.seed,
                                                       iterations=args.iterations))

    extent = 3.8
    grid = np.linspace(-extent, extent, 200)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(mixture.log_density(np.stack([xx.ravel(), yy.ravel()], 1))).reshape(xx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax in axes:
        ax.contourf(xx, yy, density, levels=20, cmap="Blues")
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
    axes[0].scatter(demos[:2000, 0], demos[:2000, 1], s=1, c="k", alpha=0.3)
    axes[0].plot(mixture.means[:, 0], mixture.means[:, 1], "o", color="navy", ms=5)
    axes[0].set_title("teacher: 8-mode ring, std 0.5 (exact score)", fontsize=10)

    obs = torch.zeros(1, 1)
    generator = torch.Generator().manual_seed(args.seed)
    for ax, model, name in ((axes[1], vdd, "VDD"), (axes[2], em, "EM on demonstrations")):
        with torch.no_grad():
            weights, means, chols = (t[0].numpy() for t in model.components(obs))
            samples = model.sample(obs.expand(2000, -1), generator=generator).numpy()
            kl = (model.log_prob(torch.as_tensor(samples), obs.expand(2000, -1)).double().numpy()
                  - mixture.log_density(samples)).mean()
        distances = np.linalg.norm(mixture.means[:, None] - means[None], axis=-1).min(1)
        draw_mixture(ax, weights, means, chols, samples,
                     f"{name}: max mode distance {distances.max():.3f}, reverse KL {kl:.4f}")
    fig.suptitle("VDD 2-D check: expert means (x), 2-sigma ellipses, opacity and label = gating weight")
    fig.tight_layout()

    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
