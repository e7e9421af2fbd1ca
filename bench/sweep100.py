"""Canonical job `sweep100` (docs/ARCHITECTURE.md): vgcore against the NumPy reference, PyTorch and GEMM.

A thin wrapper of `vgcore bench --jobs sweep100`; any other flag of it passes
through (--json FILE, --backend, --repeats N, --quick, ...)::

    PYTHONPATH=. python bench/sweep100.py [--json FILE]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["--jobs", "sweep100", *sys.argv[1:]]))
