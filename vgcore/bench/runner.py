"""The run: which rows each job gets, timing them, the document; and the ``vgcore bench`` command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vgcore.bench import peers, report
from vgcore.bench.jobs import (
    JOBS,
    QUICK_JOBS,
    Job,
    backend_refusal,
    cuda_runner,
    make_problem,
    missing_feature,
    segment_supported,
    sweep_runner,
    vgcore_runner,
)
from vgcore.bench.report import SEGMENT_LABEL
from vgcore.bench.timing import (
    BUSY_FRACTION,
    OtherLoad,
    load_average,
    medians,
    reset_peak_rss,
    threads_limited,
    time_backends,
)

#: vgcore's backends the run can time ("numpy" is the reference the ratios use).
BACKENDS = ("cpu", "numpy", "cuda")


def cuda_status() -> tuple[bool, str]:
    """(whether the "cuda" backend can run here, why not)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device"
    except Exception as error:
        return False, f"no usable CUDA device ({type(error).__name__}: {error})"
    if importlib.util.find_spec("vgcore.backends.cuda_stack") is None:
        return False, "vgcore was built without its CuPy backend (vgcore.backends.cuda_stack)"
    return True, ""


@dataclass
class Options:
    jobs: Sequence[str] = tuple(JOBS)
    backend: str = "all"
    quick: bool = False
    torch: bool = True
    jax: bool = True
    gemm: bool = True
    memory: bool = True
    budget_s: float = 6.0
    min_repeats: int = 2
    max_repeats: int = 30
    repeats: int | None = None
    threads: int | None = None
    log: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class JobResult:
    """One job's rows for the document."""

    results: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    skipped: str | None = None


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def runners_for(job: Job, problem, options: Options, notes: list[str]) -> tuple[dict, dict]:
    """The job's runners by row label, with a detail string each; skipped rows get a note saying why."""
    threads = report.vgcore_threads()
    runners: dict[str, Callable[[], Any]] = {}
    details: dict[str, str] = {}
    # a job on a new model kind (recurrent, batch norm) may lack an implementation on some backend
    probe = job.recurrent or job.norm is not None

    def add_vgcore(label: str, backend: str, detail: str, **call: Any) -> None:
        refusal = backend_refusal(job, backend, **call) if probe else None
        if refusal is not None:
            _note(notes, f"{job.name}: {label}: skipped, {refusal}")
            return
        runners[label] = vgcore_runner(problem, backend, **call)
        details[label] = detail

    wanted = BACKENDS if options.backend == "all" else (options.backend,)
    if "cpu" in wanted:
        detail = f"{threads} OpenMP threads"
        if job.kind == "sweep":
            detail += ", the backend's gradient_profiles on all configs (the sweep's chunk runner)"
        add_vgcore("cpu", "cpu", detail)
        if job.kind == "sweep":
            sweep = sweep_runner(problem)
            if sweep is not None:
                runners["vg.sweep"] = sweep
                details["vg.sweep"] = "vgcore.sweep end to end, cpu, with models, statistics and frame"
            else:
                _note(notes, f"{job.name}: vg.sweep: skipped, vgcore has no sweep here")
        if job.kind == "profile" and not job.recurrent:
            if segment_supported():
                add_vgcore(SEGMENT_LABEL, "cpu", "segment='auto': activations kept every S layers, "
                           "recomputed", segment="auto")
            else:
                _note(notes, f"{job.name}: {SEGMENT_LABEL}: skipped, gradient_profile takes no segment here")
    if "cuda" in wanted:
        available, why = cuda_status()
        if available:
            runners["cuda"] = cuda_runner(problem)
            details["cuda"] = "CuPy backend, synchronised"
        else:
            _note(notes, f"cuda: skipped, {why}")
    if "numpy" in wanted:
        add_vgcore("numpy", "numpy", "vgcore reference, backend='numpy'")
        if job.kind == "sweep":
            runners["numpy loop"] = peers.numpy_loop_runner(problem)
            details["numpy loop"] = "plain NumPy forward/backward loop over the configs' pre-drawn weights"
    for name, wanted_peer, status, make in (("torch", options.torch, peers.torch_status,
                                             lambda: peers.torch_runner(problem, threads)),
                                            ("jax", options.jax, peers.jax_status,
                                             lambda: peers.jax_runner(problem))):
        if not wanted_peer:
            continue
        available, why = status()
        if not available:
            _note(notes, f"{name}: skipped, {why}")
            continue
        try:
            runners[name], details[name] = make()
        except peers.NoPeer as reason:
            _note(notes, f"{job.name}: {name}: skipped, {reason}")
    if options.gemm:
        gemm = peers.GemmBaseline(job, threads)
        runners["gemm"] = gemm
        details["gemm"] = gemm.detail
    return runners, details


