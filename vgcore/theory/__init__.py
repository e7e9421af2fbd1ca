"""Mean-field theory of signal and gradient propagation in deep random stacks.

Model (Poole et al. 2016; Schoenholz et al. 2017, "Deep Information
Propagation"): weights ``N(0, sigma_w**2 / n)``, biases ``N(0, sigma_b**2)``,
infinite width, no residual connections and no normalisation.  The variance
``q`` of a pre-activation follows the map

    F(q) = sigma_w**2 * E[phi(sqrt(q) z)**2] + sigma_b**2,      z ~ N(0, 1),

and the correlation ``c`` of the pre-activations of two inputs, once both
have variance ``q*``, follows

    C(c) = (sigma_w**2 * E[phi(u1) phi(u2)] + sigma_b**2) / q*,
    (u1, u2) ~ N(0, q* [[1, c], [c, 1]]).

``chi_1 = sigma_w**2 E[phi'(sqrt(q*) z)**2]`` is the mean per-layer ratio of
squared gradient norms (layer l over layer l + 1): below 1 gradients vanish
towards the input, above 1 they explode.

How the Gaussian expectations are computed
------------------------------------------
Plain Gauss-Hermite quadrature converges slowly for the kinked activations
(relu, leaky_relu, elu, selu) and for every saturating activation once ``q``
is large (``tanh(sqrt(q) z)`` is then a near step).  So every expectation here
is a composite Gauss-Legendre rule in ``z`` over ``[-9, 9]`` (the Gaussian
mass beyond is below 3e-19), with a panel edge exactly at the kink ``h = 0``
and panels graded geometrically away from it, from the activation's own scale
``|h| ~ 1`` outwards; this resolves the kink and the steep parts at any ``q``.

Each activation is split into its straight-line asymptote ``r`` (slope and
offset on each side of 0, e.g. ``r(h) = max(h, 0)`` for gelu or ``sign(h)``
for tanh) and a remainder that decays away from 0.  Gaussian expectations of
``r`` are closed forms; only the remainder is integrated.  For relu,
leaky_relu and linear the remainder is zero, so those are exact closed forms
(``E[relu(sqrt(q) z)**2] = q / 2``, ``E[relu'**2] = 1 / 2``).  The split also
keeps ``F(q) - q`` accurate when ``q`` is huge (near ``sigma_w = sqrt 2`` for
the relu-like activations), where ``F(q)`` and ``q`` agree to many digits.

The correlation map nests two such rules (the outer one over ``u1``, the inner
one over ``u2`` given ``u1``, each with its panel edge at its own kink), with
10 points per panel: about 1e-12 relative, in about 1 ms; closed forms (the
arc-cosine kernel) for relu, leaky_relu and linear.  Quadrature nodes are
cached, and so are the results per (activation, sigma_w, sigma_b), since
sweeps ask for the same configuration many times.

Public functions: :func:`fixed_point`, :func:`chi1`, :func:`depth_scales`,
:func:`critical_sigma_w`, and the maps themselves, :func:`q_map` and
:func:`c_map`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from vgcore._activations import ACTIVATION_TABLE, LEAKY_SLOPE, activation
from vgcore._validation import check_activation, check_real

__all__ = ["c_map", "chi1", "critical_sigma_w", "depth_scales", "fixed_point", "q_map"]

# --------------------------------------------------------------------------- asymptotes

#: name -> (slope for h > 0, offset for h > 0, slope for h < 0, offset for h < 0)
#: of the straight line that phi approaches as h -> +inf / -inf (vgcore._activations' table).
_ASYMPTOTES: dict[str, tuple[float, float, float, float]] = {
    name: info.asymptotes for name, info in ACTIVATION_TABLE.items()
}

#: Activations equal to their asymptote everywhere: piecewise linear through 0.
_HOMOGENEOUS = frozenset(name for name, info in ACTIVATION_TABLE.items() if info.piecewise_linear)

_SQRT_2PI = math.sqrt(2.0 * math.pi)

# --------------------------------------------------------------------------- quadrature

#: The rules integrate z over [-_Z_MAX, _Z_MAX]; 2 * P(z > 9) = 2.3e-19.
_Z_MAX = 9.0


class _RuleShape(NamedTuple):
    """Gauss-Legendre points per panel and the widest panel allowed (in z)."""

    points: int
    max_width: float


#: One-dimensional moments: about 1e-16 relative.
_FINE = _RuleShape(16, 1.5)
#: The nested rule of the correlation map: about 1e-12 relative, 20x cheaper.
_COARSE = _RuleShape(10, 3.0)


@functools.lru_cache(maxsize=8)
def _legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


@functools.lru_cache(maxsize=256)
def _base_edges(shape: _RuleShape, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform edges over the window, and the offsets ``scale * 2**k`` below ``max_width``."""
    uniform = np.linspace(-_Z_MAX, _Z_MAX, math.ceil(2.0 * _Z_MAX / shape.max_width) + 1)
    levels = max(1, math.ceil(math.log2(shape.max_width / scale)))
    offsets = scale * 2.0 ** np.arange(levels)
    return uniform, np.concatenate([-offsets[::-1], [0.0], offsets])


