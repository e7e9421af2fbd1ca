"""Measured chi against mean-field theory's chi_1 (issue 4's acceptance table).

tanh, sigma_b = 0.05, width 1000, depth 50, sigma_w from 0.5 to 3.  Inputs
start at the variance fixed point q* (so the measurement sees no transient),
and chi is the least-squares per-layer ratio of squared gradient norms
(vgcore.stats.chi) over a batch of 16 samples.  Prints a table and the
largest relative gap |chi - chi_1| / chi_1.

    python bench/chi_agreement.py [--width 1000] [--depth 50] [--points 11]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import vgcore as vg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--sigma-b", type=float, default=0.05)
    arguments = parser.parse_args()
    print(f"tanh, sigma_b {arguments.sigma_b}, width {arguments.width}, depth {arguments.depth}, "
          f"batch {arguments.batch}")
    print(f"{'sigma_w':>8} {'q*':>9} {'chi_1':>9} {'chi':>9} {'rel gap':>8} {'r2':>6}")
    gaps = []
    for sigma_w in np.linspace(0.5, 3.0, arguments.points):
        stack = vg.Stack.random(arguments.depth, arguments.width, activation="tanh", sigma_w=sigma_w,
                                sigma_b=arguments.sigma_b, seed=0)
        q_star = vg.theory.fixed_point("tanh", sigma_w, arguments.sigma_b)
        # x_0 with squared length n q*: its first layer's pre-activations already have variance q*
        x = vg.random_inputs(stack, arguments.batch, seed=1, scale=math.sqrt(max(q_star, 1e-12)))
        summary = vg.stats.summary(vg.gradient_profile(stack, x))
        gap = abs(summary["chi"] - summary["chi_theory"]) / summary["chi_theory"]
        gaps.append(gap)
        print(f"{sigma_w:8.3f} {q_star:9.4f} {summary['chi_theory']:9.4f} {summary['chi']:9.4f} "
              f"{gap:8.2%} {summary['r2']:6.3f}")
    print(f"largest relative gap: {max(gaps):.2%}")


if __name__ == "__main__":
    main()
