"""The ``vgcore`` command: sweep, plot, info, bench.

    vgcore sweep --depth 50 --width 64 --sigma-w 0.5:3:26 --sigma-b 0:0.5:11 --out STORE
    vgcore plot STORE --kind phase -o phase.png
    vgcore info
    vgcore bench [bench options]

Grid flags take one value, a comma-separated list (``1,2,3``) or a range
``start:stop:count`` (``count`` evenly spaced values from ``start`` to
``stop`` inclusive, as numpy.linspace), and lists of ranges
(``0.5:1:3,2``).  ``none`` means no residual branch / no layer norm.

Bad flags print one line ``vgcore <command>: error: ...`` on stderr and exit
with status 2; ``main`` returns the exit status instead of exiting.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

PROG = "vgcore"
#: Most values one range ``start:stop:count`` may give (a sweep takes at most 10 million rows).
MAX_RANGE_COUNT = 1_000_000


class _UsageError(Exception):
    """A bad command line: one line on stderr, status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit; we want one line
        raise _UsageError(f"{self.prog}: error: {message}")


# --------------------------------------------------------------------------
# Value parsing


def _round(value: float) -> float:
    """linspace's values rounded to 12 significant digits: 0.6, not 0.6000000000000001."""
    return float(f"{value:.12g}")


def parse_values(text: str, kind: str) -> list:
    """A flag's value as a list: ``a``, ``a,b,c``, ``start:stop:count`` and lists of those.

    kind: "int", "float", "float_or_name" (sigma_w: also xavier, lecun, he,
    critical), "float_or_none" (residual), "str", "str_or_none" (norm).
    """
    values: list = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in {text!r}")
        if ":" in item and kind not in ("str", "str_or_none"):
            values.extend(_parse_range(item, kind))
        else:
            values.append(_parse_one(item, kind))
    return values


def _parse_range(item: str, kind: str) -> list:
    parts = item.split(":")
    if len(parts) != 3:
        raise ValueError(f"range {item!r}: expected start:stop:count")
    try:
        start, stop = float(parts[0]), float(parts[1])
        count = int(parts[2])
    except ValueError:
        raise ValueError(f"range {item!r}: expected numbers start:stop and an integer count") from None
    if count < 1:
        raise ValueError(f"range {item!r}: count must be >= 1")
    if count > MAX_RANGE_COUNT:
        raise ValueError(f"range {item!r}: count must be <= {MAX_RANGE_COUNT:,}")
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ValueError(f"range {item!r}: start and stop must be finite")
    import numpy as np

    points = [_round(v) for v in np.linspace(start, stop, count)]
    if kind == "int":
        if any(p != round(p) for p in points):
            raise ValueError(f"range {item!r}: does not give whole numbers")
        return [round(p) for p in points]
    return points


