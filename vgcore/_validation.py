"""Argument checking and conversion shared by every public function.

Each check names the offending argument in its message and runs before any
work starts.  Nothing here modifies an input: conversions copy only when the
input cannot be used as it is (wrong dtype, non-contiguous).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from vgcore._activations import ACTIVATIONS

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NORMS = (None, "pre", "post")
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
        otherwise only float32 and float64 are accepted.

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
    if kind != "f" or (array.dtype not in FLOAT_DTYPES and not allow_any_float):
        raise TypeError(
            f"{name}: dtype {array.dtype} is not supported; pass float32 or float64 values"
        )
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(array.shape)}")
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    if not bool(xp.isfinite(array).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return array


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
        raise TypeError(f"norm: expected None, 'pre' or 'post', got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm: expected None, 'pre' or 'post', got {norm!r}")
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


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, inputs: tuple = ()):
    """Validate a caller-supplied output array; None passes through.

    Raises
    ------
    TypeError
        ``out`` is not an ndarray of the right dtype.
    ValueError
        Wrong shape, not C-contiguous, not writable, or overlapping an input.
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
        for array in inputs:
            if isinstance(array, np.ndarray) and np.shares_memory(out, array):
                raise ValueError("out: overlaps an input array")
    return out
