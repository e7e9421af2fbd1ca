"""Argument checking and conversion shared by every public function.

Each check names the offending argument in its message and runs before any
work starts.  Nothing here modifies an input: conversions copy only when the
input cannot be used as it is (wrong dtype, non-contiguous).
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np

from vgcore._activations import ACTIVATIONS

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NORMS = (None, "pre", "post", "batch")
BACKENDS = ("auto", "cpu", "cuda", "numpy")


def is_cupy_array(value: Any) -> bool:
    """True for a cupy.ndarray, without importing CuPy."""
    return type(value).__module__.split(".")[0] == "cupy"


def array_namespace(value: Any):
    """numpy for host arrays, cupy for CuPy arrays."""
    if is_cupy_array(value):
        import cupy

        return cupy
    return np


def as_float_array(value: Any, name: str, *, dtype: Any = None, ndim: int | None = None,
                   allow_any_float: bool = False):
    """Read ``value`` as a floating array (NumPy, CuPy, or anything DLPack / NumPy can read).

    Parameters
    ----------
    value : array-like
        The argument.
    name : str
        Its name, for error messages.
    dtype : dtype, optional
        Cast to this dtype (copying only when it differs).
    ndim : int, optional
        Required number of dimensions.
    allow_any_float : bool
        Accept float16 (and other real floating dtypes) and cast them to ``dtype``;
        otherwise only float32 and float64 are accepted.  Implied when ``dtype``
        is given: a target dtype means "cast to it".  Non-native byte order
        (big-endian float32 / float64) is always accepted and converted.

    Raises
    ------
    TypeError
        Not an array, or not of a supported floating dtype.
    ValueError
        Wrong number of dimensions, or NaN / inf entries.
    """
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(value, (str, bytes, dict, set)):
        raise TypeError(f"{name}: expected an array, got {type(value).__name__}")
    xp = array_namespace(value)
    if xp is np and not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
        try:
            value = np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError) as error:
            device = getattr(value, "device", "its device")
            if str(device).startswith("cuda"):
                import cupy

                xp = cupy
                value = cupy.from_dlpack(value)
            else:
                raise TypeError(f"{name}: cannot read the array through DLPack ({error})") from error
    try:
        array = xp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a numeric array ({error})") from error
    kind = array.dtype.kind
    if kind == "f" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if dtype is not None:
        allow_any_float = True
    if kind != "f" or (array.dtype not in FLOAT_DTYPES and not allow_any_float):
        raise TypeError(
            f"{name}: dtype {array.dtype} is not supported; pass float32 or float64 values"
        )
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(array.shape)}")
    if not all_finite(array):
        raise ValueError(f"{name}: contains NaN or inf")
    if dtype is not None and array.dtype != dtype:
        with np.errstate(over="ignore"):
            array = array.astype(dtype)
        if not all_finite(array):
            raise ValueError(f"{name}: values overflow {np.dtype(dtype).name} (largest magnitude "
                             f"{np.finfo(np.dtype(dtype)).max:.3g})")
    return array


def batch_array(value: Any, name: str, *, width: int, dtype: np.dtype, like: Any, device: str):
    """A batch (B, width), B >= 1, C-contiguous in ``dtype``, on the device of ``like``.

    Raises
    ------
    TypeError
        Not a floating array, or on another device than ``like``.
    ValueError
        Wrong shape, an empty batch, NaN or inf.
    """
    array = as_float_array(value, name, ndim=2, dtype=dtype, allow_any_float=True)
    if array_namespace(array) is not array_namespace(like):
        raise TypeError(f"{name}: must live on the same device as the model ({device})")
    if array.shape[0] < 1:
        raise ValueError(f"{name}: the batch (first axis) must hold at least one sample")
    if array.shape[1] != width:
        raise ValueError(f"{name}: expected shape (B, {width}) for a model of width {width}, "
                         f"got {tuple(array.shape)}")
    return contiguous(array)


def vectors_array(value: Any, name: str, *, batch: int, width: int, dtype: np.dtype, like: Any, device: str):
    """Tangents / cotangents (B, k, n) or (k, n) with k >= 1, C-contiguous in ``dtype``, on ``like``'s device.

    Raises
    ------
    TypeError
        Not a floating array, or on another device than ``like``.
    ValueError
        Wrong shape, NaN or inf.
    """
    array = as_float_array(value, name, dtype=dtype, allow_any_float=True)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape (B, k, n) or (k, n), got {tuple(array.shape)}")
    if array_namespace(array) is not array_namespace(like):
        raise TypeError(f"{name}: must live on the same device as the model ({device})")
    if array.shape[-1] != width or array.shape[-2] < 1 or (array.ndim == 3 and array.shape[0] != batch):
        raise ValueError(f"{name}: expected shape ({batch}, k, {width}) or (k, {width}) "
                         f"with k >= 1, got {tuple(array.shape)}")
    return contiguous(array)


def available_memory() -> int:
    """Bytes of memory this process can still have: MemAvailable (and a cgroup's limit), else physical RAM.

    An estimate for refusing sizes that cannot fit before any work starts;
    it never promises an allocation will succeed.
    """
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            return 2**62  # unknown: let the allocation itself decide
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as handle:
                limit = handle.read().strip()
            with open(usage_file) as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, max(0, int(limit) - usage))
    return available


def _format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.3g} EiB"  # pragma: no cover


def check_memory(nbytes: float, names: str, what: str) -> None:
    """ValueError naming ``names`` when ``nbytes`` exceed the memory this process can have.

    Parameters
    ----------
    nbytes : float
        Expected peak memory of the request.
    names : str
        The arguments that set the size, e.g. "depth, width".
    what : str
        What needs the memory, for the message.
    """
    available = available_memory()
    if nbytes > available:
        raise ValueError(f"{names}: {what} needs about {_format_bytes(nbytes)} of memory; "
                         f"{_format_bytes(available)} is available")


#: all_finite checks this many values at a time, so that its boolean scratch stays small.
_FINITE_BLOCK_VALUES = 2**22


def all_finite(array) -> bool:
    """Whether every entry of a NumPy / CuPy array is finite, with at most a few MiB of scratch."""
    xp = array_namespace(array)
    if array.ndim == 0 or array.size <= _FINITE_BLOCK_VALUES:
        return bool(xp.isfinite(array).all())
    per_row = max(1, array.size // array.shape[0])
    step = max(1, _FINITE_BLOCK_VALUES // per_row)
    return all(bool(xp.isfinite(array[start:start + step]).all()) for start in range(0, array.shape[0], step))


def contiguous(array):
    """C-contiguous version of ``array`` (the array itself when already contiguous)."""
    return array_namespace(array).ascontiguousarray(array)


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """A Python int >= minimum from an int or NumPy integer (bool is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_real(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """A finite Python float from a real number (bool is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_activation(activation: Any) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a string, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return activation


def check_residual(residual: Any) -> float | None:
    if residual is None:
        return None
    return check_real(residual, "residual")


def check_norm(norm: Any) -> str | None:
    if norm is not None and not isinstance(norm, str):
        raise TypeError(f"norm: expected None, 'pre', 'post' or 'batch', got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm: expected None, 'pre', 'post' or 'batch', got {norm!r}")
    return norm


def check_backend(backend: Any) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def check_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"dtype: not a dtype: {dtype!r}") from error
    if resolved not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32 or float64, got {resolved}")
    return resolved


def _host_view(value: Any) -> np.ndarray | None:
    """An ndarray sharing ``value``'s host memory, or None when it has none to share (a list, a copy).

    Used to compare ``out`` with what the caller passed, before any conversion:
    a converted input (cast, made contiguous) is a copy, but the caller's
    original array may still be ``out``.
    """
    if isinstance(value, np.ndarray):
        return value
    if value is None or is_cupy_array(value) or isinstance(value, (str, bytes, numbers.Number)):
        return None
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError):
            return None
    try:
        return np.asarray(value, copy=False)
    except (ValueError, TypeError):  # a list or an object NumPy must copy: no shared memory
        return None


def _overlaps(out, array) -> bool:
    """Whether ``out`` and ``array`` share any element (exact; assumed when too hard to decide)."""
    try:
        return bool(np.shares_memory(out, array, max_work=10**6))
    except np.exceptions.TooHardError:
        return True


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, inputs: tuple = (),
              originals: tuple = ()):
    """Validate a caller-supplied output array; None passes through.

    Parameters
    ----------
    out : ndarray or None
    shape, dtype
        What the result will be.
    inputs : tuple
        The converted inputs the computation reads.
    originals : tuple
        The caller's arguments as given, before conversion: ``out`` may alias
        one of them even where the converted input is a copy.

    Raises
    ------
    TypeError
        ``out`` is not an ndarray of the right dtype.
    ValueError
        Wrong shape, not C-contiguous, not writable, or overlapping an input
        (converted or as given) through any view.
    """
    if out is None:
        return None
    if not isinstance(out, np.ndarray) and not is_cupy_array(out):
        raise TypeError(f"out: expected an ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out: must be C-contiguous")
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError("out: is not writable")
        for array in (*inputs, *originals):
            view = _host_view(array)
            if view is not None and _overlaps(out, view):
                raise ValueError("out: overlaps an input array (through a view of it); "
                                 "pass a separate array")
    else:
        import cupy

        for array in (*inputs, *originals):
            if is_cupy_array(array) and cupy.shares_memory(out, array):
                raise ValueError("out: overlaps an input array (through a view of it); "
                                 "pass a separate array")
    return out
