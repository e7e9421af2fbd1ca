"""The NumPy reference backend of recurrent models: vgcore.reference.recurrent, as a backend.

Implements :class:`vgcore.backends.Backend` for the "recurrent" kind with the
plain code the tests trust; each function unpacks the problem (model, s_0,
steps T, inputs, warm-up) and, where the caller passed ``out``, writes there.
Computations other than lyapunov_log_growth use the inputs of the counted
steps (the problem's warm-up is 0 for them).
"""

from __future__ import annotations

import numpy as np

from vgcore.backends._common import into, per_sample
from vgcore.reference import recurrent as reference


def _arguments(problem) -> tuple:
    """(model, s0, steps, inputs) of the problem."""
    return problem.model, problem.x, problem.depth, problem.inputs


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """s_T (B, N); see vgcore.forward."""
    return into(out, reference.forward(*_arguments(problem)))


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The reference profile through time; it keeps every step, so ``segment`` changes nothing."""
    return reference.gradient_profile(*_arguments(problem), grad_output)


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """(d s_T / d s_0) v, (B, k, N); see vgcore.jvp."""
    return into(out, reference.jvp(*_arguments(problem), per_sample(problem, tangents)))


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """(d s_T / d s_0)^T u, (B, k, N); see vgcore.vjp."""
    return into(out, reference.vjp(*_arguments(problem), per_sample(problem, cotangents)))


def jacobian(problem, out: np.ndarray | None) -> np.ndarray:
    """d s_T / d s_0 per sample, (B, N, N); see vgcore.jacobian."""
    return into(out, reference.jacobian(*_arguments(problem)))


def singular_values(problem) -> np.ndarray:
    """Singular values of each sample's d s_T / d s_0, (B, N), descending."""
    return reference.singular_values(*_arguments(problem))


def lyapunov_log_growth(problem, k: int) -> np.ndarray:
    """Unsorted sums over the counted steps of log|R_ii| (after ``problem.warmup`` steps), (B, k) float64."""
    return reference.lyapunov_log_growth(*_arguments(problem), k, warmup=problem.warmup)
