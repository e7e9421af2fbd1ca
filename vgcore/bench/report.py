"""The benchmark's output: machine description, result rows with ratios, the tables, JSON.

Ratios are speed-ups, ``time(base) / time(row)``: ``vs_numpy`` > 1 means
faster than the NumPy reference; ``gemm_fraction`` is the row's flop rate
over the GEMM rate measured in the same run (``time(gemm) / time(row)``).
The JSON document is described in :mod:`vgcore.bench`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform

import numpy as np

from vgcore.bench.jobs import Job
from vgcore.bench.timing import load_average

#: The report's schema version (keys are only ever added within one version).
SCHEMA = 1
SEGMENT_LABEL = "cpu seg=auto"
#: Order of the rows of a job in the table.
ROW_ORDER = ("cpu", SEGMENT_LABEL, "cuda", "vg.sweep", "numpy", "numpy loop", "torch", "jax", "gemm")
#: Rows whose result is not compared with the reference (no result, or another problem's).
UNCOMPARED = ("gemm", "vg.sweep")
#: Head-to-head ratios the report states besides the table: (job kind, row, base row).
COMPARISONS = (("sweep", "vg.sweep", "numpy loop"), ("sweep", "vg.sweep", "jax"),
               ("sweep", "cpu", "numpy loop"), ("sweep", "cpu", "jax"))


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
    """An installed package's version, read from its metadata (without importing it) where possible."""
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:  # e.g. cupy ships as cupy-cuda12x
        pass
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as error:  # a broken install is reported, not fatal
        return f"unusable ({type(error).__name__})"


def _blas() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    found = [f"{info.get('internal_api')} {info.get('version')} ({info.get('num_threads')} threads)"
             for info in threadpool_info() if info.get("user_api") == "blas"]
    return ", ".join(found) or None


def vgcore_threads() -> int:
    """Threads the compiled kernels use (OpenMP's maximum)."""
    from vgcore.backends._threads import n_threads

    return n_threads()


def machine_info() -> dict:
    """CPU model, cores, threads and library versions, for the JSON and RESULTS.md."""
    import vgcore

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": vgcore_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": package_version("scipy"),
        "torch": package_version("torch"),
        "jax": package_version("jax"),
        "cupy": package_version("cupy"),
        "vgcore": vgcore.__version__,
        "blas": _blas(),
        "load_average": load_average(),
    }


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------

def ratio(base: float | None, value: float | None) -> float | None:
    """``base / value``, the speed-up of ``value`` over ``base``; None where either is missing or not > 0."""
    if base is None or value is None or value <= 0:
        return None
    return base / value


def result_row(job: Job, label: str, times: list[float], medians: dict[str, float], *,
               max_abs_diff: float | None, compared: list[str], detail: str) -> dict:
    """One row of the results: the label's median and its ratios to the other rows of the job."""
    median = medians.get(label)
    return {
        "job": job.name,
        "backend": label,
        "median_s": median,
        "times_s": times,
        "repeats": len(times),
        "gflops": None if median is None else job.flops / median / 1e9,
        "vs_numpy": ratio(medians.get("numpy"), median),
        "vs_torch": ratio(medians.get("torch"), median),
        "gemm_fraction": ratio(medians.get("gemm"), median),
        "max_abs_diff": max_abs_diff,
        "compared": compared,
        "detail": detail,
    }


def comparison_rows(job: Job, medians: dict[str, float]) -> list[dict]:
    """The head-to-head ratios of :data:`COMPARISONS` that the job's rows allow."""
    return [{"job": job.name, "row": row, "base": base, "ratio": ratio(medians[base], medians[row])}
            for kind, row, base in COMPARISONS if kind == job.kind and row in medians and base in medians]


def memory_row(job: Job, label: str, peak_traced: int, peak_rss: int | None) -> dict:
    stored = job.activations_bytes()
    return {
        "job": job.name,
        "backend": label,
        "activations_bytes": stored,
        "peak_traced_bytes": peak_traced,
        "traced_ratio": peak_traced / stored,
        "peak_rss_bytes": peak_rss,
        "rss_ratio": None if peak_rss is None else peak_rss / stored,
    }


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def format_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} GiB"


