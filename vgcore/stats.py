"""Gradient-decay statistics of a :class:`~vgcore.Profile` (``vg.stats``).

Every statistic is a function of one curve: ``m_l``, the mean over samples of
the natural log of the gradient norm at ``x_l``, for ``l = 0`` (the input)
to ``L`` (the output).  ``exp(m_l)`` is the geometric-mean norm at layer l.

Accepted inputs
---------------
Every function takes, as its ``profile`` argument, one of:

- a :class:`~vgcore.Profile`: ``m`` is the mean over samples of
  ``profile.log_grad_norm``; a profile holding CuPy arrays is moved to the
  host with :meth:`Profile.to_numpy` first;
- a sequence (list, tuple, 1-D object array) of Profiles, a batch: the result
  is one value per profile, as a NumPy array (float64, or object for
  :func:`vanishing_depth`, whose values may be ``None``), or a list of dicts
  for :func:`summary`;
- a 1-D array-like of mean log norms ``m_0 .. m_L`` ordered input -> output
  (NumPy, CuPy, a list, ...), so that code holding per-layer norms from
  elsewhere, e.g. a PyTorch monitor, can reuse the same statistics.  Pass
  ``numpy.log(norms)`` for plain norms.

Zero gradients
--------------
A gradient that is exactly zero has log norm ``-inf`` (a layer that saturates
or dies completely zeroes the gradient of every layer below it).  ``-inf`` is
read as the limit of a vanishing norm, and every statistic stays NaN-free:

- the line behind :func:`chi` is fitted over the finite points only, so it
  measures the decay where gradient still flows; with fewer than two finite
  points (only the output carries gradient) ``chi = 0``, ``depth_scale = 0``
  and ``r2 = 1``;
- :func:`vanishing_depth` reaches a zero norm at the latest at the first
  layer (from the output) whose norm is zero;
- :func:`imbalance` is ``inf`` when the first ``k`` layers hold more zero
  norms than the last ``k`` (always the case when zeros run up from the
  input and the two groups differ).

The output's gradient is the reference of every ratio and must be nonzero:
a curve whose last point is ``-inf`` raises ValueError.

Validation
----------
Bad input raises before any work, naming the argument: TypeError for a
wrong type (not a Profile, sequence of Profiles or real array; a non-integer
``k``; a non-real ``threshold``), ValueError for a wrong shape (a depth below
1, no samples), NaN or ``+inf`` log norms, finite log norms of magnitude above
1e100 (no real norm has one; the bound keeps every sum finite), ``k`` outside
``1 .. L + 1`` and ``threshold`` outside ``(0, 1)``.  No input is modified.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike

from vgcore._profile import Profile

__all__ = ["chi", "clip_coefficient", "depth_scale", "global_norm", "imbalance", "summary", "vanishing_depth"]

#: Largest magnitude accepted for a finite log norm (see the module docstring).
MAX_ABS_LOG_NORM = 1e100

_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Input handling


class _Curve:
    """A validated mean-log-norm curve, shifted so that the output's value is 0.

    ``relative[l] = m_l - m_L``: finite or ``-inf``, ``relative[L] == 0``.
    Shifting by the output removes a constant that every statistic ignores
    and makes a flat curve exactly zero, so that its slope is exactly 0.
    """

    __slots__ = ("_fit", "profile", "relative")

    def __init__(self, relative: np.ndarray, profile: Profile | None) -> None:
        self.relative = relative
        self.profile = profile
        self._fit: tuple[float, float] | None = None

    @property
    def depth(self) -> int:
        return self.relative.shape[0] - 1

    def fit(self) -> tuple[float, float]:
        """``(slope, r2)`` of the least-squares line through the finite points (cached)."""
        if self._fit is None:
            self._fit = _fit_line(self.relative)
        return self._fit


def _host(array: Any) -> Any:
    """A CuPy array (a CUDA array with a ``get`` method) copied to the host; anything else unchanged."""
    get = getattr(array, "get", None)
    if callable(get) and hasattr(array, "__cuda_array_interface__"):
        return get()
    return array


def _real_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a float64 NumPy array; TypeError unless its dtype is integer or real."""
    try:
        array = np.asarray(_host(values))
    except (TypeError, ValueError) as error:  # ragged nesting, unconvertible objects
        raise TypeError(f"{name}: expected a real array, got {type(values).__name__} ({error})") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected real (integer or float) values, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _curve_from_mean(mean_log_norm: np.ndarray, name: str, profile: Profile | None) -> _Curve:
    if np.isnan(mean_log_norm).any():
        raise ValueError(f"{name}: log gradient norms contain NaN")
    if np.isposinf(mean_log_norm).any():
        raise ValueError(f"{name}: log gradient norms contain +inf (only -inf, a zero gradient, is allowed)")
    finite = mean_log_norm[np.isfinite(mean_log_norm)]
    if finite.size and np.abs(finite).max() > MAX_ABS_LOG_NORM:
        raise ValueError(f"{name}: finite log gradient norms must lie within +-{MAX_ABS_LOG_NORM:g}")
    if mean_log_norm[-1] == -np.inf:
        raise ValueError(
            f"{name}: the gradient at the output (the last layer) is exactly zero, "
            "so ratios to it are undefined"
        )
    # the new array never aliases the caller's
    return _Curve(mean_log_norm - mean_log_norm[-1], profile)


