"""Cost of :class:`vgcore.torch.GradientMonitor` per training step, on CPU.

A 12-block model (an ``nn.TransformerEncoder`` by default, or a 12-block
residual MLP with ``--model mlp``) trains with AdamW on random data.  Each
variant trains its own copy of the model, and the variants take turns step
by step (in rotating order), so that load from other processes on a shared
machine falls on all of them alike:

- ``bare``: forward, backward, ``optimizer.step()``, ``zero_grad()``;
- ``monitor every=1`` / ``monitor every=N``: the same with a GradientMonitor
  (``monitor.step()`` after ``optimizer.step()``);
- ``per-parameter .norm()``: the usual way, a loop over the parameters
  calling ``p.grad.norm().item()`` after the backward pass, summed per block.

Prints the median time of a step per variant, its ratio to ``bare``, and
the median over rounds of the paired ratio (variant / bare within one round),
all measured in this one run.  Usage::

    PYTHONPATH=. python bench/bench_monitor.py [--model transformer|mlp] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from vgcore.torch import GradientMonitor, resolve_layers


class ResidualMLP(nn.Module):
    """``blocks`` pre-norm residual blocks ``x + W2 gelu(W1 LN(x))`` in an ``nn.ModuleList``."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def make_model(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "transformer":
        layer = nn.TransformerEncoderLayer(
            d_model=128, nhead=4, dim_feedforward=512, dropout=0.0, batch_first=True
        )
        model = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
        data = torch.randn(16, 32, 128)
    elif kind == "mlp":
        model = ResidualMLP(width=256, blocks=12)
        data = torch.randn(128, 256)
    else:
        raise ValueError(f"--model: expected transformer or mlp, got {kind!r}")
    return model, data


def make_variant(name: str, kind: str, every: int) -> Callable[[], None]:
    model, data = make_model(kind, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    blocks = resolve_layers(model)
    monitor = GradientMonitor(model, every=every) if name.startswith("monitor") else None
    usual = name.startswith("per-parameter")
    sink: list[list[float]] = []

    def train_step() -> None:
        loss = model(data).square().mean()
        loss.backward()
        if usual:
            # the forum snippet: one norm (and one host sync) per parameter, then per block
            norms = {id(p): p.grad.norm().item() for p in model.parameters() if p.grad is not None}
            sink.append([sum(norms.get(id(p), 0.0) ** 2 for p in ps) ** 0.5 for ps in blocks.values()])
        optimizer.step()
        if monitor is not None:
            monitor.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer", choices=["transformer", "mlp"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=10, help="the second monitor's sync interval")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    names = ["bare", "monitor every=1", f"monitor every={args.every}", "per-parameter .norm()"]
    steps = {name: make_variant(name, args.model, 1 if name.endswith("=1") else args.every) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)

    model, _ = make_model(args.model, seed=0)
    n_params = sum(1 for _ in model.parameters())
    print(
        f"model: {args.model}, 12 blocks, {n_params} parameter tensors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.steps} steps per variant, interleaved"
    )
    bare = statistics.median(times["bare"])
    # paired: each round runs every variant once, back to back; the median of the per-round
    # ratios is less sensitive to load that comes and goes than the ratio of the medians
    print(f"{'variant':<24}{'median step (ms)':>18}{'ratio of medians':>18}{'median paired ratio':>21}")
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))
        print(f"{name:<24}{median * 1e3:>18.3f}{median / bare:>18.3f}{paired:>21.3f}")


if __name__ == "__main__":
    main()