def _parse_one(item: str, kind: str) -> Any:
    lowered = item.lower()
    if kind in ("float_or_none", "str_or_none") and lowered in ("none", "null", "off"):
        return None
    if kind in ("str", "str_or_none"):
        return item
    if kind == "float_or_name" and item.isalpha():
        return lowered
    try:
        if kind == "int":
            return int(item)
        return float(item)
    except ValueError:
        expected = {"int": "an integer", "float_or_name": "a number or a scheme name",
                    "float_or_none": "a number or none"}.get(kind, "a number")
        raise ValueError(f"{item!r} is not {expected}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = text.lower().split("x")
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in pixels, e.g. 1200x900, got {text!r}") from None


#: flag -> (grid key, value kind, help)
GRID_FLAGS = {
    "--depth": ("depth", "int", "layers L, e.g. 50 or 10,20,50 or 10:100:10 (required)"),
    "--width": ("width", "int", "units n per layer, e.g. 64 or 32,64,128 (required)"),
    "--activation": ("activation", "str", "activation(s), e.g. tanh,relu (default tanh)"),
    "--init": ("init", "str", "gaussian, orthogonal, uniform (default gaussian)"),
    "--sigma-w": ("sigma_w", "float_or_name",
                  "weight scale(s), e.g. 0.5:3:26, or xavier, lecun, he, critical (default 1)"),
    "--sigma-b": ("sigma_b", "float", "bias scale(s), e.g. 0:0.5:11 (default 0)"),
    "--residual": ("residual", "float_or_none", "branch scale(s) or none, e.g. none,1 (default none)"),
    "--norm": ("norm", "str_or_none", "none, pre or post (layer norm), batch (batch norm) (default none)"),
    "--dtype": ("dtype", "str", "float64, float32 (default float64)"),
    "--cell": ("cell", "str", "dense, rnn, lstm, gru (default dense; recurrent: --depth is the steps T, "
                              "--sigma-w the gain)"),
    "--forget-bias": ("forget_bias", "float", "lstm forget / gru update gate bias(es) (default 0)"),
    "--sigma-u": ("sigma_u", "float", "recurrent input weight scale(s) (default 1)"),
    "--input-width": ("input_width", "int", "recurrent input features m, 0 = autonomous (default 0)"),
}


# --------------------------------------------------------------------------
# The parser


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="vgcore: measure vanishing and exploding gradients, fast.")
    commands = parser.add_subparsers(dest="command", metavar="{sweep,plot,info,bench}", parser_class=_Parser)
    commands.required = True

    sweep = commands.add_parser("sweep", help="a sweep over a grid of stacks into a Parquet store",
                                description="Gradient profiles over the Cartesian grid of the flags' values. "
                                            "Each grid flag takes a value, a list 1,2,3 or a range "
                                            "start:stop:count (count values, both ends included).")
    for flag, (key, _, text) in GRID_FLAGS.items():
        sweep.add_argument(flag, dest=key, metavar="VALUES", help=text)
    sweep.add_argument("--batch", type=int, default=32, help="samples per profile (default 32)")
    sweep.add_argument("--seeds", default="1", metavar="N|LIST",
                       help="a count n (seeds 0..n-1) or a list of seeds a,b,c (default 1)")
    sweep.add_argument("--out", metavar="STORE",
                       help="store directory (Parquet parts); without it the rows are printed as CSV")
    sweep.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="skip configs already in the store (default); --no-resume recomputes them")
    sweep.add_argument("--scheduler", metavar="ADDRESS", help="run chunks on this dask scheduler")
    sweep.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy", "cuda"])
    sweep.add_argument("--chunk-size", type=int, metavar="ROWS", help="rows per chunk (default: automatic)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")

    plot = commands.add_parser("plot", help="a PNG of a store: flow, phase or spectrum",
                               description="Draw a figure of a sweep store as a PNG of an exact pixel size.")
    plot.add_argument("store", metavar="STORE")
    plot.add_argument("--kind", required=True, choices=["flow", "phase", "spectrum", "time", "chaos"])
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png")
    plot.add_argument("--size", type=_size, metavar="WxH", help="pixels, e.g. 1200x900 (the default)")
    plot.add_argument("--width-px", type=int, metavar="W")
    plot.add_argument("--height-px", type=int, metavar="H")
    plot.add_argument("--dpi", type=float, default=150.0)
    plot.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                      help="keep rows with KEY == VALUE (repeatable), e.g. --where activation=tanh")

    commands.add_parser("info", help="version, build (OpenMP, BLAS), GPU and CuPy",
                        description="What this vgcore install can do.")
    commands.add_parser("bench", help="benchmark the canonical jobs on every backend (vgcore.bench)",
                        add_help=False)
    return parser


# --------------------------------------------------------------------------
# Commands


def _grid(arguments: argparse.Namespace) -> dict:
    grid = {}
    for flag, (key, kind, _) in GRID_FLAGS.items():
        text = getattr(arguments, key)
        if text is None:
            if key in ("depth", "width"):
                raise _UsageError(f"{PROG} sweep: error: the following argument is required: {flag}")
            continue
        try:
            grid[key] = parse_values(text, kind)
        except ValueError as error:
            raise _UsageError(f"{PROG} sweep: error: argument {flag}: {error}") from None
    return grid


def _seeds(text: str):
    try:
        values = parse_values(text, "int")
    except ValueError as error:
        raise _UsageError(f"{PROG} sweep: error: argument --seeds: {error}") from None
    return values[0] if len(values) == 1 and "," not in text and ":" not in text else values


