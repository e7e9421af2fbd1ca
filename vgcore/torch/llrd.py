"""Layer-wise learning-rate decay (LLRD) parameter groups, its automatic decay, and freezing."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from vgcore._findings import TOTAL, GradientHistory, check_positive_float
from vgcore.torch.layers import check_model, resolve_layers, split_outside
from vgcore.torch.monitor import GradientMonitor

__all__ = ["auto_decay", "freeze_layers", "llrd_param_groups"]


def _profile_log_norms(profile: Any) -> np.ndarray | Any:
    """Per-layer mean log norms (1-D, input -> output) from a monitor, DataFrame or norms; or a Profile."""
    from vgcore import Profile

    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, (GradientMonitor, GradientHistory)):
        frame = profile.history
        if frame.shape[0] == 0:
            raise ValueError("profile: the monitor has recorded no step yet")
        values = frame[profile.layer_names].to_numpy()
    elif hasattr(profile, "to_numpy") and getattr(profile, "ndim", 1) == 2:
        # a history DataFrame: its layer columns (not the total)
        columns = [c for c in getattr(profile, "columns", ()) if c != TOTAL]
        values = profile[columns].to_numpy(dtype=np.float64)
    else:
        values = profile.detach().cpu().numpy() if isinstance(profile, torch.Tensor) else profile
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"profile: expected a GradientMonitor, a DataFrame, a vgcore.Profile or a 1-D array of "
                f"per-layer gradient norms, got {type(profile).__name__}"
            ) from None
        if values.ndim != 1:
            raise ValueError(f"profile: expected a 1-D array of per-layer norms, got shape {values.shape}")
        values = values[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(values)
    # per layer, the mean log norm over the recorded steps where it is finite and nonzero;
    # layers with none (frozen, dead) drop out
    finite = np.isfinite(logs)
    counts = finite.sum(axis=0)
    keep = counts > 0
    if keep.sum() < 2:
        raise ValueError("profile: needs finite, nonzero gradient norms for at least 2 layers")
    sums = np.where(finite, logs, 0.0).sum(axis=0)
    return sums[keep] / counts[keep]


def auto_decay(profile: Any, bounds: tuple[float, float] = (0.1, 1.0)) -> float:
    """The LLRD decay that scales each block's learning rate with its measured gradient size.

    With the per-layer norms ``g_l`` (input -> output), vgcore's ``chi`` is
    the per-layer ratio of squared norms ``g_l^2 / g_{l+1}^2`` of the
    least-squares line through ``log g_l``, so ``sqrt(chi)`` is the typical
    ratio of one block's gradient norm to the next one up.  The decay is

        decay = clip(sqrt(chi), *bounds)

    and ``lr_l = base_lr * decay^(L - 1 - l)`` then makes ``lr_l / lr_top``
    follow ``g_l / g_top``: under Adam-type optimizers, whose step size does
    not shrink with the gradient, each block's update stays in proportion to
    its gradient, as it would under plain SGD, instead of blocks with 30x
    smaller (noisier) gradients moving as far as the top ones.  Gradients
    growing towards the input (chi > 1) give decay 1 (uniform).

    Parameters
    ----------
    profile : GradientMonitor, GradientHistory, pandas.DataFrame, vgcore.Profile or 1-D array-like
        A monitor or history (e.g. :func:`vgcore.jax.history`'s; its whole
        history: per layer, the geometric mean over the recorded steps where
        the layer's norm is finite and nonzero), a history DataFrame (its
        ``total`` column left out), a vgcore Profile, or per-layer gradient norms
        (plain norms, not logs) ordered input -> output.  Frozen and dead
        layers are left out of the fit.
    bounds : (float, float), default (0.1, 1.0)
        Smallest and largest decay returned.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        ``profile`` or ``bounds`` has the wrong type.
    ValueError
        Fewer than two layers with finite, nonzero norms; bad bounds.
    """
    from vgcore import stats

    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds: expected a (low, high) pair, got {bounds!r}")
    low = check_positive_float(bounds[0], "bounds[0]")
    high = check_positive_float(bounds[1], "bounds[1]")
    if low > high:
        raise ValueError(f"bounds: low {low} exceeds high {high}")
    chi = float(stats.chi(_profile_log_norms(profile)))
    return min(max(math.sqrt(chi), low), high)


def llrd_param_groups(
    model: nn.Module,
    base_lr: float,
    decay: float | str = 0.5,
    layers: Any = None,
    *,
    profile: Any = None,
    decay_bounds: tuple[float, float] = (0.1, 1.0),
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for layer-wise learning-rate decay (LLRD).

    With blocks ``0 .. L-1`` (input -> output; see :func:`resolve_layers`):

    - block ``l`` gets ``lr = base_lr * decay ** (L - 1 - l)`` (its distance
      from the top block), so the top block gets ``base_lr``;
    - the *head*, parameters registered after the first block's and outside
      every block (pooler, classifier), gets ``base_lr``;
    - the *embeddings*, parameters registered before the first block's,
      get the bottom block's lr times decay: ``base_lr * decay ** L``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    base_lr : float
        Learning rate of the top block and the head.
    decay : float or "auto", default 0.5
        Per-block factor, positive.  ``"auto"``: :func:`auto_decay` of
        ``profile`` (``clip(sqrt(chi), *decay_bounds)`` of the measured
        gradient profile).
    layers : None, sequence or mapping, optional
        The blocks; see :func:`resolve_layers`.
    profile : GradientMonitor, DataFrame, vgcore.Profile or 1-D array-like, optional
        The measured gradient profile, required for ``decay="auto"``.
    decay_bounds : (float, float), default (0.1, 1.0)
        Bounds of the automatic decay.
    trainable_only : bool, default True
        Leave out parameters with ``requires_grad=False`` (groups left empty
        are dropped).

    Returns
    -------
    list of dict
        ``{"params": [...], "lr": float, "name": str}`` per group: the
        embeddings (name ``"embeddings"``), each block (its layer name), the
        head (``"head"``), input -> output.  Pass it to any
        ``torch.optim`` optimizer.

    Raises
    ------
    TypeError
        ``model``, ``base_lr``, ``decay``, ``layers`` or ``profile`` has the
        wrong type.
    ValueError
        ``base_lr`` or ``decay`` not positive and finite, ``decay="auto"``
        without ``profile``, or a bad layer specification.
    """
    check_model(model)
    base_lr = check_positive_float(base_lr, "base_lr")
    if isinstance(decay, str):
        if decay != "auto":
            raise ValueError(f"decay: expected a positive number or 'auto', got {decay!r}")
        if profile is None:
            raise ValueError("profile: decay='auto' needs a measured profile (a GradientMonitor or norms)")
        decay = auto_decay(profile, decay_bounds)
    else:
        decay = check_positive_float(decay, "decay")
        if profile is not None:
            raise ValueError("profile: only used with decay='auto'")
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only: expected a bool, got {type(trainable_only).__name__}")
    blocks = resolve_layers(model, layers)
    embeddings, head = split_outside(model, blocks)
    depth = len(blocks)

    def keep(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad or not trainable_only]

    groups = [{"params": keep(p for _, p in embeddings), "lr": base_lr * decay**depth, "name": "embeddings"}]
    for index, (name, params) in enumerate(blocks.items()):
        groups.append({"params": keep(params), "lr": base_lr * decay ** (depth - 1 - index), "name": name})
    groups.append({"params": keep(p for _, p in head), "lr": base_lr, "name": "head"})
    return [g for g in groups if g["params"]]


