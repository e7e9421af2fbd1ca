"""The NumPy reference backend of batch-normalised stacks (kind "batchnorm"): vgcore.reference.batchnorm.

Implements :class:`vgcore.backends.Backend` with the plain code the tests
trust.  The batch is one input: jvp / vjp take batch vectors, the k-th being
``vectors[:, k, :]`` ((k, n) vectors are the same vector in every sample);
jacobian, singular_values and lyapunov_log_growth refuse with a ValueError
naming norm (vgcore.backends._batchnorm_common).
"""

from __future__ import annotations

import numpy as np

from vgcore.backends._batchnorm_common import jacobian as jacobian  # refused for a coupled batch
from vgcore.backends._batchnorm_common import lyapunov_log_growth as lyapunov_log_growth
from vgcore.backends._batchnorm_common import singular_values as singular_values
from vgcore.backends._common import into, per_sample
from vgcore.reference import batchnorm as batchnorm_reference


def _arguments(problem) -> tuple:
    stack = problem.model
    return stack.weights, stack.biases, problem.x


def _options(problem) -> tuple:
    return problem.model.activation, problem.model.residual


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """x_L (B, n); see vgcore.forward."""
    return into(out, batchnorm_reference.forward(*_arguments(problem), *_options(problem)))


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The reference profile (batch-wide renormalisation); ``segment`` changes nothing."""
    return batchnorm_reference.gradient_profile(*_arguments(problem), grad_output, *_options(problem))


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J T_j for batch tangents T_j = tangents[:, j, :], (B, k, n)."""
    return into(out, batchnorm_reference.jvp(*_arguments(problem), per_sample(problem, tangents),
                                               *_options(problem)))


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J^T U_j for batch cotangents U_j = cotangents[:, j, :], (B, k, n)."""
    return into(out, batchnorm_reference.vjp(*_arguments(problem), per_sample(problem, cotangents),
                                               *_options(problem)))
