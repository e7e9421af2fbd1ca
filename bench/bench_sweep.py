"""The sweep engine's jobs: the README's main job and phase10k, in configs/s, wall time and peak memory.

    PYTHONPATH=. python bench/bench_sweep.py [--jobs readme,phase10k,cli] [--threads N] [--json FILE]

- ``readme``: the README's main job in process, ``vg.sweep`` of tanh, depth 50, width 64,
  sigma_w 0.5..3 (26) x sigma_b 0..0.5 (11), batch 16, into a store: configs/s of
  the sweep (median of 3 runs after a warm-up in the same process).
- ``cli``: the same job as the README's command line, ``vgcore sweep ... --out STORE``,
  in a fresh process: wall time start-up included (median of 3).
- ``phase10k``: docs/ARCHITECTURE.md's phase10k (10,000 configs: sigma_w 0.5..3 x sigma_b 0..0.5,
  100 x 100, depth 50, width 64, batch 16, into a store) in a fresh process: wall
  time, configs/s, and the process's peak resident memory (VmHWM).

Each row also reports the machine's load: the other processes' share of the cores
while it ran (from /proc/stat minus this benchmark's CPU time), since the figures
are only comparable on an idle machine.  Sweep100's ratios (against the NumPy loop,
JAX and the GEMM rate) are in ``vgcore bench --jobs sweep100``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

README_FLAGS = ["--activation", "tanh", "--depth", "50", "--width", "64", "--sigma-w", "0.5:3:26",
                "--sigma-b", "0:0.5:11", "--batch", "16"]

CHILD = r"""
import json, os, resource, sys, time
started = time.perf_counter()
import numpy as np
from vgcore.sweep import sweep
grid = {"depth": 50, "width": 64, "activation": "tanh",
        "sigma_w": [float(f"{v:.12g}") for v in np.linspace(0.5, 3, 100)],
        "sigma_b": [float(f"{v:.12g}") for v in np.linspace(0, 0.5, 100)]}
result = sweep(grid, batch=16, store=sys.argv[1], progress=False)
wall = time.perf_counter() - started
peak = 0
with open("/proc/self/status") as handle:
    for line in handle:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
print(json.dumps({"rows": len(result), "sweep_seconds": result.seconds, "wall_seconds": wall,
                  "peak_rss_bytes": peak}))
"""


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class _Load:
    """Other processes' share of the cores during a block (its own CPU time and children's removed)."""

    def __enter__(self):
        self.ticks = _cpu_ticks()
        self.own = os.times()
        return self

    def __exit__(self, *exc):
        busy, total = _cpu_ticks()
        own = os.times()
        hz = os.sysconf("SC_CLK_TCK")
        mine = ((own.user - self.own.user) + (own.system - self.own.system)
                + (own.children_user - self.own.children_user)
                + (own.children_system - self.own.children_system)) * hz
        spent = max(total - self.ticks[1], 1)
        self.others = max(0.0, (busy - self.ticks[0] - mine) / spent)


def _environment(threads: int | None) -> dict:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), environment.get("PYTHONPATH", "")])
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


def readme(threads: int | None) -> dict:
    import numpy as np

    from vgcore.sweep import sweep

    grid = {"depth": 50, "width": 64, "activation": "tanh",
            "sigma_w": [float(f"{v:.12g}") for v in np.linspace(0.5, 3, 26)],
            "sigma_b": [float(f"{v:.12g}") for v in np.linspace(0, 0.5, 11)]}
    rates = []
    with tempfile.TemporaryDirectory() as directory, _Load() as load:
        sweep(grid, batch=16, progress=False)  # warm-up: imports, theory tables, BLAS
        for run in range(3):
            result = sweep(grid, batch=16, store=os.path.join(directory, f"s{run}"), progress=False)
            rates.append(len(result) / result.seconds)
    return {"job": "readme", "configs": len(result), "configs_per_s": statistics.median(rates),
            "runs": rates, "others_share": load.others}


def cli(threads: int | None) -> dict:
    walls = []
    with tempfile.TemporaryDirectory() as directory, _Load() as load:
        for run in range(3):
            command = [sys.executable, "-m", "vgcore", "sweep", *README_FLAGS, "--out",
                       os.path.join(directory, f"s{run}"), "--no-progress"]
            started = time.perf_counter()
            done = subprocess.run(command, env=_environment(threads), capture_output=True, text=True,
                                  cwd=directory, check=True)
            walls.append(time.perf_counter() - started)
    return {"job": "cli", "wall_seconds": statistics.median(walls), "runs": walls,
            "last_line": done.stderr.strip().splitlines()[-1], "others_share": load.others}


def phase10k(threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as directory, _Load() as load:
        done = subprocess.run([sys.executable, "-c", CHILD, os.path.join(directory, "store")],
                              env=_environment(threads), capture_output=True, text=True, cwd=directory,
                              check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures.update(job="phase10k", configs_per_s=figures["rows"] / figures["sweep_seconds"],
                   others_share=load.others)
    return figures


JOBS = {"readme": readme, "cli": cli, "phase10k": phase10k}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated: " + ", ".join(JOBS))
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: all)")
    parser.add_argument("--json", metavar="FILE")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(arguments.threads, user_api="openmp")
    results = []
    for name in arguments.jobs.split(","):
        result = JOBS[name](arguments.threads)
        results.append(result)
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in result.items() if k != "runs"}
        print(json.dumps(shown), flush=True)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
