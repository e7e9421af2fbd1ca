"""Tests of the benchmark runner (vgcore.bench) on tiny sizes.

What is checked: every job has each of its rows or a printed reason why not;
the reported ratios, rates and medians are what the reported times give;
every row computes what the NumPy reference computes; the flop counts agree
with PyTorch's own count of the matrix products of the same computation; a
missing peer, feature or backend implementation is skipped with its reason.
No timed assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_environment

import vgcore as vg
from vgcore import bench
from vgcore.bench import jobs, peers, timing

TOP_KEYS = {"schema", "date", "quick", "machine", "jobs", "results", "comparisons", "memory", "notes",
            "load_average_after"}
MACHINE_KEYS = {"cpu", "cores", "threads", "platform", "python", "numpy", "scipy", "torch", "jax", "cupy",
                "vgcore", "blas", "load_average"}
JOB_KEYS = {"job", "what", "depth", "width", "batch", "configs", "flops", "other_load", "skipped"}
RESULT_KEYS = {"job", "backend", "median_s", "times_s", "repeats", "gflops", "vs_numpy", "vs_torch",
               "gemm_fraction", "max_abs_diff", "compared", "detail"}
MEMORY_KEYS = {"job", "backend", "activations_bytes", "peak_traced_bytes", "traced_ratio", "peak_rss_bytes",
               "rss_ratio"}
QUICK_ARGS = ["--quick", "--quiet"]


def quick_run(tmp_path, *argv: str) -> dict:
    path = tmp_path / "bench.json"
    assert bench.main([*QUICK_ARGS, "--repeats", "1", *argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick_document(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main([*QUICK_ARGS, "--repeats", "2", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def rows_of(document: dict, job: str) -> dict[str, dict]:
    return {row["backend"]: row for row in document["results"] if row["job"] == job}


def expected_rows(job: jobs.Job) -> set[str]:
    """The rows a full run owes each job (the ones that cannot run must be explained in a note)."""
    rows = {"cpu", "cuda", "numpy", "torch", "jax", "gemm"}
    if job.kind == "sweep":
        rows |= {"vg.sweep", "numpy loop"}
    if job.kind == "profile" and not job.recurrent:
        rows.add(bench.SEGMENT_LABEL)
    return rows


def test_json_has_the_documented_keys(quick_document):
    assert set(quick_document) == TOP_KEYS
    assert quick_document["schema"] == 1 and quick_document["quick"] is True
    assert set(quick_document["machine"]) == MACHINE_KEYS
    assert [job["job"] for job in quick_document["jobs"]] == list(bench.JOBS)
    for job in quick_document["jobs"]:
        assert set(job) == JOB_KEYS
        assert job["flops"] == bench.QUICK_JOBS[job["job"]].flops
    for row in quick_document["results"]:
        assert set(row) == RESULT_KEYS
    for row in quick_document["memory"]:
        assert set(row) == MEMORY_KEYS


def test_every_job_has_each_row_or_a_reason(quick_document):
    notes = quick_document["notes"]
    for entry in quick_document["jobs"]:
        name = entry["job"]
        rows = rows_of(quick_document, name)
        if entry["skipped"] is not None:
            assert rows == {}, name
            assert f"{name}: skipped, {entry['skipped']}" in notes
            continue
        assert {"numpy", "gemm"} <= set(rows), name
        assert set(rows) <= expected_rows(bench.QUICK_JOBS[name]), name
        for label in expected_rows(bench.QUICK_JOBS[name]) - set(rows):
            explained = [note for note in notes
                         if note.startswith((f"{name}: {label}: skipped, ", f"{label}: skipped, "))]
            assert explained, f"{name}: row {label!r} missing without a note"
    # the features that exist here are run, not skipped
    skipped = {entry["job"]: entry["skipped"] for entry in quick_document["jobs"]}
    for name in ("deep_narrow", "medium", "wide", "sweep100", "jacobian"):
        assert skipped[name] is None
    if hasattr(vg, "Recurrent"):
        assert skipped["lstm"] is None and skipped["rnn_lyapunov"] is None


def test_peers_run_where_they_import(quick_document):
    for name in ("deep_narrow", "medium", "wide", "sweep100", "jacobian"):
        rows = rows_of(quick_document, name)
        assert ("torch" in rows) == bench.torch_available(), name
        assert ("jax" in rows) == bench.jax_available(), name
        assert "cpu" in rows
    for name in ("lstm", "rnn_lyapunov"):
        if rows_of(quick_document, name):
            assert ("torch" in rows_of(quick_document, name)) == bench.torch_available(), name


def test_reported_figures_are_those_of_the_reported_times(quick_document):
    flops = {job["job"]: job["flops"] for job in quick_document["jobs"]}
    for name in flops:
        rows = rows_of(quick_document, name)
        for row in rows.values():
            assert row["repeats"] == 2 == len(row["times_s"])
            assert all(t > 0 for t in row["times_s"])
            assert row["median_s"] == statistics.median(row["times_s"])
            assert math.isclose(row["gflops"], flops[name] / row["median_s"] / 1e9, rel_tol=1e-12)
            for key, base in (("vs_numpy", "numpy"), ("vs_torch", "torch"), ("gemm_fraction", "gemm")):
                if base in rows:
                    assert math.isclose(row[key], rows[base]["median_s"] / row["median_s"], rel_tol=1e-12)
                else:
                    assert row[key] is None
    for item in quick_document["comparisons"]:
        rows = rows_of(quick_document, item["job"])
        assert math.isclose(item["ratio"], rows[item["base"]]["median_s"] / rows[item["row"]]["median_s"],
                            rel_tol=1e-12)


def test_sweep_is_compared_with_a_numpy_loop_jax_and_gemm(quick_document):
    pairs = {(item["row"], item["base"]) for item in quick_document["comparisons"]
             if item["job"] == "sweep100"}
    assert {("vg.sweep", "numpy loop"), ("cpu", "numpy loop")} <= pairs
    assert (("vg.sweep", "jax") in pairs) == bench.jax_available()
    assert rows_of(quick_document, "sweep100")["vg.sweep"]["gemm_fraction"] is not None
    assert "sweep100: vg.sweep " in bench.format_report(quick_document)


def test_rows_compute_what_the_reference_computes(quick_document):
    for row in quick_document["results"]:
        if row["backend"] in ("gemm", "vg.sweep"):
            assert row["compared"] == [] and row["max_abs_diff"] is None
            continue
        job = bench.QUICK_JOBS[row["job"]]
        if job.kind in ("jacobian", "lyapunov"):
            expected = ["value"]
        elif row["backend"] == "torch" and job.model == "lstm":
            expected = ["log_grad_norm"]  # LSTMCell hides the per-step weight gradients
        else:
            expected = ["log_grad_norm", "log_weight_grad_norm"]
        assert row["compared"] == expected, row
        assert row["max_abs_diff"] is not None and row["max_abs_diff"] < 1e-8, row


def test_memory_rows_for_the_gradient_profile_jobs(quick_document):
    measured = {(row["job"], row["backend"]) for row in quick_document["memory"]}
    for job in ("deep_narrow", "medium", "wide", "sweep100"):
        assert {(job, "cpu"), (job, "numpy")} <= measured
    assert not {job for job, _ in measured} & {"jacobian", "rnn_lyapunov"}
    for row in quick_document["memory"]:
        job = bench.QUICK_JOBS[row["job"]]
        assert row["activations_bytes"] == job.depth * job.batch * job.state_width * 8
        assert row["peak_traced_bytes"] > 0
        assert math.isclose(row["traced_ratio"], row["peak_traced_bytes"] / row["activations_bytes"])


# ---------------------------------------------------------------------------
# Flop counts against PyTorch's count of the same products
# ---------------------------------------------------------------------------

def _counted_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["deep_narrow", "wide", "sweep100", "rnn_lyapunov"])
def test_flops_match_torch_count_of_the_peer(name):
    if not bench.torch_available():
        pytest.skip("PyTorch is not installed")
    job = bench.QUICK_JOBS[name]
    if jobs.missing_feature(job):
        pytest.skip(jobs.missing_feature(job))
    runner, _ = peers.torch_runner(jobs.make_problem(job), 1)
    assert _counted_flops(runner) == job.flops


def test_lstm_flops_match_torch_count_with_weight_gradients():
    """Forward, state backward and W_hh's gradient: 3 x 4 (B, n) x (n, n) products per step."""
    if not bench.torch_available():
        pytest.skip("PyTorch is not installed")
    job = bench.QUICK_JOBS["lstm"]
    if jobs.missing_feature(job):
        pytest.skip(jobs.missing_feature(job))
    import torch

    problem = jobs.make_problem(job)
    cell = peers.torch_lstm_cell(problem.models[0]).requires_grad_(True)
    s0, g = torch.from_numpy(problem.xs[0]), torch.from_numpy(problem.grad_outputs[0])
    assert _counted_flops(lambda: peers.torch_lstm_profile(cell, s0, g, job.depth)) == job.flops


