"""Canonical job `lstm` (docs/ARCHITECTURE.md): vgcore against the NumPy reference, PyTorch and GEMM.

A thin wrapper of `vgcore bench --jobs lstm`; any other flag of it passes
through (--json FILE, --backend, --repeats N, --quick, ...)::

    PYTHONPATH=. python bench/lstm.py [--json FILE]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["--jobs", "lstm", *sys.argv[1:]]))
