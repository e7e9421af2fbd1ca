"""Public computations on a Stack: validation, then dispatch to a backend.

Backends:
- "cpu":   the compiled kernels (vgcore._kernels through vgcore._cpu);
- "numpy": the plain reference (vgcore._reference);
- "cuda":  the CuPy mirror (vgcore._cuda), for arrays on an NVIDIA GPU;
- "auto":  "cuda" when the stack's arrays live on a GPU, else "cpu".
Results come back on the device of the inputs.
"""

from __future__ import annotations

import math
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

from vgcore import _reference
from vgcore import _validation as check
from vgcore._profile import Profile
from vgcore._stack import Stack

# Offset mixed into a stack's seed for the default grad_output, so that the
# cotangent stream never coincides with the weight stream.
_GRAD_OUTPUT_STREAM = 0x67726164  # "grad"


def _numpy_backend() -> SimpleNamespace:
    """The reference, wrapped to the backends' common signatures."""

    def options(stack):
        return stack.activation, stack.residual, stack.norm

    def into(out, result):
        if out is None:
            return result
        out[...] = result
        return out

    def broadcast(x, vectors):
        return np.broadcast_to(vectors, (x.shape[0], *vectors.shape[-2:]))

    return SimpleNamespace(
        forward=lambda s, x, out: into(out, _reference.forward(s.weights, s.biases, x, *options(s))),
        gradient_profile=lambda s, x, g: _reference.gradient_profile(s.weights, s.biases, x, g,
                                                                     *options(s)),
        jvp=lambda s, x, t, out: into(out, _reference.jvp(s.weights, s.biases, x, broadcast(x, t),
                                                          *options(s))),
        vjp=lambda s, x, u, out: into(out, _reference.vjp(s.weights, s.biases, x, broadcast(x, u),
                                                          *options(s))),
        jacobian=lambda s, x, out: into(out, _reference.jacobian(s.weights, s.biases, x, *options(s))),
    )


def _resolve(name: str, stack: Stack) -> str:
    """The concrete backend for ``backend=name`` (validated) and this stack's device."""
    on_gpu = stack.device == "cuda"
    if name == "auto":
        return "cuda" if on_gpu else "cpu"
    if on_gpu and name != "cuda":
        raise ValueError(f"backend: {name!r} runs on host arrays but the stack lives on the GPU; "
                         "use backend='cuda' or 'auto'")
    return name


def _backend(name: str, stack: Stack) -> ModuleType | SimpleNamespace:
    """Resolve ``backend`` for ``stack`` (validated name) to an implementation."""
    name = _resolve(name, stack)
    if name == "cuda":
        try:
            from vgcore import _cuda
        except ImportError as error:
            raise ValueError(f"backend: 'cuda' is not available here ({error})") from error
        return _cuda.backend()
    if name == "numpy":
        return _numpy_backend()
    from vgcore import _cpu

    return _cpu


def _check_stack(stack: Any) -> Stack:
    if not isinstance(stack, Stack):
        raise TypeError(f"stack: expected a vgcore.Stack, got {type(stack).__name__}")
    return stack


def _check_batch(stack: Stack, x: Any, name: str = "x"):
    """x as a C-contiguous (B, n) array in the stack's dtype, on the stack's device."""
    x = check.as_float_array(x, name, ndim=2, dtype=stack.dtype, allow_any_float=True)
    if check.array_namespace(x) is not check.array_namespace(stack.weights):
        raise TypeError(f"{name}: must live on the same device as the stack ({stack.device})")
    if x.shape[0] < 1:
        raise ValueError(f"{name}: the batch (first axis) must hold at least one sample")
    if x.shape[1] != stack.width:
        raise ValueError(f"{name}: expected shape (B, {stack.width}) for a stack of width "
                         f"{stack.width}, got {tuple(x.shape)}")
    return check.contiguous(x)


def _check_vectors(stack: Stack, vectors: Any, batch: int, name: str):
    """Tangents / cotangents (B, k, n) or (k, n), C-contiguous, in the stack's dtype."""
    vectors = check.as_float_array(vectors, name, dtype=stack.dtype, allow_any_float=True)
    if vectors.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape (B, k, n) or (k, n), got {tuple(vectors.shape)}")
    if check.array_namespace(vectors) is not check.array_namespace(stack.weights):
        raise TypeError(f"{name}: must live on the same device as the stack ({stack.device})")
    if vectors.shape[-1] != stack.width or vectors.shape[-2] < 1 or (
        vectors.ndim == 3 and vectors.shape[0] != batch
    ):
        raise ValueError(f"{name}: expected shape ({batch}, k, {stack.width}) or (k, {stack.width}) "
                         f"with k >= 1, got {tuple(vectors.shape)}")
    return check.contiguous(vectors)


def forward(stack: Stack, x: Any, *, out: Any = None, backend: str = "auto"):
    """Output x_L of the stack for a batch of inputs.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    out : ndarray, shape (B, n), optional
        Where to write the result (C-contiguous, the stack's dtype, writable).
    backend : {"auto", "cpu", "cuda", "numpy"}

    Returns
    -------
    ndarray, shape (B, n)

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work.
    """
    stack = _check_stack(stack)
    backend = check.check_backend(backend)
    x = _check_batch(stack, x)
    out = check.check_out(out, x.shape, stack.dtype, (x, stack.weights, stack.biases))
    return _backend(backend, stack).forward(stack, x, out)