def _curve_from_profile(profile: Profile, name: str) -> _Curve:
    host = profile.to_numpy()
    log_grad_norm = _real_array(host.log_grad_norm, f"{name}.log_grad_norm")
    if log_grad_norm.ndim != 2:
        raise ValueError(f"{name}.log_grad_norm: expected shape (B, L + 1), got {log_grad_norm.shape}")
    if log_grad_norm.shape[0] < 1:
        raise ValueError(f"{name}.log_grad_norm: needs at least one sample, got shape {log_grad_norm.shape}")
    if log_grad_norm.shape[1] < 2:
        raise ValueError(f"{name}: depth must be at least 1, got shape {log_grad_norm.shape}")
    # NaN / +inf are checked per sample: a +inf could otherwise hide behind a -inf in the mean
    if np.isnan(log_grad_norm).any():
        raise ValueError(f"{name}.log_grad_norm: contains NaN")
    if np.isposinf(log_grad_norm).any():
        raise ValueError(f"{name}.log_grad_norm: contains +inf (only -inf, a zero gradient, is allowed)")
    return _curve_from_mean(log_grad_norm.mean(axis=0), f"{name}.log_grad_norm", host)


def _curve_from_array(values: Any, name: str) -> _Curve:
    mean_log_norm = _real_array(values, name)
    if mean_log_norm.ndim != 1:
        raise ValueError(
            f"{name}: expected a Profile, a sequence of Profiles or a 1-D array of mean log norms "
            f"(input -> output), got an array of shape {mean_log_norm.shape}"
        )
    if mean_log_norm.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 layers (depth >= 1), got {mean_log_norm.shape[0]}")
    return _curve_from_mean(mean_log_norm, name, None)


def _as_batch(profile: Any) -> list[Profile] | None:
    """The Profiles of a batch, or None when ``profile`` is not a sequence of Profiles."""
    if isinstance(profile, Profile) or isinstance(profile, (str, bytes)):
        return None
    if isinstance(profile, np.ndarray):
        if profile.dtype != object or profile.ndim != 1:
            return None
        items = list(profile)
    elif isinstance(profile, Sequence):
        items = list(profile)
    else:
        return None
    is_profile = [isinstance(item, Profile) for item in items]
    if not items or not any(is_profile):
        return None
    if not all(is_profile):
        wrong = is_profile.index(False)
        raise TypeError(
            f"profile[{wrong}]: a batch must hold only Profiles, got {type(items[wrong]).__name__}"
        )
    return items


def _curve(profile: Any, name: str) -> _Curve:
    if isinstance(profile, Profile):
        return _curve_from_profile(profile, name)
    if profile is None or isinstance(profile, (str, bytes, dict, numbers.Number)):
        raise TypeError(
            f"{name}: expected a Profile, a sequence of Profiles or a 1-D array of mean log norms, "
            f"got {type(profile).__name__}"
        )
    return _curve_from_array(profile, name)


def _apply(profile: Any, statistic: Callable[[_Curve], _T]) -> list[_T] | _T:
    """``statistic`` of one curve, or the list over a batch of Profiles (all validated first)."""
    batch = _as_batch(profile)
    if batch is None:
        return statistic(_curve(profile, "profile"))
    curves = [_curve(item, f"profile[{index}]") for index, item in enumerate(batch)]
    return [statistic(curve) for curve in curves]


def _float_result(result: list[float] | float) -> np.ndarray | float:
    return np.asarray(result, dtype=np.float64) if isinstance(result, list) else result


# --------------------------------------------------------------------------
# The statistics on one curve


