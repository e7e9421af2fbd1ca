"""Mean-field theory of gradients in deep batch-normalised stacks (norm="batch").

Yang, Pennington, Rao, Sohl-Dickstein and Schoenholz, "A mean field theory of
batch normalization" (ICLR 2019): at initialisation, batch normalisation makes
gradients explode with depth, at a rate set by the batch size B, whatever
sigma_w and sigma_b.  Derived here for vgcore's layer without residual

    x' = phi(BN(x @ W.T + b)),    W ~ N(0, sigma_w^2 / n),   width n -> inf,

with the paper's assumptions (the gradient-independence assumption of mean
field; the forward pass at its permutation-symmetric "BSB1" fixed point; BN's
eps negligible beside the batch variance of a feature).

Derivation
----------
The bias cancels in BN (mean subtraction) and sigma_w cancels (BN is scale
invariant), so nothing depends on them.  Per feature, a pre-activation column
v (B,) is Gaussian with covariance sigma_w^2 K, K the batch Gram matrix of the
layer input.  At the BSB1 fixed point K projected on S = 1^perp (dimension
m = B - 1) is isotropic, so v's centred part is ``sqrt(K_aa - K_ab) sigma_w xi``
with xi standard Gaussian in S, and the BN output is ``z = sqrt(B) zhat``,
zhat = xi / |xi| uniform on the unit sphere of S, independent of |xi|^2 ~ chi^2_m.
BN's Jacobian is ``sqrt(B) / |G v| (G - zhat zhat^T)``, G = I - 1 1^T / B.  The
covariance Pi (B, B) of a feature's gradient across the batch then maps one
layer towards the input as

    Pi' = sigma_w^2 E[(B / |G v|^2) P D Pi D P],     P = G - zhat zhat^T,  D = diag(phi'(z)),
        = B / ((B - 3) (K_aa - K_ab)) E_zhat[P D Pi D P]       (E[1 / chi^2_m] = 1 / (m - 2)),

and G (isotropic gradients in S) is an eigenvector by permutation symmetry,
with eigenvalue ``chi = tr Pi' / tr Pi`` at Pi = G:

    chi = B E[tr(D G D P)] / ((B - 3)(B - 1)(K_aa - K_ab)),
    tr(D G D P) = sum d_a^2 (1 - 2/B) - sum d_a^2 zhat_a^2 + (sum d_a)^2 / B^2 + (zhat . d)^2 / B.

For positively homogeneous activations (linear, relu, leaky_relu with slope
alpha) every expectation over the sphere is one over the Gaussian G g
(g ~ N(0, I_B); coordinates of variance 1 - 1/B and correlation
rho = -1 / (B - 1)), which the arc-cosine kernel
``A(rho) = (sqrt(1 - rho^2) + (pi - arccos rho) rho) / (2 pi)`` and the orthant
probability ``P(++) = 1/4 + arcsin(rho) / (2 pi)`` give in closed form:

    K_aa = (1 + alpha^2) / 2,   K_ab = (1 + alpha^2) A(rho) - 2 alpha A(-rho),
    E[d_1 d_2] = alpha + (1 - alpha)^2 P(++),
    E[tr] = B K_aa (1 - 2/B) - K_aa + (B K_aa + B (B - 1) E[d_1 d_2]) / B^2 + (K_aa + (B - 1) K_ab) / B.

Linear (alpha = 1): ``chi = (B - 2) / (B - 3)``, the paper's rate.  As B -> inf,
``chi -> E[phi'(z)^2] / Var[phi(z)]``, z ~ N(0, 1): relu ``pi / (pi - 1)``
(about 1.467, the paper's large-batch limit), linear 1.  For B <= 3 the
expectation E[1 / chi^2_m] diverges (B = 3) or BN's output is +-1 whatever its
input (B = 2, gradients live only through eps): no closed form, NaN.  Other
activations have no closed form at finite B (NaN); their large-batch limit is
the one-dimensional Gaussian ratio above.

Measured (examples/batchnorm_explosion.py: width 512, 60 layers, sigma_w sqrt 2,
per-layer ratio fitted over layers 12..48, one seed): linear B = 8, 16, 64
measure 1.181, 1.056, 1.012 against 1.2, 1.077, 1.016; relu 1.798, 1.589,
1.482 against 1.788, 1.590, 1.493, and at B = 256 1.446 against 1.473
(tests/test_batchnorm_theory.py holds B = 8, 16, 64 to 3 %).  At B = 4
(theory: linear 2, relu 3.08) width 512 measures 1.86 and 2.71 (width 1536:
2.04 and 2.80): E[1 / chi^2_3] has infinite variance, so the average over
the width converges slowly to the n -> inf limit.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from vgcore._activations import LEAKY_SLOPE, activation
from vgcore._validation import check_activation

__all__ = ["batchnorm_chi"]

#: The slope for h < 0 of each positively homogeneous activation.
_HOMOGENEOUS_SLOPES = {"linear": 1.0, "relu": 0.0, "leaky_relu": LEAKY_SLOPE}


def _arc_cosine(rho: float) -> float:
    """E[relu(u) relu(v)] for unit-variance Gaussians of correlation rho."""
    return (math.sqrt(max(0.0, 1.0 - rho * rho)) + (math.pi - math.acos(rho)) * rho) / (2.0 * math.pi)


def _homogeneous_chi(alpha: float, batch: float) -> float:
    """chi of phi(h) = max(h, 0) + alpha min(h, 0) at batch size B (module docstring)."""
    k_aa = 0.5 * (1.0 + alpha * alpha)
    if math.isinf(batch):
        return k_aa / (k_aa - (1.0 - alpha) ** 2 / (2.0 * math.pi))
    b = float(batch)
    rho = -1.0 / (b - 1.0)
    k_ab = (1.0 + alpha * alpha) * _arc_cosine(rho) - 2.0 * alpha * _arc_cosine(-rho)
    both_positive = 0.25 + math.asin(rho) / (2.0 * math.pi)
    derivative_pair = alpha + (1.0 - alpha) ** 2 * both_positive
    trace = (b * k_aa * (1.0 - 2.0 / b) - k_aa + (b * k_aa + b * (b - 1.0) * derivative_pair) / (b * b)
             + (k_aa + (b - 1.0) * k_ab) / b)
    return b * trace / ((b - 3.0) * (b - 1.0) * (k_aa - k_ab))


def _large_batch_chi(name: str) -> float:
    """E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1): Gauss-Hermite quadrature, probabilists' weights.

    Only for smooth activations (the kinked ones with a closed form are
    homogeneous; elu and selu are refused by the caller).
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(160)
    weights = weights / math.sqrt(2.0 * math.pi)
    value, derivative = activation(name, nodes)
    mean = float(weights @ value)
    variance = float(weights @ (value * value)) - mean * mean
    return float(weights @ (derivative * derivative)) / variance


