"""Fuzz test (issue 17): generated hostile calls of every public function, a few seconds.

The generators and the rules live in tests/fuzz_harness.py (shared with the
100,000-call campaign script): every call either returns, with no input
modified, no NaN from finite input and no NaN / inf array accepted, or raises
ValueError / TypeError whose message starts with the name of an argument.
"""

from __future__ import annotations

import fuzz_harness as harness
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def pool():
    return harness.stack_pool()


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])
@given(data=st.data())
def test_public_functions_refuse_hostile_input_by_name_and_never_corrupt(pool, data):
    call = harness.make_call(harness.HypothesisChooser(data), pool)
    outcome, problem = harness.run_call(call)
    assert problem is None, f"{call.name}: {problem}\n args {call.args!r:.400}\n kwargs {call.kwargs!r:.400}"
    assert outcome in ("accepted", "refused")


@pytest.mark.parametrize(("message", "names", "expected"), [
    ("x: contains NaN or inf", ("stack", "x"), True),
    ("depth, width: a 3 x 4 stack needs", ("depth", "width", "depth, width"), True),
    ("grid['depth']: must be >= 1", ("grid",), True),
    ("math domain error", ("activation", "sigma_w"), False),
    ("The function value at x=0.0 is NaN", ("activation", "sigma_w"), False),
    ("array is too big", ("depth",), False),
])
def test_the_rule_for_naming_an_argument(message, names, expected):
    assert harness.names_an_argument(message, names) is expected


def test_the_campaign_rules_catch_violations():
    """The rules can fail: a mutated input, a NaN result and an unnamed error are each reported."""
    import numpy as np

    array = np.ones(3)

    def mutate(a):
        a[0] = 2.0

    assert harness.run_call(harness.Call("f", mutate, (array,), {}, ("a",)))[1] == "input modified"
    assert harness.run_call(harness.Call("f", lambda a: np.array([np.nan]), (np.ones(2),), {}, ("a",)))[1] \
        == "NaN from finite input"

    def unnamed(a):
        raise ValueError("math domain error")

    assert "naming no argument" in harness.run_call(harness.Call("f", unnamed, (1.0,), {}, ("a",)))[1]

    def crash(a):
        raise ZeroDivisionError("boom")

    assert harness.run_call(harness.Call("f", crash, (1.0,), {}, ("a",)))[0] == "crashed"