def _format_load(load: list[float] | None) -> str:
    return "-" if not load else "/".join(f"{value:.2f}" for value in load)


def _grid(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *lines])


def format_results(document: dict, *, markdown: bool = False) -> str:
    """The timing table: job, backend, median, ratios, GEMM fraction, GFLOP/s, repeats."""
    header = ["job", "backend", "median", "vs numpy", "vs torch", "GEMM fraction", "GFLOP/s", "repeats"]
    lines = [[row["job"], row["backend"], format_time(row["median_s"]), format_ratio(row["vs_numpy"]),
              format_ratio(row["vs_torch"]),
              "-" if row["gemm_fraction"] is None else f"{row['gemm_fraction']:.2f}",
              "-" if row["gflops"] is None else f"{row['gflops']:.3g}", str(row["repeats"])]
             for row in document["results"]]
    return _grid(header, lines, markdown)


def format_memory(document: dict, *, markdown: bool = False) -> str:
    """The memory table: peak of gradient_profile against the stored activations (L x B x n)."""
    header = ["job", "backend", "activations L*B*n", "peak (tracemalloc)", "ratio", "peak RSS growth",
              "RSS ratio"]
    lines = [[row["job"], row["backend"], format_bytes(row["activations_bytes"]),
              format_bytes(row["peak_traced_bytes"]), f"{row['traced_ratio']:.2f}",
              format_bytes(row["peak_rss_bytes"]),
              "-" if row["rss_ratio"] is None else f"{row['rss_ratio']:.2f}"]
             for row in document["memory"]]
    return _grid(header, lines, markdown)


def format_comparisons(document: dict) -> list[str]:
    """One line per job with head-to-head ratios, e.g. the sweep's vg.sweep against the NumPy loop and JAX."""
    lines = []
    medians = {(row["job"], row["backend"]): row for row in document["results"]}
    for job in dict.fromkeys(item["job"] for item in document.get("comparisons", [])):
        items = [item for item in document["comparisons"] if item["job"] == job]
        parts = [f"{item['row']} {format_time(medians[job, item['row']]['median_s'])} = "
                 f"{format_ratio(item['ratio'])} {item['base']} "
                 f"({format_time(medians[job, item['base']]['median_s'])})" for item in items]
        gemm = medians.get((job, "gemm"))
        if gemm is not None:
            rows = dict.fromkeys(item["row"] for item in items)
            fractions = [f"{row} {medians[job, row]['gemm_fraction']:.2f}" for row in rows
                         if medians[job, row]["gemm_fraction"] is not None]
            parts.append(f"fraction of the GEMM rate on the job's products (GEMM "
                         f"{format_time(gemm['median_s'])}, this run): {', '.join(fractions)}")
        lines.append(f"{job}: " + "; ".join(parts) + ".")
    return lines


def format_report(document: dict, *, markdown: bool = False) -> str:
    """The whole text report: a header line, the timing table, loads, comparisons, memory, notes."""
    machine = document["machine"]
    parts = [f"vgcore bench{' --quick' if document['quick'] else ''}: {document['date']}, "
             f"{machine['cpu']}, {machine['cores']} cores, vgcore {machine['threads']} threads; "
             f"numpy {machine['numpy']}, scipy {machine['scipy']}, torch {machine['torch'] or '-'}, "
             f"jax {machine.get('jax') or '-'}; "
             f"BLAS {machine['blas'] or '-'}; load average {_format_load(machine['load_average'])} "
             f"before, {_format_load(document.get('load_average_after'))} after",
             "", format_results(document, markdown=markdown)]
    loads = [f"{job['job']} {job['other_load']:.0%}" for job in document["jobs"]
             if job.get("other_load") is not None]
    if loads:
        parts += ["", f"Other processes' share of the cores during each job: {', '.join(loads)}."]
    comparisons = format_comparisons(document)
    if comparisons:
        parts += ["", *comparisons]
    if document["memory"]:
        parts += ["", "Peak memory of gradient_profile (warm-up run) against the stored activations:",
                  "", format_memory(document, markdown=markdown)]
    if document["notes"]:
        parts += ["", *(f"note: {note}" for note in document["notes"])]
    return "\n".join(parts)


def write_json(document: dict, path: str) -> None:
    with open(path, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")
