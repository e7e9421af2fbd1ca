"""vgcore.jax: the optax monitor in jitted JAX training loops on the CPU."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("pandas")
import jax.numpy as jnp  # noqa: E402

from vgcore.jax import MonitorState, history, monitor  # noqa: E402


def init_mlp(seed: int, depth: int, width: int) -> list[dict]:
    """``depth`` blocks then a head, as a list (top-level entries "0" .. str(depth)); torch's Linear init."""
    rng = np.random.default_rng(seed)  # NumPy draws: eager jax.random costs seconds for 40 arrays
    bound = 1.0 / math.sqrt(width)
    params = [
        {"w": rng.uniform(-bound, bound, (width, width)), "b": rng.uniform(-bound, bound, width)}
        for _ in range(depth)
    ]
    params.append({"w": rng.uniform(-bound, bound, (width, 1)), "b": rng.uniform(-bound, bound, 1)})
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)


def make_loss(residual: bool, activation=jax.nn.sigmoid):
    def loss(params, x):
        for block in params[:-1]:
            if residual:
                u = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
                x = x + activation(u @ block["w"] + block["b"])
            else:
                x = activation(x @ block["w"] + block["b"])
        return jnp.mean(jnp.square(x @ params[-1]["w"] + params[-1]["b"]))

    return loss


def hand_norms(grads: list[dict]) -> np.ndarray:
    """Per-entry Euclidean norms of a list of gradient dicts, in float64 NumPy."""
    return np.array([
        math.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in entry.values()))
        for entry in grads
    ])


def test_jitted_loop_records_the_pre_clip_gradient_norms():
    params = init_mlp(0, depth=4, width=8)
    loss = make_loss(residual=False, activation=jnp.tanh)
    clip = 1e-3
    optimizer = optax.chain(monitor(), optax.clip_by_global_norm(clip), optax.sgd(0.5))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x):
        grads = jax.grad(loss)(params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    states, expected = [], []
    for seed in range(3):
        x = jax.random.normal(jax.random.PRNGKey(10 + seed), (16, 8))
        expected.append(hand_norms(jax.grad(loss)(params, x)))  # by hand, at the step's parameters
        params, opt_state = train_step(params, opt_state, x)
        states.append(opt_state)
    record = history(states, max_norm=clip)
    frame = record.history
    assert list(frame.columns) == ["0", "1", "2", "3", "4", "total"]
    assert list(frame.index) == [0, 1, 2]
    np.testing.assert_allclose(frame[record.layer_names].to_numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(frame["total"], np.sqrt(np.square(expected).sum(axis=1)), rtol=1e-5)
    assert (frame["total"] > 100 * clip).all()  # clipped after the monitor saw them
    fraction, coefficient = record.clipping()
    assert fraction == 1.0
    assert coefficient == pytest.approx(float(np.mean(clip / frame["total"])), rel=1e-12)


def test_multisteps_accumulation_gives_one_row_per_optimizer_step_of_the_mean_gradient():
    params = init_mlp(1, depth=3, width=6)
    loss = make_loss(residual=False, activation=jnp.tanh)
    optimizer = optax.MultiSteps(optax.chain(monitor(), optax.sgd(0.1)), every_k_schedule=2)
    opt_state = optimizer.init(params)
    update = jax.jit(optimizer.update)  # eager, MultiSteps would compile its branches on every call
    batches = [jax.random.normal(jax.random.PRNGKey(20 + i), (8, 6)) for i in range(4)]
    states, expected = [], []
    for pair in (batches[:2], batches[2:]):
        grads = [jax.grad(loss)(params, x) for x in pair]
        expected.append(hand_norms(jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)))
        for g in grads:
            updates, opt_state = update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            states.append(opt_state)
    record = history(states)
    assert list(record.history.index) == [0, 1]  # the micro-steps' states count once
    np.testing.assert_allclose(record.norms, expected, rtol=1e-5)


def test_layers_by_names_in_the_order_given_by_path_and_by_function():
    blocks = {"b0": jnp.full(3, 2.0), "b1": jnp.full(3, 3.0)}
    params = {"embed": jnp.ones(4), "blocks": blocks, "head": jnp.ones(1)}
    grads = params
    by_top = monitor()
    assert by_top.init(params).layer_names == ("blocks", "embed", "head")  # jax.tree_util's (sorted) order
    named = monitor(layers=["embed", "blocks/b0", "blocks/b1", "head"])
    _, state = named.update(grads, named.init(params))
    assert state.layer_names == ("embed", "blocks/b0", "blocks/b1", "head")
    np.testing.assert_allclose(state.norms, [2.0, 2 * math.sqrt(3), 3 * math.sqrt(3), 1.0], rtol=1e-6)
    by_function = monitor(layers=lambda path: None if path[0] == "head" else path[-1])
    _, state = by_function.update(grads, by_function.init(params))
    assert state.layer_names == ("b0", "b1", "embed")
    np.testing.assert_allclose(state.norms, [2 * math.sqrt(3), 3 * math.sqrt(3), 2.0], rtol=1e-6)


def test_states_stacked_by_scan_give_the_same_history():
    params = init_mlp(2, depth=3, width=6)
    loss = make_loss(residual=False, activation=jnp.tanh)
    optimizer = optax.chain(monitor(), optax.sgd(0.1))
    xs = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 6))

    def body(carry, x):
        params, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(loss)(params, x), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), opt_state

    _, stacked = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), xs))(params, optimizer.init(params))
    listed, state, p = [], optimizer.init(params), params
    for x in xs:
        updates, state = optimizer.update(jax.grad(loss)(p, x), state, p)
        p = optax.apply_updates(p, updates)
        listed.append(state)
    np.testing.assert_allclose(history(stacked).norms, history(listed).norms, rtol=1e-5)
    assert len(history(stacked)) == 4


