"""NumPy reference of every computation on a recurrent model: plain and obvious, what the tests trust.

It follows docs/ARCHITECTURE.md's step (torch's equations, see vgcore._recurrent) one
time step at a time, with no attempt at speed, and is itself checked against
finite differences, torch autograd and closed forms
(tests/test_recurrent_reference.py).

Conventions: inputs are validated (Recurrent.bind); arrays are NumPy, in the
model's dtype (float32 or float64) and computations run in it; logs of norms
are accumulated in float64.  ``model`` is a :class:`vgcore.Recurrent`; ``s0``
the initial states (B, N) with N = model.state_width; ``inputs`` None or
(B, warmup + T, m); vectors (tangents, cotangents) are (B, N) or (B, k, N).

Per step, the "gate units" are the G n pre-activations of the cell
(rnn: phi's argument; lstm: i, f, g, o; gru: r, z, n), and their
derivatives d gate / d pre-activation are what saturation and dead count.
The cotangent "at pre_h" is that of ``W_hh h + b_hh``, whose outer product
with h gives the step's contribution to d loss / d W_hh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vgcore._activations import activation
from vgcore.reference.stack import derivative_statistics, renormalised_backward


@dataclass
class StepCache:
    """What one step's forward pass keeps for its Jacobian products."""

    h: np.ndarray  # h_{t-1}, (B, n)
    c: np.ndarray | None  # lstm: c_{t-1}
    gates: np.ndarray  # (B, G n): phi(a) (rnn); i, f, g, o (lstm); r, z, n (gru)
    derivatives: np.ndarray  # (B, G n): d gate / d its pre-activation
    hidden_n: np.ndarray | None  # gru: W_hn h + b_hn, (B, n)
    tanh_c: np.ndarray | None  # lstm: tanh(c_t)
    tanh_c_derivative: np.ndarray | None  # lstm: tanh'(c_t)


def _parameters(model):
    return (np.asarray(model.weight_hh), np.asarray(model.weight_ih), np.asarray(model.bias_hh),
            np.asarray(model.bias_ih))


def step_forward(model, s: np.ndarray, u: np.ndarray | None) -> tuple[np.ndarray, StepCache]:
    """One step s_{t-1} -> s_t with input u_t (B, m) or None; returns ``(s_t, cache)``."""
    weight_hh, weight_ih, bias_hh, bias_ih = _parameters(model)
    n = model.hidden_width
    h = s[:, :n]
    pre_h = h @ weight_hh.T + bias_hh
    pre_x = (u @ weight_ih.T + bias_ih) if u is not None else np.broadcast_to(bias_ih, pre_h.shape)
    if model.cell == "rnn":
        value, derivative = activation(model.activation, pre_x + pre_h)
        return value.astype(s.dtype, copy=False), StepCache(h, None, value, derivative, None, None, None)
    if model.cell == "lstm":
        c = s[:, n:]
        a = pre_x + pre_h
        sig, sig_d = activation("sigmoid", a)
        tanh, tanh_d = activation("tanh", a)
        block = np.arange(4 * n) // n  # gate index of each column
        candidate = block == 2
        gates = np.where(candidate, tanh, sig)
        derivatives = np.where(candidate, tanh_d, sig_d)
        i, f, g, o = (gates[:, k * n:(k + 1) * n] for k in range(4))
        c_next = f * c + i * g
        tanh_c, tanh_c_derivative = activation("tanh", c_next)
        h_next = o * tanh_c
        s_next = np.concatenate([h_next, c_next], axis=1).astype(s.dtype, copy=False)
        return s_next, StepCache(h, c, gates, derivatives, None, tanh_c, tanh_c_derivative)
    # gru
    rz, rz_d = activation("sigmoid", pre_x[:, :2 * n] + pre_h[:, :2 * n])
    r, z = rz[:, :n], rz[:, n:]
    hidden_n = pre_h[:, 2 * n:]
    candidate, candidate_d = activation("tanh", pre_x[:, 2 * n:] + r * hidden_n)
    h_next = (1 - z) * candidate + z * h
    gates = np.concatenate([rz, candidate], axis=1)
    derivatives = np.concatenate([rz_d, candidate_d], axis=1)
    return h_next.astype(s.dtype, copy=False), StepCache(h, None, gates, derivatives, hidden_n, None, None)


def _expand(array, k_axis: bool):
    """Broadcast a per-sample cache (B, w) against vectors (B, k, w) when ``k_axis``."""
    return array[:, None, :] if k_axis else array


