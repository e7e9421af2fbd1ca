"""Generated hostile calls of vgcore's public functions, and the rules their outcomes must obey.

Shared by tests/test_fuzz.py (hypothesis, a few seconds) and the longer
campaign script (NumPy's generator, 100,000+ calls).  A *chooser* supplies the
random choices: :class:`RandomChooser` (numpy.random.Generator) or
:class:`HypothesisChooser` (hypothesis's ``data.draw``), so both drive the
same generators.

Each call is classified as
- "accepted": it returned; then no input may have changed, no NaN may appear
  in the result when every input was finite, and no non-finite array input
  may have been accepted;
- "refused": ValueError or TypeError whose message starts with the name of
  one of the function's arguments (``"x: ..."``, ``"depth, width: ..."``,
  ``"grid['depth']: ..."``);
- anything else is a violation, described by :func:`run_call`'s ``problem``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import vgcore as vg
from vgcore import stats, theory

# --------------------------------------------------------------------------
# Choosers


class RandomChooser:
    """Choices from a NumPy generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choice(self, options: list, label: str = "") -> Any:
        return options[int(self.rng.integers(len(options)))]

    def integer(self, low: int, high: int, label: str = "") -> int:
        return int(self.rng.integers(low, high + 1))

    def uniform(self, low: float, high: float, label: str = "") -> float:
        return float(self.rng.uniform(low, high))


class HypothesisChooser:
    """Choices drawn through hypothesis (shrinkable, reproducible under the CI profile)."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def choice(self, options: list, label: str = "") -> Any:
        return options[self.data.draw(self.st.integers(0, len(options) - 1), label=label)]

    def integer(self, low: int, high: int, label: str = "") -> int:
        return self.data.draw(self.st.integers(low, high), label=label)

    def uniform(self, low: float, high: float, label: str = "") -> float:
        return self.data.draw(self.st.floats(low, high), label=label)


# --------------------------------------------------------------------------
# Hostile values


def _kind(c, hostile: list, label: str) -> str:
    """"good", or one of ``hostile`` with the call's probability ``c.hostility``."""
    if c.uniform(0.0, 1.0, label=f"{label} hostile?") >= getattr(c, "hostility", 0.5):
        return "good"
    return c.choice(hostile, label)


def hostile_int(c, good: tuple[int, int], label: str) -> Any:
    kind = _kind(c, ["zero", "negative", "huge", "2**63", "bool", "float", "np", "none", "str"], label)
    return {
        "good": lambda: c.integer(*good, label=label),
        "zero": lambda: 0,
        "negative": lambda: -c.integer(1, 5, label=label),
        # beyond any memory: sizes that fit (a 16 GB stack) are valid and only slow the campaign down
        "huge": lambda: 10 ** c.integer(12, 15, label=label),
        "2**63": lambda: 2**63,
        "bool": lambda: True,
        "float": lambda: 3.0,
        "np": lambda: np.int64(c.integer(*good, label=label)),
        "none": lambda: None,
        "str": lambda: "3",
    }[kind]()


def hostile_real(c, good: tuple[float, float], label: str, positive: bool = False) -> Any:
    kind = _kind(c, ["zero", "negative", "tiny", "huge", "inf", "nan", "str", "none", "bool", "np32",
                     "complex"], label)
    return {
        "good": lambda: c.uniform(*good, label=label),
        "zero": lambda: 0.0,
        "negative": lambda: -c.uniform(0.1, 3.0, label=label),
        "tiny": lambda: 10.0 ** -c.integer(20, 320, label=label),
        "huge": lambda: 10.0 ** c.integer(20, 308, label=label),
        "inf": lambda: math.inf,
        "nan": lambda: math.nan,
        "str": lambda: "1",
        "none": lambda: None,
        "bool": lambda: True,
        "np32": lambda: np.float32(c.uniform(*good, label=label)),
        "complex": lambda: 1j,
    }[kind]()


def hostile_name(c, names: tuple, label: str, extra: tuple = ()) -> Any:
    if _kind(c, ["bad"], label) == "good":
        return c.choice(list(names), label)
    return c.choice([*extra, "nonsense", None, 3, ""], label)