def _gauss_rule(
    kinks: np.ndarray, scale: float, shape: _RuleShape = _FINE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite rule for ``E[f(z)]``, ``z ~ N(0, 1)``, one rule per kink.

    Parameters
    ----------
    kinks : ndarray, shape (k,)
        Where each rule's integrand has its kink: a panel edge is put there
        exactly (it may lie outside the window).
    scale : float
        Width in ``z`` of the panels next to the kink; panels double in width
        away from it, up to ``shape.max_width``.
    shape : _RuleShape
        Points per panel and widest panel.

    Returns
    -------
    z, weights : ndarray, shape (N,)
        Nodes and weights (Gaussian density included) of all the rules, one
        after the other: ``np.add.reduceat(weights * f(z), starts)`` approximates
        ``E[f(z)]`` for each rule.
    starts : ndarray, shape (k,)
        Where each rule begins in ``z``.
    """
    uniform, offsets = _base_edges(shape, float(scale))
    edges = np.concatenate(
        [np.broadcast_to(uniform, (kinks.size, uniform.size)), kinks[:, None] + offsets], axis=1
    )
    np.clip(edges, -_Z_MAX, _Z_MAX, out=edges)
    edges.sort(axis=1)
    lower, upper = edges[:, :-1], edges[:, 1:]
    used = upper > lower  # clipping and coinciding edges leave empty panels
    counts = np.count_nonzero(used, axis=1)
    half = 0.5 * (upper[used] - lower[used])
    middle = 0.5 * (upper[used] + lower[used])
    nodes, node_weights = _legendre(shape.points)
    z = (middle[:, None] + half[:, None] * nodes).ravel()
    weights = (half[:, None] * node_weights).ravel() * np.exp(-0.5 * z * z) / _SQRT_2PI
    starts = np.zeros(kinks.size, dtype=np.intp)
    np.cumsum(counts[:-1] * shape.points, out=starts[1:])
    return z, weights, starts


# --------------------------------------------------------------------------- one-dimensional moments


class _Moments(NamedTuple):
    """Gaussian moments of phi at variance q, each minus its asymptotic leading term.

    With ``kappa = (s_plus**2 + s_minus**2) / 2`` (the slopes of the asymptote):
    ``phi2 = E[phi**2] - kappa q``, ``dphi2 = E[phi'**2] - kappa``,
    ``slope = E[phi phi' h] / q - kappa`` (so ``dF/dq = sigma_w**2 (kappa + slope)``).
    """

    phi2: float
    dphi2: float
    slope: float
    #: The part of ``phi2`` that comes from the decaying remainder (0 for small q).
    remainder: float


#: Below this variance the moments are integrated directly: subtracting the
#: asymptote there would cancel (E[tanh**2] ~ q against E[sign**2] = 1).
_DIRECT_BELOW = 1.0


def _kappa(name: str) -> float:
    s_plus, _, s_minus, _ = _ASYMPTOTES[name]
    return 0.5 * (s_plus * s_plus + s_minus * s_minus)


def _moments(name: str, q: float) -> _Moments:
    """E[phi^2], E[phi'^2] and E[phi phi' h] / q at variance ``q``, asymptote removed."""
    s_plus, c_plus, s_minus, c_minus = _ASYMPTOTES[name]
    kappa = 0.5 * (s_plus * s_plus + s_minus * s_minus)
    if q == 0.0:
        # Limits q -> 0+: one-sided values at the kink, averaged.
        value, derivative = activation(name, np.array([0.0, 1e-300, -1e-300]))
        phi0 = float(value[0])
        dphi2 = float(np.mean(derivative[1:] * derivative[1:]))
        # dF/dq at 0 needs phi'' unless phi(0) = 0; only that case is ever asked for.
        slope = dphi2 - kappa if phi0 == 0.0 else math.nan
        return _Moments(phi0 * phi0, dphi2 - kappa, slope, 0.0)
    root_q = math.sqrt(q)
    # Closed-form parts: E[r^2] - kappa q and E[r r' h] / q - kappa.
    odd = s_plus * c_plus - s_minus * c_minus
    r2_excess = 2.0 * odd * root_q / _SQRT_2PI + 0.5 * (c_plus * c_plus + c_minus * c_minus)
    rslope_excess = odd / (_SQRT_2PI * root_q)
    if name in _HOMOGENEOUS:
        return _Moments(r2_excess, 0.0, rslope_excess, 0.0)
    z, weights, _ = _gauss_rule(np.zeros(1), min(1.0, 1.0 / root_q))
    h = root_q * z
    value, derivative = activation(name, h)
    positive = h > 0
    slope_r = np.where(positive, s_plus, s_minus)
    line = slope_r * h + np.where(positive, c_plus, c_minus)
    dphi2 = float(weights @ (derivative * derivative - slope_r * slope_r))
    if q < _DIRECT_BELOW:
        phi2 = float(weights @ (value * value)) - kappa * q
        slope = float(weights @ (value * derivative * z)) / root_q - kappa
        return _Moments(phi2, dphi2, slope, 0.0)
    remainder = float(weights @ ((value - line) * (value + line)))
    slope = rslope_excess + float(weights @ ((value * derivative - line * slope_r) * z)) / root_q
    return _Moments(r2_excess + remainder, dphi2, slope, remainder)


# --------------------------------------------------------------------------- validation


#: The theory works with sigma_w**2 and sigma_b**2: they must be finite, and sigma_w**2 a normal float.
SIGMA_W_RANGE = (math.sqrt(np.finfo(float).tiny), math.sqrt(np.finfo(float).max))
SIGMA_B_MAX = SIGMA_W_RANGE[1]


def _check_sigmas(sigma_w: object, sigma_b: object) -> tuple[float, float]:
    sigma_w = check_real(sigma_w, "sigma_w", positive=True)
    sigma_b = check_real(sigma_b, "sigma_b", minimum=0.0)
    low, high = SIGMA_W_RANGE
    if not low <= sigma_w <= high:
        raise ValueError(f"sigma_w: mean-field theory needs {low:.3g} <= sigma_w <= {high:.3g} "
                         f"(sigma_w**2 a normal float), got {sigma_w!r}")
    if sigma_b > SIGMA_B_MAX:
        raise ValueError(f"sigma_b: mean-field theory needs sigma_b <= {SIGMA_B_MAX:.3g} "
                         f"(sigma_b**2 finite), got {sigma_b!r}")
    return sigma_w, sigma_b


# --------------------------------------------------------------------------- the variance map

#: The upward search for a fixed point gives up (q* = inf) beyond this variance.
_Q_MAX = 1e64
#: Below this, the downward search stops and brackets [0, q].
_Q_MIN = 1e-64
#: From here on, the decaying remainder of E[phi^2] shrinks like 1 / sqrt(q)
#: (it lives within |h| < 50), which the divergence test relies on.
_Q_ASYMPTOTIC = 1e4
#: The smallest normal double: the log-space search for a tiny q* stops there.
_SMALLEST_NORMAL = float(np.finfo(float).tiny)
_SEARCH_FACTOR = 16.0


def _excess(name: str, q: float, var_w: float, var_b: float) -> tuple[float, _Moments]:
    """F(q) - q, computed without cancelling the leading terms, and the moments."""
    moments = _moments(name, q)
    return (var_w * _kappa(name) - 1.0) * q + var_w * moments.phi2 + var_b, moments


class _Solution(NamedTuple):
    q_star: float
    #: chi_1 - 1 and dF/dq - 1 at q*, computed without cancellation.
    chi1_minus_1: float
    slope_minus_1: float
    #: chi_1 and dF/dq at q* themselves, as products of positive terms: exact where
    #: they are tiny (sigma_w -> 0), where 1 + (x - 1) loses them.
    chi1: float = math.nan
    slope: float = math.nan


@functools.lru_cache(maxsize=4096)
def _solve(name: str, sigma_w: float, sigma_b: float) -> _Solution:
    var_w, var_b = sigma_w * sigma_w, sigma_b * sigma_b
    kappa = _kappa(name)
    # The growth of F(q) at large q, relative to q, minus one.
    lead = var_w * kappa - 1.0
    if abs(lead) <= 8.0 * np.finfo(float).eps:
        lead = 0.0  # sigma_w = sqrt(2) for relu: treat the rounding of sigma_w**2 as exact
    if name in _HOMOGENEOUS:
        # F(q) = sigma_w**2 kappa q + sigma_b**2 exactly.
        if lead < 0.0:
            q_star = var_b / -lead
        elif var_b == 0.0 and lead == 0.0:
            q_star = 1.0  # every q is fixed; the iteration stays at q0 = 1
        else:
            return _Solution(math.inf, lead, math.nan, var_w * kappa, math.nan)
        return _Solution(q_star, lead, lead, var_w * kappa, var_w * kappa)
    q_star = _find_fixed_point(name, var_w, var_b, lead)
    if math.isinf(q_star):
        # Far out phi is its asymptote, so chi_1 tends to sigma_w**2 kappa.
        return _Solution(math.inf, lead, math.nan, var_w * kappa, math.nan)
    moments = _moments(name, q_star)
    return _Solution(q_star, lead + var_w * moments.dphi2, lead + var_w * moments.slope,
                     var_w * (kappa + moments.dphi2), var_w * (kappa + moments.slope))


def _find_fixed_point(name: str, var_w: float, var_b: float, lead: float) -> float:
    """The fixed point that iterating F from q0 = 1 approaches (F is increasing).

    Iterating an increasing map from q0 moves monotonically towards the first
    fixed point on the side where F(q0) - q0 points; that point is bracketed by
    a geometric search (factors of 16) and polished with Brent's method.
    """

    def excess(q: float) -> float:
        return _excess(name, q, var_w, var_b)[0]

    at_one = excess(1.0)
    if at_one == 0.0:
        return 1.0
    if at_one > 0.0:
        low, high = 1.0, 1.0
        while True:
            low, high = high, high * _SEARCH_FACTOR
            if high > _Q_MAX:
                return math.inf
            value, moments = _excess(name, high, var_w, var_b)
            if value <= 0.0:
                break
            # Beyond _Q_ASYMPTOTIC the excess is lead q + O(sqrt q) terms + a
            # remainder that decays like 1 / sqrt(q); once lead q beats those it always will.
            if high >= _Q_ASYMPTOTIC and lead > 0.0:
                s_plus, c_plus, s_minus, c_minus = _ASYMPTOTES[name]
                odd = 2.0 * (s_plus * c_plus - s_minus * c_minus) * math.sqrt(high) / _SQRT_2PI
                if lead * high > var_w * (abs(odd) + abs(moments.remainder)):
                    return math.inf
    else:
        at_zero = excess(0.0)
        if at_zero == 0.0 and var_w * _moments(name, 0.0).dphi2 + var_w * _kappa(name) <= 1.0:
            return 0.0  # q = 0 is fixed and attracting, with F(q) < q above it
        high, low = 1.0, 1.0
        while True:
            high, low = low, low / _SEARCH_FACTOR
            if low < _Q_MIN:
                low = 0.0
                break
            if excess(low) >= 0.0:
                break
        if low == 0.0 and at_zero == 0.0:
            return 0.0
    from scipy import optimize  # on first use: the sweeps' vectorised theory never needs it

    if low == 0.0:
        # q* below _Q_MIN (tiny sigma_w and sigma_b): SciPy's brentq stalls on absolute values
        # near 1e-290 (it failed to converge in 2000 steps for sigmoid at sigma_w 1e-143), so the
        # bracket is searched further down, to the normal floats, and the root found in log q,
        # where F(q) / q - 1 is of order 1 at every scale.
        low = high
        while low > _SMALLEST_NORMAL and excess(low) < 0.0:
            high, low = low, max(low * 2.0**-64, _SMALLEST_NORMAL)
        if excess(low) < 0.0:
            # q* below the normal floats (a subnormal sigma_b**2; phi(0) = 0, else q* >= sigma_w**2
            # phi(0)**2 is normal): there F(q) = F(0) + sigma_w**2 phi'(0)**2 q to working precision
            return at_zero / (1.0 - var_w * (_kappa(name) + _moments(name, 0.0).dphi2))
        if excess(low) == 0.0:
            return low
        root = math.exp(optimize.brentq(lambda u: excess(math.exp(u)) / math.exp(u), math.log(low),
                                        math.log(high), xtol=1e-15, rtol=4.0 * np.finfo(float).eps,
                                        maxiter=500))
        # one Newton step on q: the log-space root is good to |log q| eps (~1e-13 at q ~ 1e-300)
        slope = var_w * (_kappa(name) + _moments(name, root).slope) - 1.0  # d excess / dq
        polished = root - excess(root) / slope if slope < 0.0 else root
        return polished if abs(excess(polished)) <= abs(excess(root)) else root
    return optimize.brentq(excess, low, high, xtol=1e-300, rtol=4.0 * np.finfo(float).eps, maxiter=2000)


# --------------------------------------------------------------------------- public API


def q_map(activation: str, q: float, sigma_w: float, sigma_b: float) -> float:
    """The variance map ``F(q) = sigma_w**2 E[phi(sqrt(q) z)**2] + sigma_b**2``.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    q : float
        Pre-activation variance, finite and >= 0.
    sigma_w : float
        Weight scale (weights ``N(0, sigma_w**2 / n)``), finite and > 0.
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).

    Returns
    -------
    float
        The variance of the next layer's pre-activations.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown or a number is out of range; the message
        names the argument.
    """
    name = check_activation(activation)
    q = check_real(q, "q")
    if q < 0.0:
        raise ValueError(f"q: must be >= 0, got {q!r}")
    sigma_w, sigma_b = _check_sigmas(sigma_w, sigma_b)
    var_w = sigma_w * sigma_w
    return var_w * (_kappa(name) * q + _moments(name, q).phi2) + sigma_b * sigma_b


def fixed_point(activation: str, sigma_w: float, sigma_b: float) -> float:
    """The fixed point ``q*`` of the variance map reached from ``q0 = 1``.

    ``F`` is increasing (for every activation here), so iterating it from
    ``q0 = 1`` moves monotonically to the first fixed point on the side where
    ``F(1) - 1`` points, or to infinity; that is the point returned (found by
    a bracketing search and Brent's method, to about machine precision, not
    by iterating).  Examples: ``tanh`` with ``sigma_b = 0`` gives ``0`` for
    ``sigma_w <= 1`` and the non-zero stable fixed point above (``q = 0`` is
    then fixed but unstable); ``relu`` gives ``sigma_b**2 / (1 - sigma_w**2 /
    2)`` below ``sigma_w = sqrt 2``; ``gelu`` with ``sigma_w = 1.5`` and
    ``sigma_b = 0.05`` goes down to a small fixed point near 0 although it
    grows like relu far out.  Where every ``q`` is fixed (``relu`` at
    ``sigma_w = sqrt 2``, ``linear`` at ``sigma_w = 1``, both with ``sigma_b =
    0``) it is ``q0 = 1``; ``sigma_w**2 (s_+**2 + s_-**2) / 2`` within 8
    machine epsilons of 1 counts as exactly 1, so ``math.sqrt(2)`` is critical
    for relu.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_w : float
        Weight scale, > 0 with ``sigma_w**2`` a finite normal float
        (:data:`SIGMA_W_RANGE`, about 1.5e-154 .. 1.3e154).
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).

    Returns
    -------
    float
        ``q*`` (0.0 is a valid answer); ``math.inf`` where the iteration
        from 1 grows without bound: relu with ``sigma_w > sqrt 2``, or
        ``sigma_w = sqrt 2`` and ``sigma_b > 0``; linear with ``sigma_w >= 1``
        and ``sigma_b > 0``; and the other activations that grow linearly
        (elu, selu, gelu, silu, softplus) where ``F(q) > q`` for all
        ``q >= 1``, which needs ``sigma_w**2 (s_+**2 + s_-**2) / 2 >= 1``
        (``s_+``, ``s_-`` the slopes of the asymptotes).  Fixed points beyond
        1e64 count as infinite.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown, ``sigma_w`` is not finite and > 0, or
        ``sigma_b`` is not finite and >= 0; the message names the argument.
    """
    name = check_activation(activation)
    sigma_w, sigma_b = _check_sigmas(sigma_w, sigma_b)
    return _solve(name, sigma_w, sigma_b).q_star


def chi1(activation: str, sigma_w: float, sigma_b: float) -> float:
    """``chi_1 = sigma_w**2 E[phi'(sqrt(q*) z)**2]`` at the fixed point ``q*``.

    The mean-field per-layer ratio of squared gradient norms, layer ``l`` over
    layer ``l + 1``: below 1 gradients vanish towards the input, above 1 they
    explode.  Where ``q* = inf`` this is the limit ``q -> inf``, which is
    finite: ``sigma_w**2 (s_+**2 + s_-**2) / 2`` with ``s_+``, ``s_-`` the
    slopes of the activation's asymptotes (relu ``sigma_w**2 / 2``,
    leaky_relu ``sigma_w**2 (1 + 0.01**2) / 2``, linear ``sigma_w**2``, as
    they are at any finite ``q*``; gelu, silu, softplus and elu as relu; selu
    ``selu_scale**2 sigma_w**2 / 2``; bounded activations always have a
    finite ``q*``).  At ``q* = 0`` it is the limit ``q -> 0+``: the mean of
    ``phi'(0+)**2`` and ``phi'(0-)**2``.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_w : float
        Weight scale, > 0 with ``sigma_w**2`` a finite normal float
        (:data:`SIGMA_W_RANGE`, about 1.5e-154 .. 1.3e154).
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).

    Returns
    -------
    float
        ``chi_1``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown or a number is out of range; the message
        names the argument.
    """
    name = check_activation(activation)
    sigma_w, sigma_b = _check_sigmas(sigma_w, sigma_b)
    solution = _solve(name, sigma_w, sigma_b)
    if solution.chi1_minus_1 < -0.5 and math.isfinite(solution.chi1):
        return solution.chi1  # far below 1: the direct product keeps its relative accuracy
    return 1.0 + solution.chi1_minus_1


# --------------------------------------------------------------------------- the correlation map


def _pair_moments(name: str, q: float, c: float) -> tuple[float, float]:
    """``E[phi(u1) phi(u2)]`` and ``E[phi'(u1) phi'(u2)]``, ``(u1, u2) ~ N(0, q [[1, c], [c, 1]])``."""
    if name in _HOMOGENEOUS:
        # Arc-cosine kernel: E[relu(u1) relu(u2)] = q (sin t + (pi - t) c) / (2 pi),
        # P(u1 > 0, u2 > 0) = (pi - t) / (2 pi), t = arccos c; leaky_relu and
        # linear are (1 - a) relu + a * identity.
        angle = math.acos(c)
        relu_pair = q * (math.sin(angle) + (math.pi - angle) * c) / (2.0 * math.pi)
        both_positive = (math.pi - angle) / (2.0 * math.pi)
        slope = {"linear": 1.0, "relu": 0.0, "leaky_relu": LEAKY_SLOPE}[name]
        kinked = 1.0 - slope
        # The cross terms use E[relu(u1) u2] = E[u1 u2] / 2 = q c / 2 and
        # P(u1 > 0) = 1 / 2, by the symmetry (u1, u2) -> (-u1, -u2).
        value = kinked * kinked * relu_pair + (kinked + slope) * slope * q * c
        derivative = kinked * kinked * both_positive + (kinked + slope) * slope
        return value, derivative
    root_q = math.sqrt(q)
    s = math.sqrt(max(0.0, 1.0 - c * c))
    if s == 0.0:  # u2 = c u1 with c = +-1: a one-dimensional integral
        z, weights, _ = _gauss_rule(np.zeros(1), min(1.0, 1.0 / root_q))
        value1, derivative1 = activation(name, root_q * z)
        value2, derivative2 = activation(name, c * root_q * z)
        return float(weights @ (value1 * value2)), float(weights @ (derivative1 * derivative2))
    # Outer rule over z1 (u1 = sqrt(q) z1); given u1, u2 = c u1 + sqrt(q) s z2.
    # The inner expectation is smoothed over sqrt(q) s in h, so it varies on a
    # z1-scale s / |c| around z1 = 0: the outer panels are graded down to that.
    outer_scale = min(1.0, 1.0 / root_q, s / abs(c) if c != 0.0 else 1.0)
    z1, w1, _ = _gauss_rule(np.zeros(1), outer_scale, _COARSE)
    u1 = root_q * z1
    inner_sd = root_q * s
    z2, w2, starts = _gauss_rule(-c * u1 / inner_sd, min(1.0, 1.0 / inner_sd), _COARSE)
    counts = np.diff(np.append(starts, z2.size))
    value2, derivative2 = activation(name, np.repeat(c * u1, counts) + inner_sd * z2)
    value1, derivative1 = activation(name, u1)
    inner_value = np.add.reduceat(w2 * value2, starts)
    inner_derivative = np.add.reduceat(w2 * derivative2, starts)
    return float(w1 @ (value1 * inner_value)), float(w1 @ (derivative1 * inner_derivative))


def _depth(slope_minus_1: float, slope: float = math.nan) -> float:
    """``-1 / ln(slope)`` from ``slope - 1``; inf at slope 1 (criticality).

    Far below 1 the log is taken of ``slope`` itself where it is known (``slope
    - 1`` rounds to -1 once ``slope`` < 1e-16); 0 where the slope is 0.
    """
    if slope_minus_1 == 0.0:
        return math.inf
    if slope_minus_1 < -0.5 and math.isfinite(slope):
        return 0.0 if slope <= 0.0 else -1.0 / math.log(slope)
    return -1.0 / math.log1p(slope_minus_1)


def _correlation_step(name: str, c: float, q_star: float, var_w: float, var_b: float) -> tuple[float, float]:
    """``C(c) - c`` and ``C'(c) = sigma_w**2 E[phi'(u1) phi'(u2)]`` at variance ``q*``."""
    value, derivative = _pair_moments(name, q_star, c)
    return (var_w * value + var_b) / q_star - c, var_w * derivative


