"""The public computations: validate, then hand the problem to the chosen backend.

Every function here takes any stack kind (vgcore._model): the stack validates
its inputs and call keywords (``stack.bind``), the registry in vgcore.backends
names the implementation for the stack's kind and the backend, and the result
comes back on the device of the model.  Backends:

- "cpu":   the compiled kernels (vgcore._ext);
- "numpy": the plain NumPy reference;
- "cuda":  the CuPy mirror, for arrays on an NVIDIA GPU;
- "auto":  "cuda" when the model's arrays live on a GPU, else "cpu".

See docs/ARCHITECTURE.md for the data flow of a call.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from vgcore import _validation as check
from vgcore._model import Problem, check_model
from vgcore._profile import Profile
from vgcore.backends import implementation

__all__ = [
    "default_grad_output", "forward", "gradient_profile", "jacobian", "jvp", "lyapunov_exponents",
    "singular_values", "vjp",
]

# Offset mixed into a stack's seed for the default grad_output, so that the
# cotangent stream never coincides with the weight stream.
_GRAD_OUTPUT_STREAM = 0x67726164  # "grad"


def _prepare(stack: Any, x: Any, backend: Any, **call: Any) -> tuple[ModuleType, Problem]:
    """The implementation for ``stack`` on ``backend`` and the validated problem at ``x``.

    Raises TypeError / ValueError naming the argument (stack, backend, x, steps, ...).
    """
    implementation_module = implementation(check_model(stack), backend)
    return implementation_module, stack.bind(x, **call)


def _out(out: Any, shape: tuple[int, ...], problem: Problem, *others: Any, given: tuple = ()):
    """Validated ``out`` of ``shape``, overlapping neither the problem's arrays nor ``others``,
    nor the caller's arguments as ``given`` (before conversion, which may have copied them)."""
    inputs = (problem.x, problem.inputs, *problem.model.parameters, *others)
    return check.check_out(out, shape, problem.model.dtype, tuple(a for a in inputs if a is not None),
                           tuple(a for a in given if a is not None))


def _check_size(problem: Problem, values: float, what: str) -> None:
    """ValueError naming x, before any work, when ``values`` values of the model's dtype exceed the
    memory this process can have (vgcore._validation.check_memory): the batch of x sets the size."""
    check.check_memory(values * np.dtype(problem.model.dtype).itemsize, "x", what)


def _no_nan(result: Any, stack: Any, what: str) -> Any:
    """``result``, or a ValueError naming stack where the computation overflowed into NaN.

    Finite inputs never give NaN (docs/ARCHITECTURE.md, Errors): where values exceed the
    dtype inside a computation (inf - inf, 0 * inf), the result is refused
    rather than returned.  Overflow to +-inf without NaN is returned as is.
    """
    arrays = result if isinstance(result, tuple) else (result,)
    for array in arrays:
        if bool(check.array_namespace(array).isnan(array).any()):
            dtype = np.dtype(stack.dtype)
            raise ValueError(f"stack: {what} at these inputs x exceeds {dtype.name} (largest "
                             f"{np.finfo(dtype).max:.3g}) and rounding made it NaN; use smaller weights or "
                             "inputs, float64, or the log-space quantities (gradient_profile, "
                             "lyapunov_exponents)")
    return result


def forward(stack: Any, x: Any, *, out: Any = None, backend: str = "auto", steps: int | None = None,
            inputs: Any = None):
    """The model's output for a batch of inputs: a stack's x_L.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    out : ndarray, shape (B, n), optional
        Where to write the result (C-contiguous, the stack's dtype, writable,
        overlapping no input).
    backend : {"auto", "cpu", "cuda", "numpy"}
    steps, inputs
        Recurrent models only (time steps and per-step inputs); a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

    Returns
    -------
    ndarray, shape (B, n)

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming
        stack where the computation overflows the dtype into NaN (never returned).
    """
    backend_module, problem = _prepare(stack, x, backend, steps=steps, inputs=inputs)
    out = _out(out, tuple(problem.x.shape), problem, given=(x, inputs))
    return _no_nan(backend_module.forward(problem, out), stack, "the forward pass")