def _exp(x: float) -> float:
    """``exp(x)`` as a float; ``inf`` on overflow, without a warning."""
    with np.errstate(over="ignore"):
        return float(np.exp(x))


def _fit_line(relative: np.ndarray) -> tuple[float, float]:
    """Slope and R^2 of the least-squares line of ``relative`` against l over its finite points.

    Fewer than two finite points (only the output's): slope ``+inf`` (every
    step towards the input loses all gradient) and R^2 = 1.  A line that
    fits exactly, a flat one included, has R^2 = 1 (there the usual
    ``1 - SS_res / SS_tot`` is 0 / 0).
    """
    layers = np.flatnonzero(np.isfinite(relative)).astype(np.float64)
    if layers.size < 2:
        return math.inf, 1.0
    values = relative[layers.astype(np.intp)]
    centred_layers = layers - layers.mean()
    slope = float(centred_layers @ values / (centred_layers @ centred_layers))
    centred_values = values - values.mean()
    residuals = centred_values - slope * centred_layers
    total = float(centred_values @ centred_values)
    if total == 0.0:
        return slope, 1.0
    r2 = 1.0 - float(residuals @ residuals) / total
    # mathematically in [0, 1] for a least-squares line with intercept; clip rounding
    return slope, min(max(r2, 0.0), 1.0)


def _chi(curve: _Curve) -> float:
    slope, _ = curve.fit()
    return _exp(-2.0 * slope)


def _depth_scale(curve: _Curve) -> float:
    slope, _ = curve.fit()
    # 1 / |ln chi| with ln chi = -2 slope, computed from the slope so no exp/log rounding enters
    return math.inf if slope == 0.0 else 1.0 / (2.0 * abs(slope))


def _vanishing_depth(curve: _Curve, log_threshold: float) -> int | None:
    # relative[L - d] = log of the norm ratio of layer L - d to the output; reversed, index d
    below = np.flatnonzero(curve.relative[::-1] < log_threshold)
    return int(below[0]) if below.size else None


def _imbalance(curve: _Curve, k: int) -> float:
    relative = curve.relative
    first, last = relative[:k], relative[relative.shape[0] - k :]
    first_zeros, last_zeros = int(np.isneginf(first).sum()), int(np.isneginf(last).sum())
    # -inf as the limit of a log norm -> -inf: the group with more zero norms has the smaller
    # geometric mean, infinitely so; with as many, the finite parts decide
    if first_zeros != last_zeros:
        return math.inf if first_zeros > last_zeros else 0.0
    finite_sum_first = float(first[np.isfinite(first)].sum())
    finite_sum_last = float(last[np.isfinite(last)].sum())
    return _exp((finite_sum_last - finite_sum_first) / k)


