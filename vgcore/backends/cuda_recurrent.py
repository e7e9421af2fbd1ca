"""The CuPy backend of recurrent models: every computation on an NVIDIA GPU.

The algorithms are those of the NumPy reference (vgcore.reference.recurrent)
and of the compiled CPU kernels (vgcore._ext._recurrent), batched over
samples (and over all k vectors of every sample) on the device:

- the step's matrix products go to cuBLAS through ``cupy.matmul``, one per
  step for the whole batch;
- the cell's gate math, its VJP and its JVP run in the kernels of
  ``csrc/vg_cuda_recurrent.cu``, one thread per hidden unit of a row, which
  call the very unit functions of the CPU kernels (``csrc/vg_gates.h``);
- the per-step renormalisation of the cotangents is the stacks' kernel
  (``vg_renormalise_rows`` of vgcore.backends.cuda_stack); the weight-gradient
  norms, saturation and dead units are CuPy reductions.

Importing this module raises ImportError, with the reason, when CuPy or a
CUDA device is missing (through vgcore.backends.cuda_stack); the dispatcher
turns that into "backend: 'cuda' is not available here (...)".  Models on the
host are copied to the device and results come back to the host.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np

from vgcore._activations import ACTIVATION_CODES, SATURATION_THRESHOLD
from vgcore._recurrent import CELL_CODES
from vgcore.backends import cuda_stack
from vgcore.backends.cuda_stack import cupy, to_device

# Literals on purpose: tests/test_cuda_build.py reads them with ``ast`` and compiles the kernel
# file with nvcc (and NVRTC where found), instantiating exactly these kernels.

#: The kernel file, in csrc/ (vgcore/_csrc/ once installed).
KERNEL_FILE = "vg_cuda_recurrent.cu"
#: Headers the kernel file reaches; their contents key CuPy's kernel cache.
KERNEL_HEADERS = ("vg_gates.h", "vg_gates_body.h", "vg_activations.h", "vg_activation_body.h")
#: Template kernels, instantiated for float and double.
TEMPLATE_KERNELS = ("vg_cell_forward", "vg_cell_backward", "vg_cell_jvp")
#: extern "C" kernels.
PLAIN_KERNELS = ()
#: C types of the template instantiations, by NumPy dtype name.
KERNEL_TYPES = {"float32": "float", "float64": "double"}
#: NVRTC options besides the include path (as vgcore.backends.cuda_stack's).
NVRTC_OPTIONS = ("--device-as-default-execution-space",)

_THREADS = 256


def _source() -> str:
    directory = cuda_stack.csrc_dir()
    source = (directory / KERNEL_FILE).read_text()
    digest = hashlib.sha256(source.encode())
    for header in KERNEL_HEADERS:
        digest.update((directory / header).read_bytes())
    return f"// vgcore csrc sha256 {digest.hexdigest()}\n{source}"


@functools.cache
def _kernels(device_id: int) -> dict[tuple[str, str], Any]:
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=_source(), options=cuda_stack.kernel_options(),
                                name_expressions=[f"{name}<{ctype}>" for name in TEMPLATE_KERNELS
                                                  for ctype in KERNEL_TYPES.values()])
        return {(name, ctype): module.get_function(f"{name}<{ctype}>")
                for name in TEMPLATE_KERNELS for ctype in KERNEL_TYPES.values()}


def _launch(name: str, dtype, units: int, *args) -> None:
    kernel = _kernels(cupy.cuda.runtime.getDevice())[name, KERNEL_TYPES[np.dtype(dtype).name]]
    kernel(((units + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _i32(value: int) -> np.int32:
    return np.int32(value)


class _Cell:
    """A recurrent model's parameters on the device and its codes as kernel arguments."""

    def __init__(self, model) -> None:
        self.cell = np.int32(CELL_CODES[model.cell])
        self.activation = np.int32(ACTIVATION_CODES[model.activation])
        self.weight_hh = to_device(model.weight_hh)
        self.weight_ih = to_device(model.weight_ih)
        self.bias_hh = to_device(model.bias_hh)
        self.bias_ih = to_device(model.bias_ih)
        self.n = model.hidden_width
        self.m = model.input_width
        self.gn = model.gates * model.hidden_width
        self.width = model.state_width
        extra = {"rnn": 0, "lstm": 2, "gru": 1}[model.cell]
        self.columns = 2 * self.gn + extra * self.n
        self.dtype = np.dtype(model.dtype)

    def step(self, state, u, state_out, cache, pre_h, pre_x) -> None:
        """One step of the batch: state (B, N) -> state_out, cache (B, C); u (B, m) or None."""
        rows = state.shape[0]
        cupy.matmul(state[:, :self.n], self.weight_hh.T, out=pre_h)
        x_part = cuda_stack._NULL
        if u is not None and self.m:
            cupy.matmul(u, self.weight_ih.T, out=pre_x)
            x_part = pre_x
        _launch("vg_cell_forward", self.dtype, rows * self.n, self.cell, self.activation, _i32(rows),
                _i32(self.n), pre_h, self.bias_hh, x_part, self.bias_ih, state, state_out, cache)

    def backward(self, g, cache, state_prev, per_sample: int, g_hh) -> None:
        """In place: g (rows, N) at s_t -> at s_{t-1}; g_hh (rows, G n) receives the cotangents at pre_h."""
        rows = g.shape[0]
        _launch("vg_cell_backward", self.dtype, rows * self.n, self.cell, _i32(rows), _i32(self.n),
                _i32(per_sample), g, cache, state_prev, g_hh, np.int64(self.gn), g)
        g[:, :self.n] += cupy.matmul(g_hh, self.weight_hh)

    def jvp(self, t, cache, state_prev, per_sample: int, t_a) -> None:
        """In place: tangents t (rows, N) at s_{t-1} -> at s_t; t_a (rows, G n) scratch."""
        rows = t.shape[0]
        cupy.matmul(t[:, :self.n], self.weight_hh.T, out=t_a)
        _launch("vg_cell_jvp", self.dtype, rows * self.n, self.cell, _i32(rows), _i32(self.n),
                _i32(per_sample), t_a, t, cache, state_prev, t)