#: The leading name of a sweep() error message -> the flag that set it.
_SWEEP_FLAGS = {"store": "--out", "client": "--scheduler", "batch": "--batch", "seeds": "--seeds",
                "chunk_size": "--chunk-size", "backend": "--backend", "resume": "--resume",
                **{f"grid[{key!r}]": flag for flag, (key, _, _) in GRID_FLAGS.items()}}


def _sweep_error(error: BaseException) -> _UsageError:
    """One line for a refused sweep, naming the flag behind the argument that sweep() named."""
    text = _one_line(error)
    if text.startswith("store"):  # "store: ..." or "store '/path': ..."
        return _UsageError(f"{PROG} sweep: error: argument --out: {text}")
    names = [name.strip() for name in text.split(":", 1)[0].split(",")]
    flags = [_SWEEP_FLAGS[name] for name in names if name in _SWEEP_FLAGS]
    prefix = f"argument {'/'.join(flags)}: " if flags else ""
    return _UsageError(f"{PROG} sweep: error: {prefix}{text}")


def _sweep(arguments: argparse.Namespace) -> int:
    from vgcore.sweep import COLUMNS, sweep

    grid = _grid(arguments)
    seeds = _seeds(arguments.seeds)
    if arguments.out is not None and not arguments.out.strip():
        raise _UsageError(f"{PROG} sweep: error: argument --out: expected a directory, got an empty path")
    try:
        result = sweep(grid, batch=arguments.batch, seeds=seeds, backend=arguments.backend,
                       store=arguments.out, resume=arguments.resume, progress=not arguments.no_progress,
                       client=arguments.scheduler, chunk_size=arguments.chunk_size)
    except ValueError as error:
        raise _sweep_error(error) from None
    except OSError as error:  # the file system refused something the store did not foresee
        where = error.filename or arguments.out
        raise _UsageError(f"{PROG} sweep: error: {where!r}: {error.strerror or _one_line(error)}") from None
    except MemoryError:
        raise _UsageError(f"{PROG} sweep: error: out of memory; use a smaller --batch, --depth, --width "
                          "or --chunk-size") from None
    rate = result.computed / result.seconds if result.seconds > 0 else math.inf
    print(f"{PROG} sweep: {len(result)} rows ({result.computed} computed now, "  # len: no pandas needed
          f"{len(result) - result.computed} from the store) in {result.seconds:.1f} s, "
          f"{rate:.1f} configs/s" + (f" -> {arguments.out}" if arguments.out else ""), file=sys.stderr)
    if arguments.out is None:
        columns = [c for c in COLUMNS if c != "log_grad_norm"]
        result.frame[columns].to_csv(sys.stdout, index=False)
    return 0


