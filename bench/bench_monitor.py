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
all measured in this one run.

With ``--frameworks`` (default: each of lightning, transformers, jax that
imports), the same 12-block residual MLP (width 256, batch 512) trains in
each framework with and without vgcore's monitor, logging the per-layer
norms at every step (``every=1``, the most expensive setting):

- Lightning: a ``Trainer`` with and without
  :class:`vgcore.lightning.GradientMonitorCallback` (AdamW);
- transformers: a ``Trainer`` (``logging_steps=1``) with and without
  :class:`vgcore.transformers.GradientMonitorCallback`;
- JAX: a jitted step (grad + ``optax.adamw``) with and without
  ``vgcore.jax.monitor()`` first in the chain.

A framework step is the time from one training step's start to the next's
(data loading, logging and the callbacks included).  The Lightning and
transformers runs alternate in rounds (a fresh Trainer each time); the JAX
variants alternate step by step.  Printed: the median step of each
variant, the ratio of medians, the median over rounds of the per-round
ratio, and the time spent inside the callback's own methods per step as a
fraction of the bare step (the most stable figure on a busy machine).
Usage::

    PYTHONPATH=. python bench/bench_monitor.py [--model transformer|mlp] [--steps 200]
        [--frameworks lightning,transformers,jax] [--rounds 6] [--framework-steps 40]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
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


# --------------------------------------------------------------------------
# Frameworks: Lightning, transformers, JAX

# Batch 512: as many rows per step as the transformer above has tokens (16 x 32).  The monitor's cost
# is one read of every gradient (about 1.3 ms for these 6.3M float32 parameters on 2 cores), so
# its share of a step shrinks as the step's compute grows: --framework-batch 128 shows a lighter
# step, where that read weighs 2-4 times as much.
FRAMEWORK_WIDTH, FRAMEWORK_BATCH, FRAMEWORK_BLOCKS = 256, 512, 12


def set_framework_batch(rows: int) -> None:
    global FRAMEWORK_BATCH
    FRAMEWORK_BATCH = rows


class Timed:
    """Wraps bound methods of an object so that the seconds spent inside them add up in ``seconds``."""

    def __init__(self, target: object, names: list[str]) -> None:
        self.seconds = 0.0
        self.add(target, names)

    def add(self, target: object, names: list[str]) -> None:
        for name in names:
            setattr(target, name, self._wrap(getattr(target, name)))

    def _wrap(self, method: Callable) -> Callable:
        @functools.wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def step_intervals(starts: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]


def summarise(label: str, runs: dict[str, list[list[float]]], inside: list[float]) -> None:
    """One line per variant: median step, ratio of medians, median per-round ratio; the in-callback share."""
    bare_all = [t for run in runs["bare"] for t in run]
    bare = statistics.median(bare_all)
    for name, rounds in runs.items():
        flat = [t for run in rounds for t in run]
        median = statistics.median(flat)
        paired = statistics.median(
            statistics.median(r) / statistics.median(b) for r, b in zip(rounds, runs["bare"], strict=True)
        )
        print(f"{label + ' ' + name:<34}{median * 1e3:>18.3f}{median / bare:>10.3f}{paired:>22.3f}")
    if inside:
        steps = sum(len(run) for run in runs["monitor"]) or 1
        share = sum(inside) / steps / bare
        print(f"{label + ' time inside the callback':<34}{sum(inside) / steps * 1e3:>18.3f}{1 + share:>10.3f}"
              f"{'(bare + in-callback)':>22}")


