"""JAX / optax integration: per-layer gradient norms recorded inside a jitted training step.

Install with ``pip install vgcore[jax]`` (JAX and optax).  ``import vgcore``
never imports JAX; importing this module does.

:func:`monitor` is an optax ``GradientTransformation`` that passes the
updates through unchanged and keeps, in its state, the per-layer norms of
the updates it saw last.  Put it first in the chain so that it sees the
gradients themselves, before clipping and the optimizer's scaling::

    optimizer = optax.chain(vgcore.jax.monitor(), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    states = []
    for batch in batches:
        params, opt_state = train_step(params, opt_state, batch)
        states.append(opt_state)          # device arrays: no host sync here
    record = vgcore.jax.history(states, max_norm=1.0)
    record.history, record.profile(), record.check(window=len(states))

:func:`history` gives the same :class:`vgcore._findings.GradientHistory` the
PyTorch monitor files its steps in: the same DataFrame (one row per step,
one column per layer, then ``total``), statistics and findings.  Inside
``optax.MultiSteps`` (gradient accumulation) the monitor sees the
accumulated gradient once per optimizer step; the states of the micro-steps
in between repeat the last step and count once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as error:  # exercised in a subprocess by the tests
    raise ImportError(
        "vgcore.jax needs JAX and optax, which are not installed: pip install vgcore[jax]"
    ) from error

from vgcore._findings import TOTAL, GradientHistory, check_optional_max_norm

__all__ = ["MonitorState", "history", "monitor"]


@jax.tree_util.register_pytree_node_class
class MonitorState:
    """The state of :func:`monitor`: a pytree of two arrays, the layer names static.

    Attributes
    ----------
    count : jax.Array, int32, shape ()
        Updates seen so far (the step the norms belong to is ``count - 1``).
    norms : jax.Array, shape (L,)
        Per-layer Euclidean norms of the last updates seen (float32, or
        float64 when a leaf is), NaN before the first update.
    layer_names : tuple of str
        The layers, in order (static: part of the pytree's structure).
    """

    def __init__(self, count: Any, norms: Any, layer_names: tuple[str, ...]) -> None:
        self.count = count
        self.norms = norms
        self.layer_names = layer_names

    def tree_flatten(self) -> tuple[tuple[Any, Any], tuple[str, ...]]:
        return (self.count, self.norms), self.layer_names

    @classmethod
    def tree_unflatten(cls, layer_names: tuple[str, ...], children: tuple[Any, Any]) -> MonitorState:
        return cls(children[0], children[1], layer_names)

    def __repr__(self) -> str:
        return f"MonitorState({len(self.layer_names)} layers, count={self.count})"


def _key_name(key: Any) -> str:
    """One entry of a jax.tree_util key path as a plain string."""
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaf_paths(tree: Any) -> list[tuple[str, ...]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in leaves]


def _check_layers(layers: Any) -> Any:
    if layers is None or callable(layers):
        return layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(
            "layers: expected None, a sequence of names or a function of a key path, "
            f"got {type(layers).__name__}"
        )
    names = list(layers)
    if not names:
        raise ValueError("layers: the sequence is empty")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers: names must be str, got {type(name).__name__}")
    if len(set(names)) != len(names):
        raise ValueError("layers: duplicate layer names")
    return tuple(names)


def _assign(paths: list[tuple[str, ...]], layers: Any) -> tuple[tuple[str, ...], list[int | None]]:
    """(layer names, each leaf's layer index or None) for leaves with these key paths."""
    if not paths:
        raise ValueError("params: the parameter pytree has no leaves")
    if layers is None or callable(layers):
        names: list[str] = []
        index: dict[str, int] = {}
        layer_of: list[int | None] = []
        for path in paths:
            if layers is None:
                name = path[0] if path else "params"
            else:
                name = layers(path)
                if name is not None and not isinstance(name, str):
                    raise TypeError(
                        f"layers: the function must return a str or None, got {type(name).__name__}"
                    )
            if name is None:
                layer_of.append(None)
                continue
            if name not in index:
                index[name] = len(names)
                names.append(name)
            layer_of.append(index[name])
        if not names:
            raise ValueError("layers: the function assigned no parameter to a layer")
        return tuple(names), layer_of
    # names: a top-level key, or a "/"-separated path prefix ("params/Dense_0")
    top_level = {p[0] for p in paths if p}
    prefixes = [(name,) if name in top_level else tuple(name.split("/")) for name in layers]
    layer_of = []
    for path in paths:
        match = next((i for i, prefix in enumerate(prefixes) if path[: len(prefix)] == prefix), None)
        layer_of.append(match)
    used = set(layer_of)
    missing = [name for i, name in enumerate(layers) if i not in used]
    if missing:
        raise ValueError(f"layers: no parameter under {missing!r} (top-level keys or '/'-separated paths)")
    return tuple(layers), layer_of


def _norm_dtype(leaves: list[Any]) -> Any:
    return jnp.float64 if any(getattr(leaf, "dtype", None) == jnp.float64 for leaf in leaves) else jnp.float32


def monitor(layers: Any = None) -> optax.GradientTransformation:
    """An optax transformation recording per-layer gradient norms in its state, under ``jit``.

    The updates pass through unchanged; the state (:class:`MonitorState`)
    holds the number of updates seen and the per-layer norms of the last
    ones.  Place it first in an ``optax.chain`` to record the raw (pre-clip)
    gradients.  Collect the states over training (a list, or stacked by
    ``jax.lax.scan``) and read them with :func:`history`.

    Parameters
    ----------
    layers : None, sequence of str, or callable, optional
        ``None``: one layer per top-level entry of the parameter pytree, in
        ``jax.tree_util`` order (dict keys sorted, list items in order).  A
        sequence of names: those layers, in the order given, each a
        top-level key or a ``"/"``-separated key path prefix
        (``"params/Dense_0"``); leaves under none of them are not watched.
        A function of a leaf's key path (a tuple of str) returning its
        layer's name, or None to leave it out; layers in order of first
        appearance.  Layers are taken to run input -> output in this order.

    Returns
    -------
    optax.GradientTransformation

    Raises
    ------
    TypeError
        ``layers`` has the wrong type.
    ValueError
        ``layers`` is empty or has duplicates; at ``init``: a name matches
        no parameter, or the pytree has no leaves; at ``update``: the
        updates' structure gives other layers than ``init``'s parameters.
    """
    layers = _check_layers(layers)

    def init_fn(params: Any) -> MonitorState:
        names, _ = _assign(_leaf_paths(params), layers)
        if TOTAL in names:
            raise ValueError(f"layers: the name {TOTAL!r} is reserved for the total-norm column")
        dtype = _norm_dtype(jax.tree_util.tree_leaves(params))
        return MonitorState(jnp.zeros((), jnp.int32), jnp.full((len(names),), jnp.nan, dtype), names)

    def update_fn(updates: Any, state: MonitorState, params: Any = None) -> tuple[Any, MonitorState]:
        del params
        paths = _leaf_paths(updates)
        names, layer_of = _assign(paths, layers)
        if names != state.layer_names:
            raise ValueError(f"updates: their layers {names} differ from init's {state.layer_names}")
        leaves = jax.tree_util.tree_leaves(updates)
        dtype = state.norms.dtype
        squares: list[list[Any]] = [[] for _ in names]
        for leaf, layer in zip(leaves, layer_of, strict=True):
            if layer is not None:
                value = jnp.asarray(leaf)
                value = jnp.abs(value) if jnp.iscomplexobj(value) else value
                squares[layer].append(jnp.sum(jnp.square(value.astype(dtype))))
        layer_sq = jnp.stack([sum(parts) if parts else jnp.zeros((), dtype) for parts in squares])
        # Without the barrier XLA fuses these reductions into the next transformations' elementwise
        # passes, which then run slower: on CPU, chain(monitor(), adamw) cost 7-8 ms more than adamw
        # alone for 6.3M parameters, against 0-4 ms with it (bench/bench_monitor.py's model).
        updates, layer_sq = jax.lax.optimization_barrier((updates, layer_sq))
        return updates, MonitorState(state.count + 1, jnp.sqrt(layer_sq), state.layer_names)

    return optax.GradientTransformation(init_fn, update_fn)


def _monitor_states(state: Any, name: str) -> MonitorState:
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, MonitorState))
        if isinstance(leaf, MonitorState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{name}: expected an optimizer state holding exactly one vgcore.jax.monitor state, "
            f"found {len(found)}"
        )
    return found[0]


