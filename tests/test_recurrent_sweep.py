"""Recurrent cells in sweeps, the CLI and the plots (docs/ARCHITECTURE.md "Sweeps")."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_environment

import vgcore as vg
from vgcore._recurrent import Recurrent
from vgcore.sweep import input_seed, load, sweep


def _row_by_hand(cell, depth, width, sigma_w, forget_bias, input_width, sigma_u, seed, batch):
    """What a sweep row must hold: Recurrent.random's model, its state and inputs, profile + summary."""
    model = Recurrent.random(width, cell=cell, input_width=input_width, sigma_w=sigma_w, sigma_u=sigma_u,
                             forget_bias=0.0 if cell == "rnn" else forget_bias, seed=seed)
    rng = np.random.default_rng(input_seed(seed))
    s0 = rng.standard_normal((batch, model.state_width))
    inputs = rng.standard_normal((batch, depth, input_width)) if input_width else None
    profile = vg.gradient_profile(model, s0, steps=depth, inputs=inputs)
    return profile, vg.stats.summary(profile)


def test_recurrent_rows_equal_individual_calls():
    grid = {"depth": 25, "width": 6, "cell": ["rnn", "lstm", "gru"], "sigma_w": [0.7, 1.6],
            "forget_bias": 1.0, "input_width": [0, 3], "sigma_u": 0.8}
    result = sweep(grid, batch=3, seeds=[5], progress=False)
    frame = result.frame
    assert len(frame) == 12 and set(frame["cell"]) == {"rnn", "lstm", "gru"}
    for _, row in frame.iterrows():
        profile, summary = _row_by_hand(row["cell"], 25, 6, row["sigma_w"], 1.0, int(row["input_width"]), 0.8,
                                        int(row["seed"]), 3)
        np.testing.assert_allclose(row["log_grad_norm"], profile.mean_log_grad_norm, rtol=1e-12, atol=1e-12)
        assert row["chi"] == pytest.approx(summary["chi"], rel=1e-10)
        if row["cell"] == "rnn":
            sigma_u = 0.8 if row["input_width"] else 0.0
            theory = vg.theory.rnn_chi1("tanh", row["sigma_w"], 0.0, sigma_u)
            assert row["chi_theory"] == pytest.approx(theory)
            assert row["chi_theory"] == pytest.approx(profile.chi_theory)
        else:
            assert math.isnan(row["chi_theory"])  # no closed form for gated cells with recurrent weights


def test_cli_sweeps_recurrent_cells_and_plots_time_and_chaos(tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "vgcore.cli", "sweep", "--depth", "30", "--width", "12",
               "--cell", "rnn,lstm", "--sigma-w", "0.5,2", "--forget-bias", "1", "--input-width", "0",
               "--batch", "2", "--out", str(store), "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=child_environment(),
                         timeout=300)
    assert run.returncode == 0, run.stderr
    frame = load(store).frame
    assert sorted(set(frame["cell"])) == ["lstm", "rnn"] and len(frame) == 4
    for kind in ("time", "chaos"):
        png = tmp_path / f"{kind}.png"
        run = subprocess.run([sys.executable, "-m", "vgcore.cli", "plot", str(store), "--kind", kind, "-o",
                              str(png), "--size", "400x300"], capture_output=True, text=True, cwd=tmp_path,
                             env=child_environment(), timeout=300)
        assert run.returncode == 0, run.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = (int.from_bytes(png.read_bytes()[16 + 4 * i:20 + 4 * i], "big") for i in range(2))
        assert (width, height) == (400, 300)


def test_plot_chaos_refuses_a_sweep_without_rnn_rows():
    pytest.importorskip("matplotlib")
    from vgcore import plot

    result = sweep({"depth": 5, "width": 4}, batch=2, progress=False)
    with pytest.raises(ValueError, match="no rows of cell rnn"):
        plot.figure(result, "chaos")
