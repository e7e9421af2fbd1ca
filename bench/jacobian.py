"""Canonical job `jacobian` (docs/ARCHITECTURE.md): vgcore against the NumPy reference, PyTorch and GEMM.

A thin wrapper of `vgcore bench --jobs jacobian`; any other flag of it passes
through (--json FILE, --backend, --repeats N, --quick, ...)::

    PYTHONPATH=. python bench/jacobian.py [--json FILE]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["--jobs", "jacobian", *sys.argv[1:]]))