@functools.lru_cache(maxsize=4096)
def _correlation_fixed_point(name: str, sigma_w: float, sigma_b: float) -> tuple[float, float]:
    """``(c*, chi_c - 1)``: the stable fixed point of the correlation map and its slope there.

    NaN for both where ``q* = inf``.
    """
    solution = _solve(name, sigma_w, sigma_b)
    if math.isinf(solution.q_star):
        return math.nan, math.nan
    if solution.chi1_minus_1 <= 0.0 or solution.q_star == 0.0:
        # Ordered (or critical): c = 1 is stable and the slope there is chi_1.
        # (q* = 0 with chi_1 > 1 happens only within rounding of criticality.)
        return 1.0, solution.chi1_minus_1
    # Chaotic: C(1) = 1 with C'(1) = chi_1 > 1, so c = 1 repels.  C is a power
    # series in c with non-negative coefficients (Mehler's formula), so on
    # [0, 1] it is increasing and convex, and C(0) >= 0: g(c) = C(c) - c has
    # exactly one root c* in [0, 1), where g' < 0.  Newton's method from c = 0
    # climbs to it monotonically (the tangents of a convex g stay below it).
    q_star, var_w, var_b = solution.q_star, sigma_w * sigma_w, sigma_b * sigma_b
    c = 0.0
    step_value, slope = _correlation_step(name, c, q_star, var_w, var_b)
    for _ in range(100):
        if step_value <= 0.0 or slope >= 1.0:
            break  # at c* (g(0) = 0 for odd phi without bias), or lost to rounding
        c_next = c + step_value / (1.0 - slope)
        if c_next >= 1.0:  # cannot happen in exact arithmetic (c* < 1); keep rounding from it
            c_next = 0.5 * (c + 1.0)
        if c_next - c <= 1e-14 * c_next:
            break
        c = c_next
        step_value, slope = _correlation_step(name, c, q_star, var_w, var_b)
    return c, slope - 1.0