def _inputs_at(inputs, t: int):
    return None if inputs is None else cupy.ascontiguousarray(inputs[:, t])


def _forward_with_caches(cell: _Cell, s0, steps: int, inputs, start: int = 0):
    """States (T+1, B, N) and caches (T, B, C) of steps start .. start + T - 1."""
    batch = s0.shape[0]
    states = cupy.empty((steps + 1, batch, cell.width), cell.dtype)
    caches = cupy.empty((steps, batch, cell.columns), cell.dtype)
    pre_h, pre_x = (cupy.empty((batch, cell.gn), cell.dtype) for _ in range(2))
    states[0] = s0
    for t in range(steps):
        cell.step(states[t], _inputs_at(inputs, start + t), states[t + 1], caches[t], pre_h, pre_x)
    return states, caches


def _forward(cell: _Cell, s0, steps: int, inputs, out):
    batch = s0.shape[0]
    buffers = [cupy.array(s0, copy=True), cupy.empty_like(s0)]
    cache = cupy.empty((batch, cell.columns), cell.dtype)
    pre_h, pre_x = (cupy.empty((batch, cell.gn), cell.dtype) for _ in range(2))
    for t in range(steps):
        cell.step(buffers[t % 2], _inputs_at(inputs, t), buffers[(t + 1) % 2], cache, pre_h, pre_x)
    result = buffers[steps % 2]
    if out is not None:
        out[...] = result
        return out
    return result