def history(states: Any, *, max_norm: float | None = None) -> GradientHistory:
    """The per-layer gradient history recorded by :func:`monitor`, with its statistics and findings.

    Parameters
    ----------
    states : sequence of optimizer states, or one stacked state
        The optimizer state after each step (the monitor's own state or any
        pytree holding exactly one, e.g. an ``optax.chain``'s tuple or an
        ``optax.MultiSteps`` state), in step order; or one state whose
        arrays are stacked over steps (``jax.lax.scan``'s output).  States
        repeating the previous one's count (the micro-steps of
        ``optax.MultiSteps``) and states before the first update are
        skipped.
    max_norm : float, optional
        The run's clipping threshold (``optax.clip_by_global_norm``), for
        ``clipping()`` and the ``"clipping"`` finding.

    Returns
    -------
    GradientHistory
        ``.history`` (pandas DataFrame: index ``step`` = count - 1, one
        column per layer, then ``total``), ``.profile(window)``,
        ``.check(...)``, ``.clipping(max_norm)``, ``.plot()``, as for
        :class:`vgcore.torch.GradientMonitor`.

    Raises
    ------
    TypeError
        ``states`` is not a sequence of states nor a state.
    ValueError
        A state holds no monitor state or more than one, the states' layers
        differ, or ``max_norm`` is not positive and finite.
    """
    max_norm = check_optional_max_norm(max_norm)
    if isinstance(states, (str, bytes)) or states is None:
        raise TypeError(f"states: expected optimizer states, got {type(states).__name__}")
    if isinstance(states, (list, tuple)) and not _holds_monitor_once(states):
        items = [_monitor_states(state, f"states[{i}]") for i, state in enumerate(states)]
    else:  # one state (an optax.chain's tuple included), possibly stacked over steps
        items = [_monitor_states(states, "states")]
    if not items:
        raise ValueError("states: no state given")
    names = items[0].layer_names
    counts: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for i, item in enumerate(items):
        if item.layer_names != names:
            raise ValueError(
                f"states[{i}]: its layers {item.layer_names} differ from the first state's {names}"
            )
    host = jax.device_get([(item.count, item.norms) for item in items])
    for count, norms in host:
        count = np.asarray(count).reshape(-1)
        norms = np.asarray(norms, dtype=np.float64).reshape(count.shape[0], len(names))
        counts.append(count)
        rows.append(norms)
    all_counts = np.concatenate(counts)
    all_rows = np.concatenate(rows)
    record = GradientHistory(names, max_norm=max_norm, empty_hint="no update in the states given")
    last = 0
    for count, row in zip(all_counts.tolist(), all_rows, strict=True):
        if count <= last:  # before the first update, or a repeat (MultiSteps' micro-steps)
            continue
        last = count
        record.append(count - 1, row)
    return record


def _holds_monitor_once(state: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, MonitorState))
    return sum(isinstance(leaf, MonitorState) for leaf in leaves) == 1

