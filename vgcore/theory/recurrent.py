"""Theory of gradient propagation through time in random recurrent networks.

Vanilla RNN, mean field (Molgedey, Schuchhardt & Schuster 1992; Poole et al.
2016; Chen, Pennington & Schoenholz 2018): h' = phi(W h + b [+ U u_t]) with
W ~ N(0, g^2 / n), b ~ N(0, sigma_b^2) and, when driven, U ~ N(0, sigma_u^2 / m)
and i.i.d. standard normal inputs u_t.  At large n the pre-activations of
the stationary state are Gaussian with variance q*, the fixed point of

    q = g^2 E[phi(sqrt(q) z)^2] + sigma_b^2 + sigma_u^2          (z ~ N(0, 1))

(the stack's variance map with an effective bias variance sigma_b^2 +
sigma_u^2, since a fresh input each step adds independent variance).  A
perturbation of the state grows per step by

    chi_1 = g^2 E[phi'(sqrt(q*) z)^2]

in squared norm, so the largest Lyapunov exponent is (1/2) ln chi_1 and a
gradient flowing back through time scales by the same factor per step:
chi_1 < 1 ordered (gradients vanish, timescale 1 / |ln chi_1| steps in squared
norm), chi_1 > 1 chaotic.  For the autonomous tanh network with sigma_b = 0
the transition is at g = 1; below it q* = 0 and the exponent is ln g.

Gated cells (lstm, gru) with constant gates: with zero recurrent weights and
no input drive (or zero input weights), every gate is a constant and the
state that the cell keeps evolves as c' = f * c + (const) (lstm, f =
sigmoid(b_f)) or h' = z * h + (const) (gru, z = sigmoid(b_z)).  The gradient
of the loss with respect to the kept state then decays by exactly the keep
gate per step, log f = ln sigmoid(forget_bias), at every step but the last
(which also passes through the output gate); so does every Lyapunov direction
of the kept state.
"""

from __future__ import annotations

import math
from typing import Any

from vgcore._validation import check_real

__all__ = [
    "gated_log_decay",
    "rnn_chi1",
    "rnn_fixed_point",
    "rnn_lyapunov_exponent",
    "rnn_timescale",
]


def _mean_field():
    # imported on use: vgcore.theory re-exports this module's functions at its end
    from vgcore import theory

    return theory


def _effective_sigma_b(sigma_b: Any, sigma_u: Any) -> float:
    sigma_b = check_real(sigma_b, "sigma_b", minimum=0.0)
    sigma_u = check_real(sigma_u, "sigma_u", minimum=0.0)
    return math.hypot(sigma_b, sigma_u)


def rnn_fixed_point(activation: str, sigma_w: float, sigma_b: float = 0.0, sigma_u: float = 0.0) -> float:
    """Stationary pre-activation variance q* of a random vanilla RNN (mean field).

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_w : float
        Recurrent gain g > 0.
    sigma_b : float
        Bias standard deviation >= 0.
    sigma_u : float
        Input weight scale >= 0 of a network driven by i.i.d. standard normal
        inputs (0: autonomous).

    Returns
    -------
    float
        q*, the fixed point of q = g^2 E[phi(sqrt(q) z)^2] + sigma_b^2 + sigma_u^2
        reached from q = 1 (:func:`vgcore.theory.fixed_point`); ``inf`` where
        the variance grows without bound.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument.
    """
    return _mean_field().fixed_point(activation, sigma_w, _effective_sigma_b(sigma_b, sigma_u))


def rnn_chi1(activation: str, sigma_w: float, sigma_b: float = 0.0, sigma_u: float = 0.0) -> float:
    """Per-step growth of squared perturbation (and gradient) norms, chi_1 = g^2 E[phi'(sqrt(q*) z)^2].

    Parameters and errors as :func:`rnn_fixed_point`.

    Returns
    -------
    float
        chi_1; < 1 ordered (gradients vanish through time), > 1 chaotic.
    """
    return _mean_field().chi1(activation, sigma_w, _effective_sigma_b(sigma_b, sigma_u))


