"""Hypothesis strategies for the batch-norm tests (tests/test_batchnorm*.py, tests/test_backends.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import vgcore as vg

DTYPES = [np.float32, np.float64]


@st.composite
def batchnorm_cases(draw, max_depth: int = 30, max_width: int = 24, min_batch: int = 2, max_batch: int = 16,
                    dtypes=DTYPES, activations=vg.ACTIVATIONS):
    """(stack, x): a norm="batch" stack over every activation, init, residual on / off and dtype; B >= 2."""
    stack = vg.Stack.random(
        draw(st.integers(1, max_depth)), draw(st.integers(1, max_width)),
        activation=draw(st.sampled_from(activations)),
        init=draw(st.sampled_from(["gaussian", "orthogonal", "uniform"])),
        sigma_w=draw(st.floats(0.3, 2.0)),
        sigma_b=draw(st.floats(0.0, 0.5)),
        residual=draw(st.sampled_from([None, 1.0, 0.5, 0.2])),
        norm="batch",
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31)),
    )
    x = vg.random_inputs(stack, draw(st.integers(min_batch, max_batch)), seed=draw(st.integers(0, 2**31)))
    return stack, x
