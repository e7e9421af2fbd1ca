"""The CuPy backend of batch-normalised stacks (kind "batchnorm"): the twin of vgcore/_ext/_batchnorm.pyx.

Matrix products go to cuBLAS (``cupy.matmul``) for the whole batch, and for
all k batch vectors at once in the Jacobian products; the per-feature work
around them (bias, BN over the batch, activation, residual; BN's Jacobian
product; the batch-wide renormalisation) runs in the kernels of
``csrc/vg_batchnorm_kernels.cu``, which reuse the helpers and the activation
math of ``csrc/vg_cuda_kernels.cu`` / ``vg_activations.h``.  The backward
pass keeps the renormalisation on the device (log scale and pending factor
are device scalars), so a profile never waits for the host per layer.
jacobian, singular_values and lyapunov_log_growth refuse with a ValueError
naming norm, as on every backend (vgcore.backends._batchnorm_common).

The kernels are compiled by NVRTC once per device and cached; importing this
module raises ImportError, with the reason, where CuPy or a GPU is missing.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from vgcore._activations import ACTIVATION_CODES, SATURATION_THRESHOLD
from vgcore.backends._batchnorm_common import jacobian as jacobian  # refused for a coupled batch
from vgcore.backends._batchnorm_common import lyapunov_log_growth as lyapunov_log_growth
from vgcore.backends._batchnorm_common import singular_values as singular_values

# Literals on purpose: tests/test_batchnorm_cuda_build.py reads them with ``ast`` (this module
# cannot be imported without CuPy) and compiles the kernel file with nvcc and NVRTC.

#: The kernel file, in csrc/ (vgcore/_csrc/ once installed).
KERNEL_FILE = "vg_batchnorm_kernels.cu"
#: Files the kernel file includes, directly or not; their contents key CuPy's kernel cache.
KERNEL_HEADERS = ("vg_cuda_kernels.cu", "vg_activations.h", "vg_activation_body.h", "vg_stack.h")
#: Template kernels, instantiated for float and double.
TEMPLATE_KERNELS = ("vg_bn_forward_columns", "vg_bn_product", "vg_bn_rows")
#: extern "C" kernels (double only).
PLAIN_KERNELS = ("vg_bn_batch_scale",)
#: C types of the template instantiations, by NumPy dtype name.
KERNEL_TYPES = {"float32": "float", "float64": "double"}
#: NVRTC options besides the include path (as vgcore.backends.cuda_stack).
NVRTC_OPTIONS = ("--device-as-default-execution-space",)

_THREADS = 256


def csrc_dir() -> Path:
    """Where the kernel sources are: vgcore/_csrc when installed, else the checkout's csrc/."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in (KERNEL_FILE, *KERNEL_HEADERS)):
            return candidate
    raise FileNotFoundError(f"vgcore's batch-norm CUDA sources ({KERNEL_FILE}) are neither in "
                            f"{package / '_csrc'} nor in {package.parent / 'csrc'}")


def kernel_source(directory: Path) -> str:
    """The kernel file headed by a digest of it and every file it includes (CuPy's cache key)."""
    source = (directory / KERNEL_FILE).read_text()
    digest = hashlib.sha256(source.encode())
    for header in KERNEL_HEADERS:
        digest.update((directory / header).read_bytes())
    return f"// vgcore csrc sha256 {digest.hexdigest()}\n{source}"


try:
    import cupy
except Exception as error:  # ImportError, or a CUDA library that fails to load
    raise ImportError(f"CuPy does not import: {error}") from error
try:
    from vgcore.backends.cuda_stack import _deliver, _on_host, to_device
except ImportError as error:
    raise ImportError(str(error)) from error
try:
    csrc_dir()
except FileNotFoundError as error:
    raise ImportError(str(error)) from error


@functools.cache
def _kernels(device_id: int) -> dict:
    directory = csrc_dir()
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(directory), options=(f"-I{directory}", *NVRTC_OPTIONS),
                                name_expressions=[f"{name}<{ctype}>" for name in TEMPLATE_KERNELS
                                                  for ctype in KERNEL_TYPES.values()])
        kernels = {(name, ctype): module.get_function(f"{name}<{ctype}>")
                   for name in TEMPLATE_KERNELS for ctype in KERNEL_TYPES.values()}
        kernels.update({(name, None): module.get_function(name) for name in PLAIN_KERNELS})
    return kernels


def _launch(name: str, dtype, blocks: int, *args) -> None:
    ctype = None if dtype is None else KERNEL_TYPES[np.dtype(dtype).name]
    _kernels(cupy.cuda.runtime.getDevice())[name, ctype]((int(blocks),), (_THREADS,), args)


def _i32(value: int) -> np.int32:
    return np.int32(value)


