"""The constants the C kernels were compiled with equal their Python twins in vgcore._activations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vgcore import _activations
from vgcore._ext import _kernels

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.parametrize("name", ["LEAKY_SLOPE", "SELU_ALPHA", "SELU_SCALE", "SATURATION_THRESHOLD",
                                  "LAYER_NORM_EPS", "SCALE_RANGE"])
def test_compiled_scalars_equal_python(name):
    assert _kernels.compiled_constants()[name] == getattr(_activations, name)


def test_scale_range_is_where_every_activation_is_its_linearisation():
    """Below 2**-SCALE_RANGE the scaled forward pass uses phi(h) = phi(0) + phi'(0+-) h: the next term
    of every activation must be below the dtype's rounding there (and the threshold a power of two
    the header spells exactly)."""
    header = (CSRC / "vg_activations.h").read_text()
    for dtype, suffix in ((np.float64, "D"), (np.float32, "F")):
        power = _activations.SCALE_RANGE[np.dtype(dtype).name]
        literal = re.search(rf"#define VG_SCALE_TINY_{suffix} ([0-9.e+-]+)f?", header).group(1)
        assert float(literal) == 2.0 ** -power
        for name in _activations.ACTIVATION_TABLE:
            for sign in (1.0, -1.0):
                h = np.array([sign * 2.0 ** -power], dtype)
                value, derivative = _activations.activation(name, h.astype(np.float64))
                zero = _activations.activation(name, np.zeros(1))[0]
                linear = zero + derivative * h.astype(np.float64)
                assert abs(value[0] - linear[0]) <= np.finfo(dtype).eps * max(abs(value[0]), 1e-300), name


def test_compiled_norm_codes_equal_python():
    assert _kernels.compiled_constants()["NORM_CODES"] == _activations.NORM_CODES


def test_activation_enum_matches_the_table():
    """The C enum of csrc/vg_activations.h lists the table's activations, in its order."""
    assert _kernels.compiled_constants()["N_ACTIVATIONS"] == len(_activations.ACTIVATION_TABLE)
    enum = dict(re.findall(r"VG_([A-Z_]+) = (\d+),", (CSRC / "vg_activations.h").read_text()))
    for name, info in _activations.ACTIVATION_TABLE.items():
        assert int(enum[name.upper()]) == info.code == _activations.ACTIVATION_CODES[name]


@pytest.mark.parametrize("name", list(_activations.ACTIVATION_TABLE))
def test_each_compiled_activation_is_the_table_entry_of_that_code(name):
    """The code the table gives computes that activation in the compiled header (both dtypes)."""
    h = np.linspace(-3, 3, 61)
    for dtype in (np.float64, np.float32):
        value, derivative = np.empty_like(h, dtype), np.empty_like(h, dtype)
        _kernels.activation_values(_activations.ACTIVATION_TABLE[name].code, h.astype(dtype), value,
                                   derivative)
        expected_value, expected_derivative = _activations.activation(name, h)
        tolerance = 1e-14 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(value, expected_value, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(derivative, expected_derivative, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", list(_activations.ACTIVATION_TABLE))
def test_table_asymptotes_and_jumps_are_those_of_the_math(name):
    """The table's facts are checked against the activation itself, not copied from it."""
    info = _activations.ACTIVATION_TABLE[name]
    slope_plus, offset_plus, slope_minus, offset_minus = info.asymptotes
    far = np.array([-40.0, 40.0])
    value, _ = _activations.activation(name, far)
    np.testing.assert_allclose(value, [slope_minus * -40.0 + offset_minus, slope_plus * 40.0 + offset_plus],
                               rtol=1e-9, atol=1e-9)
    step = 1e-9
    left, right = _activations.activation(name, np.array([-step, step]))[1]
    assert (info.jump_order == 1) == (abs(left - right) > 1e-6)
    if info.piecewise_linear:
        h = np.linspace(-3, 3, 13)
        expected = np.where(h > 0, slope_plus * h + offset_plus, slope_minus * h + offset_minus)
        np.testing.assert_allclose(_activations.activation(name, h)[0], expected, rtol=1e-15)
