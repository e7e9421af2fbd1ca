"""Shared test configuration: a deterministic Hypothesis profile and stack strategies."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import vgcore as vg

# Deterministic by default (CI): derandomised, no example database, no deadline.
# VGCORE_HYPOTHESIS=thorough explores more (and randomly) for local runs.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", database=None, deadline=None, max_examples=600,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("VGCORE_HYPOTHESIS", "ci"))

BACKENDS = ["cpu", "numpy"]
DTYPES = [np.float32, np.float64]


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA = _cuda_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CuPy / NVIDIA GPU here")


@st.composite
def stack_cases(draw, max_depth: int = 60, max_width: int = 48, max_batch: int = 8,
                dtypes=DTYPES, activations=vg.ACTIVATIONS, sigma_w=(0.3, 1.6)):
    """(stack, x) over every option of DESIGN.md's layer, moderately conditioned.

    sigma_w stays within a range where neither float32 rounding nor chaos
    swamps the comparison over 60 layers.
    """
    depth = draw(st.integers(1, max_depth))
    width = draw(st.integers(1, max_width))
    batch = draw(st.integers(1, max_batch))
    stack = vg.Stack.random(
        depth, width,
        activation=draw(st.sampled_from(activations)),
        init=draw(st.sampled_from(["gaussian", "orthogonal", "uniform"])),
        sigma_w=draw(st.floats(*sigma_w)),
        sigma_b=draw(st.floats(0.0, 0.5)),
        residual=draw(st.sampled_from([None, 1.0, 0.5, 0.2])),
        norm=draw(st.sampled_from([None, "pre", "post"])),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31)),
    )
    x = vg.random_inputs(stack, batch, seed=draw(st.integers(0, 2**31)))
    return stack, x


def recast(stack: vg.Stack, dtype) -> vg.Stack:
    """The same stack with its parameters in ``dtype`` (exact for float32 -> float64)."""
    return vg.Stack(np.asarray(stack.weights, dtype), np.asarray(stack.biases, dtype),
                    activation=stack.activation, residual=stack.residual, norm=stack.norm)


def references(function, stack, *args):
    """(low, high): the reference in float32 and in float64 for the same problem.

    For a float32 stack, high is computed in float64 from the same float32
    parameters (exact upcast).  For a float64 stack, low is the float32
    reference of the rounded problem: a probe of how sensitive the result is
    to rounding, used by assert_matches_reference for cancelling results.
    """
    other = np.float64 if stack.dtype == np.float32 else np.float32
    converted = function(recast(stack, other), *[np.asarray(a, other) for a in args], backend="numpy")
    own = function(stack, *args, backend="numpy")
    return (own, converted) if stack.dtype == np.float32 else (converted, own)


def assert_matches_reference(actual, reference, reference_low, *, dtype, relative_to=None):
    """Compiled result against the reference.

    float64: |actual - reference| <= 1e-10 * scale + 100 (eps64 / eps32) max |ref32 - ref64|:
    1e-10 relative wherever the problem is well conditioned; where the result
    cancels (a tiny Jacobian built from O(1) intermediates), 100 times the
    rounding error its measured sensitivity implies.
    float32: the float32 path must be as accurate as the float32 reference:
    |actual - ref64| <= 1e-4 * scale + 10 max |ref32 - ref64|, where ``reference``
    is computed in float64 from the same float32 parameters and
    ``reference_low`` in float32.  This holds the compiled code to 1e-4 where
    the problem is well conditioned without failing on problems whose
    conditioning no float32 code could beat.

    ``scale`` is max(1, |reference|) elementwise (``relative_to=None``, for logs)
    or the largest |reference| (``relative_to="max"``, for vectors).
    """
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    low = np.asarray(reference_low, np.float64)
    assert actual.shape == reference.shape
    finite = np.isfinite(reference)
    both = finite & np.isfinite(low)
    sensitivity = np.abs(low[both] - reference[both]).max(initial=0.0)
    if relative_to == "max":
        scale = max(np.abs(reference[finite]).max(initial=0.0), np.finfo(np.float64).tiny)
    else:
        scale = np.maximum(1.0, np.abs(reference[finite]))
    # Where the float32 reference disagrees with float64 on which results are
    # exactly zero (a relu kink flipped by rounding; a gradient that is zero
    # by structure and only rounding noise otherwise), zero patterns are not
    # determined by the problem at float32 precision.
    zeros_determined = np.array_equal(finite, np.isfinite(low))
    if dtype == np.float32 and (not zeros_determined or np.any(sensitivity > 0.1 * scale)):
        return  # no float32 code can be held to this problem
    if zeros_determined:
        np.testing.assert_array_equal(actual[~finite], reference[~finite])
        np.testing.assert_array_equal(np.isfinite(actual), finite)
    keep = finite & np.isfinite(actual)
    actual, reference = actual[keep], reference[keep]
    if relative_to != "max":
        scale = np.maximum(1.0, np.abs(reference))
    if dtype == np.float64:
        bound = 1e-10 * scale + 100 * (np.finfo(np.float64).eps / np.finfo(np.float32).eps) * sensitivity
    else:
        bound = 1e-4 * scale + 10 * sensitivity
    excess = np.abs(actual - reference) - bound
    assert np.all(excess <= 0), f"max excess {excess.max():.3g} over bound, max |diff| " \
        f"{np.abs(actual - reference).max():.3g}"


def child_environment() -> dict[str, str]:
    """Environment for a child Python process that must import the vgcore under test.

    Puts the directory holding the imported vgcore package first on
    PYTHONPATH: site-packages for an installed vgcore (CI), the checkout for
    an in-place build.  Never the bare repository root of an installed run,
    whose vgcore/ has no compiled kernels.  Use it with a neutral cwd, since
    ``python -m`` puts the cwd first on sys.path.
    """
    import os
    from pathlib import Path

    home = str(Path(vg.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")])))