def depth_scales(activation: str, sigma_w: float, sigma_b: float) -> tuple[float, float]:
    """Depth scales of the variance and correlation maps at their fixed points.

    ``xi_q = -1 / ln(F'(q*))``: the number of layers over which the variance
    of the pre-activations relaxes (by a factor e) to ``q*``.
    ``xi_c = -1 / ln(chi_c)``: the same for the correlation of two inputs,
    with ``chi_c = C'(c*) = sigma_w**2 E[phi'(u1) phi'(u2)]`` at the stable
    fixed point ``c*`` of the correlation map.  In the ordered phase
    (``chi_1 <= 1``) ``c* = 1`` and ``chi_c = chi_1``; in the chaotic phase
    (``chi_1 > 1``) ``c* < 1`` is found by Newton's method on the correlation
    map, which nests two composite Gauss-Legendre rules in place of a 2-D
    Gauss-Hermite rule (see the module docstring; about 1e-12 relative).

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_w : float
        Weight scale, > 0 with ``sigma_w**2`` a finite normal float
        (:data:`SIGMA_W_RANGE`, about 1.5e-154 .. 1.3e154).
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).

    Returns
    -------
    xi_q, xi_c : float
        In layers.  ``math.inf`` where the slope is exactly 1 (criticality,
        e.g. ``xi_c`` of tanh at ``sigma_w = 1``, ``sigma_b = 0``; both scales of
        relu at ``sigma_w = sqrt 2``, ``sigma_b = 0``).  Both are NaN where
        ``q* = inf``: with no fixed point there is nothing to relax to.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown or a number is out of range; the message
        names the argument.
    """
    name = check_activation(activation)
    sigma_w, sigma_b = _check_sigmas(sigma_w, sigma_b)
    solution = _solve(name, sigma_w, sigma_b)
    if math.isinf(solution.q_star):
        return math.nan, math.nan
    c_star, chi_c_minus_1 = _correlation_fixed_point(name, sigma_w, sigma_b)
    # In the ordered phase chi_c is chi_1, known directly where it is tiny.
    chi_c = solution.chi1 if c_star == 1.0 and chi_c_minus_1 == solution.chi1_minus_1 else math.nan
    return _depth(solution.slope_minus_1, solution.slope), _depth(chi_c_minus_1, chi_c)


