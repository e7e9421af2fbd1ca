"""Hypothesis strategies and helpers for the recurrent tests (tests/test_recurrent*.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import vgcore as vg
from vgcore._activations import ACTIVATIONS, NOT_SMOOTH_AT_ZERO
from vgcore._recurrent import CELLS, Recurrent
from vgcore.reference import recurrent as reference

DTYPES = [np.float32, np.float64]


@st.composite
def recurrent_cases(draw, max_width: int = 6, max_steps: int = 8, max_batch: int = 3, max_input: int = 4,
                    dtypes=(np.float64,), cells=tuple(CELLS), activations=ACTIVATIONS,
                    sigma_w=(0.3, 1.6), state_scale: float = 0.5):
    """(model, s0, steps, inputs) over cells, widths, steps, batch, inputs on / off and dtypes."""
    cell = draw(st.sampled_from(cells))
    activation = draw(st.sampled_from(activations)) if cell == "rnn" else "tanh"
    width = draw(st.integers(1, max_width))
    input_width = draw(st.sampled_from([0, draw(st.integers(1, max_input))])) if max_input else 0
    model = Recurrent.random(
        width, cell=cell, activation=activation, input_width=input_width,
        init=draw(st.sampled_from(["gaussian", "orthogonal", "uniform"])),
        sigma_w=draw(st.floats(*sigma_w)),
        sigma_u=draw(st.floats(0.3, 1.5)),
        sigma_b=draw(st.floats(0.0, 0.5)),
        forget_bias=0.0 if cell == "rnn" else draw(st.floats(-1.0, 2.0)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31)),
    )
    batch = draw(st.integers(1, max_batch))
    steps = draw(st.integers(1, max_steps))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    s0 = (state_scale * rng.standard_normal((batch, model.state_width))).astype(model.dtype)
    inputs = rng.standard_normal((batch, steps, input_width)).astype(model.dtype) if input_width else None
    return model, s0, steps, inputs


def recast(model: Recurrent, dtype) -> Recurrent:
    """The same model with its parameters in ``dtype`` (exact for float32 -> float64)."""
    weight_ih = np.asarray(model.weight_ih, dtype) if model.input_width else None
    return Recurrent(np.asarray(model.weight_hh, dtype), weight_ih, np.asarray(model.bias_hh, dtype),
                     np.asarray(model.bias_ih, dtype), cell=model.cell, activation=model.activation)


def pre_activations(model: Recurrent, s0, steps: int, inputs) -> np.ndarray:
    """The argument of the rnn's phi at every step, (T, B, n) (to keep kinks away from tests)."""
    _, caches = reference.forward_with_caches(model, s0, steps, inputs)
    weight_hh, weight_ih = np.asarray(model.weight_hh), np.asarray(model.weight_ih)
    out = []
    for t, cache in enumerate(caches):
        a = cache.h @ weight_hh.T + model.bias_hh + model.bias_ih
        if inputs is not None:
            a = a + inputs[:, t] @ weight_ih.T
        out.append(a)
    return np.stack(out)


def kinked(model: Recurrent) -> bool:
    return model.cell == "rnn" and model.activation in NOT_SMOOTH_AT_ZERO


__all__ = ["DTYPES", "kinked", "pre_activations", "recast", "recurrent_cases", "vg"]