def default_grad_output(stack: Any, batch: int):
    """The default cotangent of gradient_profile: standard normal, drawn from the stack's seed.

    Models without a seed (explicit parameters) use seed 0.  Drawn in float64
    on the host, then cast and moved to the stack's device, so every backend
    sees the same values.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    batch : int
        Number of samples B.

    Returns
    -------
    array, shape (B, stack.state_width), the model's dtype, on its device
    """
    seed = 0 if stack.seed is None else stack.seed
    rng = np.random.default_rng([seed, _GRAD_OUTPUT_STREAM])
    values = rng.standard_normal((batch, stack.state_width)).astype(stack.dtype)
    if stack.device == "cuda":
        from vgcore.backends.cuda_stack import to_device

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


def gradient_profile(stack: Any, x: Any, grad_output: Any = None, *, backend: str = "auto",
                     segment: int | str | None = None, steps: int | None = None,
                     inputs: Any = None) -> Profile:
    """Per-layer gradient norms, weight-gradient norms, saturation and dead units.

    The loss is ``sum_b <x_L[b], g[b]>`` with ``g = grad_output``.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
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
    steps, inputs
        Recurrent models only; a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

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
        Naming the offending argument, before any work (x when the kept
        activations, 2 (L + 1) B n values, exceed the memory available: use
        ``segment``); ValueError naming stack where the computation overflows
        the dtype into NaN (never returned).
    """
    backend_module, problem = _prepare(stack, x, backend, steps=steps, inputs=inputs)
    segment = _check_segment(segment, problem.depth)
    depth, batch, width = problem.depth, problem.batch, stack.state_width
    kept = depth if segment is None else segment + -(-depth // segment)
    _check_size(problem, 2.0 * (kept + 1) * batch * width,
                f"the gradient profile of {batch:,} samples through {depth:,} layers (or steps) of width "
                f"{width}, keeping x_l and phi'(h) of {kept:,} of them"
                + ("" if segment is not None else " (segment='auto' keeps about "
                   f"{_check_segment('auto', depth) + -(-depth // _check_segment('auto', depth)):,})"))
    if grad_output is None:
        grad_output = default_grad_output(stack, problem.batch)
    else:
        # the same call keywords: a recurrent model needs steps (and inputs) to bind anything
        grad_output = stack.bind(grad_output, name="grad_output", steps=steps, inputs=inputs).x
        if grad_output.shape != problem.x.shape:
            raise ValueError(f"grad_output: expected shape {tuple(problem.x.shape)}, "
                             f"got {tuple(grad_output.shape)}")
    result = backend_module.gradient_profile(problem, grad_output, segment)
    _no_nan((result["log_grad_norm"], result["log_weight_grad_norm"]), stack, "the gradient profile")
    return Profile(chi_theory=stack.chi_theory_at(problem), config=stack.config(), **result)


def _jacobian_product(kind: str, stack: Any, x: Any, vectors: Any, name: str, out: Any, backend: Any,
                      call: dict):
    """Validation and dispatch shared by jvp and vjp; ``name`` is the vectors' argument name."""
    backend_module, problem = _prepare(stack, x, backend, **call)
    given_vectors = vectors
    vectors = check.vectors_array(vectors, name, batch=problem.batch, width=stack.state_width,
                                  dtype=stack.dtype, like=problem.x, device=stack.device)
    shape = (problem.batch, vectors.shape[-2], stack.state_width)
    # the vectors twice (out and the kernels' scratch), and for a VJP every layer's forward pass
    kept = 2.0 * (problem.depth + 1) * problem.batch * stack.state_width if kind == "vjp" else 0
    _check_size(problem, 2.0 * math.prod(shape) + kept,
                f"the {kind} of {shape[1]:,} vectors for each of {problem.batch:,} samples through "
                f"{problem.depth:,} layers (or steps) of width {stack.state_width}")
    out = _out(out, shape, problem, vectors, given=(x, call.get("inputs"), given_vectors))
    return _no_nan(getattr(backend_module, kind)(problem, vectors, out), stack, f"the {kind}")


def jvp(stack: Any, x: Any, tangents: Any, *, out: Any = None, backend: str = "auto",
        steps: int | None = None, inputs: Any = None):
    """Jacobian-vector products J(x_b) v of the stack's input-output map.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
    tangents : array, shape (B, k, n) or (k, n)
        k tangents per sample at the input (the same k for every sample when 2-D).
    out : ndarray, shape (B, k, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}
    steps, inputs
        Recurrent models only; a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

    Returns
    -------
    ndarray, shape (B, k, n)
        ``out[b, j] = J(x_b) tangents[b, j]``.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming
        stack where the computation overflows the dtype into NaN (never returned).
    """
    return _jacobian_product("jvp", stack, x, tangents, "tangents", out, backend,
                             {"steps": steps, "inputs": inputs})


def vjp(stack: Any, x: Any, cotangents: Any, *, out: Any = None, backend: str = "auto",
        steps: int | None = None, inputs: Any = None):
    """Vector-Jacobian products J(x_b)^T u of the stack's input-output map.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
    cotangents : array, shape (B, k, n) or (k, n)
        k cotangents per sample at the output.
    out : ndarray, shape (B, k, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}
    steps, inputs
        Recurrent models only; a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

    Returns
    -------
    ndarray, shape (B, k, n)
        ``out[b, j] = J(x_b)^T cotangents[b, j]``.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming
        stack where the computation overflows the dtype into NaN (never returned).
    """
    return _jacobian_product("vjp", stack, x, cotangents, "cotangents", out, backend,
                             {"steps": steps, "inputs": inputs})


def jacobian(stack: Any, x: Any, *, out: Any = None, backend: str = "auto", steps: int | None = None,
             inputs: Any = None):
    """Input-output Jacobian d x_L / d x_0 of every sample.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
    out : ndarray, shape (B, n, n), optional
    backend : {"auto", "cpu", "cuda", "numpy"}
    steps, inputs
        Recurrent models only; a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

    Returns
    -------
    ndarray, shape (B, n, n)
        ``J[b, i, j] = d x_L[b, i] / d x_0[b, j]``.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming
        stack where the computation overflows the dtype into NaN (never returned).
    """
    backend_module, problem = _prepare(stack, x, backend, steps=steps, inputs=inputs)
    width = stack.state_width
    _check_size(problem, 3.0 * problem.batch * width * width,
                f"the Jacobians of {problem.batch:,} samples of width {width} ({width} x {width} each)")
    out = _out(out, (problem.batch, width, width), problem, given=(x, inputs))
    return _no_nan(backend_module.jacobian(problem, out), stack, "the Jacobian")


def singular_values(stack: Any, x: Any, *, backend: str = "auto", steps: int | None = None,
                    inputs: Any = None):
    """Singular values of each sample's input-output Jacobian d x_L / d x_0.

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    backend : {"auto", "cpu", "cuda", "numpy"}
        "cpu": the compiled Jacobian (:func:`vgcore.jacobian`), then LAPACK's
        divide-and-conquer SVD (``numpy.linalg.svd``) per sample, samples
        spread over the kernels' threads with BLAS held to one thread each.
    steps, inputs
        Recurrent models only; a stack refuses them.
        At most 1e8 steps and 1e16 multiply-adds of the cell (steps B G n (n + m): B
        samples, G gate blocks, width n, m inputs) per call (vgcore._recurrent.MAX_STEPS,
        MAX_WORK: the compiled kernels cannot be interrupted); beyond them, ValueError
        naming steps before any work.

    Returns
    -------
    ndarray, shape (B, n), the stack's dtype (CuPy for a stack on the GPU)
        Descending.  They are the singular values of the product of the
        layers' Jacobians, so at depth they underflow or overflow like it
        (use :func:`lyapunov_exponents` for log rates that stay finite).

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming x
        where the Jacobian overflows the dtype (its SVD does not exist in it).
    """
    backend_module, problem = _prepare(stack, x, backend, steps=steps, inputs=inputs)
    width = stack.state_width
    _check_size(problem, 4.0 * problem.batch * width * width,
                f"the singular values of the Jacobians of {problem.batch:,} samples of width {width} "
                f"({width} x {width} each, and their SVD's workspace)")
    try:
        return _no_nan(backend_module.singular_values(problem), stack, "the singular values")
    except np.linalg.LinAlgError as error:  # LAPACK refuses a Jacobian that overflowed to inf / NaN
        raise ValueError(f"x: the Jacobian at these inputs is beyond {np.dtype(stack.dtype).name} "
                         f"(LAPACK: {error}); lyapunov_exponents gives its log growth rates") from None


def _check_k(k: Any, width: int) -> int:
    if k is None:
        return width
    k = check.check_int(k, "k")
    if k > width:
        raise ValueError(f"k: must be <= the stack's width {width}, got {k}")
    return k


def lyapunov_exponents(stack: Any, x: Any, k: int | None = None, *, backend: str = "auto",
                       steps: int | None = None, inputs: Any = None, warmup: int | None = None):
    """Lyapunov exponents of the stack at each input: per-layer mean log growth rates of k directions.

    The k tangents of each sample start as the first k standard basis
    vectors e_1..e_k of the input space.  Every layer maps them with its
    Jacobian J_l(x_{l-1}) (the forward-mode JVP), then a QR factorisation
    T = Q R replaces them by the orthonormal columns of Q; exponent i is
    (1/L) sum_l log|R_ii| of layer l (Benettin's algorithm).  Renormalising
    every layer keeps the result finite and exact at any depth, where the
    Jacobian itself underflows or overflows.

    Identities: with k = n, the exponents sum to (1/L) log|det J| =
    (1/L) sum_l log|det J_l|; for any k, L times their sum is the log of the
    k-volume |det R| of J [e_1..e_k].  Where a layer maps a direction to
    zero (dead relu units, a layer norm's null space, k above the Jacobian's
    rank) QR measures rounding, so those exponents are of the size of
    log(eps) / L and not reproducible bit for bit across backends; they are
    -inf only where the product is exactly zero (e.g. a layer whose every
    relu unit is dead).

    Parameters
    ----------
    stack : Stack
        Any vgcore model (a Stack, or another model kind).
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    k : int, optional
        Number of directions, 1 <= k <= n; default n (the whole spectrum).
    backend : {"auto", "cpu", "cuda", "numpy"}
        "cpu": compiled (vgcore._ext._spectra), nogil, LAPACK ?geqrf / ?orgqr
        per sample and layer, OpenMP over blocks of samples; bitwise the same
        results for any number of threads.
    steps, inputs, warmup
        Recurrent models only; a stack refuses them.
        Warm-up steps keep no memory but count: steps + warmup is at most 1e8 and the
        cell's multiply-adds, (steps + warmup) B G n (n + m), at most 1e16 per call
        (vgcore._recurrent.MAX_STEPS, MAX_WORK: about a day of a 16-core CPU; the compiled
        kernels cannot be interrupted); beyond them, ValueError naming steps, or warmup
        where steps alone is within them, before any work.

    Returns
    -------
    ndarray, shape (B, k), float64 (CuPy for a stack on the GPU)
        Sorted descending.  Logs are accumulated in float64 for both dtypes;
        a float32 stack's Jacobian products and QR run in float32.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work; ValueError naming
        stack where the computation overflows the dtype into NaN (never returned).
    """
    backend_module, problem = _prepare(stack, x, backend, steps=steps, inputs=inputs, warmup=warmup)
    k = _check_k(k, stack.state_width)
    rates = _no_nan(backend_module.lyapunov_log_growth(problem, k), stack, "the Lyapunov sum") / problem.depth
    xp = check.array_namespace(rates)
    return xp.ascontiguousarray(xp.sort(rates, axis=1)[:, ::-1])