class _Layers:
    """A stack's parameters on the device and its options as kernel arguments."""

    def __init__(self, stack) -> None:
        self.dtype = np.dtype(stack.dtype)
        self.weights = to_device(stack.weights)
        self.biases = to_device(stack.biases)
        self.activation = np.int32(ACTIVATION_CODES[stack.activation])
        self.has_residual = np.int32(stack.residual is not None)
        self.residual = self.dtype.type(0.0 if stack.residual is None else stack.residual)
        self.branch = self.dtype.type(1.0 if stack.residual is None else stack.residual)
        self.depth, self.width = int(self.weights.shape[0]), int(self.weights.shape[1])


def _forward_layer(layers: _Layers, layer: int, x, z, out, derivative, inv_std) -> None:
    """x (B, n) through one layer: z = BN(v), out = x', derivative = phi'(z) (or None), inv_std (n,)."""
    batch = x.shape[0]
    cupy.matmul(x, layers.weights[layer].T, out=z)
    _launch("vg_bn_forward_columns", layers.dtype, layers.width, _i32(batch), _i32(layers.width),
            layers.activation, layers.has_residual, layers.residual, layers.biases[layer], x, z, out,
            np.uintp(0) if derivative is None else derivative, inv_std)


def _forward_keeping(layers: _Layers, x):
    """(xs (L+1, B, n), zs (L, B, n), derivatives (L, B, n), inv_std (L, n)) of the forward pass."""
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    xs = cupy.empty((depth + 1, batch, width), dtype)
    xs[0] = x
    zs = cupy.empty((depth, batch, width), dtype)
    derivatives = cupy.empty((depth, batch, width), dtype)
    inv_std = cupy.empty((depth, width), dtype)
    for layer in range(depth):
        _forward_layer(layers, layer, xs[layer], zs[layer], xs[layer + 1], derivatives[layer], inv_std[layer])
    return xs, zs, derivatives, inv_std


def _forward(layers: _Layers, x, out):
    z = cupy.empty_like(x)
    inv_std = cupy.empty(layers.width, layers.dtype)
    buffers = [cupy.empty_like(x) if out is None else out, cupy.empty_like(x)]
    current = x
    for layer in range(layers.depth):
        target = buffers[(layers.depth - 1 - layer) % 2]
        _forward_layer(layers, layer, current, z, target, None, inv_std)
        current = target
    return buffers[0]


def _gradient_profile(layers: _Layers, x, grad_output) -> dict:
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    xs, zs, derivatives, inv_std = _forward_keeping(layers, x)
    threshold = dtype.type(SATURATION_THRESHOLD)
    saturated = ((derivatives < threshold) & (derivatives > -threshold)).sum(axis=(1, 2), dtype=np.int64)
    dead = (derivatives == 0).all(axis=1).mean(axis=1, dtype=np.float64)
    log_grad_norm = cupy.empty((batch, depth + 1), np.float64)
    layer_log_scale = cupy.empty(depth, np.float64)
    # the output cotangent, scaled by its largest entry before squaring (any finite scale is exact)
    g = cupy.array(grad_output, dtype=dtype, order="C", copy=True)
    largest = float(cupy.abs(g).max())
    log_scale = cupy.zeros((), np.float64)
    pending = cupy.ones((), np.float64)
    if largest > 0:
        squares = cupy.square(g.astype(np.float64) / largest).sum(axis=1)
        total = squares.sum()
        with np.errstate(divide="ignore"):
            log_grad_norm[:, depth] = cupy.where(squares > 0, np.log(largest) + 0.5 * cupy.log(squares),
                                                 -np.inf)
        log_scale[...] = np.log(largest) + 0.5 * cupy.log(total)
        pending[...] = (1.0 / largest) / cupy.sqrt(total)
    else:
        log_grad_norm[:, depth] = -np.inf
    g_in = cupy.empty_like(g)
    row_squares = cupy.empty(batch, np.float64)
    flat_log_grad_norm = log_grad_norm.reshape(-1)
    for layer in range(depth - 1, -1, -1):
        layer_log_scale[layer] = log_scale
        # phase 1: the cotangent at v, over the derivatives (no longer needed)
        g_v = derivatives[layer]
        cupy.multiply(g * (pending.astype(dtype) * layers.branch), g_v, out=g_v)
        _launch("vg_bn_product", dtype, width, _i32(1), _i32(batch), _i32(width), g_v, zs[layer],
                inv_std[layer])
        # phase 2: the input cotangent and the batch-wide renormalisation
        cupy.matmul(g_v, layers.weights[layer], out=g_in)
        _launch("vg_bn_rows", dtype, batch, _i32(batch), _i32(width), layers.has_residual, pending, g, g_in,
                row_squares)
        _launch("vg_bn_batch_scale", None, 1, _i32(batch), row_squares, log_scale, pending,
                flat_log_grad_norm[layer:], _i32(depth + 1))
        g, g_in = g_in, g
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": layer_log_scale + _weight_gradient_log_norms(derivatives, xs[:-1]),
        "saturation": saturated / float(batch * width),
        "dead": dead,
    }


