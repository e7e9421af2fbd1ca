"""NumPy reference of a batch-normalised stack (norm="batch"): plain and obvious.

The layer (docs/ARCHITECTURE.md, "Batch normalisation"):

    v  = x @ W.T + b
    h  = BN(v)                              over the batch, per feature
    f  = phi(h)
    y  = x + residual * f   if residual is not None else f
    x' = y

BN(v)[b, j] = (v[b, j] - mean_b v[:, j]) * inv_std[j], inv_std = 1 / sqrt(var_b v[:, j] + 1e-5)
with the biased variance and no affine parameters: torch.nn.BatchNorm1d(n,
affine=False, track_running_stats=False) in training mode.

The samples are coupled, so the whole batch X (B, n) is one input and the
stack one map F: R^{B x n} -> R^{B x n}.  Its Jacobian products act on batch
tangents T (B, n); the functions here take k of them at once as (B, k, n),
the j-th being ``T[:, j, :]``.  The full Jacobian of F is (B, n, B, n)
(:func:`batch_jacobian`, for the tests); the public jacobian, singular_values
and lyapunov_exponents refuse norm="batch" because their per-sample (B, n, n)
contract does not describe it.

Inputs are assumed validated (B >= 2, finite, C-contiguous float32 / float64);
computations run in the arrays' dtype, logs of norms in float64.  The tests
hold this module to central finite differences and to torch autograd through
nn.BatchNorm1d (tests/test_batchnorm_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vgcore._activations import LAYER_NORM_EPS, activation
from vgcore.reference.stack import derivative_statistics, renormalised_backward

#: eps of BN(v) = (v - mean) / sqrt(var + eps); torch.nn.BatchNorm1d's default, and layer norm's.
BATCH_NORM_EPS = LAYER_NORM_EPS


def batch_norm(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BN over the batch (axis 0) per feature: ``(normalised (B, n), inv_std (n,))``."""
    centred = v - v.mean(axis=0)
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=0) + BATCH_NORM_EPS)
    return (centred * inv_std).astype(v.dtype, copy=False), inv_std.astype(v.dtype, copy=False)