def lightning_runs(rounds: int, steps: int, warmup: int) -> None:
    import lightning.pytorch as pl

    from vgcore.lightning import GradientMonitorCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResidualMLP(FRAMEWORK_WIDTH, FRAMEWORK_BLOCKS)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Starts(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self.times.append(time.perf_counter())

        def on_train_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    data = torch.utils.data.TensorDataset(torch.randn(FRAMEWORK_BATCH * 8, FRAMEWORK_WIDTH))
    runs: dict[str, list[list[float]]] = {"bare": [], "monitor": []}
    inside: list[float] = []
    for r in range(rounds):
        for name in (["bare", "monitor"] if r % 2 == 0 else ["monitor", "bare"]):
            torch.manual_seed(0)
            starts = Starts()
            callbacks: list = [starts]
            if name == "monitor":
                callback = GradientMonitorCallback(every=1)
                timer = Timed(callback, ["on_before_optimizer_step", "on_train_batch_end"])
                callbacks.append(callback)
            trainer = pl.Trainer(
                max_steps=steps + warmup, accelerator="cpu", logger=pl.loggers.CSVLogger("/tmp/vgcore-bench"),
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                log_every_n_steps=1, callbacks=callbacks,
            )
            loader = torch.utils.data.DataLoader(data, batch_size=FRAMEWORK_BATCH, shuffle=True)
            trainer.fit(Module(), loader)
            runs[name].append(step_intervals(starts.times, warmup))
            if name == "monitor":
                inside.append(timer.seconds)
    summarise("lightning", runs, inside)


def transformers_runs(rounds: int, steps: int, warmup: int) -> None:
    import transformers

    from vgcore.transformers import GradientMonitorCallback

    transformers.logging.set_verbosity_error()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ResidualMLP(FRAMEWORK_WIDTH, FRAMEWORK_BLOCKS)

        def forward(self, x, labels=None):
            return {"loss": self.net(x).square().mean()}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(FRAMEWORK_BATCH * 8, FRAMEWORK_WIDTH)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, index):
            return {"x": self.x[index], "labels": 0.0}

    class Starts(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

        def on_train_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

    runs: dict[str, list[list[float]]] = {"bare": [], "monitor": []}
    inside: list[float] = []
    for r in range(rounds):
        for name in (["bare", "monitor"] if r % 2 == 0 else ["monitor", "bare"]):
            torch.manual_seed(0)
            starts = Starts()
            callbacks: list = [starts]
            if name == "monitor":
                callback = GradientMonitorCallback()
                timer = Timed(callback, ["on_step_end", "on_log", "on_epoch_end"])
                begin = callback.on_train_begin

                def on_train_begin(*args, callback=callback, timer=timer, begin=begin, **kwargs):
                    begin(*args, **kwargs)
                    # the end-of-backward measurement runs inside autograd, not in a callback method
                    timer.add(callback.monitor, ["_end_of_backward"])

                callback.on_train_begin = on_train_begin
                callbacks.append(callback)
            args = transformers.TrainingArguments(
                output_dir="/tmp/vgcore-bench", max_steps=steps + warmup,
                per_device_train_batch_size=FRAMEWORK_BATCH, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                dataloader_num_workers=0,
            )
            trainer = transformers.Trainer(
                model=Model(), args=args, train_dataset=Data(), callbacks=callbacks
            )
            trainer.remove_callback(transformers.PrinterCallback)  # a line per step otherwise
            trainer.train()
            runs[name].append(step_intervals(starts.times, warmup))
            if name == "monitor":
                inside.append(timer.seconds)
    summarise("transformers", runs, inside)


def jax_runs(steps: int, warmup: int) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from vgcore.jax import monitor

    key = jax.random.PRNGKey(0)
    params = []
    width, hidden = FRAMEWORK_WIDTH, 4 * FRAMEWORK_WIDTH
    for k in jax.random.split(key, FRAMEWORK_BLOCKS):
        k1, k2 = jax.random.split(k)
        params.append({
            "ln": jnp.ones(width),
            "w1": jax.random.normal(k1, (width, hidden)) / width**0.5,
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, width)) / hidden**0.5,
            "b2": jnp.zeros(width),
        })
    x = jax.random.normal(key, (FRAMEWORK_BATCH, FRAMEWORK_WIDTH))

    def loss(params, x):
        for block in params:
            u = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5) * block["ln"]
            x = x + jax.nn.gelu(u @ block["w1"] + block["b1"]) @ block["w2"] + block["b2"]
        return jnp.mean(jnp.square(x))

    def make(optimizer):
        @jax.jit
        def step(params, state):
            grads = jax.grad(loss)(params, x)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    variants = {
        "bare": optax.adamw(1e-4),
        "monitor": optax.chain(monitor(), optax.adamw(1e-4)),
    }
    carry = {name: (params, opt.init(params)) for name, opt in variants.items()}
    steps_fn = {name: make(opt) for name, opt in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(warmup + steps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            carry[name] = steps_fn[name](*carry[name])
            jax.block_until_ready(carry[name])
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["bare"])
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))
        print(f"{'jax ' + name:<34}{median * 1e3:>18.3f}{median / bare:>10.3f}{paired:>22.3f}")


def frameworks(selected: list[str], rounds: int, steps: int) -> None:
    print(f"\nframeworks: {FRAMEWORK_BLOCKS}-block residual MLP (width {FRAMEWORK_WIDTH}, "
          f"batch {FRAMEWORK_BATCH}), AdamW; monitor logging every step; "
          f"torch {torch.get_num_threads()} threads")
    print(f"{'variant':<34}{'median step (ms)':>18}{'ratio':>10}{'median paired ratio':>22}")
    for name in selected:
        module = {"lightning": "lightning", "transformers": "transformers", "jax": "optax"}[name]
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed, skipped")
            continue
        if name == "lightning":
            lightning_runs(rounds, steps, warmup=5)
        elif name == "transformers":
            transformers_runs(rounds, steps, warmup=5)
        else:
            jax_runs(rounds * steps, warmup=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer", choices=["transformer", "mlp"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=10, help="the second monitor's sync interval")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--frameworks", default="lightning,transformers,jax",
                        help="comma-separated frameworks to measure ('' for none)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="alternating Trainer runs per framework variant")
    parser.add_argument("--framework-steps", type=int, default=40, help="timed steps per Trainer run")
    parser.add_argument("--framework-batch", type=int, default=FRAMEWORK_BATCH,
                        help="rows per framework step")
    parser.add_argument("--skip-torch", action="store_true", help="only the frameworks")
    args = parser.parse_args()
    set_framework_batch(args.framework_batch)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not args.skip_torch:
        torch_variants(args)
    selected = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    if selected:
        frameworks(selected, args.rounds, args.framework_steps)


def torch_variants(args: argparse.Namespace) -> None:
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
