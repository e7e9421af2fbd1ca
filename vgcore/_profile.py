"""The result type of :func:`vgcore.gradient_profile`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Profile:
    """Per-layer gradient measurements of one stack on one batch.

    Layer index ``l`` runs from 0 (the input, ``x_0``) to ``L`` (the output,
    ``x_L``).  All arrays live on the device of the computation (NumPy for
    the CPU backends, CuPy for "cuda").

    Attributes
    ----------
    log_grad_norm : ndarray, shape (B, L + 1)
        Natural log of the per-sample Euclidean norm of ``d loss / d x_l``
        for the loss ``sum_b <x_L[b], g[b]>``.  Computed with per-layer
        renormalisation, so it is finite and exact at any depth where the
        plain norm would underflow or overflow (``-inf`` only where the
        gradient is exactly zero).
    log_weight_grad_norm : ndarray, shape (L,)
        Log of the Frobenius norm of ``d loss / d W_l`` (summed over the
        batch), ``l = 1 .. L`` stored at index ``l - 1``.
    saturation : ndarray, shape (L,)
        Fraction of the ``B * n`` pre-activations of each layer with
        ``|phi'(h)| < 1e-3``.
    dead : ndarray, shape (L,)
        Fraction of the ``n`` units of each layer with ``phi'(h) == 0`` on
        every sample of the batch.
    chi_theory : float
        Mean-field theory's ``chi_1`` for this stack's activation, ``sigma_w``
        and ``sigma_b``; NaN where it does not apply (explicit weights,
        residual connections or layer norm).
    config : dict
        What produced the profile (activation, residual, norm, and where
        known init, sigma_w, sigma_b, seed).
    """

    log_grad_norm: Any
    log_weight_grad_norm: Any
    saturation: Any
    dead: Any
    chi_theory: float = float("nan")
    config: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Number of layers ``L``."""
        return int(self.log_grad_norm.shape[-1]) - 1

    @property
    def batch(self) -> int:
        """Number of samples ``B``."""
        return int(self.log_grad_norm.shape[0])

    @property
    def mean_log_grad_norm(self) -> Any:
        """Mean over samples of :attr:`log_grad_norm`, shape (L + 1,)."""
        return self.log_grad_norm.mean(axis=0)

    @property
    def grad_norm(self) -> Any:
        """Geometric-mean gradient norm per layer: ``exp(mean_b log_grad_norm)``, (L + 1,)."""
        # np.exp dispatches to CuPy through __array_ufunc__ for device arrays
        return np.exp(self.mean_log_grad_norm)

    def to_numpy(self) -> Profile:
        """A copy with every array moved to host NumPy memory."""
        def host(a: Any) -> np.ndarray:
            get = getattr(a, "get", None)
            return np.asarray(get() if callable(get) else a)

        return Profile(
            host(self.log_grad_norm),
            host(self.log_weight_grad_norm),
            host(self.saturation),
            host(self.dead),
            self.chi_theory,
            dict(self.config),
        )
