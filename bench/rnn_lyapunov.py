"""Canonical job `rnn_lyapunov` (docs/ARCHITECTURE.md): vgcore against the NumPy reference, PyTorch and GEMM.

A thin wrapper of `vgcore bench --jobs rnn_lyapunov`; any other flag of it passes
through (--json FILE, --backend, --repeats N, --quick, ...)::

    PYTHONPATH=. python bench/rnn_lyapunov.py [--json FILE]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(["--jobs", "rnn_lyapunov", *sys.argv[1:]]))
