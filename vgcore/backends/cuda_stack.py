"""The CuPy backend: every computation of vgcore on an NVIDIA GPU.

The algorithms are those of the NumPy reference (vgcore.reference.stack) and of the
compiled CPU kernels (vgcore._ext._kernels), batched over samples on the device:

- matrix products go to cuBLAS through ``cupy.matmul``, one product per layer
  for the whole batch (and for all k vectors of every sample at once in the
  Jacobian products), never one per sample;
- the work around each product (bias, activation and its derivative, residual
  branch, layer norm and its Jacobian, per-layer renormalisation, the
  weight-gradient norms) runs in the fused kernels of
  ``csrc/vg_cuda_kernels.cu``, which include the activation math of the CPU
  kernels, ``csrc/vg_activations.h``.

So one layer costs a fixed number of launches whatever the batch and the
number of vectors: 2 or 3 in the forward pass, 2 to 4 more in a JVP or VJP, 7
to 9 more in the gradient profile's backward pass; and one per pass, not per
layer, for the row check of its inputs (vg_scale_rows).

Rows beyond the floats (docs/ARCHITECTURE.md; the specification is
vgcore.reference.stack): every stored row of activations carries an int32
exponent, its true values being the row times 2**exponent.  A row whose
largest entry falls outside [2**-SCALE_RANGE, 2**SCALE_RANGE) is stored scaled
(exponent < 0 below, > 0 beyond) so that no forward pass under- or overflows;
rows in range have exponent 0 and are computed as before (exponents saturate at
+-2**29).  The post-norm's row gets the row check before LN, so LN never squares
entries beyond the floats; LN of a row beyond the floats gives true values
(the pre-norm's u has exponent min(e, 0)), and
the weight-gradient norm rescales the weighted cotangents at h by a power of
two when their squares would leave the floats (in the last block of the VJP
epilogue, so no launch is added).  The exponents live on the device beside the rows
(``_Caches.exps``, ping-pong pairs in the streaming passes) and are read and
written by the per-row kernels themselves, so they add no launch per layer
and no synchronisation with the host.

The kernels are compiled at run time by NVRTC (``cupy.RawModule``, float and
double instantiations through ``name_expressions``), once per device, and
cached.  The sources are looked for in ``vgcore/_csrc`` (an installed package)
and then in the repository's ``csrc`` (a development checkout).

Importing this module raises ImportError, with the reason, when CuPy does not
import or no CUDA device is usable; the dispatcher (vgcore.backends) turns that
into "backend: 'cuda' is not available here (...)".

Every backend function takes problems on host (NumPy) or device (CuPy) stacks;
results come back where the stack lives.  Inputs are assumed validated by
vgcore._api (C-contiguous, the stack's dtype, finite).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vgcore._activations import ACTIVATION_CODES, NORM_CODES, SATURATION_THRESHOLD

# The names below are literals on purpose: tests/test_cuda_build.py reads them
# with ``ast`` (this module cannot be imported without CuPy) and compiles the
# kernel file with nvcc, instantiating exactly these kernels.

#: The kernel file, in csrc/ (vgcore/_csrc/ once installed).
KERNEL_FILE = "vg_cuda_kernels.cu"
#: Headers the kernel file includes; their contents key CuPy's kernel cache.
KERNEL_HEADERS = ("vg_activations.h", "vg_activation_body.h", "vg_stack.h")
#: Template kernels, instantiated for float and double.
TEMPLATE_KERNELS = (
    "vg_scale_rows",
    "vg_layer_norm_rows",
    "vg_forward_epilogue",
    "vg_layer_norm_product",
    "vg_vjp_epilogue",
    "vg_jvp_epilogue",
    "vg_renormalise_rows",
    "vg_dot_partials",
)
#: extern "C" kernels (double only).
PLAIN_KERNELS = ("vg_sample_weights", "vg_weight_gradient_log_norm")
#: C types of the template instantiations, by NumPy dtype name.
KERNEL_TYPES = {"float32": "float", "float64": "double"}
#: NVRTC options besides the include path.  NVRTC refuses any function without
#: an execution-space annotation (its default is __host__); the shared header
#: has host-only helpers for the CPU kernels, which this option makes __device__.
NVRTC_OPTIONS = ("--device-as-default-execution-space",)

_REDUCTION_THREADS = 256  # one-block reductions and the weight-gradient partial sums
_MAX_PARTIALS = 1024


def csrc_dir() -> Path:
    """Where the kernel sources are: vgcore/_csrc when installed, else the checkout's csrc/."""
    package = Path(__file__).resolve().parent.parent  # vgcore/
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / KERNEL_FILE).is_file() and all(
            (candidate / header).is_file() for header in KERNEL_HEADERS
        ):
            return candidate
    raise FileNotFoundError(
        f"vgcore's CUDA sources ({KERNEL_FILE} and {', '.join(KERNEL_HEADERS)}) are neither in "
        f"{package / '_csrc'} nor in {package.parent / 'csrc'}"
    )


