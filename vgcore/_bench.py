"""Moved to :mod:`vgcore.bench`; ``python -m vgcore._bench`` still runs ``vgcore bench``."""
from vgcore.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