def batch_norm_jacobian_product(g: np.ndarray, normalised: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
    """Product of BN's Jacobian with batch vectors ``g`` (B, n) or (B, k, n).

    Per feature the Jacobian over the batch is ``inv_std (I - 1 1^T / B - z z^T / B)``
    with ``z`` the normalised column: symmetric, so it serves the JVP and the
    VJP alike.  With a k axis, each ``g[:, j, :]`` is one batch vector.
    """
    if g.ndim == 3:
        normalised = normalised[:, None, :]
    return inv_std * (g - g.mean(axis=0) - normalised * (g * normalised).mean(axis=0))


@dataclass
class LayerCache:
    """What one layer's forward pass keeps for its Jacobian products."""

    x: np.ndarray  # the layer's input, also the linear map's input
    normalised: np.ndarray  # h = BN(v)
    inv_std: np.ndarray  # (n,)
    derivative: np.ndarray  # phi'(h)
    out: np.ndarray


def layer_forward(weight, bias, x, activation_name, residual) -> tuple[np.ndarray, LayerCache]:
    """One batch-normalised layer; returns ``(x', cache)``."""
    v = x @ weight.T + bias
    h, inv_std = batch_norm(v)
    f, derivative = activation(activation_name, h)
    out = (x + residual * f if residual is not None else f).astype(x.dtype, copy=False)
    return out, LayerCache(x, h, inv_std, derivative, out)


def layer_vjp(weight, cache: LayerCache, g, residual) -> tuple[np.ndarray, np.ndarray]:
    """Batch cotangents ``g`` at the layer output -> (at its input, at v = x W^T + b).

    ``g`` is (B, n) or (B, k, n); the cotangent at v is what the weight
    gradient needs: d loss / d W = g_v^T x.
    """
    derivative = cache.derivative[:, None, :] if g.ndim == 3 else cache.derivative
    g_f = residual * g if residual is not None else g
    g_v = batch_norm_jacobian_product(g_f * derivative, cache.normalised, cache.inv_std)
    g_x = g_v @ weight
    if residual is not None:
        g_x = g_x + g
    return g_x.astype(g.dtype, copy=False), g_v.astype(g.dtype, copy=False)


def layer_jvp(weight, cache: LayerCache, t, residual) -> np.ndarray:
    """Batch tangents ``t`` (B, n) or (B, k, n) at the layer input -> at its output."""
    derivative = cache.derivative[:, None, :] if t.ndim == 3 else cache.derivative
    t_h = batch_norm_jacobian_product(t @ weight.T, cache.normalised, cache.inv_std)
    t_f = derivative * t_h
    t_y = t + residual * t_f if residual is not None else t_f
    return t_y.astype(t.dtype, copy=False)


def forward_with_caches(weights, biases, x, activation_name, residual):
    """Forward pass keeping every layer's cache: ``(x_L, [cache_1, ..., cache_L])``."""
    caches = []
    for weight, bias in zip(weights, biases, strict=True):
        x, cache = layer_forward(weight, bias, x, activation_name, residual)
        caches.append(cache)
    return x, caches


def forward(weights, biases, x, activation_name, residual) -> np.ndarray:
    """x_L (B, n) for the batch x (B, n)."""
    return forward_with_caches(weights, biases, x, activation_name, residual)[0]


def gradient_profile(weights, biases, x, grad_output, activation_name, residual) -> dict:
    """Per-layer gradient measurements of the loss ``sum_b <x_L[b], g[b]>``.

    Returns a dict with ``log_grad_norm`` (B, L+1) (log of each sample's
    ||d loss / d x_l[b]||), ``log_weight_grad_norm`` (L,), ``saturation``
    (L,) and ``dead`` (L,), all float64.

    The backward map of a layer is linear in the batch cotangent G (B, n) as a
    whole, not sample by sample, so G is rescaled after every layer by one
    factor, its Frobenius norm (``renormalised_backward(coupled=True)``), and
    each sample's log norm is the carried log scale plus ``log ||G_b||``:
    exact at any depth.  The weight gradient is ``g_v^T x`` with g_v the
    cotangent at v = x W^T + b, formed as ``g_v^T (x - mean_b x)``.
    """
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual)

    def layer_vjp_at(layer, g):
        cache = caches[layer - 1]
        g, g_v = layer_vjp(weights[layer - 1], cache, g, residual)
        # g_v's columns sum to zero over the batch, so g_v^T x = g_v^T (x - mean_b x): the centred
        # form leaves out a common part that would only cancel (exactly, for identical samples)
        return g, g_v, cache.x - cache.x.mean(axis=0)

    result = renormalised_backward(len(weights), grad_output, layer_vjp_at, coupled=True)
    return {**result, **derivative_statistics(np.stack([cache.derivative for cache in caches]))}


def jvp(weights, biases, x, tangents, activation_name, residual) -> np.ndarray:
    """J_F T_j for batch tangents ``T_j = tangents[:, j, :]``; (B, k, n) -> (B, k, n)."""
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual)
    t = tangents
    for weight, cache in zip(weights, caches, strict=True):
        t = layer_jvp(weight, cache, t, residual)
    return t


def vjp(weights, biases, x, cotangents, activation_name, residual) -> np.ndarray:
    """J_F^T U_j for batch cotangents ``U_j = cotangents[:, j, :]``; (B, k, n) -> (B, k, n)."""
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual)
    g = cotangents
    for weight, cache in zip(weights[::-1], caches[::-1], strict=True):
        g, _ = layer_vjp(weight, cache, g, residual)
    return g


def batch_jacobian(weights, biases, x, activation_name, residual) -> np.ndarray:
    """The whole batch map's Jacobian, (B, n, B, n): ``J[b, i, c, j] = d x_L[b, i] / d x_0[c, j]``.

    Pushes the B n unit batch tangents through :func:`jvp`.
    """
    batch, width = x.shape
    basis = np.eye(batch * width, dtype=x.dtype).reshape(batch * width, batch, width)
    columns = jvp(weights, biases, x, np.ascontiguousarray(basis.transpose(1, 0, 2)), activation_name,
                  residual)  # (B, B n, n): [b, (c, j), i]
    return np.ascontiguousarray(columns.reshape(batch, batch, width, width).transpose(0, 3, 1, 2))