def c_map(activation: str, c: float, sigma_w: float, sigma_b: float, q: float | None = None) -> float:
    """The correlation map ``C(c) = (sigma_w**2 E[phi(u1) phi(u2)] + sigma_b**2) / q``.

    ``(u1, u2) ~ N(0, q [[1, c], [c, 1]])``: two inputs whose pre-activations
    both have variance ``q`` (by default the fixed point ``q*``, where ``C(1) =
    1``) and correlation ``c``; the result is their correlation one layer on.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    c : float
        Correlation, in ``[-1, 1]``.
    sigma_w : float
        Weight scale, > 0 with ``sigma_w**2`` a finite normal float
        (:data:`SIGMA_W_RANGE`, about 1.5e-154 .. 1.3e154).
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).
    q : float, optional
        Variance of the pre-activations, finite and > 0; default
        :func:`fixed_point`.

    Returns
    -------
    float
        ``C(c)``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown or a number is out of range (the message
        names the argument), or if ``q`` is omitted where ``q*`` is 0 or
        infinite (the message names ``q``).
    """
    name = check_activation(activation)
    c = check_real(c, "c")
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"c: must lie in [-1, 1], got {c!r}")
    sigma_w, sigma_b = _check_sigmas(sigma_w, sigma_b)
    if q is None:
        q = _solve(name, sigma_w, sigma_b).q_star
        if not 0.0 < q < math.inf:
            raise ValueError(f"q: the fixed point q* is {q!r}; pass a finite q > 0")
    else:
        q = check_real(q, "q")
        if q <= 0.0:
            raise ValueError(f"q: must be > 0, got {q!r}")
    value, _ = _pair_moments(name, q, c)
    return (sigma_w * sigma_w * value + sigma_b * sigma_b) / q


