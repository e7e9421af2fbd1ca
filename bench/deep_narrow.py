"""Canonical job `deep_narrow` (docs/ARCHITECTURE.md): vgcore against the NumPy reference, PyTorch and GEMM.

A thin wrapper of `vgcore bench --jobs deep_narrow`; any other flag of it passes
through (--json FILE, --backend, --repeats N, --quick, ...)::

    PYTHONPATH=. python bench/deep_narrow.py [--json FILE]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["--jobs", "deep_narrow", *sys.argv[1:]]))