def hostile_array(c, shape: tuple[int, ...], dtype, label: str) -> Any:
    """A value for an array argument of ``shape``: mostly valid, often hostile."""
    kind = _kind(c, ["float16", "big-endian", "float32", "int", "complex", "bool", "nan", "inf", "huge",
                     "tiny", "wrong-shape", "empty", "3d", "strided", "fortran", "read-only", "list",
                     "scalar", "none", "str", "object"], label)
    rng = np.random.default_rng(c.integer(0, 2**31, label=label))
    base = rng.standard_normal(shape)
    if kind == "good":
        return base.astype(dtype)
    if kind == "float16":
        return base.astype(np.float16)
    if kind == "big-endian":
        return base.astype(np.dtype(dtype).newbyteorder(">"))
    if kind == "float32":
        return base.astype(np.float32)
    if kind == "int":
        return np.round(base).astype(np.int64)
    if kind == "complex":
        return base.astype(np.complex128)
    if kind == "bool":
        return base > 0
    if kind in ("nan", "inf"):
        spoiled = base.astype(dtype)
        spoiled.flat[rng.integers(spoiled.size)] = np.nan if kind == "nan" else -np.inf
        return spoiled
    if kind == "huge":
        factor = 1e38 if dtype == np.float32 else 10.0 ** c.integer(100, 307, label=label)
        return (np.clip(base, -1.7, 1.7) * factor).astype(dtype)
    if kind == "tiny":
        return (base * 10.0 ** -c.integer(30, 320, label=label)).astype(dtype)
    if kind == "wrong-shape":
        return rng.standard_normal((*shape[:-1], shape[-1] + 1)).astype(dtype)
    if kind == "empty":
        return np.zeros((0, *shape[1:]), dtype)
    if kind == "3d":
        return base.astype(dtype)[None]
    if kind == "strided":
        return np.repeat(base.astype(dtype), 2, axis=-1)[..., ::2]
    if kind == "fortran":
        return np.asfortranarray(base.astype(dtype))
    if kind == "read-only":
        array = base.astype(dtype)
        array.flags.writeable = False
        return array
    if kind == "list":
        return base.tolist()
    if kind == "scalar":
        return 1.0
    if kind == "none":
        return None
    if kind == "str":
        return "x"
    return np.array([object()] * max(1, base.size), dtype=object).reshape(-1)


# --------------------------------------------------------------------------
# The stacks computations run on (a pool: building them is not what most calls test)


def stack_pool() -> list[vg.Stack]:
    """Small stacks over every option, including extreme weight scales that overflow."""
    stacks = []
    seed = 0
    for activation in vg.ACTIVATIONS:
        for norm in (None, "pre", "post"):
            for dtype in ("float64", "float32"):
                seed += 1
                rng = np.random.default_rng(seed)
                extreme = 1e30 if dtype == "float64" else 1e15
                sigma_w = float(rng.choice([0.5, 1.0, 1.5, 3.0, 1e-8, 1e6, extreme]))
                stacks.append(vg.Stack.random(
                    int(rng.integers(1, 8)), int(rng.integers(1, 6)), activation=activation,
                    init=str(rng.choice(["gaussian", "orthogonal", "uniform"])), sigma_w=sigma_w,
                    sigma_b=float(rng.choice([0.0, 0.1, 1.0])), residual=rng.choice([None, 1.0, 0.5]),
                    norm=norm, dtype=dtype, seed=seed))
    if hasattr(vg, "Recurrent"):  # recurrent cells: time plays the role of depth
        for cell in ("rnn", "lstm", "gru"):
            for dtype in ("float64", "float32"):
                seed += 1
                stacks.append(vg.Recurrent.random(3, cell=cell, input_width=2 if seed % 2 else 0,
                                                  sigma_w=[1.0, 3.0, 1e4][seed % 3],
                                                  forget_bias=1.0 if cell == "lstm" else 0.0,
                                                  dtype=dtype, seed=seed))
    return stacks


# --------------------------------------------------------------------------
# Calls


@dataclass
class Call:
    name: str
    function: Callable
    args: tuple
    kwargs: dict
    argument_names: tuple[str, ...]
    nan_allowed: Callable[[Any], bool] = field(default=lambda result: False)


def _stack_argument(c, pool: list) -> Any:
    choice = c.choice(["pool"] * 12 + ["none", "array", "str"], "stack")
    if choice == "pool":
        return pool[c.integer(0, len(pool) - 1, "stack index")]
    return {"none": None, "array": np.eye(3)[None], "str": "stack"}[choice]