#: critical_sigma_w searches sigma_w in [1 / _SIGMA_SPAN, _SIGMA_SPAN].
_SIGMA_SPAN = 1e6


@functools.lru_cache(maxsize=1024)
def _critical(name: str, sigma_b: float) -> float:
    if name in _HOMOGENEOUS:
        return 1.0 / math.sqrt(_kappa(name))

    def excess(sigma_w: float) -> float:
        return _solve(name, sigma_w, sigma_b).chi1_minus_1

    if sigma_b == 0.0:
        # Odd-like activations (phi(0) = 0) without bias: q* = 0 up to the
        # critical point, so chi_1 = sigma_w**2 phi'(0)**2 there (mean of the
        # one-sided slopes).  chi_1 - 1 is flat to second order above it, so
        # take the closed form where it holds rather than a poorly posed root.
        moments = _moments(name, 0.0)
        if moments.phi2 == 0.0:
            candidate = 1.0 / math.sqrt(_kappa(name) + moments.dphi2)
            if abs(excess(candidate)) <= 1e-12:
                return candidate
    low = high = 1.0
    value = excess(1.0)
    if value == 0.0:
        return 1.0
    factor = 2.0 if value < 0.0 else 0.5
    while (value < 0.0) == (factor > 1.0):
        low, high = high, high * factor
        if not 1.0 / _SIGMA_SPAN <= high <= _SIGMA_SPAN:
            raise ValueError(
                f"sigma_b: no sigma_w in [{1 / _SIGMA_SPAN:g}, {_SIGMA_SPAN:g}] gives chi_1 = 1 "
                f"for activation {name!r} and sigma_b = {sigma_b!r}"
            )
        value = excess(high)
    from scipy import optimize

    root = optimize.brentq(excess, min(low, high), max(low, high), xtol=1e-13, rtol=4.0 * np.finfo(float).eps)
    if abs(excess(root)) > 1e-8:
        # chi_1 jumps across 1 here: the fixed point reached from q0 = 1 jumps
        # (e.g. from 0 to inf for gelu without bias), so chi_1 = 1 nowhere.
        raise ValueError(
            f"sigma_b: chi_1 jumps across 1 at sigma_w = {root!r} for activation {name!r} and "
            f"sigma_b = {sigma_b!r} (the fixed point q* jumps there), so no sigma_w gives chi_1 = 1"
        )
    return root


