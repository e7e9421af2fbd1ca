"""NumPy reference of the Jacobian spectra: plain and obvious, what the tests trust.

Inputs are assumed validated (see vgcore.spectra); arrays are NumPy, float32
or float64, and the linear algebra runs in the arrays' dtype.  Logs are
accumulated in float64 for both dtypes.
"""

from __future__ import annotations

import numpy as np

from vgcore.reference import stack as stack_reference


def singular_values(weights, biases, x, activation_name, residual, norm) -> np.ndarray:
    """Singular values of each sample's input-output Jacobian, (B, n), descending, in x's dtype."""
    jacobians = stack_reference.jacobian(weights, biases, x, activation_name, residual, norm)
    return np.stack([np.linalg.svd(jacobian, compute_uv=False) for jacobian in jacobians])


def lyapunov_log_growth(weights, biases, x, k, activation_name, residual, norm, *,
                        per_layer: bool = False) -> np.ndarray:
    """Sum over layers of log|R_ii| for k tangents renormalised by QR after every layer, (B, k).

    With ``per_layer``, every layer's log|R_ii| instead, (L, B, k).

    The tangents of every sample start as the first k standard basis vectors
    e_1..e_k.  After layer l maps them with its Jacobian, T = J_l Q, the QR
    factorisation T = Q' R (one per sample) gives the growth R_ii of the i-th
    direction orthogonal to the first i-1, and Q' the orthonormal tangents
    for the next layer.  Since J_L ... J_1 [e_1..e_k] = Q_L R_L ... R_1, the
    sums of log|R_ii| are the logs of the growth of 1-, 2-, ..., k-volumes
    spanned by the tangents, at any depth without underflow.
    """
    batch, width = x.shape
    tangents = np.zeros((batch, k, width), dtype=x.dtype)  # rows: the k tangents of a sample
    tangents[:, np.arange(k), np.arange(k)] = 1
    layers = []
    exponent = None
    for weight, bias in zip(weights, biases, strict=True):
        x, cache = stack_reference.layer_forward(weight, bias, x, activation_name, residual, norm, exponent)
        exponent = cache.out_exp
        mapped = stack_reference.layer_jvp(weight, cache, tangents, residual, norm)  # (B, k, n)
        q, r = np.linalg.qr(mapped.transpose(0, 2, 1))  # per sample: (n, k) = (n, k) (k, k)
        with np.errstate(divide="ignore"):  # a direction mapped to exactly 0: -inf
            layers.append(np.log(np.abs(np.diagonal(r, axis1=1, axis2=2).astype(np.float64))))
        tangents = np.ascontiguousarray(q.transpose(0, 2, 1))
    if per_layer:
        return np.stack(layers)
    log_growth = np.zeros((batch, k))
    for layer in layers:  # in layer order, as the compiled kernel adds them
        log_growth += layer
    return log_growth


def lyapunov_exponents(weights, biases, x, k, activation_name, residual, norm) -> np.ndarray:
    """Per-layer mean log growth rates of k directions, (B, k) float64, sorted descending."""
    rates = lyapunov_log_growth(weights, biases, x, k, activation_name, residual, norm) / len(weights)
    return np.ascontiguousarray(np.sort(rates, axis=1)[:, ::-1])
