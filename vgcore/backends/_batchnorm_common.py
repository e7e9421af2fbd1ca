"""What every batch-norm backend shares: the refusals of the per-sample spectra.

A stack with norm="batch" maps the whole batch (B, n) -> (B, n) as one input,
so "the Jacobian of sample b" does not exist: d x_L[b] / d x_0[c] is non-zero
for every pair (b, c).  vg.jacobian, vg.singular_values and
vg.lyapunov_exponents promise per-sample (B, n, n) / (B, n) / (B, k) results,
so batch-norm models refuse them; vg.jvp and vg.vjp give the whole batch
map's products (the k-th batch vector is ``vectors[:, k, :]``).
"""

from __future__ import annotations


def refuse(computation: str) -> None:
    """Raise the ValueError naming norm for a per-sample computation."""
    raise ValueError(
        f"norm: 'batch' couples the samples of a batch, so {computation} (a per-sample result) "
        "does not exist for it; use vg.jvp / vg.vjp, whose k-th batch vector is vectors[:, k, :], "
        "for products with the whole batch map's Jacobian"
    )


def jacobian(problem, out) -> None:
    """Refused for a coupled batch (:func:`refuse`)."""
    refuse("jacobian")


def singular_values(problem) -> None:
    """Refused for a coupled batch (:func:`refuse`)."""
    refuse("singular_values")


def lyapunov_log_growth(problem, k: int) -> None:
    """Refused for a coupled batch (:func:`refuse`)."""
    refuse("lyapunov_exponents")