def _default_k(depth: int) -> int:
    return max(1, depth // 4)


def _check_k(k: int | None, depth: int, name: str) -> int:
    if k is None:
        return _default_k(depth)
    if k > depth + 1:
        raise ValueError(f"k: must be at most L + 1 = {depth + 1} for {name} (depth {depth}), got {k}")
    return int(k)


def _log_weight_grad_norms(profile: Profile, name: str) -> np.ndarray:
    """A (host) Profile's ``log_weight_grad_norm``, validated: shape (L,), no NaN or ``+inf``."""
    values = _real_array(profile.log_weight_grad_norm, f"{name}.log_weight_grad_norm")
    depth = profile.depth
    if values.shape != (depth,):
        raise ValueError(f"{name}.log_weight_grad_norm: expected shape ({depth},), got {values.shape}")
    return _checked_log_norms(values, f"{name}.log_weight_grad_norm")


def _checked_log_norms(values: np.ndarray, name: str) -> np.ndarray:
    if np.isnan(values).any():
        raise ValueError(f"{name}: contains NaN")
    if np.isposinf(values).any():
        raise ValueError(f"{name}: contains +inf (only -inf, a zero gradient, is allowed)")
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > MAX_ABS_LOG_NORM:
        raise ValueError(f"{name}: finite log gradient norms must lie within +-{MAX_ABS_LOG_NORM:g}")
    return values


def _log_global_norm(log_norms: np.ndarray) -> float:
    """``log sqrt(sum_l exp(2 v_l))`` without overflow or underflow: ``m + log(sum exp(2 (v - m))) / 2``."""
    if log_norms.size == 0:
        return -math.inf
    top = float(log_norms.max())
    if top == -math.inf:  # every gradient exactly zero
        return -math.inf
    # each term is in (0, 1] and the largest is exactly 1, so the sum lies in [1, L]
    return top + 0.5 * math.log(float(np.exp(2.0 * (log_norms - top)).sum()))


def _global_norm_of(profile: Any, name: str) -> float:
    if isinstance(profile, Profile):
        return _log_global_norm(_log_weight_grad_norms(profile.to_numpy(), name))
    if profile is None or isinstance(profile, (str, bytes, dict, numbers.Number)):
        raise TypeError(
            f"{name}: expected a Profile, a sequence of Profiles or a 1-D array of per-layer log "
            f"weight-gradient norms, got {type(profile).__name__}"
        )
    values = _real_array(profile, name)
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D array of per-layer log norms, got shape {values.shape}")
    return _log_global_norm(_checked_log_norms(values, name))


def _summary(curve: _Curve) -> dict[str, Any]:
    slope, r2 = curve.fit()
    profile = curve.profile
    result: dict[str, Any] = {
        "chi": _chi(curve),
        "depth_scale": _depth_scale(curve),
        "vanishing_depth": _vanishing_depth(curve, math.log(1e-3)),
        "imbalance": _imbalance(curve, _default_k(curve.depth)),
        "r2": r2,
        "chi_theory": float(profile.chi_theory) if profile is not None else math.nan,
        "slope": slope,
        "log_grad_norm_ratio": 0.0 - float(curve.relative[0]),  # 0.0 - x: no -0.0 for a flat profile
        "depth": curve.depth,
    }
    if profile is None:
        result["mean_saturation"] = math.nan
        result["mean_dead"] = math.nan
        result["log_global_norm"] = math.nan
    else:
        for key, field in (("mean_saturation", "saturation"), ("mean_dead", "dead")):
            values = _real_array(getattr(profile, field), f"profile.{field}")
            if values.shape != (curve.depth,):
                raise ValueError(f"profile.{field}: expected shape ({curve.depth},), got {values.shape}")
            if not np.isfinite(values).all():
                raise ValueError(f"profile.{field}: contains NaN or inf")
            result[key] = float(values.mean())
        result["log_global_norm"] = _log_global_norm(_log_weight_grad_norms(profile, "profile"))
    return result


# --------------------------------------------------------------------------
# Public API


@overload
def chi(profile: Sequence[Profile]) -> np.ndarray: ...
@overload
def chi(profile: Profile | ArrayLike) -> float: ...
def chi(profile: Any) -> float | np.ndarray:
    """Measured per-layer ratio of squared gradient norms, layer l over layer l + 1.

    ``chi = exp(-2 * slope)``, where ``slope`` is that of the least-squares
    line of the mean log norm ``m_l`` against ``l`` (over the finite points).
    One step towards the input multiplies the squared norm by ``chi``, so
    ``chi < 1`` means vanishing gradients, ``chi > 1`` exploding ones; it is
    the measured counterpart of mean-field theory's ``chi_1``.

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        A gradient profile, a batch of them, or mean log norms ordered
        input -> output (see the module docstring).

    Returns
    -------
    float or ndarray
        ``chi`` in ``[0, inf]``; one per profile (float64 array) for a batch.
        A flat profile gives exactly 1; a profile where only the output's
        gradient is nonzero gives 0.

    Raises
    ------
    TypeError
        ``profile`` is of the wrong type or dtype.
    ValueError
        ``profile`` has depth < 1, no samples, NaN or ``+inf`` log norms, or
        a zero gradient at the output.
    """
    return _float_result(_apply(profile, _chi))


@overload
def depth_scale(profile: Sequence[Profile]) -> np.ndarray: ...
@overload
def depth_scale(profile: Profile | ArrayLike) -> float: ...
def depth_scale(profile: Any) -> float | np.ndarray:
    """Layers per e-fold of the squared gradient norm: ``1 / |ln chi|``.

    Computed as ``1 / (2 |slope|)`` from the fitted slope (equal to
    ``1 / |ln chi|``, without the rounding of exp and log).

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        As for :func:`chi`.

    Returns
    -------
    float or ndarray
        ``depth_scale`` in ``[0, inf]``: ``inf`` for a flat profile
        (``chi = 1``), 0 when only the output's gradient is nonzero
        (``chi = 0``); one per profile for a batch.

    Raises
    ------
    TypeError, ValueError
        As for :func:`chi`.
    """
    return _float_result(_apply(profile, _depth_scale))


@overload
def vanishing_depth(profile: Sequence[Profile], threshold: float = ...) -> np.ndarray: ...
@overload
def vanishing_depth(profile: Profile | ArrayLike, threshold: float = ...) -> int | None: ...
def vanishing_depth(profile: Any, threshold: float = 1e-3) -> int | np.ndarray | None:
    """Layers back from the output until the norm ratio to the output first falls below ``threshold``.

    The smallest ``d`` in ``0 .. L`` with ``exp(m_{L-d} - m_L) < threshold``,
    the ratio of geometric-mean norms of layer ``L - d`` and the output.  A
    zero norm (``-inf``) is below any threshold.  Unlike :func:`chi`, this
    reads the curve point by point, with no fit.

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        As for :func:`chi`.
    threshold : float, default 1e-3
        The norm ratio (not squared) counted as vanished, in ``(0, 1)``.

    Returns
    -------
    int or None or ndarray
        ``d``, or None when the ratio stays at or above ``threshold`` down to
        the input; for a batch, a 1-D object array of such values.

    Raises
    ------
    TypeError
        ``profile`` is of the wrong type, or ``threshold`` is not a real number.
    ValueError
        ``threshold`` is not in ``(0, 1)``; ``profile`` is invalid (see :func:`chi`).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold: expected a real number, got {type(threshold).__name__}")
    if not 0.0 < float(threshold) < 1.0:  # False for NaN too
        raise ValueError(f"threshold: must lie in (0, 1), got {threshold!r}")
    log_threshold = math.log(float(threshold))
    result = _apply(profile, lambda curve: _vanishing_depth(curve, log_threshold))
    if isinstance(result, list):
        array = np.empty(len(result), dtype=object)
        array[:] = result
        return array
    return result


@overload
def imbalance(profile: Sequence[Profile], k: int | None = ...) -> np.ndarray: ...
@overload
def imbalance(profile: Profile | ArrayLike, k: int | None = ...) -> float: ...
def imbalance(profile: Any, k: int | None = None) -> float | np.ndarray:
    """Geometric-mean gradient norm of the last ``k`` layers over that of the first ``k``.

    ``exp(mean(m[L+1-k:]) - mean(m[:k]))`` over the ``L + 1`` points
    ``x_0 .. x_L``: the last ``k`` are those nearest the output, the first
    ``k`` those nearest the input.  "Early layers get 30-50x smaller
    gradients" is an imbalance of 30-50; below 1, the early layers get the
    larger gradients (exploding towards the input).

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        As for :func:`chi`.
    k : int, optional
        Points in each group, ``1 .. L + 1``; default ``max(1, L // 4)``,
        per profile in a batch.  ``k = L + 1`` compares the whole profile
        with itself (1).

    Returns
    -------
    float or ndarray
        The ratio in ``[0, inf]``: ``inf`` when the first ``k`` hold more
        zero gradients than the last ``k``; one per profile for a batch.

    Raises
    ------
    TypeError
        ``profile`` is of the wrong type, or ``k`` is not an integer.
    ValueError
        ``k < 1`` or ``k > L + 1``; ``profile`` is invalid (see :func:`chi`).
    """
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k: expected an integer or None, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k: must be at least 1, got {k}")
    batch = _as_batch(profile)
    if batch is None:
        curve = _curve(profile, "profile")
        return _imbalance(curve, _check_k(k, curve.depth, "profile"))
    curves = [_curve(item, f"profile[{index}]") for index, item in enumerate(batch)]
    counts = [_check_k(k, curve.depth, f"profile[{index}]") for index, curve in enumerate(curves)]
    values = [_imbalance(curve, count) for curve, count in zip(curves, counts, strict=True)]
    return np.asarray(values, dtype=np.float64)


@overload
def summary(profile: Sequence[Profile]) -> list[dict[str, Any]]: ...
@overload
def summary(profile: Profile | ArrayLike) -> dict[str, Any]: ...
def summary(profile: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """All statistics of a profile in one dict (defaults: threshold 1e-3, k = max(1, L // 4)).

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        As for :func:`chi`.

    Returns
    -------
    dict or list of dict
        For a batch, one dict per profile.  Keys:

        - ``chi``, ``depth_scale``, ``vanishing_depth``, ``imbalance``: as
          the functions of the same names;
        - ``r2``: coefficient of determination of the line behind ``chi``,
          over its finite points; 1 where the line fits exactly (a flat
          profile, two finite points, or fewer, where ``chi = 0``);
        - ``chi_theory``: the profile's mean-field ``chi_1`` (NaN where
          theory does not apply, and for array input);
        - ``slope``: the fitted slope of ``m_l`` per layer towards the
          output (``chi = exp(-2 slope)``; ``inf`` when ``chi = 0``);
        - ``log_grad_norm_ratio``: ``m_L - m_0``, log of the output's
          geometric-mean norm over the input's (``inf`` if the input's is 0);
        - ``depth``: ``L``;
        - ``mean_saturation``, ``mean_dead``: means over layers of the
          profile's ``saturation`` and ``dead`` (NaN for array input);
        - ``log_global_norm``: :func:`global_norm`, the log of the total
          weight-gradient norm (NaN for array input).

    Raises
    ------
    TypeError, ValueError
        As for :func:`chi`; also ValueError when the profile's
        ``saturation`` or ``dead`` is not a finite array of shape (L,), or
        its ``log_weight_grad_norm`` not an array of shape (L,) free of NaN
        and ``+inf``.
    """
    return _apply(profile, _summary)


# --------------------------------------------------------------------------
# Gradient clipping


def _batch_or_one(profile: Any, statistic: Callable[[Any, str], float]) -> float | np.ndarray:
    batch = _as_batch(profile)
    if batch is None:
        return statistic(profile, "profile")
    values = [statistic(item, f"profile[{index}]") for index, item in enumerate(batch)]
    return np.asarray(values, dtype=np.float64)


@overload
def global_norm(profile: Sequence[Profile]) -> np.ndarray: ...
@overload
def global_norm(profile: Profile | ArrayLike) -> float: ...
def global_norm(profile: Any) -> float | np.ndarray:
    """Log of the total weight-gradient norm, ``log sqrt(sum_l ||d loss / d W_l||_F^2)``.

    The norm over all weights that ``torch.nn.utils.clip_grad_norm_`` (and
    optax's ``clip_by_global_norm``) measures, here over the stack's weight
    matrices.  Computed in log space from ``profile.log_weight_grad_norm``
    as ``m + log(sum_l exp(2 (v_l - m))) / 2`` with ``m = max_l v_l``, so it
    is finite and exact where the plain norms underflow or overflow.

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        A gradient profile (its ``log_weight_grad_norm``, shape (L,)), a
        batch of them, or per-layer log norms ``log ||d loss / d W_l||_F``
        (any number of layers, at least one).

    Returns
    -------
    float or ndarray
        The log of the total norm; ``-inf`` when every weight gradient is
        exactly zero; one per profile (float64 array) for a batch.

    Raises
    ------
    TypeError
        ``profile`` is of the wrong type or dtype.
    ValueError
        The log norms are not a non-empty 1-D array of shape (L,), or hold
        NaN, ``+inf`` or finite values beyond +-1e100.
    """
    return _batch_or_one(profile, _global_norm_of)


@overload
def clip_coefficient(profile: Sequence[Profile], max_norm: float) -> np.ndarray: ...
@overload
def clip_coefficient(profile: Profile | ArrayLike, max_norm: float) -> float: ...
def clip_coefficient(profile: Any, max_norm: float) -> float | np.ndarray:
    """The factor gradient clipping by total norm applies: ``min(1, max_norm / total norm)``.

    ``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` multiplies every
    gradient by this factor (computed there as ``max_norm / (total + 1e-6)``,
    clamped to 1, a relative difference of ``1e-6 / total``); the total norm
    is :func:`global_norm`'s.  Computed in log space, as
    ``exp(min(0, log max_norm - global_norm))``.

    Parameters
    ----------
    profile : Profile, sequence of Profile, or 1-D array-like
        As for :func:`global_norm`.
    max_norm : float
        The clipping threshold, positive and finite.

    Returns
    -------
    float or ndarray
        In ``(0, 1]``: 1 when the total norm is at most ``max_norm`` (a zero
        gradient included); one per profile (float64 array) for a batch.

    Raises
    ------
    TypeError
        ``profile`` or ``max_norm`` is of the wrong type.
    ValueError
        ``max_norm`` is not positive and finite; ``profile`` as for
        :func:`global_norm`.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm: expected a real number, got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not math.isfinite(max_norm) or max_norm <= 0.0:
        raise ValueError(f"max_norm: must be positive and finite, got {max_norm}")
    log_max_norm = math.log(max_norm)

    def coefficient(item: Any, name: str) -> float:
        log_total = _global_norm_of(item, name)
        return 1.0 if log_total <= log_max_norm else math.exp(log_max_norm - log_total)

    return _batch_or_one(profile, coefficient)