def name_expressions() -> list[str]:
    """The template instantiations to compile, as NVRTC name expressions."""
    return [f"{name}<{ctype}>" for name in TEMPLATE_KERNELS for ctype in KERNEL_TYPES.values()]


def kernel_source(directory: Path | None = None) -> str:
    """The kernel file's text, headed by a digest of it and of every header it includes.

    CuPy keys its on-disk kernel cache by the source text and the options, not
    by the contents of included headers; the digest makes an edit of a header
    rebuild the kernels instead of loading stale ones.
    """
    directory = csrc_dir() if directory is None else directory
    source = (directory / KERNEL_FILE).read_text()
    digest = hashlib.sha256(source.encode())
    for header in KERNEL_HEADERS:
        digest.update((directory / header).read_bytes())
    return f"// vgcore csrc sha256 {digest.hexdigest()}\n{source}"


def kernel_options(directory: Path | None = None) -> tuple[str, ...]:
    """NVRTC options: the include path of csrc, then NVRTC_OPTIONS."""
    directory = csrc_dir() if directory is None else directory
    return (f"-I{directory}", *NVRTC_OPTIONS)


try:
    import cupy
except Exception as error:  # ImportError, or a CUDA library that fails to load
    raise ImportError(f"CuPy does not import: {error}; install vgcore[cuda12] or vgcore[cuda13] "
                      "on a machine with an NVIDIA GPU") from error
try:
    _DEVICE_COUNT = cupy.cuda.runtime.getDeviceCount()
except Exception as error:  # cupy_backends...CUDARuntimeError: no driver, no device
    raise ImportError(f"CuPy {cupy.__version__} imports but CUDA is not usable: {error}") from error
if _DEVICE_COUNT < 1:
    raise ImportError(f"CuPy {cupy.__version__} imports but no CUDA device is visible")
try:
    csrc_dir()
except FileNotFoundError as error:
    raise ImportError(str(error)) from error

_NULL = np.uintp(0)  # a NULL pointer argument


# ---------------------------------------------------------------------------
# Kernels: built once per device
# ---------------------------------------------------------------------------

@functools.cache
def _kernels(device_id: int) -> dict[tuple[str, str | None], Any]:
    """Every kernel of the module on one device, by (name, C type or None)."""
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(), options=kernel_options(),
                                name_expressions=name_expressions())
        kernels: dict[tuple[str, str | None], Any] = {}
        for name in TEMPLATE_KERNELS:
            for ctype in KERNEL_TYPES.values():
                kernels[name, ctype] = module.get_function(f"{name}<{ctype}>")
        for name in PLAIN_KERNELS:
            kernels[name, None] = module.get_function(name)
    return kernels


def _launch(name: str, dtype: np.dtype | None, blocks: int, threads: int, *args) -> None:
    """Launch kernel ``name`` (its ``dtype`` instantiation) on the current device."""
    ctype = None if dtype is None else KERNEL_TYPES[np.dtype(dtype).name]
    kernel = _kernels(cupy.cuda.runtime.getDevice())[name, ctype]
    kernel((int(blocks),), (int(threads),), args)