def _weight_gradient_log_norms(cotangents_v, inputs):
    """log ||g_v^T x||_F per layer, (L,) float64, as the CPU kernel.

    The columns of g_v sum to zero over the batch, so x is centred over the
    batch first (what would only cancel goes), then scaled to unit largest
    row; from the (B, B) Gram matrices when B < n, else from the (n, n) gradients.
    """
    dtype = inputs.dtype
    centred = inputs - inputs.astype(np.float64).mean(axis=1, keepdims=True).astype(dtype)
    largest = cupy.sqrt(cupy.square(centred.astype(np.float64)).sum(axis=2).max(axis=1))  # (L,)
    safe = cupy.where(largest > 0, largest, 1.0)
    scaled = (centred / safe[:, None, None].astype(dtype)).astype(dtype)
    batch, width = inputs.shape[1], inputs.shape[2]
    if batch < width:
        gram_g = cupy.matmul(cotangents_v, cotangents_v.transpose(0, 2, 1))
        gram_u = cupy.matmul(scaled, scaled.transpose(0, 2, 1))
        total = (gram_g.astype(np.float64) * gram_u).sum(axis=(1, 2))
    else:
        gradients = (cupy.matmul(scaled[layer].T, cotangents_v[layer]) for layer in range(inputs.shape[0]))
        total = cupy.stack([cupy.square(gradient.astype(np.float64)).sum() for gradient in gradients])
    with np.errstate(divide="ignore"):
        return cupy.where((total > 0) & (largest > 0), cupy.log(safe) + 0.5 * cupy.log(total), -np.inf)


def _jacobian_products(layers: _Layers, x, vectors, out, transpose: bool):
    """J T_j or J^T U_j for the batch vectors vectors[:, j, :] (B, k, n) or (k, n) shared."""
    depth, width, batch, dtype = layers.depth, layers.width, x.shape[0], layers.dtype
    _, zs, derivatives, inv_std = _forward_keeping(layers, x)
    k = vectors.shape[-2]
    # one (B, n) batch vector after another: (k, B, n)
    t = cupy.ascontiguousarray(cupy.broadcast_to(vectors, (batch, k, width)).transpose(1, 0, 2))
    work = cupy.empty_like(t)
    rows, work_rows = t.reshape(k * batch, width), work.reshape(k * batch, width)
    for layer in (range(depth - 1, -1, -1) if transpose else range(depth)):
        if transpose:
            cupy.multiply(t * layers.branch, derivatives[layer], out=work)
            _launch("vg_bn_product", dtype, k * width, _i32(k), _i32(batch), _i32(width), work, zs[layer],
                    inv_std[layer])
            product = cupy.matmul(work_rows, layers.weights[layer]).reshape(t.shape)
            t = t + product if layers.has_residual else product
        else:
            cupy.matmul(rows, layers.weights[layer].T, out=work_rows)
            _launch("vg_bn_product", dtype, k * width, _i32(k), _i32(batch), _i32(width), work, zs[layer],
                    inv_std[layer])
            t = t + layers.residual * (derivatives[layer] * work) if layers.has_residual \
                else derivatives[layer] * work
        t = cupy.ascontiguousarray(t, dtype=dtype)
        rows = t.reshape(k * batch, width)
    result = cupy.empty((batch, k, width), dtype) if out is None else out
    result[...] = t.transpose(1, 0, 2)
    return result


# ---------------------------------------------------------------------------
# The backend: host or device stacks, results where the stack lives
# ---------------------------------------------------------------------------

def _call(problem, compute, *arrays, out=None):
    stack = problem.model
    host = _on_host(stack)
    layers = _Layers(stack)
    with layers.weights.device:
        arrays = tuple(to_device(a) if isinstance(a, np.ndarray) else a for a in (problem.x, *arrays))
        return _deliver(compute(layers, *arrays, None if host else out), out, host)


def forward(problem, out):
    """x_L (B, n); see vgcore.forward."""
    return _call(problem, _forward, out=out)


def gradient_profile(problem, grad_output, segment) -> dict:
    """The gradient profile's arrays (float64, on the stack's device); ``segment`` is ignored."""
    host = _on_host(problem.model)
    layers = _Layers(problem.model)
    with layers.weights.device:
        result = _gradient_profile(layers, to_device(problem.x), to_device(grad_output))
    return {key: cupy.asnumpy(value) for key, value in result.items()} if host else result


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another (each batched over its samples on the device)."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents, out):
    """J T_j for batch tangents T_j = tangents[:, j, :], (B, k, n)."""
    return _call(problem, lambda layers, x, t, o: _jacobian_products(layers, x, t, o, False), tangents,
                 out=out)


def vjp(problem, cotangents, out):
    """J^T U_j for batch cotangents U_j = cotangents[:, j, :], (B, k, n)."""
    return _call(problem, lambda layers, x, u, o: _jacobian_products(layers, x, u, o, True), cotangents,
                 out=out)