def _gradient_profile(cell: _Cell, s0, steps: int, inputs, grad_output) -> dict:
    batch, width = s0.shape
    states, caches = _forward_with_caches(cell, s0, steps, inputs)
    g = cupy.array(grad_output, dtype=cell.dtype, order="C", copy=True)
    g_hh = cupy.empty((batch, cell.gn), cell.dtype)
    log_scale = cupy.zeros(batch, np.float64)
    log_grad_norm = cupy.empty((batch, steps + 1), np.float64)
    log_weight_grad_norm = cupy.empty(steps, np.float64)
    flat = log_grad_norm.reshape(-1)
    unused = cupy.empty(batch, np.float64)
    threads = cuda_stack._row_threads(width)
    for t in range(steps, -1, -1):
        cuda_stack._launch("vg_renormalise_rows", cell.dtype, batch, threads, _i32(batch), _i32(width), g,
                           log_scale, flat[t:], _i32(steps + 1), cuda_stack._NULL, unused)
        if t == 0:
            break
        top = log_scale.max()
        cell.backward(g, caches[t - 1], states[t - 1], 1, g_hh)
        # log ||sum_b w_b g_hh[b] h[b]^T||_F with w_b = exp(s_b - max s), H scaled to unit largest row
        h = states[t - 1][:, :cell.n].astype(np.float64)
        scale = cupy.sqrt((h * h).sum(axis=1).max())
        h = h / cupy.where(scale > 0, scale, 1.0)
        weighted = g_hh.astype(np.float64) * cupy.exp(log_scale - top)[:, None]
        total = ((weighted @ weighted.T) * (h @ h.T)).sum()
        log_weight_grad_norm[t - 1] = cupy.where(
            total > 0, top + cupy.log(cupy.where(scale > 0, scale, 1.0)) + 0.5 * cupy.log(total), -cupy.inf)
    derivatives = caches[:, :, cell.gn:2 * cell.gn]  # (T, B, G n): the backward wrote g_hh elsewhere
    threshold = cell.dtype.type(SATURATION_THRESHOLD)
    saturated = ((derivatives < threshold) & (derivatives > -threshold)).sum(axis=(1, 2), dtype=np.int64)
    dead = (derivatives == 0).all(axis=1)
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated / float(batch * cell.gn),
        "dead": dead.mean(axis=1, dtype=np.float64),
    }


def _vectors(vectors, batch: int, width: int, dtype, out):
    result = cupy.empty((batch, vectors.shape[-2], width), dtype) if out is None else out
    result[...] = vectors
    return result


def _jvp(cell: _Cell, s0, steps: int, inputs, tangents, out):
    batch = s0.shape[0]
    result = _vectors(tangents, batch, cell.width, cell.dtype, out)
    k = result.shape[1]
    rows = result.reshape(batch * k, cell.width)
    t_a = cupy.empty((batch * k, cell.gn), cell.dtype)
    buffers = [cupy.array(s0, copy=True), cupy.empty_like(s0)]
    cache = cupy.empty((batch, cell.columns), cell.dtype)
    pre_h, pre_x = (cupy.empty((batch, cell.gn), cell.dtype) for _ in range(2))
    for t in range(steps):
        current, following = buffers[t % 2], buffers[(t + 1) % 2]
        cell.step(current, _inputs_at(inputs, t), following, cache, pre_h, pre_x)
        cell.jvp(rows, cache, current, k, t_a)
    return result


def _vjp(cell: _Cell, s0, steps: int, inputs, cotangents, out):
    batch = s0.shape[0]
    states, caches = _forward_with_caches(cell, s0, steps, inputs)
    result = _vectors(cotangents, batch, cell.width, cell.dtype, out)
    k = result.shape[1]
    rows = result.reshape(batch * k, cell.width)
    g_hh = cupy.empty((batch * k, cell.gn), cell.dtype)
    for t in range(steps - 1, -1, -1):
        cell.backward(rows, caches[t], states[t], k, g_hh)
    return result


