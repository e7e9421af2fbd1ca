"""Small helpers of the public API."""

from __future__ import annotations

from typing import Any

import numpy as np

from vgcore import _validation as check


def random_inputs(stack: Any, batch: int, *, seed: int | None = None, scale: float = 1.0):
    """Standard normal inputs x_0 (batch, stack.state_width) in the model's dtype and device.

    For a :class:`vgcore.Recurrent` these are initial states s_0 (an lstm's [h | c]).

    Parameters
    ----------
    stack : Stack
    batch : int
        Number of samples B >= 1.
    seed : int, optional
        Seed of NumPy's default generator (drawn in float64 on the host, so the
        same seed gives the same inputs on every backend).
    scale : float
        Standard deviation of the entries.

    Returns
    -------
    ndarray, shape (batch, state_width)

    Raises
    ------
    TypeError, ValueError
        Naming the argument: stack, batch (also when the inputs cannot fit in
        memory), seed, scale (also when scale times a normal draw overflows
        the stack's dtype).
    """
    from vgcore._model import check_model

    stack = check_model(stack, "stack")  # any model kind: a Recurrent's inputs are initial states
    width = stack.state_width
    batch = check.check_int(batch, "batch")
    scale = check.check_real(scale, "scale", positive=True)
    seed = check.check_int(seed, "seed", minimum=0) if seed is not None else None
    check.check_memory(batch * width * (8 + stack.dtype.itemsize), "batch", f"{batch} x {width} inputs")
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.random.default_rng(seed).standard_normal((batch, width))
        values *= scale
        values = values.astype(stack.dtype, copy=False)
    if not np.isfinite(values).all():
        raise ValueError(f"scale: {scale!r} gives inputs beyond the largest {stack.dtype.name} "
                         f"({np.finfo(stack.dtype).max:.3g}); use a smaller scale")
    if stack.device == "cuda":
        from vgcore.backends.cuda_stack import to_device

        return to_device(values)
    return values
