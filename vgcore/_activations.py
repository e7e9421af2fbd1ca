"""Activation names, their codes in csrc/vg_activations.h, and NumPy twins.

The NumPy functions here are the reference's activation math: plain NumPy
written from the definitions in DESIGN.md, with the same numerical care as the
C header (no overflow in sigmoid / softplus / silu, full precision in the
tails of tanh').  They are checked against finite differences and against the
compiled header in the tests.
"""

from __future__ import annotations

import numpy as np
from scipy import special

#: Public activation names, in the order of the C enum in vg_activations.h.
ACTIVATIONS: tuple[str, ...] = (
    "linear",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "softplus",
    "erf",
)

#: Activation name -> integer code understood by the compiled kernels.
ACTIVATION_CODES: dict[str, int] = {name: code for code, name in enumerate(ACTIVATIONS)}

LEAKY_SLOPE = 0.01
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

#: |phi'(h)| below this counts as saturated in a gradient profile.
SATURATION_THRESHOLD = 1e-3


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
        value = special.erf(h)
        derivative = 2.0 / np.sqrt(np.pi) * np.exp(-h * h)
    else:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return value.astype(dtype, copy=False), derivative.astype(dtype, copy=False)


def phi(name: str, h: np.ndarray) -> np.ndarray:
    """Value of activation ``name`` at ``h`` (see :func:`activation`)."""
    return activation(name, h)[0]


def phi_prime(name: str, h: np.ndarray) -> np.ndarray:
    """Derivative of activation ``name`` at ``h`` (see :func:`activation`)."""
    return activation(name, h)[1]