def run_job(job: Job, options: Options, notes: list[str]) -> JobResult:
    """Time one job on the selected backends and peers."""
    missing = missing_feature(job)
    if missing is not None:
        _note(notes, f"{job.name}: skipped, {missing}")
        options.log(f"{job.name}: skipped, {missing}")
        return JobResult(skipped=missing)
    problem = make_problem(job)
    runners, details = runners_for(job, problem, options, notes)
    memory_of = [label for label in ("cpu", SEGMENT_LABEL, "numpy")
                 if options.memory and job.kind in ("profile", "sweep") and label in runners]
    if memory_of:
        # first calls import modules and fill caches: keep that out of the traced warm-up
        small = make_problem(QUICK_JOBS[job.name])
        for label in memory_of:
            if label == SEGMENT_LABEL:
                vgcore_runner(small, "cpu", segment="auto")()
            else:
                vgcore_runner(small, label)()
    options.log(f"{job.name}: L {job.depth}, n {job.width}, B {job.batch}, {job.what}: {', '.join(runners)}")
    times, results, memory = time_backends(
        runners, budget_s=options.budget_s, min_repeats=options.min_repeats,
        max_repeats=options.max_repeats, repeats=options.repeats, memory_of=memory_of, log=options.log)

    timed_medians = medians(times)
    reference = peers.comparable(results.get("numpy"))
    outcome = JobResult()
    for label in sorted(runners, key=report.ROW_ORDER.index):
        result = None if label in report.UNCOMPARED else peers.comparable(results[label])
        outcome.results.append(report.result_row(
            job, label, times[label], timed_medians, max_abs_diff=peers.max_abs_diff(result, reference),
            compared=peers.compared_fields(result, reference), detail=details.get(label, "")))
    outcome.memory = [report.memory_row(job, label, peak_traced, peak_rss)
                      for label, (peak_traced, peak_rss) in memory.items()]
    outcome.comparisons = report.comparison_rows(job, timed_medians)
    return outcome


@contextlib.contextmanager
def _torch_threads_restored():
    """PyTorch's thread count as it was (the torch rows set it), for callers in the same process."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if before is None and peers.TORCH_THREADS_AT_IMPORT:
            before = peers.TORCH_THREADS_AT_IMPORT[0]
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def _jax_float64(enabled: bool):
    """JAX's 64-bit mode for the run (the peers compute in float64), put back afterwards."""
    if not enabled or not peers.jax_available():
        return contextlib.nullcontext()
    import jax

    return jax.enable_x64(True)


def run(options: Options) -> dict:
    """All selected jobs; the JSON document described in :mod:`vgcore.bench`."""
    table = QUICK_JOBS if options.quick else JOBS
    notes: list[str] = []
    if options.backend not in (*BACKENDS, "all"):
        raise ValueError(f"backend: expected one of {(*BACKENDS, 'all')}, got {options.backend!r}")
    unknown = [name for name in options.jobs if name not in table]
    if unknown:
        raise ValueError(f"jobs: unknown job(s) {unknown}; expected some of {list(table)}")
    if options.backend == "cuda":
        available, why = cuda_status()
        if not available:
            notes.append(f"cuda: skipped, {why}")
    document = {
        "schema": report.SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": options.quick,
        "machine": report.machine_info(),
        "jobs": [],
        "results": [],
        "comparisons": [],
        "memory": [],
        "notes": notes,
    }
    if options.memory and sys.platform.startswith("linux") and not reset_peak_rss():
        notes.append("memory: peak RSS not measurable here (/proc/self/clear_refs)")
    with threads_limited(options.threads), _torch_threads_restored(), _jax_float64(options.jax):
        document["machine"]["threads"] = report.vgcore_threads()
        for name in options.jobs:
            job = table[name]
            entry = {"job": job.name, "what": job.what, "depth": job.depth, "width": job.width,
                     "batch": job.batch, "configs": job.configs, "flops": job.flops}
            document["jobs"].append(entry)
            with OtherLoad() as other_load:
                outcome = run_job(job, options, notes)
            entry["other_load"] = other_load.fraction
            entry["skipped"] = outcome.skipped
            document["results"] += outcome.results
            document["comparisons"] += outcome.comparisons
            document["memory"] += outcome.memory
    document["load_average_after"] = load_average()
    busy = [f"{job['job']} {job['other_load']:.0%}" for job in document["jobs"]
            if job["other_load"] is not None and job["other_load"] > BUSY_FRACTION and not job["skipped"]]
    if busy:
        notes.append(f"machine busy: other processes took {', '.join(busy)} of the cores during these "
                     "jobs; multi-threaded rows (OpenMP, BLAS, PyTorch) slow down far more than "
                     "single-threaded ones under load: compare runs made on a quiet machine")
    return document


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _job_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of jobs")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgcore bench",
        description="Time the canonical jobs on vgcore's backends, the NumPy reference, PyTorch and JAX "
                    "(where installed) and plain GEMM; print a table of medians and ratios.")
    parser.add_argument("--jobs", type=_job_list, default=list(JOBS),
                        help=f"comma-separated jobs (default: all of {','.join(JOBS)})")
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all",
                        help="vgcore backend(s) to time; 'numpy' is the reference the ratios use "
                             "(default: all available)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats (a smoke test)")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch")
    parser.add_argument("--no-jax", dest="jax", action="store_false", help="skip JAX")
    parser.add_argument("--no-gemm", dest="gemm", action="store_false", help="skip the GEMM baseline")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time for the timed rounds of one job (default 6; --quick 0.2)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed runs per backend, instead of the budget's count")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="hold vgcore's OpenMP threads, BLAS and PyTorch to N threads (default: all; "
                             "JAX keeps XLA's own pool)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``vgcore bench``: run, print the table, write JSON; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    table = QUICK_JOBS if args.quick else JOBS
    unknown = [name for name in args.jobs if name not in table]
    if unknown:
        parser.error(f"--jobs: unknown job(s) {', '.join(unknown)}; expected some of {', '.join(table)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats: expected a count >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: expected a count >= 1")
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 6.0)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    options = Options(jobs=args.jobs, backend=args.backend, quick=args.quick, torch=args.torch, jax=args.jax,
                      gemm=args.gemm, memory=args.memory, budget_s=budget,
                      min_repeats=1 if args.quick else 2, max_repeats=3 if args.quick else 30,
                      repeats=args.repeats, threads=args.threads, log=log)
    document = run(options)
    print(report.format_report(document, markdown=args.markdown))
    if args.json:
        report.write_json(document, args.json)
    return 0