def critical_sigma_w(activation: str, sigma_b: float) -> float:
    """The weight scale ``sigma_w`` at which ``chi_1 = 1`` (the edge of chaos).

    Closed forms for relu (``sqrt 2``), leaky_relu (``sqrt(2 / (1 + 0.01**2))``)
    and linear (1), whatever ``sigma_b``.  Otherwise a bracket is grown from
    ``sigma_w = 1`` by factors of 2 towards where ``chi_1`` crosses 1 and
    Brent's method solves ``chi_1(sigma_w) = 1`` in it to about 1e-13 in
    ``sigma_w``; the first crossing met from 1 is the one returned.  Without
    bias, for activations with ``phi(0) = 0``, ``q* = 0`` up to the critical
    point and the answer is the closed form ``1 / |phi'(0)|`` (tanh 1, erf
    ``sqrt(pi) / 2``, elu 1; for selu ``phi'(0)**2`` is the mean of the two
    one-sided slopes squared), taken where ``chi_1 = 1`` there.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_b : float
        Bias standard deviation, >= 0 with ``sigma_b**2`` finite (<= 1.3e154).

    Returns
    -------
    float
        The critical ``sigma_w``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activation`` is unknown or ``sigma_b`` is out of range; and, naming
        ``sigma_b``, if no ``sigma_w`` in ``[1e-6, 1e6]`` gives ``chi_1 = 1``:
        either ``chi_1`` stays on one side of 1, or it jumps across 1 where the
        fixed point ``q*`` reached from ``q0 = 1`` jumps (gelu and silu with
        ``sigma_b = 0``, where ``q*`` jumps from 0 to infinity).
    """
    name = check_activation(activation)
    _, sigma_b = _check_sigmas(1.0, sigma_b)
    return _critical(name, sigma_b)


# Recurrent networks through time (vgcore.theory.recurrent), re-exported here.
from vgcore.theory.recurrent import (  # noqa: E402
    gated_log_decay,
    rnn_chi1,
    rnn_fixed_point,
    rnn_lyapunov_exponent,
    rnn_timescale,
)

__all__ += ["gated_log_decay", "rnn_chi1", "rnn_fixed_point", "rnn_lyapunov_exponent", "rnn_timescale"]

# Batch-normalised stacks (vgcore.theory.batchnorm), re-exported here.
from vgcore.theory.batchnorm import batchnorm_chi  # noqa: E402

__all__ += ["batchnorm_chi"]