def batchnorm_chi(activation: str, batch: int | float) -> float:
    """Mean-field per-layer gradient growth of a deep batch-normalised stack.

    The ratio of squared gradient norms, layer ``l`` over layer ``l + 1`` (one
    step towards the input), of a stack with ``norm="batch"`` and no residual
    connection at initialisation, in the limit of infinite width (Yang et al.,
    ICLR 2019).  Above 1 gradients explode towards the input.  It depends on
    the activation and the batch size only: BN removes sigma_w and the bias.
    The derivation and measured agreement are in this module's docstring.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    batch : int or math.inf
        Batch size B >= 2 (the samples BN normalises over), or ``math.inf``
        for the large-batch limit.

    Returns
    -------
    float
        ``chi``.  Closed forms: linear ``(B - 2) / (B - 3)``; relu and
        leaky_relu (arc-cosine kernel) at any B >= 4; B = inf for every smooth
        activation, ``E[phi'(z)^2] / Var[phi(z)]`` (relu ``pi / (pi - 1)``,
        linear 1).  NaN where no closed form exists: B <= 3; other activations
        at finite B; elu and selu at B = inf (their kink is not handled by
        the quadrature used here).

    Raises
    ------
    TypeError
        ``activation`` is not a string, ``batch`` not a number.
    ValueError
        Unknown activation; ``batch`` below 2, not an integer, or NaN.
    """
    name = check_activation(activation)
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, numbers.Real):
        raise TypeError(f"batch: expected an integer or math.inf, got {type(batch).__name__}")
    if not math.isinf(batch) and (batch != batch or batch != int(batch)):
        raise ValueError(f"batch: expected an integer or math.inf, got {batch!r}")
    if batch < 2:
        raise ValueError(f"batch: batch normalisation needs B >= 2, got {batch!r}")
    if name in _HOMOGENEOUS_SLOPES:
        return math.nan if batch <= 3 else _homogeneous_chi(_HOMOGENEOUS_SLOPES[name], batch)
    if math.isinf(batch) and name not in ("elu", "selu"):
        return _large_batch_chi(name)
    return math.nan