def step_vjp(model, cache: StepCache, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cotangents g at s_t -> (cotangents at s_{t-1}, cotangents at pre_h = W_hh h + b_hh)."""
    weight_hh = np.asarray(model.weight_hh)
    n = model.hidden_width
    k_axis = g.ndim == 3

    def e(array):
        return _expand(array, k_axis)

    gates, derivatives = e(cache.gates), e(cache.derivatives)
    if model.cell == "rnn":
        g_hh = g * derivatives
        return (g_hh @ weight_hh).astype(g.dtype, copy=False), g_hh
    if model.cell == "lstm":
        i, f, cand, o = (gates[..., k * n:(k + 1) * n] for k in range(4))
        di, df, dcand, do = (derivatives[..., k * n:(k + 1) * n] for k in range(4))
        g_h, g_c = g[..., :n], g[..., n:]
        g_c_total = g_c + g_h * o * e(cache.tanh_c_derivative)
        g_hh = np.concatenate([g_c_total * cand * di, g_c_total * e(cache.c) * df, g_c_total * i * dcand,
                               g_h * e(cache.tanh_c) * do], axis=-1)
        g_prev = np.concatenate([g_hh @ weight_hh, g_c_total * f], axis=-1)
        return g_prev.astype(g.dtype, copy=False), g_hh
    r, z, cand = (gates[..., k * n:(k + 1) * n] for k in range(3))
    dr, dz, dcand = (derivatives[..., k * n:(k + 1) * n] for k in range(3))
    g_a_n = g * (1 - z) * dcand  # at n's pre-activation
    g_a_z = g * (e(cache.h) - cand) * dz
    g_a_r = g_a_n * e(cache.hidden_n) * dr
    g_hh = np.concatenate([g_a_r, g_a_z, g_a_n * r], axis=-1)
    g_prev = g * z + g_hh @ weight_hh
    return g_prev.astype(g.dtype, copy=False), g_hh


def step_jvp(model, cache: StepCache, t: np.ndarray) -> np.ndarray:
    """Tangents t at s_{t-1} (B, N) or (B, k, N) -> tangents at s_t."""
    weight_hh = np.asarray(model.weight_hh)
    n = model.hidden_width
    k_axis = t.ndim == 3

    def e(array):
        return _expand(array, k_axis)

    gates, derivatives = e(cache.gates), e(cache.derivatives)
    t_a = t[..., :n] @ weight_hh.T  # tangent of pre_h
    if model.cell == "rnn":
        return (derivatives * t_a).astype(t.dtype, copy=False)
    if model.cell == "lstm":
        i, f, cand, o = (gates[..., k * n:(k + 1) * n] for k in range(4))
        ti, tf, tcand, to = (derivatives[..., k * n:(k + 1) * n] * t_a[..., k * n:(k + 1) * n]
                             for k in range(4))
        t_c = tf * e(cache.c) + f * t[..., n:] + ti * cand + i * tcand
        t_h = to * e(cache.tanh_c) + o * e(cache.tanh_c_derivative) * t_c
        return np.concatenate([t_h, t_c], axis=-1).astype(t.dtype, copy=False)
    r, z, cand = (gates[..., k * n:(k + 1) * n] for k in range(3))
    dr, dz, dcand = (derivatives[..., k * n:(k + 1) * n] for k in range(3))
    tr = dr * t_a[..., :n]
    tz = dz * t_a[..., n:2 * n]
    tcand = dcand * (tr * e(cache.hidden_n) + r * t_a[..., 2 * n:])
    t_h = (e(cache.h) - cand) * tz + (1 - z) * tcand + z * t
    return t_h.astype(t.dtype, copy=False)


def _step_input(inputs, t: int):
    return None if inputs is None else inputs[:, t]


def forward_with_caches(model, s0, steps: int, inputs, *, start: int = 0):
    """Runs ``steps`` steps from s0 with inputs[:, start:start + steps]: ``(s_T, [cache_1..cache_T])``."""
    s, caches = s0, []
    for t in range(steps):
        s, cache = step_forward(model, s, _step_input(inputs, start + t))
        caches.append(cache)
    return s, caches


def forward(model, s0, steps: int, inputs) -> np.ndarray:
    """s_T (B, N)."""
    s = s0
    for t in range(steps):
        s, _ = step_forward(model, s, _step_input(inputs, t))
    return s


def gradient_profile(model, s0, steps: int, inputs, grad_output) -> dict:
    """Per-step gradient measurements through time for the loss sum_b <s_T[b], g[b]>.

    Returns a dict of float64 arrays: ``log_grad_norm`` (B, T+1), column t the
    log norm of d loss / d s_t; ``log_weight_grad_norm`` (T,), entry t-1 the
    log Frobenius norm of step t's contribution sum_b g_hh[b] h_{t-1}[b]^T to
    d loss / d W_hh; ``saturation`` (T,), the fraction of the B G n gate
    derivatives of step t below 1e-3 in magnitude; ``dead`` (T,), the fraction
    of the G n gate units whose derivative is exactly 0 on every sample.

    The renormalised backward pass is the stacks' (vgcore.reference.stack.renormalised_backward):
    each sample's cotangent is rescaled to unit norm after every step and the
    log of the factor carried, so the logs are exact at any T; the
    weight-gradient contribution weights the samples by exp(log scale - max).
    """
    _, caches = forward_with_caches(model, s0, steps, inputs)

    def step_vjp_at(t, g):
        cache = caches[t - 1]
        g, g_hh = step_vjp(model, cache, g)
        return g, g_hh, cache.h

    result = renormalised_backward(steps, grad_output, step_vjp_at)
    return {**result, **derivative_statistics(np.stack([cache.derivatives for cache in caches]))}


def jvp(model, s0, steps: int, inputs, tangents) -> np.ndarray:
    """d s_T / d s_0 applied to tangents (B, k, N) -> (B, k, N)."""
    _, caches = forward_with_caches(model, s0, steps, inputs)
    t = tangents
    for cache in caches:
        t = step_jvp(model, cache, t)
    return t


def vjp(model, s0, steps: int, inputs, cotangents) -> np.ndarray:
    """(d s_T / d s_0)^T applied to cotangents (B, k, N) -> (B, k, N)."""
    _, caches = forward_with_caches(model, s0, steps, inputs)
    g = cotangents
    for cache in caches[::-1]:
        g, _ = step_vjp(model, cache, g)
    return g


def jacobian(model, s0, steps: int, inputs) -> np.ndarray:
    """d s_T / d s_0 per sample, (B, N_out, N_in): the identity pushed through the JVP."""
    batch, width = s0.shape
    identity = np.ascontiguousarray(np.broadcast_to(np.eye(width, dtype=s0.dtype), (batch, width, width)))
    return np.ascontiguousarray(jvp(model, s0, steps, inputs, identity).transpose(0, 2, 1))


def singular_values(model, s0, steps: int, inputs) -> np.ndarray:
    """Singular values of each sample's d s_T / d s_0, (B, N), descending, in the model's dtype."""
    return np.stack([np.linalg.svd(j, compute_uv=False) for j in jacobian(model, s0, steps, inputs)])


def lyapunov_log_growth(model, s0, steps: int, inputs, k: int, *, warmup: int = 0,
                        per_step: bool = False) -> np.ndarray:
    """Sums over the T counted steps of log|R_ii| for k tangents renormalised by QR every step, (B, k).

    The tangents start as e_1..e_k at s_0.  Each of the warmup + T steps maps
    them with its Jacobian (the JVP) and a QR factorisation per sample
    replaces them by Q; the first ``warmup`` steps advance the state and the
    directions but their log|R_ii| are not counted.  With ``per_step``,
    every counted step's log|R_ii| instead, (T, B, k).
    """
    batch, width = s0.shape
    tangents = np.zeros((batch, k, width), dtype=s0.dtype)
    tangents[:, np.arange(k), np.arange(k)] = 1
    s, counted = s0, []
    for t in range(warmup + steps):
        s, cache = step_forward(model, s, _step_input(inputs, t))
        mapped = step_jvp(model, cache, tangents)  # (B, k, N)
        q, r = np.linalg.qr(mapped.transpose(0, 2, 1))
        if t >= warmup:
            with np.errstate(divide="ignore"):  # a direction mapped to exactly 0: -inf
                counted.append(np.log(np.abs(np.diagonal(r, axis1=1, axis2=2).astype(np.float64))))
        tangents = np.ascontiguousarray(q.transpose(0, 2, 1))
    if per_step:
        return np.stack(counted)
    log_growth = np.zeros((batch, k))
    for step in counted:  # in time order, as the compiled kernel adds them
        log_growth += step
    return log_growth


def step_jacobians(model, s0, steps: int, inputs) -> np.ndarray:
    """Each step's own Jacobian d s_t / d s_{t-1}, (T, B, N, N) (for tests)."""
    batch, width = s0.shape
    identity = np.ascontiguousarray(np.broadcast_to(np.eye(width, dtype=s0.dtype), (batch, width, width)))
    _, caches = forward_with_caches(model, s0, steps, inputs)
    return np.stack([step_jvp(model, cache, identity).transpose(0, 2, 1) for cache in caches])