def _plot(arguments: argparse.Namespace) -> int:
    from vgcore import plot
    from vgcore.sweep import load

    width, height = arguments.size or plot.DEFAULT_SIZE
    if arguments.size is not None and (arguments.width_px is not None or arguments.height_px is not None):
        raise _UsageError(f"{PROG} plot: error: give --size or --width-px/--height-px, not both")
    width = arguments.width_px if arguments.width_px is not None else width
    height = arguments.height_px if arguments.height_px is not None else height
    where = {}
    for item in arguments.where:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise _UsageError(f"{PROG} plot: error: argument --where: expected KEY=VALUE, got {item!r}")
        if key.strip() in where:
            raise _UsageError(f"{PROG} plot: error: argument --where: {key.strip()!r} is given twice "
                              f"({where[key.strip()]!r} and {value.strip()!r}); a row has one value per key")
        where[key.strip()] = value.strip()
    if not arguments.output.strip():
        raise _UsageError(f"{PROG} plot: error: argument -o: expected a file name, got an empty path")
    if os.path.isdir(arguments.output):
        raise _UsageError(f"{PROG} plot: error: argument -o: {arguments.output!r} is a directory; "
                          "give a file name such as phase.png")
    directory = os.path.dirname(os.path.abspath(arguments.output))
    if not os.path.isdir(directory):
        raise _UsageError(f"{PROG} plot: error: argument -o: directory {directory!r} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"{PROG} plot: error: matplotlib is not installed; pip install 'vgcore[plot]'", file=sys.stderr)
        return 1
    try:
        result = load(arguments.store)
        plot.save(result, arguments.output, arguments.kind, width_px=width, height_px=height,
                  dpi=arguments.dpi, where=where)
    except ValueError as error:
        raise _UsageError(f"{PROG} plot: error: {_one_line(error)}") from None
    except OSError as error:  # writing the PNG: no permission, a full disk, ...
        where_failed = error.filename or arguments.output
        raise _UsageError(f"{PROG} plot: error: argument -o: {where_failed!r}: "
                          f"{error.strerror or _one_line(error)}") from None
    print(f"{PROG} plot: wrote {arguments.output} ({width}x{height} px, {arguments.kind}, "
          f"{len(result.frame)} rows)", file=sys.stderr)
    return 0


def info_lines() -> list[str]:
    """What ``vgcore info`` prints: version, build, BLAS, GPU."""
    import platform

    import numpy as np

    import vgcore

    lines = [f"vgcore {vgcore.__version__} (Python {platform.python_version()}, NumPy {np.__version__}, "
             f"{platform.system()} {platform.machine()})"]
    try:
        from vgcore._ext import _kernels
        from vgcore.backends import _threads

        openmp = "yes" if _kernels.has_openmp() else "no (built without OpenMP: kernels run on one thread)"
        omp_num_threads = os.environ.get("OMP_NUM_THREADS", "unset")
        lines.append(f"compiled kernels: yes; OpenMP: {openmp}; threads: {_threads.n_threads()} "
                     f"(cores: {os.cpu_count()}; OMP_NUM_THREADS={omp_num_threads})")
    except ImportError as error:
        lines.append(f"compiled kernels: no ({error}); build with: python setup.py build_ext --inplace")
    try:
        from threadpoolctl import threadpool_info

        blas = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
        for pool in blas:
            lines.append(f"BLAS: {pool.get('internal_api')} {pool.get('version')}, "
                         f"{pool.get('num_threads')} threads ({pool.get('filepath')})")
        if not blas:
            lines.append("BLAS: none loaded (threadpoolctl finds no BLAS library)")
    except ImportError as error:
        lines.append(f"BLAS: unknown ({error})")
    lines.append(_gpu_line())
    return lines


def _gpu_line() -> str:
    try:
        import cupy
    except ImportError as error:
        return f"GPU: not available: CuPy is not installed ({error}); pip install cupy-cuda12x"
    except Exception as error:  # a broken CuPy install raises many kinds of error
        return f"GPU: not available: CuPy fails to import ({type(error).__name__}: {_one_line(error)})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDA driver / runtime missing
        return f"GPU: not available: CuPy {cupy.__version__} finds no CUDA device ({_one_line(error)})"
    if count < 1:
        return f"GPU: not available: CuPy {cupy.__version__} finds no CUDA device"
    names = []
    for index in range(count):
        properties = cupy.cuda.runtime.getDeviceProperties(index)
        name = properties.get("name", b"?")
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    try:
        from vgcore.backends import cuda_stack  # noqa: F401

        backend = "vgcore cuda backend: yes"
    except ImportError as error:
        backend = f"vgcore cuda backend: no ({_one_line(error)})"
    return f"GPU: {count} device(s): {', '.join(names)}; CuPy {cupy.__version__}; {backend}"


def _info(arguments: argparse.Namespace) -> int:
    for line in info_lines():
        print(line)
    return 0


def _bench(argv: Sequence[str]) -> int:
    try:
        # import_module, not `from vgcore import bench`: it goes through sys.modules
        _bench = importlib.import_module("vgcore.bench")
    except ImportError as error:
        print(f"{PROG} bench: error: the benchmark module is not available ({_one_line(error)})",
              file=sys.stderr)
        return 2
    return int(_bench.main(list(argv)) or 0)


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vgcore`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after "bench" belongs to the benchmark's own parser
        return _bench(argv[1:])
    try:
        arguments = _parser().parse_args(argv)
        return {"sweep": _sweep, "plot": _plot, "info": _info}[arguments.command](arguments)
    except _UsageError as error:
        print(_one_line(error), file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
