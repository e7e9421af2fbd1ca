"""Shared test configuration: a deterministic Hypothesis profile and stack strategies."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import vgcore as vg
from vgcore._activations import DERIVATIVE_JUMPS
from vgcore.reference import spectra as spectra_reference
from vgcore.reference import stack as stack_reference

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
    """(stack, x) over every option of docs/ARCHITECTURE.md's layer, moderately conditioned.

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
    if stack.kind == "recurrent":  # recurrent models: their own parameters (tests/recurrent_strategies.py)
        from recurrent_strategies import recast as recast_recurrent

        return recast_recurrent(stack, dtype)
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


def assert_profile_matches_reference(profile, stack: vg.Stack, x, grad_output) -> None:
    """A backend's gradient profile (host arrays) against the reference.

    Log norms as assert_matches_reference.  Saturation and dead units exactly
    in float64; in float32 a unit whose phi'(h) sits at the threshold may
    round either way, and one unit per layer may flip dead where a
    pre-activation rounds across 0 (compared for the relu family only, whose
    zeros are exact; smooth activations underflow to 0 at dtype-dependent
    points).  Always: a dead unit is saturated on every sample.
    """
    low, high = references(vg.gradient_profile, stack, x, grad_output)
    assert profile.log_grad_norm.shape == (x.shape[0], stack.depth + 1)
    for field in ("log_grad_norm", "log_weight_grad_norm"):
        assert_matches_reference(getattr(profile, field), getattr(high, field), getattr(low, field),
                                 dtype=stack.dtype)
    cells = x.shape[0] * stack.width
    if stack.dtype == np.float64:
        np.testing.assert_array_equal(profile.saturation, high.saturation)
        np.testing.assert_array_equal(profile.dead, high.dead)
    else:
        assert np.abs(profile.saturation - low.saturation).max() <= 2.0 / cells + 0.02
        if stack.activation in ("relu", "linear", "leaky_relu"):
            assert np.abs(profile.dead - low.dead).max() <= 1.0 / stack.width + 1e-12
    assert np.all(profile.dead * cells <= profile.saturation * cells + 1e-9)


# Directions and samples whose Jacobian products a problem determines at its precision
# (shared by the CPU and GPU spectra tests).



def kinks_determined(stack, x):
    """(B,) mask: samples whose Jacobian no rounding of the forward pass can switch.

    relu, leaky_relu and selu have a derivative that jumps at 0, so a
    pre-activation closer to 0 than the forward pass's rounding error picks
    one of two Jacobians at random.  The error is probed as in
    conftest.references (float32 against float64, scaled to the stack's eps)
    and a sample counts when every |h| is over 10 times it.
    """
    batch = x.shape[0]
    if stack.activation not in DERIVATIVE_JUMPS:
        return np.ones(batch, bool)
    scale = np.finfo(stack.dtype).eps / np.finfo(np.float32).eps
    pre_activations = []
    for dtype in (np.float32, np.float64):
        probe = recast(stack, dtype)
        _, caches = stack_reference.forward_with_caches(probe.weights, probe.biases, np.asarray(x, dtype),
                                                        probe.activation, probe.residual, probe.norm)
        pre_activations.append([np.asarray(cache.u, np.float64) @ np.asarray(weight, np.float64).T + bias
                                for cache, weight, bias in zip(caches, stack.weights, stack.biases,
                                                               strict=True)])
    ok = np.ones(batch, bool)
    for low, high in zip(*pre_activations, strict=True):
        error = np.abs(low - high).max(axis=1) * scale
        ok &= np.abs(high).min(axis=1) > 10 * error
    return ok


def layer_jacobians(stack, x):
    """Each layer's own Jacobian J_l(x_{l-1}), (L, B, n, n), through one-layer stacks."""
    _, caches = stack_reference.forward_with_caches(stack.weights, stack.biases, x, stack.activation,
                                                    stack.residual, stack.norm)
    inputs = [x] + [cache.out for cache in caches[:-1]]
    return np.stack([
        vg.jacobian(vg.Stack(stack.weights[l:l + 1], stack.biases[l:l + 1], activation=stack.activation,
                             residual=stack.residual, norm=stack.norm), inputs[l], backend="numpy")
        for l in range(stack.depth)
    ])


def determined_directions(stack, x, k, low, high):
    """(B, k) mask: the directions whose growth the problem fixes at the stack's precision.

    (1) The probes (growth_references) agree with the float64 reference to
    1 %: the error has not saturated, so conftest's bound, linear in the
    probes' gap, applies.  (2) No rounding floor: QR measures a direction's
    growth r |J_l|_2 at layer l (J_l the layer's Jacobian) with a relative
    rounding error of about n eps / r.  Where r < 1e3 n eps (r = 0 up to
    rounding where a layer maps the direction to zero: a layer norm's null
    space, dead relu units, k above the Jacobian's rank) the value is decided
    by rounding and no two codes agree on it (nor on whether it is exactly 0,
    -inf); Householder QR then leaves column i of Q arbitrary, and with it
    every later direction at that layer and after.  Measured on the float64
    reference against the stack's eps.  (3) The sample's kinks are
    determined (kinks_determined).
    """
    finite = np.isfinite(high) & np.isfinite(low)
    gap = np.abs(np.where(finite, low, 0.0) - np.where(finite, high, 0.0))
    agree = finite & (gap <= 1e-2 * np.maximum(1.0, np.abs(high)))
    exact = recast(stack, np.float64)
    x = np.asarray(x, np.float64)
    per_layer = spectra_reference.lyapunov_log_growth(exact.weights, exact.biases, x, k, exact.activation,
                                                       exact.residual, exact.norm, per_layer=True)
    norms = np.linalg.norm(layer_jacobians(exact, x), ord=2, axis=(2, 3))  # (L, B)
    with np.errstate(divide="ignore"):
        floor = np.log(1e3 * stack.width * np.finfo(stack.dtype).eps * norms)
    noisy = ~(per_layer > floor[:, :, None])  # (L, B, k); -inf and 0 / 0 count as noisy
    above_floor = ~np.logical_or.accumulate(noisy.any(axis=0), axis=1)
    return agree & above_floor & kinks_determined(stack, x)[:, None]