def _batch_of(c, stack, label: str) -> Any:
    width = getattr(stack, "state_width", 3)
    dtype = getattr(stack, "dtype", np.float64)
    return hostile_array(c, (c.integer(1, 4, label=label), width), dtype, label)


def _out_for(c, shape: tuple[int, ...], dtype, inputs: list) -> Any:
    kind = _kind(c, ["alias", "wrong-shape", "wrong-dtype", "read-only", "strided", "list"], "out")
    if kind == "good":
        return c.choice([None, np.empty(shape, dtype)], "out given?")
    if kind == "alias":
        arrays = [a for a in inputs if isinstance(a, np.ndarray) and a.size >= math.prod(shape)]
        if arrays and arrays[0].flags.writeable and arrays[0].flags.c_contiguous:
            return arrays[0].reshape(-1)[:math.prod(shape)].reshape(shape)
        return None
    if kind == "wrong-shape":
        return np.empty((*shape[:-1], shape[-1] + 1), dtype)
    if kind == "wrong-dtype":
        return np.empty(shape, np.float16)
    if kind == "read-only":
        array = np.empty(shape, dtype)
        array.flags.writeable = False
        return array
    if kind == "strided":
        return np.empty((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    return [[0.0]]


COMPUTE_NAMES = ("stack", "x", "backend", "out", "steps", "inputs")
BACKENDS = ("auto", "cpu", "numpy")


def make_call(c, pool: list) -> Call:
    """One generated call of a public function.

    Each call draws how hostile it is: every argument valid (a third of the
    calls), a few arguments hostile, or most of them.
    """
    c.hostility = c.choice([0.0, 0.1, 0.6], "hostility")
    kind = c.choice(["Stack", "Stack.random", "Recurrent.random", "random_inputs", "forward", "forward",
                     "gradient_profile",
                     "gradient_profile", "jvp", "vjp", "jacobian", "singular_values", "lyapunov_exponents",
                     "stats", "theory", "theory", "sweep"], "function")
    backend = hostile_name(c, BACKENDS, "backend", ("cuda",))
    if kind == "Stack":
        depth, width = c.integer(1, 4, "depth"), c.integer(1, 4, "width")
        weights = hostile_array(c, (depth, width, width), np.float64, "weights")
        biases = c.choice([None, hostile_array(c, (depth, width), np.float64, "biases")], "biases?")
        return Call(kind, vg.Stack, (weights, biases),
                    {"activation": hostile_name(c, vg.ACTIVATIONS, "activation"),
                     "residual": c.choice([None, hostile_real(c, (0.1, 2.0), "residual")], "residual?"),
                     "norm": hostile_name(c, (None, "pre", "post"), "norm")},
                    ("weights", "biases", "activation", "residual", "norm"))
    if kind == "Stack.random":
        return Call(kind, vg.Stack.random,
                    (hostile_int(c, (1, 6), "depth"), hostile_int(c, (1, 6), "width")),
                    {"activation": hostile_name(c, vg.ACTIVATIONS, "activation"),
                     "init": hostile_name(c, ("gaussian", "orthogonal", "uniform"), "init"),
                     "sigma_w": c.choice([hostile_real(c, (0.3, 3.0), "sigma_w"),
                                          hostile_name(c, ("he", "critical", "xavier", "lecun"), "scheme")],
                                         "sigma_w kind"),
                     "sigma_b": hostile_real(c, (0.0, 1.0), "sigma_b"),
                     "residual": c.choice([None, hostile_real(c, (0.1, 2.0), "residual")], "residual?"),
                     "norm": hostile_name(c, (None, "pre", "post"), "norm"),
                     "dtype": hostile_name(c, ("float64", "float32", np.float32), "dtype",
                                           ("float16", "int32")),
                     "seed": c.choice([None, hostile_int(c, (0, 2**40), "seed")], "seed?"),
                     "device": hostile_name(c, ("cpu",), "device", ("cuda", "tpu"))},
                    ("depth", "width", "activation", "init", "sigma_w", "sigma_b", "residual", "norm",
                     "dtype", "seed", "device", "depth, width"))
    if kind == "Recurrent.random":
        cell = hostile_name(c, ("rnn", "lstm", "gru"), "cell")
        gated = cell in ("lstm", "gru")  # torch's gated cells: tanh only, and a forget gate only in lstm
        return Call(kind, vg.Recurrent.random, (hostile_int(c, (1, 4), "width"),),
                    {"cell": cell,
                     "activation": hostile_name(c, ("tanh",) if gated else vg.ACTIVATIONS, "activation"),
                     "input_width": hostile_int(c, (0, 3), "input_width"),
                     "init": hostile_name(c, ("gaussian", "orthogonal"), "init"),
                     "sigma_w": hostile_real(c, (0.3, 3.0), "sigma_w"),
                     "sigma_u": hostile_real(c, (0.3, 3.0), "sigma_u"),
                     "sigma_b": hostile_real(c, (0.0, 1.0), "sigma_b"),
                     "forget_bias": (hostile_real(c, (-1.0, 2.0), "forget_bias") if cell == "lstm"
                                     else c.choice([0.0, 0.0, 0.0, 1.0], "forget_bias")),
                     "dtype": hostile_name(c, ("float64", "float32"), "dtype", ("float16", "int32")),
                     "seed": c.choice([None, hostile_int(c, (0, 2**40), "seed")], "seed?")},
                    ("width", "cell", "activation", "input_width", "init", "sigma_w", "sigma_u", "sigma_b",
                     "forget_bias", "dtype", "seed", "device"))
    if kind == "random_inputs":
        return Call(kind, vg.random_inputs, (_stack_argument(c, pool), hostile_int(c, (1, 5), "batch")),
                    {"seed": c.choice([None, hostile_int(c, (0, 2**40), "seed")], "seed?"),
                     "scale": hostile_real(c, (0.1, 10.0), "scale")},
                    ("stack", "batch", "seed", "scale"))
    if kind == "stats":
        return _stats_call(c, pool)
    if kind == "theory":
        return _theory_call(c)
    if kind == "sweep":
        return _sweep_call(c)
    stack = _stack_argument(c, pool)
    x = _batch_of(c, stack, "x")
    width = getattr(stack, "state_width", 3)
    dtype = getattr(stack, "dtype", np.float64)
    batch = max(1, x.shape[0]) if isinstance(x, np.ndarray) and x.ndim == 2 else 2
    time_keywords = _time_keywords(c, stack, batch, dtype)
    if kind == "forward":
        out = _out_for(c, (batch, width), dtype, [x])
        return Call(kind, vg.forward, (stack, x), {"out": out, "backend": backend, **time_keywords},
                    COMPUTE_NAMES)
    if kind == "gradient_profile":
        grad_output = c.choice([None, hostile_array(c, (batch, width), dtype, "grad_output")], "g?")
        segment = c.choice([None, None, "auto", hostile_int(c, (1, 4), "segment"), "bogus"], "segment")
        return Call(kind, vg.gradient_profile, (stack, x, grad_output),
                    {"backend": backend, "segment": segment, **time_keywords},
                    (*COMPUTE_NAMES, "grad_output", "segment"))
    if kind in ("jvp", "vjp"):
        k = c.integer(1, 3, "k")
        shape = c.choice([(batch, k, width), (k, width)], "vector shape")
        vectors = hostile_array(c, shape, dtype, "vectors")
        out = _out_for(c, (batch, k, width), dtype, [x, vectors])
        name = "tangents" if kind == "jvp" else "cotangents"
        return Call(kind, getattr(vg, kind), (stack, x, vectors),
                    {"out": out, "backend": backend, **time_keywords}, (*COMPUTE_NAMES, name))
    if kind == "jacobian":
        out = _out_for(c, (batch, width, width), dtype, [x])
        return Call(kind, vg.jacobian, (stack, x), {"out": out, "backend": backend, **time_keywords},
                    COMPUTE_NAMES)
    if kind == "singular_values":
        return Call(kind, vg.singular_values, (stack, x), {"backend": backend, **time_keywords},
                    COMPUTE_NAMES)
    k = c.choice([None, hostile_int(c, (1, max(1, width)), "k")], "k?")
    if time_keywords and c.choice([False, True], "warmup?"):
        warmup = hostile_int(c, (0, 3), "warmup")
        time_keywords["warmup"] = 64 if type(warmup) is int and warmup > 64 else warmup  # as steps
    return Call(kind, vg.lyapunov_exponents, (stack, x, k), {"backend": backend, **time_keywords},
                (*COMPUTE_NAMES, "k", "warmup"))


def _time_keywords(c, model, batch: int, dtype) -> dict:
    """steps= / inputs= for a recurrent model (sometimes for a stack too, which must refuse them)."""
    recurrent = getattr(model, "kind", None) == "recurrent"
    if not recurrent and _kind(c, ["steps"], "time keywords") == "good":
        return {}
    # not huge: a recurrent model runs up to 10**8 steps if asked (vgcore._recurrent.MAX_STEPS; its time,
    # not a fault); beyond, it refuses naming steps (tests/test_reliability.py, defect 5)
    steps = hostile_int(c, (1, 6), "steps")
    keywords = {"steps": 64 if type(steps) is int and steps > 64 else steps}
    input_width = getattr(model, "input_width", 0)
    if input_width and c.choice([True, True, False], "inputs?"):
        steps = keywords["steps"] if type(keywords["steps"]) is int and 0 < keywords["steps"] < 50 else 3
        keywords["inputs"] = hostile_array(c, (batch, steps, input_width), dtype, "inputs")
    return keywords


def _stats_call(c, pool: list) -> Call:
    stack = pool[c.integer(0, len(pool) - 1, "stack index")]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            x = np.random.default_rng(0).standard_normal((2, stack.state_width)).astype(stack.dtype)
            steps = {"steps": 4} if getattr(stack, "kind", None) == "recurrent" else {}
            if getattr(stack, "input_width", 0):
                steps["inputs"] = np.ones((2, 4, stack.input_width), stack.dtype)
            profile = vg.gradient_profile(stack, x, backend="numpy", **steps)
        except ValueError:  # a stack whose forward pass overflows: any object stands in
            profile = None
    profile = c.choice([profile, profile, profile, None, "profile", np.zeros(3)], "profile")
    name = c.choice(["chi", "depth_scale", "vanishing_depth", "imbalance", "summary"], "stats function")
    kwargs = {}
    if name == "vanishing_depth":
        kwargs["threshold"] = hostile_real(c, (1e-6, 0.5), "threshold")
    if name == "imbalance":
        kwargs["k"] = c.choice([None, hostile_int(c, (1, 4), "k")], "k?")
    # statistics are documented to be NaN / inf where a fit is undefined: no NaN rule here
    return Call(f"stats.{name}", getattr(stats, name), (profile,), kwargs, ("profile", "threshold", "k"),
                nan_allowed=lambda result: True)


def _theory_call(c) -> Call:
    name = c.choice(["fixed_point", "chi1", "depth_scales", "critical_sigma_w", "q_map", "c_map"],
                    "theory function")
    activation = hostile_name(c, tuple(vg.ACTIVATIONS), "activation")
    sigma_w = hostile_real(c, (0.3, 3.0), "sigma_w")
    sigma_b = hostile_real(c, (0.0, 1.0), "sigma_b")
    names = ("activation", "sigma_w", "sigma_b", "q", "c")
    if name == "critical_sigma_w":
        return Call("theory.critical_sigma_w", theory.critical_sigma_w, (activation, sigma_b), {}, names)
    if name == "q_map":
        return Call("theory.q_map", theory.q_map, (activation, hostile_real(c, (0.0, 5.0), "q"), sigma_w,
                                                   sigma_b), {}, names)
    if name == "c_map":
        return Call("theory.c_map", theory.c_map, (activation, hostile_real(c, (-1.0, 1.0), "c"), sigma_w,
                                                   sigma_b), {}, names)

    def no_fixed_point(result):  # depth scales are NaN exactly where q* is infinite (documented)
        return name == "depth_scales" and math.isinf(theory.fixed_point(activation, sigma_w, sigma_b))

    return Call(f"theory.{name}", getattr(theory, name), (activation, sigma_w, sigma_b), {}, names,
                nan_allowed=no_fixed_point)


def _sweep_call(c) -> Call:
    grid = {}
    for key in ("depth", "width"):
        good = c.integer(1, 3, key)
        grid[key] = (c.choice([good, [good], [1, good + 1]], f"grid {key}")
                     if _kind(c, ["bad"], key) == "good"
                     else c.choice([hostile_int(c, (1, 3), key), {1, 2}, [], [1, 1]], f"grid {key}"))
    if c.choice([False, True], "sigma_w?"):
        grid["sigma_w"] = c.choice([hostile_real(c, (0.5, 2.0), "sigma_w"), [0.5, 1.5],
                                    hostile_name(c, ("he", "critical"), "scheme")], "grid w")
    if _kind(c, ["extra"], "extra key?") == "extra":
        extra = c.choice(["colour", "activation", "norm"], "extra")
        grid[extra] = c.choice(["tanh", "pre", 3], "extra value")
    if _kind(c, ["bad"], "seeds") == "good":
        seeds = c.choice([1, 2, [0, 2**63 - 1], [5]], "seeds")
    else:
        seeds = c.choice([hostile_int(c, (1, 2), "seeds"), [2**63], {1}, [1, 1], "1", [-1], 10**9], "seeds")
    grid = grid if _kind(c, ["bad"], "grid") == "good" else c.choice([None, [1], "grid"], "grid")
    return Call("sweep", vg.sweep, (grid,),
                {"batch": hostile_int(c, (1, 3), "batch"), "seeds": seeds, "progress": False,
                 "backend": hostile_name(c, ("numpy", "cpu"), "backend"),
                 "chunk_size": c.choice([None, hostile_int(c, (1, 4), "chunk_size")], "chunk")},
                ("grid", "batch", "seeds", "backend", "chunk_size", "client", "store", "resume", "progress",
                 "grid, seeds", "grid['depth'], grid['width'], batch"), nan_allowed=lambda result: True)


# --------------------------------------------------------------------------
# Running one call


def _snapshot(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, dict)):
        import copy

        return copy.deepcopy(value)
    return None


def _same(before: Any, after: Any) -> bool:
    if isinstance(before, np.ndarray):
        return (before.shape == after.shape and before.dtype == after.dtype
                and (before.dtype == object or np.array_equal(before, after, equal_nan=True)))
    if before is None:
        return True
    return before == after


def _all_finite_inputs(values: list) -> bool:
    for value in values:
        if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return False
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            return False
    return True


def _has_nan(result: Any) -> bool:
    if isinstance(result, np.ndarray):
        return result.dtype.kind in "fc" and bool(np.isnan(result).any())
    if isinstance(result, (float, np.floating)):
        return math.isnan(result)
    if isinstance(result, tuple):
        return any(_has_nan(item) for item in result)
    if isinstance(result, vg.Profile):
        return any(_has_nan(np.asarray(getattr(result, name)))
                   for name in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"))
    return False




def names_an_argument(message: str, names: tuple[str, ...]) -> bool:
    """Whether an error message starts with argument names of the call (``"x: ..."``)."""
    head = message.split(":", 1)[0].strip()
    parts = [part.strip() for part in head.split(",")]
    allowed = set(names)
    return bool(head) and (head in allowed
                           or all(part in allowed or part.startswith("grid[") for part in parts))


def run_call(call: Call) -> tuple[str, str | None]:
    """(outcome, problem): outcome "accepted" / "refused"; problem None or a description of a violation."""
    inputs = [*call.args, *call.kwargs.values()]
    snapshots = [_snapshot(value) for value in inputs]
    finite = _all_finite_inputs(inputs)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            result = call.function(*call.args, **call.kwargs)
    except (ValueError, TypeError) as error:
        outcome, problem = "refused", None
        if not names_an_argument(str(error), call.argument_names):
            problem = f"{type(error).__name__} naming no argument: {str(error)[:160]}"
    except Exception as error:  # every other exception is what the campaign counts
        outcome, problem = "crashed", f"{type(error).__name__}: {str(error)[:160]}"
    else:
        outcome, problem = "accepted", None
        if finite and _has_nan(result) and not call.nan_allowed(result):
            problem = "NaN from finite input"
        elif not finite and call.name in ("Stack", "forward", "gradient_profile", "jvp", "vjp", "jacobian",
                                          "singular_values", "lyapunov_exponents"):
            nonfinite_array = any(
                isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all()
                for v in inputs if v is not call.kwargs.get("out"))
            if nonfinite_array:
                problem = "accepted a NaN / inf array"
    for value, before in zip(inputs, snapshots, strict=True):
        if before is not None and value is not call.kwargs.get("out") and not _same(before, value):
            problem = "input modified"
    return outcome, problem
