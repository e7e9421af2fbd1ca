"""The recurrent jobs of docs/ARCHITECTURE.md, ratios measured in one run: ``lstm`` and ``rnn_lyapunov``.

lstm: gradient_profile through time of an LSTM, T 1000, n 256, B 32, sigma_w 1,
forget_bias 1, float64, autonomous.  Timed: vgcore's compiled CPU backend
(every step kept, and segment="auto"), the NumPy reference (one run: it is
slow), PyTorch CPU autograd computing the same per-step state-gradient norms
(an nn.LSTMCell loop with retain_grad on every state, vgcore.bench.peers),
and the machine's GEMM rate on the job's products: per step one forward
(B, n) x (n, 4n) and one backward (B, 4n) x (4n, n) product, NumPy with
BLAS on every core.  Peak memory of the two vgcore modes (tracemalloc: the
NumPy workspaces the backend allocates; the kernels' per-thread scratch is
a few rows).

rnn_lyapunov: 32 Lyapunov exponents of a tanh RNN, g = 2, n 512, B 1,
T 2000 after 500 warm-up steps.  Timed: vgcore's CPU backend against a plain
NumPy / SciPy QR-iteration loop (h <- tanh(W h + b); Q <- qr(diag(1 - h^2) W Q)).

Runs are interleaved (A B A B ...) and medians reported, so that a busy
machine slows every contestant alike::

    PYTHONPATH=. python bench/bench_recurrent.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np
import scipy.linalg

import vgcore as vg


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _interleaved(contestants: dict, repeats: int) -> dict:
    """Median seconds per contestant, runs interleaved; a contestant given as (fn, 1) runs once."""
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, (function, limit) in contestants.items():
            if len(times[name]) < limit:
                times[name].append(_time(function))
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_traced(function) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    function()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def lstm_job(steps: int, width: int, batch: int, repeats: int, torch_peer: bool) -> None:
    model = vg.Recurrent.random(width, cell="lstm", sigma_w=1.0, forget_bias=1.0, seed=0)
    rng = np.random.default_rng(1)
    s0 = rng.standard_normal((batch, model.state_width))
    g = rng.standard_normal((batch, model.state_width))
    weight = np.asarray(model.weight_hh)
    h, gates = rng.standard_normal((batch, width)), rng.standard_normal((batch, 4 * width))

    def products():
        for _ in range(steps):
            h @ weight.T
            gates @ weight

    contestants = {
        "vgcore cpu": (lambda: vg.gradient_profile(model, s0, g, steps=steps, backend="cpu"), repeats),
        "vgcore cpu segment=auto": (lambda: vg.gradient_profile(model, s0, g, steps=steps, backend="cpu",
                                                                segment="auto"), repeats),
        "GEMM (job's products)": (products, repeats),
        "NumPy reference": (lambda: vg.gradient_profile(model, s0, g, steps=steps, backend="numpy"), 1),
    }
    if torch_peer:
        try:
            import torch

            from vgcore.bench.peers import torch_lstm_cell, torch_lstm_profile

            cell = torch_lstm_cell(model)
            s0_t, g_t = torch.from_numpy(s0), torch.from_numpy(g)
            contestants["PyTorch autograd (LSTMCell loop)"] = (
                lambda: torch_lstm_profile(cell, s0_t, g_t, steps), repeats)
        except ImportError as error:
            print(f"PyTorch peer skipped: {error}")
    medians = _interleaved(contestants, repeats)
    ours = medians["vgcore cpu"]
    flops = 2 * 2 * batch * width * 4 * width * steps
    print(f"\nlstm: T {steps}, n {width}, B {batch}, sigma_w 1, forget_bias 1, float64")
    print(f"{'':34} {'seconds':>9} {'vgcore cpu is x faster':>23}")
    for name, seconds in medians.items():
        print(f"{name:34} {seconds:9.3f} {seconds / ours:23.2f}")
    gemm = medians["GEMM (job's products)"]
    print(f"GEMM rate on the job's products: {flops / gemm / 1e9:.1f} GFLOP/s; vgcore cpu runs at "
          f"{gemm / ours:.0%} of it")
    for label, segment in (("every step kept", None), ("segment='auto'", "auto")):
        peak = _peak_traced(lambda s=segment: vg.gradient_profile(model, s0, g, steps=steps, backend="cpu",
                                                                  segment=s))
        print(f"peak memory (tracemalloc), {label}: {peak / 2**20:.1f} MiB")


def numpy_qr_lyapunov(weight, bias, s0, k: int, steps: int, warmup: int) -> np.ndarray:
    """The plain NumPy / SciPy loop: Lyapunov exponents (k,) of h' = tanh(W h + b), one sample."""
    h = s0.copy()
    q = np.eye(len(h), k)
    log_growth = np.zeros(k)
    for step in range(warmup + steps):
        h = np.tanh(weight @ h + bias)
        q, r = scipy.linalg.qr((1.0 - h * h)[:, None] * (weight @ q), mode="economic", check_finite=False)
        if step >= warmup:
            log_growth += np.log(np.abs(np.diag(r)))
    return np.sort(log_growth / steps)[::-1]


def rnn_lyapunov_job(steps: int, warmup: int, width: int, k: int, repeats: int) -> None:
    model = vg.Recurrent.random(width, sigma_w=2.0, seed=0)
    s0 = np.random.default_rng(1).standard_normal((1, width))
    weight = np.asarray(model.weight_hh)
    bias = np.asarray(model.bias_hh) + np.asarray(model.bias_ih)
    results = {}

    def ours():
        results["vgcore"] = vg.lyapunov_exponents(model, s0, k, steps=steps, warmup=warmup, backend="cpu")

    def plain():
        results["numpy"] = numpy_qr_lyapunov(weight, bias, s0[0], k, steps, warmup)

    medians = _interleaved({"vgcore cpu": (ours, repeats), "NumPy/SciPy QR loop": (plain, repeats)}, repeats)
    print(f"\nrnn_lyapunov: tanh RNN g = 2, n {width}, B 1, {k} exponents, T {steps} + {warmup} warm-up")
    for name, seconds in medians.items():
        print(f"{name:34} {seconds:9.3f} {seconds / medians['vgcore cpu']:23.2f}")
    gap = np.abs(results["vgcore"][0] - results["numpy"]).max()
    print(f"largest exponent {results['vgcore'][0, 0]:.5f} (theory {model.lyapunov_theory:.5f}); "
          f"max |vgcore - numpy loop| over the {k} exponents: {gap:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--jobs", default="lstm,rnn_lyapunov")
    parser.add_argument("--threads", type=int, default=None,
                        help="hold BLAS, OpenMP and PyTorch to N threads, every contestant (default: all); "
                             "on a machine busy with other work, 1 keeps spinning thread pools from "
                             "distorting the ratios")
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    limits = nullcontext() if args.threads is None else threadpool_limits(limits=args.threads)
    if args.threads is not None:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
        print(f"every contestant held to {args.threads} thread(s)")
    with limits:
        if "lstm" in jobs:
            lstm_job(*((50, 32, 8) if args.quick else (1000, 256, 32)), args.repeats, not args.no_torch)
        if "rnn_lyapunov" in jobs:
            rnn_lyapunov_job(*((50, 10, 64, 8) if args.quick else (2000, 500, 512, 32)), args.repeats)


if __name__ == "__main__":
    main()
