"""Batch normalisation makes gradients explode with depth, at a rate set by the batch size.

Yang et al. (ICLR 2019, "A mean field theory of batch normalization") show
that at initialisation a deep batch-normalised network multiplies squared
gradient norms by a fixed factor chi > 1 per layer towards the input,
whatever sigma_w, and that chi grows as the batch shrinks: (B - 2) / (B - 3)
for a linear network, pi / (pi - 1) ~ 1.47 for relu as B -> inf
(vg.theory.batchnorm_chi; the finite-B relu form is derived in
vgcore/theory/batchnorm.py).  This script measures it:

1. gradient profiles of 60-layer, width-512 stacks with norm="batch" (linear
   and relu, sigma_w sqrt 2) at batch sizes 4 .. 256, the per-layer growth
   fitted over the middle layers (vg.stats.chi on the mean log-norm curve)
   beside the theory;
2. the same relu networks with a residual branch (x' = x + BN-layer(x)) and
   with layer norm instead (norm="post"; and "pre" with a residual branch,
   the transformer's arrangement), for contrast;
3. what clipping the total weight-gradient norm at 1.0 would do
   (vg.stats.global_norm, vg.stats.clip_coefficient; the loss is the batch
   mean of <x_L[b], u_b> with unit u_b, as a training loss would average):
   one factor for every layer, so the total is capped but the first layers'
   gradients stay as many times larger than the last layers' as before.

It prints the tables and writes three PNGs (gradient norms through depth,
growth against batch size, clipping).  About 20-40 s on 2 cores::

    PYTHONPATH=. python examples/batchnorm_explosion.py [--width 512] [--depth 60] [--out .]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import vgcore as vg

BATCHES = (4, 8, 16, 32, 64, 128, 256)
CONTRAST_BATCHES = (4, 32, 256)
#: The contrasts: relu stacks with a residual branch, or layer norm instead of batch norm.
CONTRASTS = (("BN + residual", {"residual": 1.0}), ("layer norm (post)", {"norm": "post"}),
             ("pre-LN + residual", {"norm": "pre", "residual": 1.0}))


def profile(depth: int, width: int, batch: int, activation: str, *, residual=None, norm="batch",
            mean_loss: bool = False, seed: int = 0) -> vg.Profile:
    """The gradient profile of one random stack (sigma_w sqrt 2, sigma_b 0.05) at batch size B."""
    stack = vg.Stack.random(depth, width, activation=activation, sigma_w=math.sqrt(2.0), sigma_b=0.05,
                            residual=residual, norm=norm, seed=seed)
    x = vg.random_inputs(stack, batch, seed=seed + 1)
    g = np.random.default_rng(seed + 2).standard_normal((batch, width))
    if mean_loss:  # loss = mean_b <x_L[b], u_b>, u_b unit vectors
        g = g / np.linalg.norm(g, axis=1, keepdims=True) / batch
    return vg.gradient_profile(stack, x, g)


def growth(result: vg.Profile, depth: int) -> float:
    """Per-layer ratio of squared gradient norms, fitted over the middle 60 % of the layers.

    The first layers above the input and below the output are transients (the
    forward statistics settle, the gradient turns into its growing direction).
    """
    curve = result.log_grad_norm.mean(axis=0)
    return float(vg.stats.chi(curve[depth // 5: depth - depth // 5 + 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("."), help="directory of the PNGs")
    args = parser.parse_args()
    depth, width = args.depth, args.width
    started = time.perf_counter()

    # 1-2: growth per layer against batch size
    rows, curves = [], {}
    for batch in BATCHES:
        row = {"B": batch}
        for activation in ("linear", "relu"):
            result = profile(depth, width, batch, activation)
            row[activation] = growth(result, depth)
            row[f"{activation} theory"] = vg.theory.batchnorm_chi(activation, batch)
            if activation == "relu":
                curves["BN", batch] = result.log_grad_norm.mean(axis=0)
        if batch in CONTRAST_BATCHES:
            for label, options in CONTRASTS:
                result = profile(depth, width, batch, "relu", **options)
                row[label] = growth(result, depth)
                curves[label, batch] = result.log_grad_norm.mean(axis=0)
        rows.append(row)

    print(f"Per-layer growth of squared gradient norms towards the input (chi), width {width}, "
          f"depth {depth}, sigma_w sqrt 2; measured over layers {depth // 5}..{depth - depth // 5}, "
          "theory: vg.theory.batchnorm_chi")
    header = ["B", "linear", "linear theory", "relu", "relu theory", "BN + residual", "layer norm (post)",
              "pre-LN + residual"]
    print("  ".join(f"{name:>17}" for name in header))
    for row in rows:
        print("  ".join(f"{row[name]:>17.4f}" if name in row and name != "B" else
                        (f"{row['B']:>17d}" if name == "B" else f"{'':>17}") for name in header))
    print(f"large-batch limit: linear {vg.theory.batchnorm_chi('linear', math.inf):.4f}, relu "
          f"{vg.theory.batchnorm_chi('relu', math.inf):.4f} (pi / (pi - 1))")

    # 3: clipping at 1.0
    print("\nClipping the total weight-gradient norm at 1.0 "
          "(loss: batch mean of <x_L[b], u_b>, relu, norm='batch')")
    print(f"{'B':>5} {'total norm':>12} {'clip coeff':>12} {'first layer':>12} {'last layer':>12} "
          f"{'first/last':>12} {'first, clipped':>15} {'last, clipped':>14}")
    clipped_profiles = {}
    for batch in CONTRAST_BATCHES:
        result = profile(depth, width, batch, "relu", mean_loss=True)
        coefficient = float(vg.stats.clip_coefficient(result, 1.0))
        layer_norms = np.exp(result.log_weight_grad_norm)
        clipped_profiles[batch] = (layer_norms, coefficient)
        print(f"{batch:>5} {math.exp(vg.stats.global_norm(result)):>12.3e} {coefficient:>12.3e} "
              f"{layer_norms[0]:>12.3e} {layer_norms[-1]:>12.3e} {layer_norms[0] / layer_norms[-1]:>12.3e} "
              f"{coefficient * layer_norms[0]:>15.3e} {coefficient * layer_norms[-1]:>14.3e}")
    print("Clipping multiplies every layer by the same coefficient: the total is capped at 1, the first "
          "layer stays first/last times the last one, and the last layers' updates shrink with it.")

    _plots(args.out, depth, width, rows, curves, clipped_profiles)
    print(f"\nwrote {args.out / 'batchnorm_explosion_depth.png'}, ..._growth.png, ..._clipping.png "
          f"in {time.perf_counter() - started:.1f} s")


def _plots(out: Path, depth: int, width: int, rows: list[dict], curves: dict, clipped: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    layers = np.arange(depth + 1)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(BATCHES)))

    figure, axis = plt.subplots(figsize=(8, 5))
    for colour, batch in zip(colours, BATCHES, strict=True):
        curve = curves["BN", batch] / math.log(10)
        axis.plot(layers, curve - curve[-1], color=colour, label=f"BN, B = {batch}")
        chi = vg.theory.batchnorm_chi("relu", batch)
        axis.plot(layers, (depth - layers) * 0.5 * math.log10(chi), color=colour, linestyle=":", linewidth=1)
    for style, (label, _) in zip(("--", "-.", (0, (1, 1))), CONTRASTS, strict=True):
        curve = curves[label, 32] / math.log(10)
        axis.plot(layers, curve - curve[-1], color="tab:red", linestyle=style, label=f"{label}, B = 32")
    axis.set_xlabel("layer l (0 = input)")
    axis.set_ylabel("log10 ||dL/dx_l|| - log10 ||dL/dx_L||  (mean over samples)")
    axis.set_title(f"relu stacks, width {width}: batch norm explodes gradients towards the input\n"
                   "(dotted: theory's slope, 0.5 log10 chi per layer)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "batchnorm_explosion_depth.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    fine = np.unique(np.geomspace(4, 512, 200).round().astype(int))
    batches = [row["B"] for row in rows]
    for activation, colour in (("linear", "tab:blue"), ("relu", "tab:orange")):
        axis.plot(fine, [vg.theory.batchnorm_chi(activation, b) for b in fine], color=colour,
                  label=f"{activation}: theory")
        axis.plot(batches, [row[activation] for row in rows], "o", color=colour,
                  label=f"{activation}: measured")
        axis.axhline(vg.theory.batchnorm_chi(activation, math.inf), color=colour, linestyle=":", linewidth=1)
    for marker, (label, _) in zip("s^v", CONTRASTS, strict=True):
        points = [(row["B"], row[label]) for row in rows if label in row]
        axis.plot(*zip(*points, strict=True), marker, color="tab:red", label=f"relu {label}", markersize=5)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size B")
    axis.set_ylabel("chi: per-layer growth of ||dL/dx||^2")
    axis.set_title("Gradient explosion rate against batch size (dotted: B -> inf)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "batchnorm_explosion_growth.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for colour, (batch, (norms, coefficient)) in zip(("tab:purple", "tab:green", "tab:olive"),
                                                     clipped.items(), strict=True):
        index = np.arange(1, depth + 1)
        axis.semilogy(index, norms, color=colour, label=f"B = {batch}: before clipping")
        axis.semilogy(index, coefficient * norms, color=colour, linestyle="--",
                      label=f"B = {batch}: clipped at 1.0 (x {coefficient:.1e})")
    axis.set_xlabel("layer")
    axis.set_ylabel("||dL/dW_l||_F")
    axis.set_title("Clipping the total norm rescales every layer alike:\n"
                   "the slope through depth is unchanged")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "batchnorm_explosion_clipping.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