def freeze_layers(model: nn.Module, first: int, *, layers: Any = None, embeddings: bool = True) -> list[str]:
    """Freeze the first ``first`` blocks (and the embeddings) of a model.

    Sets ``requires_grad=False`` on every parameter of blocks ``0 ..
    first - 1`` (see :func:`resolve_layers`) and, when ``embeddings`` and
    ``first >= 1``, on the parameters registered before the first block's.
    Build the optimizer (or its parameter groups) afterwards, or the frozen
    parameters stay in it (harmless: they get no gradient).

    Parameters
    ----------
    model : torch.nn.Module
        The model, modified in place.
    first : int
        How many blocks to freeze, ``0 .. L``.
    layers : None, sequence or mapping, optional
        The blocks; see :func:`resolve_layers`.
    embeddings : bool, default True
        Also freeze the embeddings.

    Returns
    -------
    list of str
        The frozen blocks' names, with ``"embeddings"`` first when frozen.

    Raises
    ------
    TypeError
        ``model``, ``first`` or ``embeddings`` has the wrong type.
    ValueError
        ``first`` is negative or exceeds the number of blocks.
    """
    check_model(model)
    if isinstance(first, bool) or not isinstance(first, numbers.Integral):
        raise TypeError(f"first: expected an integer, got {type(first).__name__}")
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings: expected a bool, got {type(embeddings).__name__}")
    blocks = resolve_layers(model, layers)
    if not 0 <= first <= len(blocks):
        raise ValueError(f"first: must lie in 0 .. {len(blocks)} (the number of blocks), got {first}")
    frozen: list[str] = []
    if first >= 1 and embeddings:
        outside, _ = split_outside(model, blocks)
        for _, p in outside:
            p.requires_grad_(False)
        if outside:
            frozen.append("embeddings")
    for name, params in list(blocks.items())[: int(first)]:
        for p in params:
            p.requires_grad_(False)
        frozen.append(name)
    return frozen