def rnn_lyapunov_exponent(activation: str, sigma_w: float, sigma_b: float = 0.0,
                          sigma_u: float = 0.0) -> float:
    """Largest Lyapunov exponent per step of a random vanilla RNN, (1/2) ln chi_1 (mean field).

    Parameters and errors as :func:`rnn_fixed_point`.  Exact as n -> infinity
    in the chaotic phase; in the ordered phase of the autonomous network
    (sigma_b = 0, phi'(0) = 1, g < 1) it is ln g, the decay at the fixed point 0.

    Returns
    -------
    float
        Natural log per step.
    """
    return 0.5 * math.log(rnn_chi1(activation, sigma_w, sigma_b, sigma_u))


def rnn_timescale(activation: str, sigma_w: float, sigma_b: float = 0.0, sigma_u: float = 0.0) -> float:
    """Steps per e-fold of the squared gradient norm, 1 / |ln chi_1| (inf at chi_1 = 1).

    Parameters and errors as :func:`rnn_fixed_point`; the theory twin of
    :func:`vgcore.stats.depth_scale` on a recurrent profile.
    """
    log_chi = math.log(rnn_chi1(activation, sigma_w, sigma_b, sigma_u))
    return math.inf if log_chi == 0 else 1.0 / abs(log_chi)


def gated_log_decay(cell: str, forget_bias: float) -> float:
    """Per-step log decay of the kept state's gradient in a gated cell with constant gates.

    With zero recurrent weights, no input drive and equal biases across
    units, the lstm's cell-state gradient (and the gru's hidden-state
    gradient) shrinks by the keep gate sigmoid(forget_bias) every step.

    Parameters
    ----------
    cell : {"lstm", "gru"}
    forget_bias : float
        The keep gate's pre-activation (lstm forget gate f, gru update gate z).

    Returns
    -------
    float
        ln sigmoid(forget_bias) < 0, computed without overflow.

    Raises
    ------
    TypeError, ValueError
        Naming ``cell`` or ``forget_bias``.
    """
    if not isinstance(cell, str):
        raise TypeError(f"cell: expected a string, got {type(cell).__name__}")
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell: a keep gate exists for 'lstm' and 'gru', got {cell!r}")
    bias = check_real(forget_bias, "forget_bias")
    # ln sigmoid(b) = -log1p(exp(-b)) = b - log1p(exp(b)), whichever exponent is negative
    return -math.log1p(math.exp(-bias)) if bias >= 0 else bias - math.log1p(math.exp(bias))


def model_chi(model: Any) -> float:
    """The theory value of chi for a Recurrent (its ``chi_theory``); NaN where no theory applies."""
    if model.sigma_w is None:
        return math.nan
    driven = model.input_width > 0 and model.sigma_u is not None and model.sigma_u > 0
    if model.cell == "rnn":
        if model.sigma_w == 0:
            return 0.0
        return rnn_chi1(model.activation, model.sigma_w, model.sigma_b,
                        model.sigma_u if driven else 0.0)
    if model.sigma_w == 0 and model.sigma_b == 0 and not driven:
        return math.exp(2.0 * gated_log_decay(model.cell, model.forget_bias))
    return math.nan


def sweep_chi_theory(cell: str, activation: str, sigma_w: float, sigma_b: float, sigma_u: float,
                     input_width: int, forget_bias: float) -> float:
    """A recurrent sweep row's chi_theory: that of Recurrent.random with these options (:func:`model_chi`)."""
    from types import SimpleNamespace

    driven = input_width > 0
    return model_chi(SimpleNamespace(cell=cell, activation=activation, sigma_w=sigma_w, sigma_b=sigma_b,
                                     sigma_u=sigma_u if driven else None, input_width=input_width,
                                     forget_bias=0.0 if cell == "rnn" else forget_bias))