def _row_threads(width: int) -> int:
    """Threads of a one-block-per-row kernel: a multiple of 32 near the width, at most 256."""
    for threads in (32, 64, 128):
        if width <= threads:
            return threads
    return 256


def _matmul(a, b, out) -> None:
    """out = a @ b through cuBLAS (transposed views are passed as such, not copied)."""
    cupy.matmul(a, b, out=out)


def _i32(value: int) -> np.int32:
    return np.int32(value)


# ---------------------------------------------------------------------------
# Stacks on the device
# ---------------------------------------------------------------------------

class _Layers(NamedTuple):
    """A stack's parameters on the device and its options as kernel arguments."""

    weights: Any  # (L, n, n) cupy
    biases: Any  # (L, n) cupy
    activation: np.int32
    has_residual: np.int32
    residual: Any  # the dtype's scalar type
    norm: int
    dtype: np.dtype

    @property
    def depth(self) -> int:
        return int(self.weights.shape[0])

    @property
    def width(self) -> int:
        return int(self.weights.shape[1])

    @property
    def pre(self) -> bool:
        return self.norm == NORM_CODES["pre"]

    @property
    def post(self) -> bool:
        return self.norm == NORM_CODES["post"]


def _layers(stack) -> _Layers:
    dtype = np.dtype(stack.dtype)
    residual = stack.residual
    return _Layers(
        to_device(stack.weights), to_device(stack.biases), np.int32(ACTIVATION_CODES[stack.activation]),
        np.int32(residual is not None), dtype.type(0.0 if residual is None else residual),
        NORM_CODES[stack.norm], dtype,
    )


def to_device(array) -> Any:
    """``array`` as a C-contiguous CuPy array on the current device (no copy when it already is one)."""
    return cupy.ascontiguousarray(cupy.asarray(array))


def _on_host(stack) -> bool:
    return not isinstance(stack.weights, cupy.ndarray)


def _deliver(result, out, host: bool):
    """A device result where the caller wants it: into ``out`` or a new host array for host inputs."""
    if not host:
        return result
    if out is None:
        return cupy.asnumpy(result)
    result.get(out=out)
    return out


def _device_of(layers: _Layers):
    return layers.weights.device


# ---------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------

def _forward_layer(layers: _Layers, layer: int, x, x_exp, u_work, target, target_exp, derivative, inv_pre,
                   inv_post) -> Any:
    """x (B, n), rows scaled by 2**x_exp (B,) int32, through layer ``layer`` into target; returns u.

    u is the layer's linear input (x, or LN(x) in u_work), scaled by x_exp as
    well (by min(x_exp, 0) for LN(x): beyond the floats it is true values);
    target_exp receives the output rows' exponents, or is None for the last
    layer of a forward pass, whose rows are then written as true values.
    inv_pre receives the pre-norm's scales; derivative phi'(h) (or None);
    inv_post the post-norm's scales.
    """
    batch, width, dtype = x.shape[0], layers.width, layers.dtype
    threads = _row_threads(width)
    u = x
    if layers.pre:
        _launch("vg_layer_norm_rows", dtype, batch, threads, _i32(batch), _i32(width), x, x_exp, u_work,
                inv_pre)
        u = u_work
    _matmul(u, layers.weights[layer].T, target)
    _launch("vg_forward_epilogue", dtype, batch, threads, _i32(batch), _i32(width), layers.activation,
            layers.has_residual, layers.residual, _i32(layers.norm), layers.biases[layer], x, x_exp, target,
            _NULL if derivative is None else derivative, inv_post if layers.post else _NULL,
            _NULL if target_exp is None else target_exp)
    return u


def _scale_inputs(layers: _Layers, x, target, target_exp) -> None:
    """The row check of the inputs x (B, n) of a pass: target, target_exp = scaled_rows(x, 0)."""
    batch, width = x.shape[0], layers.width
    _launch("vg_scale_rows", layers.dtype, batch, _row_threads(width), _i32(batch), _i32(width), x, target,
            target_exp)


