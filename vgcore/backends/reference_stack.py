"""The NumPy reference backend of dense stacks: vgcore.reference.stack and _reference_spectra, as a backend.

Implements :class:`vgcore.backends.Backend` for the "stack" kind with the
plain, obvious code the tests trust; each function only unpacks the problem
and, where the caller passed ``out``, writes the result there.
"""

from __future__ import annotations

import numpy as np

from vgcore.backends._common import into, per_sample
from vgcore.reference import spectra as spectra_reference
from vgcore.reference import stack as stack_reference


def _arguments(problem) -> tuple:
    """(weights, biases, x) of the problem."""
    stack = problem.model
    return stack.weights, stack.biases, problem.x


def _options(problem) -> tuple:
    stack = problem.model
    return stack.activation, stack.residual, stack.norm


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """x_L (B, n); see vgcore.forward."""
    return into(out, stack_reference.forward(*_arguments(problem), *_options(problem)))


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The reference profile; it keeps every activation, so ``segment`` changes nothing."""
    return stack_reference.gradient_profile(*_arguments(problem), grad_output, *_options(problem))


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J(x_b) v, (B, k, n); see vgcore.jvp."""
    return into(out, stack_reference.jvp(*_arguments(problem), per_sample(problem, tangents),
                                          *_options(problem)))


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J(x_b)^T u, (B, k, n); see vgcore.vjp."""
    return into(out, stack_reference.vjp(*_arguments(problem), per_sample(problem, cotangents),
                                          *_options(problem)))


def jacobian(problem, out: np.ndarray | None) -> np.ndarray:
    """d x_L / d x_0 per sample, (B, n, n); see vgcore.jacobian."""
    return into(out, stack_reference.jacobian(*_arguments(problem), *_options(problem)))


def singular_values(problem) -> np.ndarray:
    """Singular values of each sample's Jacobian, (B, n), descending."""
    return spectra_reference.singular_values(*_arguments(problem), *_options(problem))


def lyapunov_log_growth(problem, k: int) -> np.ndarray:
    """Unsorted sums over layers of log|R_ii|, (B, k) float64."""
    return spectra_reference.lyapunov_log_growth(*_arguments(problem), k, *_options(problem))