def test_jacobian_flops_match_torch_count_of_the_chain_rule():
    """The forward pass, then the identity pulled back through every layer, counted as torch runs it."""
    if not bench.torch_available():
        pytest.skip("PyTorch is not installed")
    import torch

    job = bench.QUICK_JOBS["jacobian"]
    problem = jobs.make_problem(job)
    stack = problem.models[0]
    weights = torch.tensor(np.asarray(stack.weights))
    biases = torch.tensor(np.asarray(stack.biases))
    result = {}

    def jacobian():
        x = torch.from_numpy(problem.xs[0])
        derivatives = []
        for weight, bias in zip(weights, biases, strict=True):
            x = torch.tanh(x @ weight.T + bias)
            derivatives.append(1 - x[0] ** 2)
        pulled = torch.eye(job.width, dtype=torch.float64)  # rows: d x_L[i] / d x_l
        for weight, derivative in zip(reversed(weights), reversed(derivatives), strict=True):
            pulled = (pulled * derivative) @ weight
        result["jacobian"] = pulled

    assert _counted_flops(jacobian) == job.flops
    expected = vg.jacobian(stack, problem.xs[0], backend="numpy")[0]
    np.testing.assert_allclose(result["jacobian"].numpy(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# Skips, with their reasons
# ---------------------------------------------------------------------------

def test_missing_peers_are_skipped_with_their_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "torch_status", lambda: (False, "PyTorch is not installed"))
    monkeypatch.setattr(peers, "jax_status", lambda: (False, "JAX is not installed (pip install jax)"))
    document = quick_run(tmp_path, "--jobs", "sweep100", "--backend", "numpy", "--no-memory", "--no-gemm")
    assert set(rows_of(document, "sweep100")) == {"numpy", "numpy loop"}
    assert "torch: skipped, PyTorch is not installed" in document["notes"]
    assert "jax: skipped, JAX is not installed (pip install jax)" in document["notes"]
    assert document["comparisons"] == []  # vg.sweep and JAX did not run
    assert "note: torch: skipped, PyTorch is not installed" in capsys.readouterr().out


def test_a_missing_feature_skips_the_job_with_its_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(vg, "Recurrent", raising=False)
    document = quick_run(tmp_path, "--jobs", "lstm,medium", "--backend", "numpy", "--no-torch", "--no-jax",
                         "--no-memory")
    lstm, medium = document["jobs"]
    assert "vg.Recurrent" in lstm["skipped"] and medium["skipped"] is None
    assert rows_of(document, "lstm") == {}
    assert rows_of(document, "medium")
    assert f"note: lstm: skipped, {lstm['skipped']}" in capsys.readouterr().out


def test_a_backend_without_the_model_kind_is_skipped_with_its_reason(tmp_path, monkeypatch):
    if jobs.missing_feature(bench.QUICK_JOBS["lstm"]):
        pytest.skip("no recurrent models here")
    from vgcore import backends

    monkeypatch.delitem(backends.IMPLEMENTATIONS, ("recurrent", "cpu"), raising=False)
    document = quick_run(tmp_path, "--jobs", "lstm", "--no-torch", "--no-jax", "--no-memory", "--no-gemm")
    assert set(rows_of(document, "lstm")) == {"numpy"}
    assert any(note.startswith("lstm: cpu: skipped, ValueError: backend") for note in document["notes"])


def test_batch_norm_job_is_skipped_exactly_when_stacks_refuse_norm_batch(quick_document):
    try:
        vg.Stack.random(2, 2, norm="batch", seed=0)
        refused = False
    except ValueError:
        refused = True
    entry = next(job for job in quick_document["jobs"] if job["job"] == "batchnorm")
    assert (entry["skipped"] is not None) == refused


def test_cuda_is_skipped_with_a_note_where_absent(tmp_path):
    available, _why = bench.cuda_status()
    if available:
        pytest.skip("a CUDA device is present")
    document = quick_run(tmp_path, "--jobs", "medium", "--backend", "cuda", "--no-torch", "--no-jax")
    assert any(note.startswith("cuda: skipped") for note in document["notes"])
    assert "cuda" not in rows_of(document, "medium")


# ---------------------------------------------------------------------------
# Options and entry points
# ---------------------------------------------------------------------------

def test_job_selection_and_backend_choice(tmp_path, capsys):
    document = quick_run(tmp_path, "--jobs", "medium", "--backend", "cpu", "--no-torch", "--no-jax",
                         "--no-memory")
    backends = [row["backend"] for row in document["results"]]
    assert {row["job"] for row in document["results"]} == {"medium"}
    assert backends[0] == "cpu" and backends[-1] == "gemm"
    assert not {"numpy", "torch", "jax"} & set(backends)
    assert document["results"][0]["vs_numpy"] is None  # no reference ran
    assert document["memory"] == []
    assert "medium" in capsys.readouterr().out


def test_threads_option_holds_the_kernels_to_one_thread(tmp_path, threads_before):
    document = quick_run(tmp_path, "--jobs", "deep_narrow", "--threads", "1", "--no-memory", "--no-jax")
    assert document["machine"]["threads"] == 1
    if bench.torch_available():  # the torch rows set its thread count; the run puts it back
        import torch

        assert torch.get_num_threads() == threads_before


@pytest.fixture
def threads_before():
    if not bench.torch_available():
        return None
    import torch

    return torch.get_num_threads()


def test_unknown_job_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--jobs", "medium,nonesuch"])
    assert exit_info.value.code == 2


def test_runs_as_a_module(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "vgcore.bench", "--quick", "--quiet", "--repeats", "1", "--jobs", "jacobian",
         "--no-torch", "--no-jax", "--markdown"],
        capture_output=True, text=True, env=child_environment(), cwd=tmp_path, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "| jacobian | cpu |" in completed.stdout


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------

def test_abba_order_warm_up_and_counts():
    calls: list[str] = []

    def runner(label):
        return lambda: calls.append(label) or label

    runners = {label: runner(label) for label in "abc"}
    times, results, memory = timing.time_backends(runners, budget_s=0, min_repeats=1, max_repeats=1,
                                                  repeats=3)
    assert results == {"a": "a", "b": "b", "c": "c"} and memory == {}
    assert calls[:3] == ["a", "b", "c"]  # one warm-up each
    # then blocks a, b, c (2 runs) and c, b, a (1 run), each fast block after one settling run
    assert calls[3:] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["c"] * 2 + ["b"] * 2 + ["a"] * 2
    assert {label: len(values) for label, values in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_automatic_counts_and_a_runner_slower_than_the_budget_is_timed_once():
    runners = {"a": lambda: None, "b": lambda: None}
    many, _, _ = timing.time_backends(runners, budget_s=1e9, min_repeats=2, max_repeats=4)
    assert {label: len(values) for label, values in many.items()} == {"a": 4, "b": 4}
    # every warm-up takes longer than twice a zero budget: each runner is timed once, not min_repeats
    once, _, _ = timing.time_backends(runners, budget_s=0.0, min_repeats=2, max_repeats=4)
    assert {label: len(values) for label, values in once.items()} == {"a": 1, "b": 1}


def test_repeat_count_is_the_budget_clipped():
    assert timing.repeat_count(0.5, budget_s=6, min_repeats=2, max_repeats=30) == 12
    assert timing.repeat_count(10.0, budget_s=6, min_repeats=2, max_repeats=30) == 2
    assert timing.repeat_count(1e-6, budget_s=6, min_repeats=2, max_repeats=30) == 30


def test_max_abs_diff_over_shared_fields():
    reference = {"log_grad_norm": np.array([0.0, -np.inf, 1.0]), "log_weight_grad_norm": np.array([2.0])}
    close = {"log_grad_norm": np.array([1e-3, -np.inf, 1.0])}
    assert peers.max_abs_diff(close, reference) == pytest.approx(1e-3)
    assert peers.compared_fields(close, reference) == ["log_grad_norm"]
    assert math.isinf(peers.max_abs_diff({"log_grad_norm": np.array([0.0, 0.0, 1.0])}, reference))
    assert peers.max_abs_diff({"log_grad_norm": np.zeros(2)}, reference) is None  # shapes differ
    assert peers.max_abs_diff({"value": np.zeros(3)}, reference) is None  # nothing shared