def test_sigmoid_mlp_is_flagged_vanishing_and_its_residual_layernorm_twin_is_not():
    x = jax.random.normal(jax.random.PRNGKey(100), (64, 32))
    findings = {}
    blocks = [str(i) for i in range(20)]  # the 20 blocks, as the torch monitor's default layers
    for residual in (False, True):
        params = init_mlp(0, depth=20, width=32)
        optimizer = optax.chain(monitor(layers=blocks), optax.sgd(1e-3))
        grads = jax.grad(make_loss(residual))(params, x)  # eager: compiling 20 blocks costs more here
        _, state = optimizer.update(grads, optimizer.init(params))
        record = history([state])
        findings[residual] = record.check()
        if not residual:
            assert record.profile()["imbalance"] > 1e3
    assert [f.kind for f in findings[False]] == ["vanishing"]
    assert "0" in findings[False][0].layers and "19" not in findings[False][0].layers
    assert findings[True] == []


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="layers"):
        monitor(layers=3)
    with pytest.raises(ValueError, match="layers"):
        monitor(layers=[])
    with pytest.raises(ValueError, match="layers"):
        monitor(layers=["nope"]).init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="states"):
        history([optax.sgd(0.1).init({"a": jnp.ones(2)})])
    with pytest.raises(TypeError, match="states"):
        history("states")
    transform = monitor()
    state = transform.init({"a": jnp.ones(2)})
    assert isinstance(state, MonitorState)
    with pytest.raises(ValueError, match="updates"):
        transform.update({"b": jnp.ones(2)}, state)
    with pytest.raises(RuntimeError, match="no step recorded"):
        history([state]).profile()  # before any update


def test_without_jax_the_import_error_names_the_extra(monkeypatch):
    for name in ("jax", "optax"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "vgcore.jax")
    with pytest.raises(ImportError, match=r"pip install vgcore\[jax\]"):
        importlib.import_module("vgcore.jax")