def _jvp_layer(layers: _Layers, layer: int, per_sample: int, t, u, u_exp, out, out_exp, derivative, inv_pre,
               inv_post, t_u_work, t_h_work) -> None:
    """Tangents t (B * k, n) at the layer's input -> at its output, in place.

    u, u_exp, derivative, out, out_exp, inv_pre and inv_post are the layer's
    forward values for the B samples (u: linear input, out: output, each
    scaled by 2**its exponent; u_exp is the layer input's, which for LN(x)
    counts as 0 where positive).
    """
    rows, width, dtype = t.shape[0], layers.width, layers.dtype
    threads = _row_threads(width)
    t_u = t
    if layers.pre:
        _launch("vg_layer_norm_product", dtype, rows, threads, _i32(rows), _i32(width), _i32(per_sample),
                t, u, u_exp, inv_pre, _NULL, t_u_work)
        t_u = t_u_work
    _matmul(t_u, layers.weights[layer].T, t_h_work)
    _launch("vg_jvp_epilogue", dtype, rows, threads, _i32(rows), _i32(width), _i32(per_sample),
            layers.has_residual, layers.residual, _i32(layers.norm), derivative, t_h_work, out,
            out_exp if layers.post else _NULL, inv_post if layers.post else _NULL, t)


def _vjp_layer(layers: _Layers, layer: int, per_sample: int, g, work, g_h, caches: _Caches,
               weight_operands=None) -> tuple[Any, Any]:
    """Cotangents g (B * k, n) at the layer's output -> at its input; returns (g, work) swapped or not.

    weight_operands, for a gradient profile: (sample_weights, stats, u, g_weighted, u_scaled,
    row_largest, arrivals); see vg_vjp_epilogue.
    """
    rows, width, dtype = g.shape[0], layers.width, layers.dtype
    threads = _row_threads(width)
    sample_weights, stats, u, g_weighted, u_scaled, row_largest, arrivals = weight_operands or (_NULL,) * 7
    _launch("vg_vjp_epilogue", dtype, rows, threads, _i32(rows), _i32(width), _i32(per_sample),
            layers.has_residual, layers.residual, _i32(layers.norm), caches.xs[layer + 1],
            caches.exps[layer + 1] if layers.post else _NULL,
            caches.inv_post[layer] if layers.post else _NULL, caches.derivatives[layer], g, g_h,
            sample_weights, stats, u, g_weighted, u_scaled, row_largest, arrivals)
    _matmul(g_h, layers.weights[layer], work)
    if layers.pre or layers.has_residual:
        _launch("vg_layer_norm_product", dtype, rows, threads, _i32(rows), _i32(width), _i32(per_sample),
                work, caches.us[layer] if layers.pre else _NULL, caches.exps[layer] if layers.pre else _NULL,
                caches.inv_pre[layer] if layers.pre else _NULL, g if layers.has_residual else _NULL, g)
        return g, work
    return work, g


# ---------------------------------------------------------------------------
# Whole stacks (device arrays in, device arrays out)
# ---------------------------------------------------------------------------

