"""``python -m vgcore.bench``: the same as ``vgcore bench``."""

import sys

from vgcore.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