def default_grad_output(stack: Stack, batch: int):
    """The default cotangent of gradient_profile: standard normal, drawn from the stack's seed.

    Explicit stacks (no seed) use seed 0.  Drawn in float64 on the host, then
    cast and moved to the stack's device, so every backend sees the same values.
    """
    seed = 0 if stack.seed is None else stack.seed
    rng = np.random.default_rng([seed, _GRAD_OUTPUT_STREAM])
    values = rng.standard_normal((batch, stack.width)).astype(stack.dtype)
    if stack.device == "cuda":
        from vgcore._cuda import to_device

        return to_device(values)
    return values


def _check_segment(segment: Any, depth: int) -> int | None:
    """None, or the segment length S in 1..L ("auto": ceil(sqrt(L / 2)), which minimises L/S + 2S)."""
    if segment is None:
        return None
    if isinstance(segment, str):
        if segment != "auto":
            raise ValueError(f"segment: expected None, 'auto' or a number of layers, got {segment!r}")
        return max(1, math.ceil(math.sqrt(depth / 2)))
    return min(check.check_int(segment, "segment"), depth)


def gradient_profile(stack: Stack, x: Any, grad_output: Any = None, *, backend: str = "auto",
                     segment: int | str | None = None) -> Profile:
    """Per-layer gradient norms, weight-gradient norms, saturation and dead units.

    The loss is ``sum_b <x_L[b], g[b]>`` with ``g = grad_output``.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
        Inputs x_0.
    grad_output : array, shape (B, n), optional
        Cotangent at the output; default standard normal drawn from the
        stack's seed (:func:`default_grad_output`).
    backend : {"auto", "cpu", "cuda", "numpy"}
    segment : None, "auto" or int
        Memory mode of the "cpu" backend.  None keeps every layer's
        activations (fastest; about 2 L B n values).  An int S keeps them only
        every S layers and recomputes each segment's forward pass during the
        backward pass: one extra forward pass, memory about (L/S + 2S) B n
        values, bitwise the same results.  "auto" picks S = ceil(sqrt(L/2)).
        Other backends keep every activation and ignore it.

    Returns
    -------
    Profile
        ``log_grad_norm`` (B, L+1), ``log_weight_grad_norm`` (L,),
        ``saturation`` (L,), ``dead`` (L,), ``chi_theory``.  Log norms are
        exact and finite at any depth (per-layer renormalisation); -inf only
        where a gradient is exactly zero.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work.
    """
    stack = _check_stack(stack)
    backend = check.check_backend(backend)
    x = _check_batch(stack, x)
    segment = _check_segment(segment, stack.depth)
    if grad_output is None:
        grad_output = default_grad_output(stack, x.shape[0])
    else:
        grad_output = _check_batch(stack, grad_output, "grad_output")
        if grad_output.shape[0] != x.shape[0]:
            raise ValueError(f"grad_output: expected shape {tuple(x.shape)}, got {tuple(grad_output.shape)}")
    implementation = _backend(backend, stack)
    if segment is not None and _resolve(backend, stack) == "cpu":
        result = implementation.gradient_profile(stack, x, grad_output, segment)
    else:
        result = implementation.gradient_profile(stack, x, grad_output)
    return Profile(chi_theory=stack.chi_theory, config=stack.config(), **result)


def _jacobian_product(kind: str, stack: Any, x: Any, vectors: Any, name: str, out: Any, backend: Any):
    """Validation and dispatch shared by jvp and vjp; ``name`` is the vectors' argument name."""
    stack = _check_stack(stack)
    backend = check.check_backend(backend)
    x = _check_batch(stack, x)
    vectors = _check_vectors(stack, vectors, x.shape[0], name)
    shape = (x.shape[0], vectors.shape[-2], stack.width)
    out = check.check_out(out, shape, stack.dtype, (x, vectors, stack.weights, stack.biases))
    return getattr(_backend(backend, stack), kind)(stack, x, vectors, out)


def jvp(stack: Stack, x: Any, tangents: Any, *, out: Any = None, backend: str = "auto"):
    """Jacobian-vector products J(x_b) v of the stack's input-output map.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
    tangents : array, shape (B, k, n) or (k, n)
        k tangents per sample at the input (the same k for every sample when 2-D).
    out : ndarray, shape (B, k, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}

    Returns
    -------
    ndarray, shape (B, k, n)
        ``out[b, j] = J(x_b) tangents[b, j]``.
    """
    return _jacobian_product("jvp", stack, x, tangents, "tangents", out, backend)


def vjp(stack: Stack, x: Any, cotangents: Any, *, out: Any = None, backend: str = "auto"):
    """Vector-Jacobian products J(x_b)^T u of the stack's input-output map.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
    cotangents : array, shape (B, k, n) or (k, n)
        k cotangents per sample at the output.
    out : ndarray, shape (B, k, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}

    Returns
    -------
    ndarray, shape (B, k, n)
        ``out[b, j] = J(x_b)^T cotangents[b, j]``.
    """
    return _jacobian_product("vjp", stack, x, cotangents, "cotangents", out, backend)


def jacobian(stack: Stack, x: Any, *, out: Any = None, backend: str = "auto"):
    """Input-output Jacobian d x_L / d x_0 of every sample.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
    out : ndarray, shape (B, n, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}

    Returns
    -------
    ndarray, shape (B, n, n)
        ``J[b, i, j] = d x_L[b, i] / d x_0[b, j]``.
    """
    stack = _check_stack(stack)
    backend = check.check_backend(backend)
    x = _check_batch(stack, x)
    shape = (x.shape[0], stack.width, stack.width)
    out = check.check_out(out, shape, stack.dtype, (x, stack.weights, stack.biases))
    return _backend(backend, stack).jacobian(stack, x, out)