class _Caches(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    xs: Any  # (L + 1, B, n): x_0 .. x_L, row b of x_l scaled by 2**exps[l, b]
    exps: Any  # (L + 1, B) int32: the rows' exponents (0 but for rows beyond the floats)
    derivatives: Any  # (L, B, n): phi'(h)
    us: Any  # (L, B, n): LN(x_{l-1}) for a pre-norm, else None (u = x)
    inv_pre: Any  # (L, B) or None
    inv_post: Any  # (L, B) or None

    def u(self, layer: int):
        """The linear input of layer ``layer`` (0-based), scaled by 2**exps[layer] (2**min(exps, 0): LN)."""
        return self.xs[layer] if self.us is None else self.us[layer]


def _forward_with_caches(layers: _Layers, x) -> _Caches:
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    xs = cupy.empty((depth + 1, batch, width), dtype)
    exps = cupy.empty((depth + 1, batch), np.int32)
    _scale_inputs(layers, x, xs[0], exps[0])
    derivatives = cupy.empty((depth, batch, width), dtype)
    us = cupy.empty((depth, batch, width), dtype) if layers.pre else None
    inv_pre = cupy.empty((depth, batch), dtype) if layers.pre else None
    inv_post = cupy.empty((depth, batch), dtype) if layers.post else None
    for layer in range(depth):
        _forward_layer(layers, layer, xs[layer], exps[layer], None if us is None else us[layer],
                       xs[layer + 1], exps[layer + 1], derivatives[layer],
                       None if inv_pre is None else inv_pre[layer],
                       None if inv_post is None else inv_post[layer])
    return _Caches(xs, exps, derivatives, us, inv_pre, inv_post)


def _forward(layers: _Layers, x, out):
    depth, dtype = layers.depth, layers.dtype
    batch = x.shape[0]
    # ping-pong between out and one buffer, arranged so that the last layer writes out: layer l
    # reads buffers[(depth - l) % 2] (the checked inputs for l = 0) and writes the other one; the
    # last layer writes true values, so its exponents are not kept
    buffers = [cupy.empty_like(x) if out is None else out, cupy.empty_like(x)]
    exps = cupy.empty((2, batch), np.int32)
    u_work = cupy.empty_like(x) if layers.pre else None
    inv_pre = cupy.empty(batch, dtype) if layers.pre else None
    inv_post = cupy.empty(batch, dtype) if layers.post else None
    _scale_inputs(layers, x, buffers[depth % 2], exps[depth % 2])
    for layer in range(depth):
        source, target = (depth - layer) % 2, (depth - 1 - layer) % 2
        _forward_layer(layers, layer, buffers[source], exps[source], u_work, buffers[target],
                       exps[target] if layer < depth - 1 else None, None, inv_pre, inv_post)
    return buffers[0]


def _gradient_profile(layers: _Layers, x, grad_output) -> dict:
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    threads = _row_threads(width)
    caches = _forward_with_caches(layers, x)
    g = cupy.array(grad_output, dtype=dtype, order="C", copy=True)
    work, g_h, g_weighted, u_scaled = (cupy.empty((batch, width), dtype) for _ in range(4))
    log_scale = cupy.zeros(batch, np.float64)
    log_grad_norm = cupy.empty((batch, depth + 1), np.float64)
    log_weight_grad_norm = cupy.empty(depth, np.float64)
    u_squared_norm = cupy.empty(batch, np.float64)
    sample_weights = cupy.empty(batch, np.float64)
    stats = cupy.zeros(3, np.float64)  # max s, u_scale, log2 of the cotangents' rescaling
    row_largest = cupy.empty(batch, np.float64)
    arrivals = cupy.zeros(1, np.uint32)  # blocks of a vg_vjp_epilogue launch done; its last block resets it
    # ||G_w^T U_s||_F^2: from the two (B, B) Gram matrices when B < n (as the CPU kernels), else
    # from the (n, n) gradient itself
    use_gram = batch < width
    side = batch if use_gram else width
    product = cupy.empty((side, side), dtype)
    other = cupy.empty((side, side), dtype) if use_gram else product
    count = side * side
    partial_blocks = max(1, min(_MAX_PARTIALS, -(-count // (4 * _REDUCTION_THREADS))))
    partials = cupy.empty(partial_blocks, np.float64)
    flat_log_grad_norm = log_grad_norm.reshape(-1)
    for layer in range(depth, -1, -1):
        u = caches.u(layer - 1) if layer > 0 else None
        _launch("vg_renormalise_rows", dtype, batch, threads, _i32(batch), _i32(width), g, log_scale,
                flat_log_grad_norm[layer:], _i32(depth + 1), _NULL if u is None else u,
                u_squared_norm)
        if layer == 0:
            break
        index = layer - 1
        _launch("vg_sample_weights", None, 1, _REDUCTION_THREADS, _i32(batch), _i32(layers.pre), log_scale,
                caches.exps[index], u_squared_norm, sample_weights, stats)
        g, work = _vjp_layer(layers, index, 1, g, work, g_h, caches,
                             (sample_weights, stats, u, g_weighted, u_scaled, row_largest, arrivals))
        if use_gram:
            _matmul(g_weighted, g_weighted.T, product)
            _matmul(u_scaled, u_scaled.T, other)
        else:
            _matmul(u_scaled.T, g_weighted, product)
        _launch("vg_dot_partials", dtype, partial_blocks, _REDUCTION_THREADS, np.int64(count), product, other,
                partials)
        _launch("vg_weight_gradient_log_norm", None, 1, _REDUCTION_THREADS, _i32(partial_blocks), partials,
                stats, log_weight_grad_norm[index:])
    derivatives = caches.derivatives
    threshold = dtype.type(SATURATION_THRESHOLD)
    saturated = ((derivatives < threshold) & (derivatives > -threshold)).sum(axis=(1, 2), dtype=np.int64)
    dead = (derivatives == 0).all(axis=1)  # (L, n): phi' == 0 on every sample
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated / float(batch * width),
        "dead": dead.mean(axis=1, dtype=np.float64),
    }


def _broadcast_vectors(vectors, batch: int, width: int, dtype, out):
    """(B, k, n) C-contiguous copy of vectors (B, k, n) or (k, n), in ``out`` when given."""
    shape = (batch, vectors.shape[-2], width)
    result = cupy.empty(shape, dtype) if out is None else out
    result[...] = vectors
    return result


def _jvp(layers: _Layers, x, tangents, out):
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    t = _broadcast_vectors(tangents, batch, width, dtype, out)
    k = t.shape[1]
    rows = t.reshape(batch * k, width)
    buffers = [cupy.empty_like(x), cupy.empty_like(x)]
    derivative = cupy.empty_like(x)
    u_work = cupy.empty_like(x) if layers.pre else None
    inv_pre = cupy.empty(batch, dtype) if layers.pre else None
    inv_post = cupy.empty(batch, dtype) if layers.post else None
    t_u_work = cupy.empty_like(rows) if layers.pre else None
    t_h_work = cupy.empty_like(rows)
    exps = cupy.empty((2, batch), np.int32)
    _scale_inputs(layers, x, buffers[1], exps[1])  # layer l reads buffers[(l + 1) % 2], writes buffers[l % 2]
    for layer in range(depth):
        source, target = (layer + 1) % 2, layer % 2
        x_exp, out, out_exp = exps[source], buffers[target], exps[target]
        u = _forward_layer(layers, layer, buffers[source], x_exp, u_work, out, out_exp, derivative, inv_pre,
                           inv_post)
        _jvp_layer(layers, layer, k, rows, u, x_exp, out, out_exp, derivative, inv_pre, inv_post, t_u_work,
                   t_h_work)
    return t


def _vjp(layers: _Layers, x, cotangents, out):
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    caches = _forward_with_caches(layers, x)
    result = _broadcast_vectors(cotangents, batch, width, dtype, out)
    k = result.shape[1]
    rows = result.reshape(batch * k, width)
    g, work, g_h = rows, cupy.empty_like(rows), cupy.empty_like(rows)
    for layer in range(depth - 1, -1, -1):
        g, work = _vjp_layer(layers, layer, k, g, work, g_h, caches)
    if g is not rows:  # the last layer's product landed in the work buffer
        rows[...] = g
    return result


def _jacobian(layers: _Layers, x, out):
    # Row i of J is J^T e_i: the VJP of the identity gives J in (out, in) layout directly.
    return _vjp(layers, x, cupy.eye(layers.width, dtype=layers.dtype), out)


def _lyapunov_log_growth(layers: _Layers, x, k: int):
    """Sums over layers of log |R_ii| of the QR step after each layer (Benettin's method), unsorted.

    k orthonormal directions, initially e_1 .. e_k, are pushed through each
    layer's Jacobian (the JVP, batched over samples and directions) and
    re-orthonormalised by a batched QR, as vgcore.spectra does on the host.
    """
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    directions = cupy.zeros((batch, k, width), dtype)
    directions[:, cupy.arange(k), cupy.arange(k)] = 1
    log_growth = cupy.zeros((batch, k), np.float64)
    buffers = [cupy.empty_like(x), cupy.empty_like(x)]
    derivative = cupy.empty_like(x)
    u_work = cupy.empty_like(x) if layers.pre else None
    inv_pre = cupy.empty(batch, dtype) if layers.pre else None
    inv_post = cupy.empty(batch, dtype) if layers.post else None
    rows_shape = (batch * k, width)
    t_u_work = cupy.empty(rows_shape, dtype) if layers.pre else None
    t_h_work = cupy.empty(rows_shape, dtype)
    exps = cupy.empty((2, batch), np.int32)
    _scale_inputs(layers, x, buffers[1], exps[1])  # layer l reads buffers[(l + 1) % 2], writes buffers[l % 2]
    for layer in range(depth):
        source, target = (layer + 1) % 2, layer % 2
        x_exp, out, out_exp = exps[source], buffers[target], exps[target]
        u = _forward_layer(layers, layer, buffers[source], x_exp, u_work, out, out_exp, derivative, inv_pre,
                           inv_post)
        rows = directions.reshape(rows_shape)
        _jvp_layer(layers, layer, k, rows, u, x_exp, out, out_exp, derivative, inv_pre, inv_post, t_u_work,
                   t_h_work)
        q, r = cupy.linalg.qr(directions.transpose(0, 2, 1))  # (B, n, k), (B, k, k)
        log_growth += cupy.log(cupy.abs(cupy.diagonal(r, axis1=1, axis2=2).astype(np.float64)))
        directions = cupy.ascontiguousarray(q.transpose(0, 2, 1))
    return log_growth


# ---------------------------------------------------------------------------
# The backend (vgcore.backends.Backend for the "stack" kind): host or device stacks
# ---------------------------------------------------------------------------

def _call(problem, compute, *arrays, out=None):
    """``compute(layers, x, *device_arrays, device_out)`` on the stack's device; results where it is."""
    stack = problem.model
    host = _on_host(stack)
    layers = _layers(stack)
    with _device_of(layers):
        arrays = tuple(to_device(a) if isinstance(a, np.ndarray) else a for a in (problem.x, *arrays))
        return _deliver(compute(layers, *arrays, None if host else out), out, host)


def forward(problem, out):
    """x_L (B, n); see vgcore.forward."""
    return _call(problem, _forward, out=out)


def gradient_profile(problem, grad_output, segment) -> dict:
    """The gradient profile's arrays (float64, on the stack's device); ``segment`` is a CPU memory mode."""
    host = _on_host(problem.model)
    layers = _layers(problem.model)
    with _device_of(layers):
        result = _gradient_profile(layers, to_device(problem.x), to_device(grad_output))
    if host:
        return {key: cupy.asnumpy(value) for key, value in result.items()}
    return result


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """Gradient profiles of many stacks (the sweep's chunk runner), one after another.

    Each profile is already batched over its samples on the device; kernels
    are queued asynchronously, so the host loop overlaps with the GPU's work.
    """
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents, out):
    """J(x_b) v for tangents (B, k, n) or (k, n) -> (B, k, n)."""
    return _call(problem, _jvp, tangents, out=out)


def vjp(problem, cotangents, out):
    """J(x_b)^T u for cotangents (B, k, n) or (k, n) -> (B, k, n)."""
    return _call(problem, _vjp, cotangents, out=out)


def jacobian(problem, out):
    """d x_L / d x_0 per sample, (B, n, n)."""
    return _call(problem, _jacobian, out=out)


def singular_values(problem):
    """Singular values of each sample's input-output Jacobian, (B, n), descending."""
    def compute(layers, x, out):
        return cupy.linalg.svd(_jacobian(layers, x, None), compute_uv=False)

    return _call(problem, compute)


def lyapunov_log_growth(problem, k: int):
    """The unsorted sums over layers of log |R_ii|, (B, k) float64 (the CPU backend's twin)."""
    def compute(layers, x, out):
        return _lyapunov_log_growth(layers, x, k)

    return _call(problem, compute)
