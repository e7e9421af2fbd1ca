"""A sweep into a store, run as a subprocess by the kill test of tests/test_store.py.

    python tests/_sweep_child.py STORE [--stall-write]

--stall-write makes the first Parquet part it writes stop half way: the
first half of the file's bytes reach the temporary file (flushed), then the
process sleeps, so the parent can SIGKILL it in the middle of a write.
"""

from __future__ import annotations

import io
import sys
import time

#: The sweep of the kill test: 2 x 3 x 2 configs x 2 seeds = 24 rows, 12 chunks of 2.
GRID = {"depth": [12, 24], "width": 16, "sigma_w": [0.8, 1.2, 1.6], "sigma_b": [0.0, 0.3]}
SEEDS = 2
BATCH = 6
CHUNK_SIZE = 2
BACKEND = "numpy"  # quick for tiny stacks, and the store does not depend on the backend


def _stall_writes() -> None:
    from vgcore import _store

    write_atomic = _store.write_atomic

    def stalled(directory, name, write):
        def half(handle):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            print("stalled", flush=True)
            time.sleep(600)

        return write_atomic(directory, name, half)

    _store.write_atomic = stalled


def main(argv: list[str]) -> int:
    if "--stall-write" in argv:
        _stall_writes()
    from vgcore.sweep import sweep

    sweep(GRID, batch=BATCH, seeds=SEEDS, store=argv[0], chunk_size=CHUNK_SIZE, progress=False,
          backend=BACKEND)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
