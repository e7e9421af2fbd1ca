"""NumPy reference of every vgcore computation: plain and obvious.

This module is what the tests trust.  It follows docs/ARCHITECTURE.md line by line, one
layer at a time, with no attempt at speed.  It is itself checked against
central finite differences and closed forms (tests/test_reference.py).

Inputs are assumed validated (see vgcore._validation); arrays are NumPy,
float32 or float64, and computations run in the arrays' dtype.  Logs of norms
are accumulated in float64 for both dtypes.

The layer (docs/ARCHITECTURE.md):

    u  = LN(x)              if norm == "pre"  else x
    h  = u @ W.T + b
    f  = phi(h)
    y  = x + residual * f   if residual is not None else f
    x' = LN(y)              if norm == "post" else y
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vgcore._activations import LAYER_NORM_EPS, SATURATION_THRESHOLD, SCALE_RANGE, activation


def layer_norm(v: np.ndarray, exponent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LN over the last axis: ``((v - mean) * inv_std, inv_std)``, inv_std with a kept axis.

    With ``exponent`` (B,) the rows are scaled (:func:`scaled_rows`): row b
    stands for ``v_b * 2**e_b``, so its variance is ``var_b * 4**e_b``.  Below
    the floats (e < 0) the normalised row ``(v_b - mean_b) * inv_std_b`` keeps
    the exponent (LN's eps keeps it tiny); beyond them (e > 0) it is
    ``(v_b - mean_b) / sqrt(var_b + eps 4**-e)``, true values of order 1, so
    the normalised rows' exponents are ``min(e, 0)``.  inv_std is always the
    true one (beyond 2**126 in float32 it is subnormal and loses bits).
    """
    centred = v - v.mean(axis=-1, keepdims=True)
    if exponent is None:
        variance = (centred * centred).mean(axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(variance + LAYER_NORM_EPS)
        return (centred * inv_std).astype(v.dtype, copy=False), inv_std.astype(v.dtype, copy=False)
    # scaled rows: the variance and the factors in float64 (as the compiled kernels), so that
    # neither 4**e var nor eps 4**-e leaves float32
    wide = centred.astype(np.float64)
    variance = (wide * wide).mean(axis=-1, keepdims=True)
    e = exponent[:, None].astype(np.int64)
    above = np.maximum(e, 0)
    with np.errstate(over="ignore", divide="ignore"):
        # e > 0: the factor 1 / sqrt(var + eps 4**-e) (0 for a constant row, whose centred row is 0)
        # and the true inv_std 2**-e times it (a constant row: 1 / sqrt(eps))
        beyond = np.where(variance > 0, 1.0 / np.sqrt(variance + np.ldexp(LAYER_NORM_EPS, -2 * above)), 0.0)
        constant = 1.0 / np.sqrt(LAYER_NORM_EPS)
        inv_std = np.where(e > 0, np.where(variance > 0, np.ldexp(beyond, -above), constant),
                           1.0 / np.sqrt(np.ldexp(variance, 2 * np.minimum(e, 0)) + LAYER_NORM_EPS))
    factor = np.where(e > 0, beyond.astype(v.dtype), inv_std.astype(v.dtype))
    return (centred * factor).astype(v.dtype, copy=False), inv_std.astype(v.dtype, copy=False)


def layer_norm_jacobian_product(g: np.ndarray, normalised: np.ndarray, inv_std: np.ndarray,
                                exponent: np.ndarray | None = None) -> np.ndarray:
    """Product of LN's Jacobian with ``g`` (the Jacobian is symmetric, so J g = J^T g).

    ``J = inv_std * (I - 1 1^T / n - xhat xhat^T / n)`` with ``xhat`` the normalised vector.
    With ``exponent`` (broadcastable against ``normalised`` without its last
    axis) ``normalised`` is scaled: xhat = normalised * 2**exponent, so the
    last term carries 4**exponent.
    """
    projection = (g * normalised).mean(axis=-1, keepdims=True)
    if exponent is not None:
        projection = np.ldexp(projection, 2 * exponent[..., None]).astype(g.dtype, copy=False)
    return inv_std * (g - g.mean(axis=-1, keepdims=True) - normalised * projection)


# ---------------------------------------------------------------------------
# Rows beyond the floats (docs/ARCHITECTURE.md): a row whose largest entry is below
# 2**-SCALE_RANGE or above 2**SCALE_RANGE is kept as v * 2**e with max |v| in [0.5, 1) and e
# carried apart, so no forward pass underflows or overflows.  Rows in range keep e = 0 and are
# computed as they always were.


#: |exponent| of a scaled row at most (SCALE_EXPONENT_LIMIT in vgcore/_ext/_layers.pxd).
SCALE_EXPONENT_LIMIT = 2**29


def scaled_rows(v: np.ndarray, exponent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``v * 2**exponent`` (B, n) re-expressed: ``(v', e')`` with e' = 0 where the row is in range.

    A row whose largest magnitude M * 2**e lies in (2**-R, 2**R] (R =
    SCALE_RANGE) is returned unscaled (e' = 0); any other is scaled by a power
    of two to max |v'| in [0.5, 1); a zero row stays zero with e' = 0.
    """
    high = SCALE_RANGE[v.dtype.name]
    largest = np.max(np.abs(v), axis=-1)
    _, k = np.frexp(largest)
    # saturated as the kernels do: beyond 2**(+-2**29) every true value is 0 or inf
    top = np.clip(exponent + k, -SCALE_EXPONENT_LIMIT, SCALE_EXPONENT_LIMIT)
    zero = largest == 0
    in_range = ((top > -high) & (top <= high)) | zero
    shift = np.where(in_range, exponent, -k)  # in range: back to true values; else max into [0.5, 1)
    out = np.ldexp(v, shift[:, None].astype(np.int32)).astype(v.dtype, copy=False)
    return out, np.where(in_range, 0, top).astype(np.int64)


def true_rows(v: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """The values ``v * 2**exponent`` in v's dtype (they may under- or overflow: that is their value)."""
    return np.ldexp(v, exponent[:, None].astype(np.int32)).astype(v.dtype, copy=False)


def scaled_activation(activation_name: str, hs: np.ndarray, exponent: np.ndarray,
                      bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``phi(hs * 2**e + bias)`` for rows of scaled products hs (B, m): ``(f, e_f, phi')``.

    Rows with e = 0 are the plain ``phi(hs + bias)``.  Any other row is first
    put on one exponent e_h with the bias (its largest entry in [0.5, 2)); if
    it is then in range it is evaluated as true values.  Below 2**-R every
    entry is, and phi is its linearisation at 0: phi'(0+) or phi'(0-) by the
    sign (vg_activation_tiny in csrc/vg_activation_body.h), times h, plus
    phi(0) -- which, when it is not 0, swamps the rest and leaves a true row.
    Beyond 2**R (:func:`activation_huge`) entries up to 2**R are evaluated as
    they are and larger ones on phi's asymptote.
    """
    dtype = hs.dtype
    high = SCALE_RANGE[dtype.name]
    low = -high
    scaled = exponent != 0
    h = hs + bias
    if not scaled.any():
        f, derivative = activation(activation_name, h)
        return f, np.zeros(len(hs), np.int64), derivative
    h = h.copy()
    e_f = np.zeros(len(hs), np.int64)
    derivative = np.empty_like(hs)
    f = np.empty_like(hs)
    plain = ~scaled
    f[plain], derivative[plain] = activation(activation_name, h[plain])
    zero_value = activation(activation_name, np.zeros(1, dtype))[0][0]
    bias_largest = np.max(np.abs(bias)) if bias.size else 0
    _, k_bias = np.frexp(bias_largest)
    for row in np.flatnonzero(scaled):
        products, e = hs[row], int(exponent[row])
        largest = np.max(np.abs(products))
        if largest == 0 and bias_largest == 0:
            f[row], derivative[row] = activation(activation_name, np.zeros_like(products))
            continue
        candidates = ([e + int(np.frexp(largest)[1])] if largest > 0 else []) + \
                     ([int(k_bias)] if bias_largest > 0 else [])
        e_h = max(candidates)
        row_h = (np.ldexp(products, e - e_h) + np.ldexp(bias, -e_h)).astype(dtype)
        if e_h > high:
            f[row], derivative[row] = activation_huge(activation_name, row_h, e_h)
            e_f[row] = e_h
            continue
        if e_h > low:
            f[row], derivative[row] = activation(activation_name, np.ldexp(row_h, e_h).astype(dtype))
            continue
        probe = (np.sign(row_h) * np.ldexp(1.0, low)).astype(dtype)
        derivative[row] = activation(activation_name, probe)[1]
        if zero_value != 0:
            f[row] = zero_value
        else:
            f[row], e_f[row] = derivative[row] * row_h, e_h
    return f, e_f, derivative


def activation_huge(activation_name: str, h_scaled: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """``(phi(h) * 2**-e, phi'(h))`` for h = h_scaled * 2**e beyond 2**SCALE_RANGE (e > 0).

    Entries with |h| <= 2**R are evaluated as they are; larger ones lie on
    phi's asymptote a h + c, with a = phi'(+-2**R) and c = phi(+-2**R) -
    a (+-2**R) (vg_activation_huge in csrc/vg_activation_body.h).
    """
    dtype = h_scaled.dtype
    high = SCALE_RANGE[dtype.name]
    _, k = np.frexp(h_scaled)
    direct = (h_scaled == 0) | (k + e <= high)
    value = np.empty_like(h_scaled)
    derivative = np.empty_like(h_scaled)
    value[direct], derivative[direct] = activation(activation_name,
                                                   np.ldexp(h_scaled[direct], e).astype(dtype))
    value[direct] = np.ldexp(value[direct], -e)
    far = ~direct
    big = np.where(h_scaled[far] > 0, 1.0, -1.0).astype(dtype) * np.ldexp(dtype.type(1), high)
    at_big, slope = activation(activation_name, big)
    value[far] = slope * h_scaled[far] + np.ldexp(at_big - slope * big, -e).astype(dtype)
    derivative[far] = slope
    return value, derivative


def add_scaled(a: np.ndarray, e_a: np.ndarray, b: np.ndarray,
               e_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a * 2**e_a + b * 2**e_b`` row by row, on the larger of the two exponents."""
    top = np.maximum(e_a, e_b)
    total = (np.ldexp(a, (e_a - top)[:, None].astype(np.int32))
             + np.ldexp(b, (e_b - top)[:, None].astype(np.int32))).astype(a.dtype, copy=False)
    return total, top


@dataclass
class LayerCache:
    """What one layer's forward pass keeps for its Jacobian products.

    ``u`` and ``out`` are scaled rows: their true values are ``u * 2**u_exp``
    and ``out * 2**out_exp`` (exponents 0 but for rows below the floats).
    """

    u: np.ndarray  # input of the linear map, LN(x) or x
    u_exp: np.ndarray  # (B,) int
    inv_std_pre: np.ndarray | None
    derivative: np.ndarray  # phi'(h)
    out: np.ndarray  # x', the layer's output
    out_exp: np.ndarray  # (B,) int
    inv_std_post: np.ndarray | None


def layer_forward(weight, bias, x, activation_name, residual, norm,
                  exponent: np.ndarray | None = None) -> tuple[np.ndarray, LayerCache]:
    """One layer of the stack; returns ``(x', cache)``, x' scaled by ``cache.out_exp``.

    ``exponent`` (B,) is x's (zeros when None): x's true rows are x * 2**exponent.
    """
    if exponent is None:
        x, exponent = scaled_rows(x, np.zeros(len(x), np.int64))
    inv_std_pre = inv_std_post = None
    u = x
    u_exp = exponent
    if norm == "pre":
        u, inv_std_pre = layer_norm(x, exponent)
        u_exp = np.minimum(exponent, 0)
    f, e_f, derivative = scaled_activation(activation_name, u @ weight.T, u_exp, bias)
    if residual is not None:
        y, e_y = add_scaled(x, exponent, (residual * f).astype(x.dtype, copy=False), e_f)
    else:
        y, e_y = f, e_f
    out = y
    if norm == "post":
        y, e_y = scaled_rows(y, e_y)  # a row beyond the floats gets its exponent before LN squares it
        out, inv_std_post = layer_norm(y, e_y)
        e_y = np.minimum(e_y, 0)
    out, out_exp = scaled_rows(out.astype(x.dtype, copy=False), e_y)
    return out, LayerCache(u, u_exp, inv_std_pre, derivative, out, out_exp, inv_std_post)


def _expand(cache_array, k_axis: bool):
    """Broadcast a per-sample cache (B, n) or exponent (B,) against vectors (B, k, n) when ``k_axis``."""
    return cache_array[:, None, ...] if k_axis else cache_array


def layer_vjp(weight, cache: LayerCache, g, residual, norm) -> tuple[np.ndarray, np.ndarray]:
    """Cotangents ``g`` at the layer output -> (cotangents at its input, cotangents at h).

    ``g`` is (B, n) or (B, k, n).
    """
    k_axis = g.ndim == 3
    if norm == "post":
        g = layer_norm_jacobian_product(g, _expand(cache.out, k_axis), _expand(cache.inv_std_post, k_axis),
                                        _expand(cache.out_exp, k_axis))
    g_f = residual * g if residual is not None else g
    g_h = g_f * _expand(cache.derivative, k_axis)
    g_u = g_h @ weight
    if norm == "pre":
        g_u = layer_norm_jacobian_product(g_u, _expand(cache.u, k_axis), _expand(cache.inv_std_pre, k_axis),
                                          _expand(cache.u_exp, k_axis))
    g_x = g_u + g if residual is not None else g_u
    return g_x.astype(g.dtype, copy=False), g_h


def layer_jvp(weight, cache: LayerCache, t, residual, norm) -> np.ndarray:
    """Tangents ``t`` at the layer input (B, n) or (B, k, n) -> tangents at its output."""
    k_axis = t.ndim == 3
    t_u = t
    if norm == "pre":
        t_u = layer_norm_jacobian_product(t, _expand(cache.u, k_axis), _expand(cache.inv_std_pre, k_axis),
                                          _expand(cache.u_exp, k_axis))
    t_h = t_u @ weight.T
    t_f = _expand(cache.derivative, k_axis) * t_h
    t_y = t + residual * t_f if residual is not None else t_f
    if norm == "post":
        t_y = layer_norm_jacobian_product(t_y, _expand(cache.out, k_axis),
                                          _expand(cache.inv_std_post, k_axis), _expand(cache.out_exp, k_axis))
    return t_y.astype(t.dtype, copy=False)


def forward_with_caches(weights, biases, x, activation_name, residual, norm):
    """Forward pass keeping every layer's cache: ``(x_L, [cache_1, ..., cache_L])``, x_L true values."""
    caches = []
    exponent = None
    for weight, bias in zip(weights, biases, strict=True):
        x, cache = layer_forward(weight, bias, x, activation_name, residual, norm, exponent)
        exponent = cache.out_exp
        caches.append(cache)
    return (x if exponent is None else true_rows(x, exponent)), caches


def forward(weights, biases, x, activation_name, residual, norm) -> np.ndarray:
    """x_L (B, n) for inputs x (B, n)."""
    return forward_with_caches(weights, biases, x, activation_name, residual, norm)[0]


def derivative_statistics(derivatives: np.ndarray) -> dict:
    """``saturation`` and ``dead`` (L,) float64 of per-layer derivatives (L, B, m) (every model kind).

    saturation: fraction of the B * m entries with |phi'| < SATURATION_THRESHOLD;
    dead: fraction of the m units whose phi' is exactly 0 on every sample.
    """
    saturation = (np.abs(derivatives) < SATURATION_THRESHOLD).mean(axis=(1, 2))
    dead = (derivatives == 0).all(axis=1).mean(axis=1)
    return {"saturation": saturation.astype(np.float64), "dead": dead.astype(np.float64)}


def renormalised_backward(depth: int, grad_output: np.ndarray, layer_vjp_at, *,
                          coupled: bool = False) -> dict:
    """The renormalised backward pass of every model kind's reference.

    ``layer_vjp_at(l, g)`` maps the unit-scaled cotangent g (B, n) at the
    output of layer (step) l = depth .. 1 to ``(g_in, g_h, u)`` or
    ``(g_in, g_h, u, u_exp)``: the cotangent at the layer's input, the
    cotangent at its pre-activations (B, m) and the linear input u (B, n),
    scaled by 2**u_exp (B,) when given, whose outer products with g_h make
    d loss / d W_l.

    Each sample's cotangent is rescaled to unit norm after every layer and the
    log of the factor carried in float64, so the logs are exact at any depth.
    With ``coupled`` (batch norm: samples interact) the whole batch is
    rescaled by one factor, its Frobenius norm, since rescaling samples apart
    would not commute with the coupled Jacobian.  The weight gradient sums
    samples of different scales, so it is formed with weights
    exp(log_scale_b - max log_scale), again exact.

    Returns ``log_grad_norm`` (B, depth+1) and ``log_weight_grad_norm`` (depth,), float64.
    """
    batch = grad_output.shape[0]
    log_grad_norm = np.empty((batch, depth + 1))
    log_weight_grad_norm = np.empty(depth)
    log_scale = np.zeros(batch)
    g = grad_output
    with np.errstate(divide="ignore"):
        for layer in range(depth, -1, -1):
            log_norm_b, unit = log_row_norms(g)
            log_grad_norm[:, layer] = log_scale + log_norm_b
            if coupled:
                # one factor for the batch: its Frobenius norm, taken as one long row
                log_total, whole = log_row_norms(g.reshape(1, -1))
                if np.isfinite(log_total[0]):
                    g = whole.reshape(g.shape).astype(g.dtype, copy=False)
                    log_scale = log_scale + log_total[0]
            else:
                g = unit.astype(g.dtype, copy=False)  # zero rows stay zero
                log_scale = log_scale + np.where(np.isfinite(log_norm_b), log_norm_b, 0.0)
            if layer == 0:
                break
            g, g_h, u, *u_exp = layer_vjp_at(layer, g)
            # sample b's term is exp(log_scale_b) g_h,b (u_b 2**e_b): weighted relative to the largest
            sample_log = log_scale + (u_exp[0] * np.log(2.0) if u_exp else 0.0)
            sample_weight = np.exp(sample_log - sample_log.max())
            weight_grad = (g_h * sample_weight[:, None].astype(g_h.dtype)).T @ u
            log_weight_norm = log_row_norms(weight_grad.reshape(1, -1))[0][0]
            log_weight_grad_norm[layer - 1] = sample_log.max() + log_weight_norm
    return {"log_grad_norm": log_grad_norm, "log_weight_grad_norm": log_weight_grad_norm}


def log_row_norms(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log ||r||, r / ||r||) for each row, in float64, exact for any finite scale.

    Each row is divided by its largest magnitude before squaring, so no
    square underflows or overflows (a plain sum of squares loses rows below
    1e-154 or above 1e154).  Zero rows give -inf and stay zero.
    """
    rows = rows.astype(np.float64)
    largest = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    safe = np.where(largest > 0, largest, 1.0)
    scaled = rows / safe[:, None]
    root = np.sqrt(np.einsum("ij,ij->i", scaled, scaled))
    with np.errstate(divide="ignore"):
        log_norm = np.where(largest > 0, np.log(safe) + np.log(np.where(root > 0, root, 1.0)), -np.inf)
    unit = scaled / np.where(root > 0, root, 1.0)[:, None]
    return log_norm, unit


def gradient_profile(weights, biases, x, grad_output, activation_name, residual, norm):
    """Per-layer gradient measurements, with per-layer renormalisation (:func:`renormalised_backward`).

    Returns a dict with ``log_grad_norm`` (B, L+1), ``log_weight_grad_norm``
    (L,), ``saturation`` (L,) and ``dead`` (L,), all float64.
    """
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual, norm)

    def layer_vjp_at(layer, g):
        cache = caches[layer - 1]
        g, g_h = layer_vjp(weights[layer - 1], cache, g, residual, norm)
        return g, g_h, cache.u, cache.u_exp

    result = renormalised_backward(len(weights), grad_output, layer_vjp_at)
    return {**result, **derivative_statistics(np.stack([cache.derivative for cache in caches]))}


def jvp(weights, biases, x, tangents, activation_name, residual, norm) -> np.ndarray:
    """J(x_b) v for tangents (B, k, n) -> (B, k, n)."""
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual, norm)
    t = tangents
    for weight, cache in zip(weights, caches, strict=True):
        t = layer_jvp(weight, cache, t, residual, norm)
    return t


def vjp(weights, biases, x, cotangents, activation_name, residual, norm) -> np.ndarray:
    """J(x_b)^T u for cotangents (B, k, n) -> (B, k, n)."""
    _, caches = forward_with_caches(weights, biases, x, activation_name, residual, norm)
    g = cotangents
    for weight, cache in zip(weights[::-1], caches[::-1], strict=True):
        g, _ = layer_vjp(weight, cache, g, residual, norm)
    return g


def jacobian(weights, biases, x, activation_name, residual, norm) -> np.ndarray:
    """d x_L / d x_0 per sample, (B, n_out, n_in): pushes the identity through the JVP."""
    batch, width = x.shape
    identity = np.broadcast_to(np.eye(width, dtype=x.dtype), (batch, width, width))
    columns = jvp(weights, biases, x, np.ascontiguousarray(identity), activation_name, residual, norm)
    return np.ascontiguousarray(columns.transpose(0, 2, 1))
