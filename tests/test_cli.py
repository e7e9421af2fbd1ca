"""The vgcore command: sweep -> plot end to end, value parsing, one-line errors with status 2, info, bench."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import child_environment
from hypothesis import given, settings
from hypothesis import strategies as st

import vgcore as vg
from vgcore import cli
from vgcore.sweep import load

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the NumPy reference: quickest for the tiny stacks here and unaffected by other processes' load
SWEEP = ["sweep", "--depth", "6,9", "--width", "8", "--sigma-w", "0.5:2:4", "--sigma-b", "0:0.3:3",
         "--batch", "4", "--seeds", "2", "--backend", "numpy", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "store"
    assert cli.main([*SWEEP, "--out", str(path)]) == 0
    return path


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib_image.imread(path)
    assert np.ptp(image[..., :3]) > 0, "a blank image"
    return image.shape


# --------------------------------------------------------------------------
# End to end


def test_sweep_writes_the_grid_into_the_store(store, capsys):
    result = load(store)
    assert result.complete and len(result.frame) == 2 * 4 * 3 * 2
    assert result.grid["sigma_w"] == [0.5, 1.0, 1.5, 2.0] and result.grid["sigma_b"] == [0.0, 0.15, 0.3]
    assert result.grid["depth"] == [6, 9] and result.seeds == [0, 1] and result.batch == 4
    # resumed: nothing left to compute
    assert cli.main([*SWEEP, "--out", str(store)]) == 0
    assert "0 computed now, 48 from the store" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["flow", "phase", "spectrum"])
def test_plot_writes_a_png_of_the_requested_size(store, tmp_path, kind, capsys):
    output = tmp_path / f"{kind}.png"
    assert cli.main(["plot", str(store), "--kind", kind, "-o", str(output), "--size", "640x480"]) == 0
    assert _png_shape(output)[:2] == (480, 640)
    assert f"wrote {output}" in capsys.readouterr().err


def test_plot_size_flags_and_dpi(store, tmp_path):
    output = tmp_path / "phase.png"
    assert cli.main(["plot", str(store), "--kind", "phase", "-o", str(output), "--width-px", "517",
                     "--height-px", "333", "--dpi", "90"]) == 0
    assert _png_shape(output)[:2] == (333, 517)
    assert cli.main(["plot", str(store), "--kind", "flow", "-o", str(output), "--where", "depth=9",
                     "--where", "sigma_b=0.15"]) == 0
    assert _png_shape(output)[:2] == (900, 1200)  # the default size


def test_spectrum_uses_singular_values_when_vgcore_has_them(store, tmp_path, monkeypatch):
    from vgcore import plot

    calls = []

    def singular_values(stack, x):
        calls.append((stack.depth, stack.seed))
        return np.linalg.svd(vg.jacobian(stack, x), compute_uv=False)

    monkeypatch.setattr(vg, "singular_values", singular_values, raising=False)
    figure = plot.spectrum(load(store), width_px=400, height_px=300, dpi=100)
    assert "singular values" in figure.axes[0].get_title()
    assert 1 <= len(calls) <= plot.MAX_SPECTRUM_CONFIGS
    monkeypatch.delattr(vg, "singular_values")
    figure = plot.spectrum(load(store), width_px=400, height_px=300, dpi=100)
    assert "decrements" in figure.axes[0].get_title()


def test_phase_plot_draws_theorys_critical_line(store):
    from vgcore import plot, theory

    figure = plot.phase(load(store), width_px=400, height_px=300, dpi=100)
    axes = figure.axes[0]
    (line,) = [line for line in axes.get_lines() if line.get_color() == "lime"]
    sigma_w, sigma_b = line.get_data()
    assert sigma_b.min() == 0.0 and sigma_b.max() == pytest.approx(0.3)
    expected = [theory.critical_sigma_w("tanh", b) for b in sigma_b[::25]]
    np.testing.assert_allclose(sigma_w[::25], expected, rtol=1e-9)


def test_sweep_without_out_prints_csv(capsys):
    assert cli.main(["sweep", "--depth", "3", "--width", "4", "--sigma-w", "he,critical", "--residual",
                     "none,0.5", "--norm", "none,pre", "--batch", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",") == ["depth", "width", "activation", "init", "sigma_w", "sigma_b", "residual",
                                   "norm", "dtype", "cell", "forget_bias", "sigma_u", "input_width", "seed",
                                   "chi", "depth_scale", "vanishing_depth", "imbalance", "r2", "chi_theory",
                                   "log_global_norm"]
    assert len(lines) == 1 + 2 * 2 * 2
    assert float(lines[1].split(",")[4]) == pytest.approx(np.sqrt(2))


def test_python_dash_m_vgcore(tmp_path):
    environment = child_environment()
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "vgcore", "sweep", "--depth", "4", "--width", "5",
                           "--sigma-w", "1,2", "--batch", "2", "--backend", "numpy", "--out", str(store)],
                          env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 rows (2 computed now" in done.stderr
    assert len(load(store).frame) == 2
    bad = subprocess.run([sys.executable, "-m", "vgcore", "sweep", "--depth", "4", "--width", "5", "--bogus"],
                         env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unrecognized arguments: --bogus" in bad.stderr


# --------------------------------------------------------------------------
# Bad command lines: one line on stderr, status 2


@pytest.mark.parametrize(("argv", "message"), [
    ([], "required: {sweep,plot,info,bench}"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["sweep", "--width", "4"], "required: --depth"),
    (["sweep", "--depth", "x", "--width", "4"], "argument --depth: 'x' is not an integer"),
    (["sweep", "--depth", "1:10:3", "--width", "4"], "range '1:10:3': does not give whole numbers"),
    (["sweep", "--depth", "3", "--width", "4", "--sigma-w", "0.5:3"], "expected start:stop:count"),
    (["sweep", "--depth", "3", "--width", "4", "--sigma-w", "1:2:0"], "count must be >= 1"),
    (["sweep", "--depth", "3", "--width", "4", "--sigma-b", "0,,1"], "empty item"),
    (["sweep", "--depth", "3", "--width", "4", "--activation", "swish"], "grid['activation']: unknown"),
    (["sweep", "--depth", "3", "--width", "4", "--sigma-w", "-1"], "grid['sigma_w']: must be > 0"),
    (["sweep", "--depth", "3", "--width", "4", "--seeds", "a"], "argument --seeds"),
    (["sweep", "--depth", "3", "--width", "4", "--batch", "many"], "argument --batch: invalid int"),
    (["sweep", "--depth", "3", "--width", "4", "--backend", "tpu"], "argument --backend: invalid choice"),
    (["sweep", "--depth", "3", "--width", "4", "--bogus"], "unrecognized arguments: --bogus"),
    (["plot", "STORE", "-o", "x.png"], "required: --kind"),
    (["plot", "STORE", "--kind", "pie", "-o", "x.png"], "argument --kind: invalid choice: 'pie'"),
    (["plot", "STORE", "--kind", "flow", "-o", "x.png", "--size", "big"], "expected WIDTHxHEIGHT"),
    (["plot", "/nonexistent/store", "--kind", "flow", "-o", "x.png"], "not a directory"),
    (["plot", "STORE", "--kind", "flow", "-o", "/nonexistent/dir/x.png"], "does not exist"),
])
def test_bad_flags_give_one_line_and_status_2(argv, message, capsys, tmp_path):
    argv = [str(tmp_path) if item == "STORE" else item for item in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vgcore"), captured.err
    assert "error: " in captured.err and message in captured.err
    assert captured.out == ""


def test_bad_plot_requests_on_a_real_store(store, capsys, tmp_path):
    output = str(tmp_path / "x.png")
    for argv, message in [
        (["--size", "640x480", "--width-px", "300"], "not both"),
        (["--size", "8x8"], "width_px: expected an integer number of pixels in 16..20000"),
        (["--where", "depth"], "expected KEY=VALUE"),
        (["--where", "colour=red"], "unknown key 'colour'"),
        (["--where", "depth=7"], "no row of the sweep matches"),
    ]:
        assert cli.main(["plot", str(store), "--kind", "phase", "-o", output, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not os.path.exists(output)


def test_help_exits_zero(capsys):
    assert cli.main(["sweep", "--help"]) == 0
    assert "--sigma-w" in capsys.readouterr().out


# --------------------------------------------------------------------------
# Value parsing


@settings(max_examples=60)
@given(start=st.floats(0, 10), stop=st.floats(0, 10), count=st.integers(1, 50))
def test_ranges_are_inclusive_linspace(start, stop, count):
    values = cli.parse_values(f"{start!r}:{stop!r}:{count}", "float")
    np.testing.assert_allclose(values, np.linspace(start, stop, count), rtol=1e-11, atol=1e-11)
    assert len(values) == count


@settings(max_examples=40)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8))
def test_int_lists(values):
    assert cli.parse_values(",".join(map(str, values)), "int") == values


def test_values_of_each_kind():
    assert cli.parse_values("0.5:3:26", "float")[:3] == [0.5, 0.6, 0.7]  # rounded, not 0.6000000000000001
    assert cli.parse_values("10:50:5", "int") == [10, 20, 30, 40, 50]
    assert cli.parse_values("0.5:1:3,2", "float") == [0.5, 0.75, 1.0, 2.0]
    assert cli.parse_values("he,1.5,critical", "float_or_name") == ["he", 1.5, "critical"]
    assert cli.parse_values("none,0.5", "float_or_none") == [None, 0.5]
    assert cli.parse_values("None,pre", "str_or_none") == [None, "pre"]


# --------------------------------------------------------------------------
# info and bench


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vgcore {vg.__version__}")
    assert "OpenMP: " in out and "threads: " in out and "BLAS: " in out
    assert "GPU: " in out
    gpu = next(line for line in out.splitlines() if line.startswith("GPU: "))
    assert "not available: " in gpu or "device(s)" in gpu


def test_bench_forwards_its_arguments(monkeypatch):
    received = []
    fake = types.ModuleType("vgcore.bench")
    fake.main = lambda argv: received.append(argv) or 7
    monkeypatch.setitem(sys.modules, "vgcore.bench", fake)
    assert cli.main(["bench", "--json", "--jobs", "medium", "-h"]) == 7
    assert received == [["--json", "--jobs", "medium", "-h"]]


def test_bench_missing_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vgcore.bench", None)  # import raises ImportError
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vgcore bench: error: " in err


def test_sweep_on_a_dask_scheduler(tmp_path, capsys):
    distributed = pytest.importorskip("dask.distributed")
    argv = ["sweep", "--depth", "4", "--width", "5", "--sigma-w", "0.5:1.5:3", "--batch", "2", "--seeds", "2",
            "--backend", "numpy", "--no-progress"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert cli.main([*argv, "--scheduler", cluster.scheduler_address, "--out", str(tmp_path / "d")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert load(tmp_path / "d").frame.equals(load(tmp_path / "local").frame)


# --------------------------------------------------------------------------
# Issue 17, defect 6: command lines that printed a traceback now give one line and status 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--seeds", "1000000000"], "argument --seeds: seeds: a count must be between 1 and 1,000,000"),
    (["--seeds", "9223372036854775808"], "argument --seeds"),
    (["--seeds", "0,9223372036854775808"], "each seed must satisfy 0 <= seed < 2**63"),
    (["--seeds", "0:1000000000:1000000001"], "argument --seeds: range '0:1000000000:1000000001'"),
    (["--out", ""], "argument --out: expected a directory, got an empty path"),
    (["--out", "/proc/vgcore-x"], "argument --out: store '/proc/vgcore-x'"),
    (["--out", "FILE/sub"], "argument --out: store 'FILE/sub': cannot be opened"),
    (["--depth", "1000000", "--width", "10000"], "argument --depth/--width/--batch: "),
    (["--batch", "100000000000"], "argument --depth/--width/--batch: "),
    (["--sigma-w", "0:1:100000000000"], "argument --sigma-w: range '0:1:100000000000': count must be <="),
    (["--scheduler", "tcp://127.0.0.1:9"], "argument --scheduler: client: cannot connect"),
])
def test_defect6_malformed_sweep_command_lines_give_one_line_and_status_2(argv, message, capsys, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a directory")
    if "--scheduler" in argv:
        pytest.importorskip("dask.distributed")
    base = ["sweep", "--depth", "3", "--width", "4", "--backend", "numpy", "--no-progress"]
    assert cli.main([*base, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vgcore sweep: error: "), captured.err
    assert message in captured.err, captured.err
    assert captured.out == ""
    assert not os.path.exists(tmp_path / "FILE" / "sub")


def test_defect6_plot_output_that_is_a_directory_or_repeated_where(store, capsys, tmp_path):
    for argv, message in [
        (["-o", str(tmp_path)], f"argument -o: {str(tmp_path)!r} is a directory"),
        (["-o", str(tmp_path / "x.png"), "--where", "depth=6", "--where", "depth=9"],
         "argument --where: 'depth' is given twice"),
    ]:
        assert cli.main(["plot", str(store), "--kind", "flow", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount(8)); skipped with the reason elsewhere."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_defect6_a_full_disk_gives_one_line_naming_the_store(small_disk, capsys):
    out = small_disk / "store"
    argv = ["sweep", "--depth", "3", "--width", "4", "--sigma-b", "0:0.7:8", "--seeds", "4", "--batch", "2",
            "--chunk-size", "1", "--backend", "numpy", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument --out: store {str(out)!r}: could not write a part" in err, err
    assert 0 < len(load(out).frame) < 32
