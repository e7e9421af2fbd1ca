"""All the canonical jobs (docs/ARCHITECTURE.md), as ``vgcore bench``; flags pass through::

    PYTHONPATH=. python bench/run_all.py [--json FILE] [--markdown]
"""

import sys

from vgcore.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
