"""Vanilla RNN, GRU and LSTM: how far back gradients reach through time, and the RNN's edge of chaos.

Part 1 (``rnn_vs_lstm_gradients.png``).  Three cells of width 128, driven by
16 standard normal input features for T = 1,000 steps, at matched
initialisations: the same seed, recurrent gain g = sigma_w = 1 (each gate
block N(0, 1/n)), input weights N(0, 1/m), zero biases but the gated cells'
keep-gate bias forget_bias = 1 (the LSTM's forget gate f, the GRU's update
gate z; the common "forget-gate bias 1" initialisation).  For the loss
<s_T, g> the script measures ||d loss / d s_t|| through time with
:func:`vgcore.gradient_profile` (renormalised every step, so the logs stay
exact where the plain norm underflows), and plots it against the time lag
T - t relative to the norm at s_T.  The *vanishing horizon* is the lag at
which that ratio first falls below 1e-3 (:func:`vgcore.stats.vanishing_depth`);
the dashed line is mean-field theory's decay for the vanilla RNN,
(1/2) ln chi_1 per step (:func:`vgcore.theory.rnn_chi1`, with the inputs'
extra variance sigma_u^2 in the fixed point).

Part 2 (``rnn_transition_to_chaos.png``).  The autonomous tanh RNN of width
400 (no inputs, no bias): its largest Lyapunov exponent
(:func:`vgcore.lyapunov_exponents`, k = 1, 300 counted steps after 200 of
warm-up, mean of 2 initial states) against the gain g from 0.5 to 3, beside
mean-field theory's (1/2) ln chi_1(g) (:func:`vgcore.theory.rnn_lyapunov_exponent`):
negative (ordered: perturbations and gradients die out) below g = 1,
positive (chaotic) above.

About 10 seconds on 2 idle CPU cores::

    PYTHONPATH=. python examples/rnn_vs_lstm.py [--out DIR] [--steps 1000]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

import vgcore as vg

WIDTH, INPUTS, BATCH = 128, 16, 16
CELLS = ("rnn", "gru", "lstm")
THRESHOLD = 1e-3
CHAOS_WIDTH = 400
GAINS = np.round(np.linspace(0.5, 3.0, 11), 3)


def gradient_through_time(steps: int, seed: int = 0) -> dict:
    """Per cell: the mean log norm ratio to s_T per lag (steps + 1,), the horizon and chi."""
    rng = np.random.default_rng(seed + 1)
    inputs = rng.standard_normal((BATCH, steps, INPUTS))
    results = {}
    for cell in CELLS:
        model = vg.Recurrent.random(WIDTH, cell=cell, input_width=INPUTS, sigma_w=1.0, sigma_u=1.0,
                                    forget_bias=0.0 if cell == "rnn" else 1.0, seed=seed)
        s0 = np.zeros((BATCH, model.state_width))
        profile = vg.gradient_profile(model, s0, inputs=inputs)
        mean = profile.mean_log_grad_norm
        results[cell] = {
            "log_ratio": (mean - mean[-1])[::-1],  # index = lag T - t
            "horizon": vg.stats.vanishing_depth(profile, threshold=THRESHOLD),
            "chi": vg.stats.chi(profile),
            "chi_theory": profile.chi_theory,
        }
    return results


def transition_to_chaos(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Largest Lyapunov exponent per gain (measured mean over 2 states) and theory's on the same gains."""
    measured = []
    s0 = np.random.default_rng(seed + 2).standard_normal((2, CHAOS_WIDTH))
    for gain in GAINS:
        model = vg.Recurrent.random(CHAOS_WIDTH, sigma_w=float(gain), seed=seed)
        exponents = vg.lyapunov_exponents(model, s0, 1, steps=300, warmup=200)
        measured.append(float(np.mean(exponents[:, 0])))
    theory = np.array([vg.theory.rnn_lyapunov_exponent("tanh", float(g)) for g in GAINS])
    return np.array(measured), theory


def plot_gradients(results: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"rnn": "tab:red", "gru": "tab:green", "lstm": "tab:blue"}
    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    lags = np.arange(steps + 1)
    for cell, result in results.items():
        horizon = result["horizon"]
        label = f"{cell.upper()}: vanishes (< 1e-3) after {horizon} steps" if horizon is not None \
            else f"{cell.upper()}: above 1e-3 for all {steps} steps"
        axes.plot(lags, result["log_ratio"] / math.log(10), color=colours[cell], label=label)
        if horizon is not None:
            axes.axvline(horizon, color=colours[cell], linestyle=":", linewidth=1)
    chi = results["rnn"]["chi_theory"]
    axes.plot(lags, 0.5 * math.log10(chi) * lags, color="black", linestyle="--", linewidth=1,
              label=f"RNN mean-field theory, chi_1 = {chi:.3f} per step")
    axes.axhline(math.log10(THRESHOLD), color="grey", linewidth=0.8)
    low = min(r["log_ratio"].min() for r in results.values()) / math.log(10)
    axes.set_ylim(max(low, -40) - 1, 1)
    axes.set_xlim(0, steps)
    axes.set_xlabel("time lag T - t (steps)")
    axes.set_ylabel("log10 ||dL/ds_t|| / ||dL/ds_T||")
    axes.set_title(f"Gradients through time, width {WIDTH}, g = 1, forget bias 1 (gated)")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_chaos(measured: np.ndarray, theory_points: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = np.linspace(GAINS[0], GAINS[-1], 200)
    theory = [vg.theory.rnn_lyapunov_exponent("tanh", float(g)) for g in fine]
    figure, axes = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    axes.plot(fine, theory, color="black", label="mean-field theory (1/2) ln chi_1")
    axes.plot(GAINS, measured, "o", color="tab:red", label=f"measured, tanh RNN width {CHAOS_WIDTH}")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.axvline(1, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("recurrent gain g (sigma_w)")
    axes.set_ylabel("largest Lyapunov exponent (per step)")
    axes.set_title("Vanilla RNN: transition to chaos at g = 1")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="where the PNGs go")
    parser.add_argument("--steps", type=int, default=1000, help="time steps T of part 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    results = gradient_through_time(args.steps, args.seed)
    print(f"Part 1: gradient norm through T = {args.steps} steps (width {WIDTH}, {INPUTS} inputs, g = 1)")
    print(f"{'cell':6} {'horizon (1e-3)':>15} {'chi per step':>13} {'theory':>8}")
    for cell, result in results.items():
        horizon = "none" if result["horizon"] is None else str(result["horizon"])
        print(f"{cell:6} {horizon:>15} {result['chi']:>13.4f} {result['chi_theory']:>8.4f}")
    plot_gradients(results, args.steps, args.out / "rnn_vs_lstm_gradients.png")

    measured, theory = transition_to_chaos(args.seed)
    print(f"\nPart 2: largest Lyapunov exponent of the tanh RNN (width {CHAOS_WIDTH}) against g")
    print(f"{'g':>6} {'measured':>10} {'theory':>10}")
    for gain, value, expected in zip(GAINS, measured, theory, strict=True):
        print(f"{gain:>6.2f} {value:>10.4f} {expected:>10.4f}")
    plot_chaos(measured, theory, args.out / "rnn_transition_to_chaos.png")
    print(f"\nwrote {args.out / 'rnn_vs_lstm_gradients.png'} and {args.out / 'rnn_transition_to_chaos.png'}")


if __name__ == "__main__":
    main()
