"""Smoke tests of the benchmark runner (vgcore._bench) on tiny sizes: it runs, the JSON has
the documented keys, times are positive and every backend computes the same thing.

No timed assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import child_environment

from vgcore import _bench

TOP_KEYS = {"schema", "date", "quick", "machine", "jobs", "results", "memory", "notes", "load_average_after"}
MACHINE_KEYS = {"cpu", "cores", "threads", "platform", "python", "numpy", "scipy", "torch", "cupy", "vgcore",
                "blas", "load_average"}
JOB_KEYS = {"job", "what", "depth", "width", "batch", "configs", "flops", "other_load"}
RESULT_KEYS = {"job", "backend", "median_s", "times_s", "repeats", "gflops", "vs_numpy", "vs_torch",
               "gemm_fraction", "max_abs_diff", "detail"}
MEMORY_KEYS = {"job", "backend", "activations_bytes", "peak_traced_bytes", "traced_ratio", "peak_rss_bytes",
               "rss_ratio"}


@pytest.fixture(scope="module")
def quick_document(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert _bench.main(["--quick", "--quiet", "--repeats", "2", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_has_the_documented_keys(quick_document):
    assert set(quick_document) == TOP_KEYS
    assert quick_document["schema"] == 1 and quick_document["quick"] is True
    assert set(quick_document["machine"]) == MACHINE_KEYS
    assert [job["job"] for job in quick_document["jobs"]] == list(_bench.JOBS)
    for job in quick_document["jobs"]:
        assert set(job) == JOB_KEYS
        assert job["flops"] > 0
    for row in quick_document["results"]:
        assert set(row) == RESULT_KEYS
    for row in quick_document["memory"]:
        assert set(row) == MEMORY_KEYS


def test_every_job_ran_on_the_backends_with_positive_times(quick_document):
    expected = {"cpu", "numpy", "gemm"} | ({"torch"} if _bench.torch_available() else set())
    for job in _bench.JOBS:
        rows = {row["backend"]: row for row in quick_document["results"] if row["job"] == job}
        assert expected <= set(rows), job
        for row in rows.values():
            assert row["repeats"] == 2 == len(row["times_s"])
            assert all(t > 0 for t in row["times_s"])
            assert row["median_s"] > 0 and row["gflops"] > 0
            assert row["vs_numpy"] > 0 and row["gemm_fraction"] > 0
        assert rows["numpy"]["vs_numpy"] == 1.0
        assert rows["gemm"]["gemm_fraction"] == 1.0


def test_backends_compute_the_same_thing(quick_document):
    for row in quick_document["results"]:
        if row["backend"] in ("cpu", _bench.SEGMENT_LABEL, "torch"):
            assert row["max_abs_diff"] is not None and row["max_abs_diff"] < 1e-8, row


def test_memory_rows_for_the_gradient_profile_jobs(quick_document):
    measured = {(row["job"], row["backend"]) for row in quick_document["memory"]}
    for job in ("deep_narrow", "medium", "wide", "sweep100"):
        assert {(job, "cpu"), (job, "numpy")} <= measured
    for row in quick_document["memory"]:
        assert row["activations_bytes"] > 0 and row["peak_traced_bytes"] > 0
        assert math.isclose(row["traced_ratio"], row["peak_traced_bytes"] / row["activations_bytes"])


def test_job_selection_and_backend_choice(tmp_path, capsys):
    path = tmp_path / "one.json"
    argv = ["--quick", "--quiet", "--repeats", "1", "--jobs", "medium", "--backend", "cpu", "--no-torch",
            "--no-memory", "--json", str(path)]
    assert _bench.main(argv) == 0
    document = json.loads(path.read_text())
    backends = [row["backend"] for row in document["results"]]
    assert {row["job"] for row in document["results"]} == {"medium"}
    assert backends[0] == "cpu" and backends[-1] == "gemm"
    assert not {"numpy", "torch"} & set(backends)
    assert document["results"][0]["vs_numpy"] is None  # no reference ran
    assert document["memory"] == []
    assert "medium" in capsys.readouterr().out


def test_threads_option_holds_the_kernels_to_one_thread(tmp_path, threads_before):
    path = tmp_path / "threads.json"
    argv = ["--quick", "--quiet", "--repeats", "1", "--jobs", "deep_narrow", "--threads", "1", "--no-memory",
            "--json", str(path)]
    assert _bench.main(argv) == 0
    assert json.loads(path.read_text())["machine"]["threads"] == 1
    if _bench.torch_available():  # the torch rows set its thread count; the run puts it back
        import torch

        assert torch.get_num_threads() == threads_before


@pytest.fixture
def threads_before():
    if not _bench.torch_available():
        return None
    import torch

    return torch.get_num_threads()


def test_cuda_is_skipped_with_a_note_where_absent(tmp_path):
    available, _why = _bench.cuda_status()
    if available:
        pytest.skip("a CUDA device is present")
    path = tmp_path / "cuda.json"
    argv = ["--quick", "--quiet", "--repeats", "1", "--jobs", "medium", "--backend", "cuda", "--no-torch",
            "--json", str(path)]
    assert _bench.main(argv) == 0
    notes = json.loads(path.read_text())["notes"]
    assert any(note.startswith("cuda: skipped") for note in notes)


def test_unknown_job_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        _bench.main(["--quick", "--jobs", "medium,nonesuch"])
    assert exit_info.value.code == 2


def test_gemm_flops_match_the_job():
    wide = _bench.JOBS["wide"]
    assert wide.flops == 3 * 20 * 2 * 512 * 2048 * 2048
    jacobian = _bench.JOBS["jacobian"]
    assert jacobian.flops == 100 * 2 * 256 * 256 * (256 + 1)
    assert _bench.JOBS["sweep100"].flops == 100 * 3 * 100 * 2 * 16 * 64 * 64


def test_runs_as_a_module(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "vgcore._bench", "--quick", "--quiet", "--repeats", "1", "--jobs", "jacobian",
         "--no-torch", "--markdown"],
        capture_output=True, text=True, env=child_environment(), cwd=tmp_path, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "| jacobian | cpu |" in completed.stdout