def _lyapunov_log_growth(cell: _Cell, s0, steps: int, inputs, k: int, warmup: int):
    batch = s0.shape[0]
    directions = cupy.zeros((batch, k, cell.width), cell.dtype)
    directions[:, cupy.arange(k), cupy.arange(k)] = 1
    log_growth = cupy.zeros((batch, k), np.float64)
    t_a = cupy.empty((batch * k, cell.gn), cell.dtype)
    buffers = [cupy.array(s0, copy=True), cupy.empty_like(s0)]
    cache = cupy.empty((batch, cell.columns), cell.dtype)
    pre_h, pre_x = (cupy.empty((batch, cell.gn), cell.dtype) for _ in range(2))
    for t in range(warmup + steps):
        current, following = buffers[t % 2], buffers[(t + 1) % 2]
        cell.step(current, _inputs_at(inputs, t), following, cache, pre_h, pre_x)
        cell.jvp(directions.reshape(batch * k, cell.width), cache, current, k, t_a)
        q, r = cupy.linalg.qr(directions.transpose(0, 2, 1))  # (B, N, k), (B, k, k)
        if t >= warmup:
            log_growth += cupy.log(cupy.abs(cupy.diagonal(r, axis1=1, axis2=2).astype(np.float64)))
        directions = cupy.ascontiguousarray(q.transpose(0, 2, 1))
    return log_growth


# ---------------------------------------------------------------------------
# The backend (vgcore.backends.Backend for the "recurrent" kind)
# ---------------------------------------------------------------------------

def _on_host(model) -> bool:
    return not isinstance(model.weight_hh, cupy.ndarray)


def _run(problem, compute, *arrays, out=None):
    """``compute(cell, s0, steps, inputs, *arrays, out)`` on the device; results where the model lives."""
    model = problem.model
    host = _on_host(model)
    cell = _Cell(model)
    with cell.weight_hh.device:
        inputs = None if problem.inputs is None else to_device(problem.inputs)
        device_arrays = tuple(to_device(a) if isinstance(a, np.ndarray) else a for a in arrays)
        result = compute(cell, to_device(problem.x), problem.depth, inputs, *device_arrays,
                         None if host else out)
        return cuda_stack._deliver(result, out, host)


def forward(problem, out):
    """s_T (B, N); see vgcore.forward."""
    return _run(problem, _forward, out=out)


def gradient_profile(problem, grad_output, segment) -> dict:
    """The profile's arrays (float64, on the model's device); ``segment`` is a CPU memory mode."""
    model = problem.model
    cell = _Cell(model)
    with cell.weight_hh.device:
        inputs = None if problem.inputs is None else to_device(problem.inputs)
        result = _gradient_profile(cell, to_device(problem.x), problem.depth, inputs, to_device(grad_output))
    if _on_host(model):
        return {key: cupy.asnumpy(value) for key, value in result.items()}
    return result


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents, out):
    """(d s_T / d s_0) v, (B, k, N); see vgcore.jvp."""
    return _run(problem, _jvp, tangents, out=out)


def vjp(problem, cotangents, out):
    """(d s_T / d s_0)^T u, (B, k, N); see vgcore.vjp."""
    return _run(problem, _vjp, cotangents, out=out)


def jacobian(problem, out):
    """d s_T / d s_0 per sample, (B, N, N): row i is the VJP of e_i."""
    width = problem.model.state_width

    def compute(cell, s0, steps, inputs, out):
        return _vjp(cell, s0, steps, inputs, cupy.eye(width, dtype=cell.dtype), out)

    return _run(problem, compute, out=out)


def singular_values(problem):
    """Singular values of each sample's Jacobian (cupy.linalg.svd, batched), (B, N) descending."""
    width = problem.model.state_width

    def compute(cell, s0, steps, inputs, out):
        jacobians = _vjp(cell, s0, steps, inputs, cupy.eye(width, dtype=cell.dtype), None)
        return cupy.linalg.svd(jacobians, compute_uv=False)

    return _run(problem, compute)


def lyapunov_log_growth(problem, k: int):
    """Unsorted sums over the counted steps of log|R_ii|, (B, k) float64 (batched QR per step)."""
    warmup = problem.warmup

    def compute(cell, s0, steps, inputs, out):
        return _lyapunov_log_growth(cell, s0, steps, inputs, k, warmup)

    return _run(problem, compute)
