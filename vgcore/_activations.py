"""Activations and the constants shared with the C kernels: the Python side's one source of truth.

The table :data:`ACTIVATION_TABLE` holds what the rest of vgcore needs to know
about each activation — its code in csrc/vg_activations.h, the straight lines
it approaches for large |h| (theory), whether phi or phi' jumps at 0 (tests,
spectra), and its PyTorch equivalent (benchmarks, ``Stack.from_torch``).  The
constants below mirror the C headers (csrc/vg_activations.h, csrc/vg_stack.h);
tests/test_constants.py holds the compiled values equal to these.

:func:`activation` is the NumPy reference's activation math: plain NumPy
written from the definitions, with the same numerical care as the C header
(no overflow in sigmoid / softplus / silu, full precision in the tails of
tanh').  It is checked against finite differences and against the compiled
header in the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Leaky ReLU's slope for h < 0 (VG_LEAKY_SLOPE).
LEAKY_SLOPE = 0.01
#: SELU's constants (VG_SELU_ALPHA, VG_SELU_SCALE).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

#: |phi'(h)| below this counts as saturated in a gradient profile (VG_SATURATION_THRESHOLD).
SATURATION_THRESHOLD = 1e-3
#: The eps of layer and batch normalisation: (v - mean) / sqrt(var + eps) (VG_LAYER_NORM_EPS).
LAYER_NORM_EPS = 1e-5
#: The scaled forward pass: a row of activations whose largest entry is below 2**-SCALE_RANGE[dtype]
#: is kept as a scaled row and a power-of-two exponent (VG_SCALE_RANGE_D, VG_SCALE_RANGE_F).
SCALE_RANGE: dict[str, int] = {"float64": 100, "float32": 30}
#: Where a stack's normalisation sits -> the kernels' code (VG_NORM_NONE, _PRE, _POST, _BATCH).
NORM_CODES: dict[str | None, int] = {None: 0, "pre": 1, "post": 2, "batch": 3}


class Activation(NamedTuple):
    """Everything vgcore knows about one activation, besides its math.

    Attributes
    ----------
    name : str
        Public name.
    code : int
        Its value in the C enum of csrc/vg_activations.h (the table's order).
    asymptotes : tuple of 4 floats
        (slope, offset) of the line phi approaches as h -> +inf, then as h -> -inf.
    jump_order : int or None
        The lowest order of derivative that jumps at h = 0: 1 where phi' jumps
        (relu, leaky_relu, selu: a pre-activation rounding across 0 switches the
        Jacobian), 2 where only phi'' does (elu: finite differences of gradients
        are unreliable across 0); None for activations smooth at 0.
    piecewise_linear : bool
        phi equals its asymptotes everywhere (closed-form mean-field theory).
    torch : str
        The equivalent ``torch.nn`` module (as written in an nn.Sequential), or
        "" where PyTorch has none.
    """

    name: str
    code: int
    asymptotes: tuple[float, float, float, float]
    jump_order: int | None
    piecewise_linear: bool
    torch: str


def _table(*rows: tuple) -> dict[str, Activation]:
    return {row[0]: Activation(row[0], code, *row[1:]) for code, row in enumerate(rows)}


#: name -> Activation, in the order of the C enum.
ACTIVATION_TABLE: dict[str, Activation] = _table(
    # name, asymptotes (+slope, +offset, -slope, -offset), jump order, piecewise linear, torch
    ("linear", (1.0, 0.0, 1.0, 0.0), None, True, "Identity"),
    ("sigmoid", (0.0, 1.0, 0.0, 0.0), None, False, "Sigmoid"),
    ("tanh", (0.0, 1.0, 0.0, -1.0), None, False, "Tanh"),
    ("relu", (1.0, 0.0, 0.0, 0.0), 1, True, "ReLU"),
    ("leaky_relu", (1.0, 0.0, LEAKY_SLOPE, 0.0), 1, True, "LeakyReLU"),
    ("elu", (1.0, 0.0, 0.0, -1.0), 2, False, "ELU"),
    ("selu", (SELU_SCALE, 0.0, 0.0, -SELU_SCALE * SELU_ALPHA), 1, False, "SELU"),
    ("gelu", (1.0, 0.0, 0.0, 0.0), None, False, "GELU"),
    ("silu", (1.0, 0.0, 0.0, 0.0), None, False, "SiLU"),
    ("softplus", (1.0, 0.0, 0.0, 0.0), None, False, "Softplus"),
    ("erf", (0.0, 1.0, 0.0, -1.0), None, False, ""),
)

#: Public activation names, in the order of the C enum in vg_activations.h.
ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATION_TABLE)

#: Activation name -> integer code understood by the compiled kernels.
ACTIVATION_CODES: dict[str, int] = {name: info.code for name, info in ACTIVATION_TABLE.items()}

#: Activations whose derivative phi' jumps at 0 (the Jacobian depends on which side of 0 h rounds to).
DERIVATIVE_JUMPS: frozenset[str] = frozenset(
    name for name, info in ACTIVATION_TABLE.items() if info.jump_order == 1)
#: Activations with any derivative jumping at 0 (finite differences of gradients need h away from 0).
NOT_SMOOTH_AT_ZERO: frozenset[str] = frozenset(
    name for name, info in ACTIVATION_TABLE.items() if info.jump_order is not None)


def _sigmoid_parts(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sigmoid(h) and 1 - sigmoid(h), evaluating exp only at -|h|."""
    e = np.exp(-np.abs(h))
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    positive = h >= 0
    return np.where(positive, big, small), np.where(positive, small, big)


def activation(name: str, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and derivative of activation ``name`` at ``h``.

    Parameters
    ----------
    name : str
        One of :data:`ACTIVATIONS`.
    h : ndarray
        Pre-activations, any shape, float32 or float64.

    Returns
    -------
    value, derivative : ndarray
        ``phi(h)`` and ``phi'(h)``, same shape and dtype as ``h``.
    """
    h = np.asarray(h)
    dtype = h.dtype if h.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    h = h.astype(dtype, copy=False)
    one = np.ones_like(h)
    if name == "linear":
        value, derivative = h.copy(), one
    elif name == "sigmoid":
        s, oms = _sigmoid_parts(h)
        value, derivative = s, s * oms
    elif name == "tanh":
        e = np.exp(-2.0 * np.abs(h))
        value, derivative = np.tanh(h), 4.0 * e / (1.0 + e) ** 2
    elif name == "relu":
        value, derivative = np.where(h > 0, h, 0.0), np.where(h > 0, 1.0, 0.0)
    elif name == "leaky_relu":
        value = np.where(h > 0, h, LEAKY_SLOPE * h)
        derivative = np.where(h > 0, 1.0, LEAKY_SLOPE)
    elif name == "elu":
        negative = np.minimum(h, 0.0)
        value = np.where(h > 0, h, np.expm1(negative))
        derivative = np.where(h > 0, 1.0, np.exp(negative))
    elif name == "selu":
        negative = np.minimum(h, 0.0)
        value = SELU_SCALE * np.where(h > 0, h, SELU_ALPHA * np.expm1(negative))
        derivative = SELU_SCALE * np.where(h > 0, 1.0, SELU_ALPHA * np.exp(negative))
    elif name == "gelu":
        from scipy import special  # on first use: `import vgcore` stays quick

        cdf = 0.5 * special.erfc(-h / np.sqrt(2.0))
        pdf = np.exp(-0.5 * h * h) / np.sqrt(2.0 * np.pi)
        value, derivative = h * cdf, cdf + h * pdf
    elif name == "silu":
        s, oms = _sigmoid_parts(h)
        value, derivative = h * s, s * (1.0 + h * oms)
    elif name == "softplus":
        s, _ = _sigmoid_parts(h)
        value = np.maximum(h, 0.0) + np.log1p(np.exp(-np.abs(h)))
        derivative = s
    elif name == "erf":
        from scipy import special

        value = special.erf(h)
        derivative = 2.0 / np.sqrt(np.pi) * np.exp(-h * h)
    else:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return value.astype(dtype, copy=False), derivative.astype(dtype, copy=False)
