"""The gradient monitor: per-layer gradient norms of a PyTorch model at every training step."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from vgcore._findings import (
    Clipping,
    Finding,
    GradientHistory,
    check_optional_max_norm,
    check_positive_int,
)
from vgcore.torch.layers import check_model, resolve_layers

__all__ = ["GradientMonitor"]

logger = logging.getLogger("vgcore.torch")

# The engine's end-of-backward callback queue: what DistributedDataParallel uses to run
# work once every gradient of a backward pass has been accumulated.
_ENGINE = torch.autograd.Variable._execution_engine

_NO_STEP_HINT = (
    "run a backward pass (each one ends a step until monitor.step() is first called), or call "
    "monitor.step() after each optimizer step (or pass optimizer= to the constructor)"
)


class GradientMonitor:
    """Per-layer gradient norms of a PyTorch model during training.

    The first and the last parameter of each layer get a post-accumulate-grad
    hook (``Tensor.register_post_accumulate_grad_hook``), which fires once
    that parameter's ``.grad`` holds the gradient accumulated so far.  The
    first hook to fire in a backward pass queues one callback with the
    autograd engine, which runs when the pass ends, once every gradient has
    been accumulated; it takes the norms of all the watched parameters'
    gradients in one fused ``torch._foreach_norm`` on their device and files
    them there, with no host synchronisation.  Being tensor-level, the hooks
    see exactly what the optimizer will see: in-place activations
    (``nn.ReLU(inplace=True)``), which break module backward hooks, do not
    matter.  (A Python hook on every parameter added about 1% to a CPU
    training step in bench/bench_monitor.py; two per layer catch every
    backward pass that reaches the layer.)

    Steps
    -----
    A step's norm of a parameter is that of its ``.grad`` at the end of the
    step's last backward pass: with gradient accumulation (several backward
    passes per step), the norm of the summed gradient.  Gradients zeroed or
    clipped after the backward passes do not change it, so the recorded
    norms are the pre-clip ones.  Where steps end:

    - ``optimizer`` given: after every ``optimizer.step()`` (a step
      post-hook);
    - :meth:`step` called: there, once per optimizer step, after the step's
      backward pass(es) and before the next step's first one (the usual
      place: right after ``optimizer.step()``);
    - neither: **every backward pass ends a step**, so that a monitor
      attached to a training loop that knows nothing of it still records
      (``step_on_backward=True``).  The history is never silently empty.

    Mixing the last two: the first call to :meth:`step` switches the monitor
    to explicit steps for good, and the backward passes before it are taken
    as the micro-batches of that first step: the rows they recorded are
    replaced by one, step 0, holding the gradient as it stood at the last of
    them (the accumulated one, or the last batch's if the gradients were
    zeroed in between).  So a loop that calls :meth:`step` after each
    optimizer step records the same history with or without accumulation;
    call it from the first step on, since earlier rows are merged away.

    The step's per-layer norms are kept on the device and copied to the host
    in one transfer every ``every`` steps (and whenever :attr:`history`,
    :meth:`profile`, :meth:`check`, :meth:`clipping` or :meth:`plot` is
    used).  Every step is recorded; ``every`` only sets how often the host
    waits for the device.

    Mixed precision: pass the ``torch.amp.GradScaler`` as ``scaler`` and the
    recorded norms are those of the unscaled gradients: each backward pass's
    norms are divided by the scale in force during that pass (read from the
    scaler's scale tensor, without synchronisation).  A step the scaler skips
    for inf/NaN gradients is recorded with its non-finite norms when
    :meth:`step` is called explicitly, and not at all with ``optimizer=``
    (``optimizer.step()`` is then not called).

    Parameters
    ----------
    model : torch.nn.Module
        The model to watch.
    layers : None, sequence or mapping, optional
        How to group parameters into layers; see :func:`vgcore.torch.resolve_layers`.
    every : int, default 1
        Copy the recorded norms to the host every ``every`` steps.
    optimizer : torch.optim.Optimizer, optional
        If given, :meth:`step` runs automatically after each
        ``optimizer.step()`` (an optimizer step post-hook).
    scaler : torch.amp.GradScaler, optional
        The loss scaler of mixed-precision training, whose scale is divided
        out of the norms.
    max_norm : float, optional
        The run's gradient-clipping threshold (clip by total norm, as
        ``torch.nn.utils.clip_grad_norm_``): the default of :meth:`clipping`,
        and :meth:`check` then reports ``"clipping"`` when most steps are
        clipped.  The monitor never clips.
    step_on_backward : bool, optional
        Whether every backward pass ends a step until :meth:`step` is first
        called.  Default: True unless ``optimizer`` is given or
        ``hooks=False``.  The framework callbacks pass False.
    hooks : bool, default True
        Measure at the end of every backward pass (hooks).  ``False``: no
        hook; the gradients are measured when :meth:`measure` is called, or
        else by :meth:`step` (as ``.grad`` stands then, so before
        ``zero_grad``).

    Attributes
    ----------
    layer_names : list of str
        The layers, input -> output; the columns of :attr:`history` (before
        ``total``).
    steps : int
        Steps ended so far (recorded or not).
    max_norm : float or None
        The clipping threshold given.

    Notes
    -----
    A layer whose parameters all have ``requires_grad=False`` is *frozen*:
    its norm is NaN.  A layer with a trainable parameter but no gradient
    this step (zero, or not reached by the backward pass) has norm 0.
    Parameters frozen when the monitor starts are hooked too, and counted
    once unfrozen.

    Norms are computed in float32 (float64 for float64 gradients).  The
    end-of-backward callback uses the autograd engine's ``queue_callback``,
    as ``DistributedDataParallel`` does; under DDP the recorded norms are
    those of each rank's local gradients, before the all-reduce.

    Examples
    --------
    >>> with GradientMonitor(model, optimizer=optimizer) as monitor:   # doctest: +SKIP
    ...     for batch in loader:
    ...         loss_fn(model(batch)).backward()
    ...         optimizer.step()
    ...         optimizer.zero_grad()
    ...     print(monitor.check())
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any = None,
        every: int = 1,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        max_norm: float | None = None,
        step_on_backward: bool | None = None,
        hooks: bool = True,
    ) -> None:
        check_model(model)
        self.every = check_positive_int(every, "every")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.max_norm = check_optional_max_norm(max_norm)
        if not isinstance(hooks, bool):
            raise TypeError(f"hooks: expected a bool, got {type(hooks).__name__}")
        if step_on_backward is None:
            step_on_backward = optimizer is None and hooks
        elif not isinstance(step_on_backward, bool):
            raise TypeError(
                f"step_on_backward: expected a bool or None, got {type(step_on_backward).__name__}"
            )
        elif step_on_backward and not hooks:
            raise ValueError("step_on_backward: needs hooks=True (without hooks no backward pass is seen)")
        grouped = resolve_layers(model, layers)
        self._history = GradientHistory(list(grouped), max_norm=self.max_norm, logger=logger,
                                        empty_hint=self._empty_hint)
        self.model = model
        self.layer_names: list[str] = list(grouped)
        self._scaler = scaler
        self._params: list[nn.Parameter] = []
        self._layer_of: list[int] = []
        self._layer_params: list[list[int]] = []
        for layer_index, params in enumerate(grouped.values()):
            indices = []
            for p in params:
                indices.append(len(self._params))
                self._params.append(p)
                self._layer_of.append(layer_index)
            self._layer_params.append(indices)
        self._index_of = {id(p): i for i, p in enumerate(self._params)}
        self._hooks = hooks
        self._step_on_backward = step_on_backward
        self._auto_rows = 0  # rows recorded by backward passes ending steps, before step() is called
        self._handles: list[Any] = []
        if hooks:
            # Trigger hooks on the first and last parameter of each layer only: the callback they
            # queue measures every parameter, and a Python call per parameter and backward pass
            # costs about 1% of a small CPU training step (bench/bench_monitor.py).
            triggers = sorted({i for indices in self._layer_params for i in (indices[0], indices[-1])})
            self._handles = [_register_hook(self._params[i], self._on_grad) for i in triggers]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.step()))
        self.steps = 0
        # whether every watched parameter was frozen at the last step that recorded nothing
        self._all_frozen_at_empty_step = False
        self._closed = False
        # per backward pass
        self._callback_queued = False
        # per step (device tensors are created on first use, on the gradients' device)
        self._param_sq: torch.Tensor | None = None
        self._reached: set[int] = set()
        self._gather_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._subset_cache: dict[tuple[int, ...], list[int]] = {}
        self._layer_index: torch.Tensor | None = None
        # recorded, not yet on the host: (step, layer norms on device, frozen layer indices)
        self._pending: list[tuple[int, torch.Tensor, tuple[int, ...]]] = []

    # -- hooks ------------------------------------------------------------

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            try:
                _ENGINE.queue_callback(self._end_of_backward)
            except RuntimeError:  # not inside an engine-run backward pass: measure right away
                self._end_of_backward()

    def _end_of_backward(self) -> None:
        """Measure every watched gradient once the backward pass has accumulated them all."""
        self._callback_queued = False
        if self._closed:
            return
        measured = self._measure(range(len(self._params)), None)
        if measured and self._step_on_backward:
            self._end_step()
            self._auto_rows += 1

    def _measure(self, indices: Any, scale: Any) -> bool:
        """File the norms of the given watched parameters' current gradients; whether any was measured."""
        with torch.no_grad():
            measured: list[int] = []
            grads: list[torch.Tensor] = []
            sparse: dict[int, torch.Tensor] = {}
            for i in indices:
                p = self._params[i]
                grad = p.grad
                if grad is None or not p.requires_grad:
                    continue
                if grad.is_sparse:
                    sparse[i] = torch.linalg.vector_norm(grad.coalesce().values(), dtype=_wide(grad.dtype))
                else:
                    measured.append(i)
                    grads.append(grad)
            if not grads and not sparse:
                return False
            if grads:
                norms = self._norms(grads)
                if sparse:
                    extra = torch.stack(list(sparse.values())).to(norms.device, norms.dtype)
                    norms = torch.cat([norms, extra])
            else:
                norms = torch.stack(list(sparse.values()))
            measured.extend(sparse)
            if scale is not None:
                norms = norms / (scale.to(norms.device) if isinstance(scale, torch.Tensor) else float(scale))
            elif self._scaler is not None and self._scaler.is_enabled():
                scaler_scale = getattr(self._scaler, "_scale", None)
                norms = norms / (
                    scaler_scale.to(norms.device)
                    if isinstance(scaler_scale, torch.Tensor)
                    else float(self._scaler.get_scale())
                )
            if self._param_sq is None:
                # float64 when the model's gradients are, else float32
                self._param_sq = torch.zeros(len(self._params), dtype=norms.dtype, device=norms.device)
                self._layer_index = torch.tensor(self._layer_of, device=norms.device)
            squares = norms.to(self._param_sq).square()
            if not sparse and len(measured) == len(self._params):  # the usual case: all, in order
                self._param_sq.copy_(squares)
            else:
                key = tuple(measured)
                gather = self._gather_cache.get(key)
                if gather is None:
                    gather = torch.tensor(key, device=self._param_sq.device)
                    self._gather_cache[key] = gather
                self._param_sq.index_copy_(0, gather, squares)
            self._reached.update(measured)
        return True

    @staticmethod
    def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
        """Euclidean norms of a list of dense gradients, on the first one's device.

        float64 gradients give float64 norms, all others float32 (half
        precision is accumulated in float32, where its norms cannot overflow).
        """
        device = grads[0].device
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for position, grad in enumerate(grads):
            groups.setdefault((grad.device, grad.dtype), []).append(position)
        out_dtype = torch.float64 if any(dtype == torch.float64 for _, dtype in groups) else torch.float32

        def norms_of(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.stack(torch._foreach_norm(tensors, 2, dtype=_wide(dtype))).to(device, out_dtype)

        if len(groups) == 1:
            return norms_of(grads, grads[0].dtype)
        out = torch.empty(len(grads), dtype=out_dtype, device=device)
        for (_, dtype), positions in groups.items():
            out[torch.tensor(positions, device=device)] = norms_of([grads[p] for p in positions], dtype)
        return out

    def measure(self, parameters: Any = None, *, scale: Any = None) -> None:
        """Measure the watched gradients now, as the end of a backward pass does.

        For monitors without hooks (``hooks=False``), and for frameworks that
        hand over the final gradients of a step at one point (the Lightning
        callback measures in ``on_before_optimizer_step``, after unscaling
        and before clipping).  A later measurement of a parameter in the same
        step replaces the earlier one.

        Parameters
        ----------
        parameters : iterable of torch.Tensor, optional
            Only the watched ones among these (e.g. one optimizer's
            parameters); default all watched parameters.
        scale : float or torch.Tensor, optional
            A loss scale the gradients still carry, divided out of the norms
            (default: the monitor's ``scaler``, if any).

        Raises
        ------
        RuntimeError
            The monitor is closed.
        """
        if self._closed:
            raise RuntimeError("GradientMonitor.measure: the monitor is closed")
        if parameters is None:
            indices: Any = range(len(self._params))
        else:
            ids = tuple(id(p) for p in parameters)
            indices = self._subset_cache.get(ids)
            if indices is None:
                indices = sorted(self._index_of[i] for i in set(ids) if i in self._index_of)
                self._subset_cache[ids] = indices
        self._measure(indices, scale)

    # -- steps ------------------------------------------------------------

    def step(self) -> None:
        """End the current step and record its per-layer norms.

        Call once per optimizer step, after its backward pass(es) (or pass
        ``optimizer`` to the constructor to have it called for you).  A step
        in which no backward pass reached any watched parameter is counted
        but not recorded.  The first call switches a monitor whose backward
        passes ended steps to explicit steps (see the class docstring).
        Without hooks, a step in which :meth:`measure` was not called
        measures the gradients as they stand.

        Raises
        ------
        RuntimeError
            The monitor is closed.
        """
        if self._closed:
            raise RuntimeError("GradientMonitor.step: the monitor is closed")
        if self._step_on_backward:
            self._step_on_backward = False
            auto_rows, self._auto_rows = self._auto_rows, 0
            if auto_rows and not self._reached:
                # the backward passes so far were this first step's micro-batches: one row, step 0
                self._flush()
                self._history.merge_last(auto_rows, step=0)
                self.steps = 1
                return
        if not self._hooks and not self._reached:
            self._measure(range(len(self._params)), None)
        self._end_step()

    def _end_step(self) -> None:
        step = self.steps
        self.steps += 1
        if not self._reached or self._param_sq is None:
            self._all_frozen_at_empty_step = not any(p.requires_grad for p in self._params)
            return
        with torch.no_grad():
            layer_sq = self._param_sq.new_zeros(len(self.layer_names))
            layer_sq.index_add_(0, self._layer_index, self._param_sq)
            layer_norm = layer_sq.sqrt_()
            self._param_sq.zero_()
        frozen: tuple[int, ...] = ()
        if len(self._reached) < len(self._params):
            reached_layers = {self._layer_of[i] for i in self._reached}
            frozen = tuple(
                layer
                for layer, indices in enumerate(self._layer_params)
                if layer not in reached_layers and not any(self._params[i].requires_grad for i in indices)
            )
        self._reached = set()
        self._pending.append((step, layer_norm, frozen))
        if len(self._pending) >= self.every:
            self._flush()

    def _empty_hint(self) -> str:
        """What to say when a result is asked for and no step is recorded: what happened so far."""
        if not self.steps:
            return _NO_STEP_HINT
        ended = f"{self.steps} step{'s' if self.steps != 1 else ''} ended"
        if self._all_frozen_at_empty_step:
            names = self.layer_names
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} layers)" if len(names) > 6 else "")
            return (
                f"{ended}, but every watched parameter is frozen (requires_grad=False), so no "
                f"gradient was recorded; frozen layers: {shown}. Unfreeze a layer, or watch "
                "trainable ones (layers=)"
            )
        return (
            f"{ended}, but no backward pass reached a watched parameter before any of them "
            "(their .grad was None); run the backward pass before the step ends"
        )

    def _flush(self) -> None:
        if not self._pending:
            return
        host = torch.stack([norms for _, norms, _ in self._pending]).cpu().numpy().astype(np.float64)
        for row, (step, _, frozen) in zip(host, self._pending, strict=True):
            mask = np.zeros(len(self.layer_names), dtype=bool)
            mask[list(frozen)] = True
            self._history.append(step, row, mask)
        self._pending = []

    # -- results ----------------------------------------------------------

    @property
    def recorded(self) -> GradientHistory:
        """The recorded steps as a framework-free :class:`vgcore._findings.GradientHistory`."""
        self._flush()
        return self._history

    @property
    def history(self) -> Any:
        """Recorded per-layer gradient norms: a pandas DataFrame.

        One row per recorded step (index ``step``, counting from 0), one
        column per layer in layer order, then ``total``, the step's total
        norm over the watched layers (what clipping by total norm compares
        with ``max_norm``, over these parameters).  Values are Euclidean
        norms of the (unscaled, pre-clip) gradients, NaN for frozen layers.
        """
        return self.recorded.history

    def profile(self, window: int = 1) -> dict[str, Any]:
        """The last recorded steps' per-layer curve as vgcore statistics.

        See :meth:`vgcore._findings.GradientHistory.profile` (the keys of
        :func:`vgcore.stats.summary` on the active layers' log norms, plus
        ``imbalance_k``, ``step``, ``total_norm``, ``log_global_norm``,
        ``layers``, ``grad_norm`` and ``frozen``).

        Parameters
        ----------
        window : int, default 1
            Geometric mean of each layer's norm over the last ``window``
            recorded steps.

        Returns
        -------
        dict

        Raises
        ------
        RuntimeError
            No step has been recorded.
        TypeError, ValueError
            ``window`` is not a positive integer.
        """
        return self.recorded.profile(window)

    def check(
        self,
        *,
        imbalance_threshold: float = 10.0,
        max_norm: float = 1e3,
        window: int = 1,
        growth_threshold: float = 10.0,
        log: bool | logging.Logger = False,
    ) -> list[Finding]:
        """Verdicts on the last recorded steps, naming the layers concerned.

        ``frozen``, ``dead``, ``exploding`` (non-finite norms, a total norm
        above ``max_norm``, a total norm growing exponentially over the
        window, or gradients growing towards the input), ``vanishing``, and
        ``clipping`` when the monitor has a ``max_norm`` and most of the
        window's steps exceed it; see
        :meth:`vgcore._findings.GradientHistory.check` for the rules.

        Parameters
        ----------
        imbalance_threshold : float, default 10
            Ratio of top to bottom gradient norms above which gradients are
            called vanishing (and below whose inverse, exploding).
        max_norm : float, default 1e3
            Total gradient norm above which gradients are called exploding
            (the clipping threshold is the constructor's ``max_norm``).
        window : int, default 1
            Judge the last ``window`` recorded steps.
        growth_threshold : float, default 10
            Growth of the total norm across the window called exploding.
        log : bool or logging.Logger, default False
            Also emit each finding as a warning through this logger (True:
            the ``"vgcore.torch"`` logger).

        Returns
        -------
        list of Finding
            Empty when all is well.

        Raises
        ------
        RuntimeError
            No step has been recorded.
        TypeError, ValueError
            A threshold is not a positive number, ``window`` not a positive
            integer, or ``log`` neither a bool nor a Logger.
        """
        return self.recorded.check(
            imbalance_threshold=imbalance_threshold,
            max_norm=max_norm,
            window=window,
            growth_threshold=growth_threshold,
            log=log,
        )

    def clipping(self, max_norm: float | None = None, *, window: int | None = None) -> Clipping:
        """Fraction of the recorded steps clipping to ``max_norm`` scales down, and their mean coefficient.

        A step is clipped when its total norm (``history["total"]``) exceeds
        ``max_norm``; its gradients are then multiplied by ``max_norm /
        total``.

        Parameters
        ----------
        max_norm : float, optional
            The threshold; default the constructor's ``max_norm``.
        window : int, optional
            Only the last ``window`` recorded steps.

        Returns
        -------
        Clipping
            ``(fraction, mean_coefficient)``; the mean is NaN when no step
            is clipped.

        Raises
        ------
        ValueError
            No ``max_norm`` here nor at construction, or not positive.
        RuntimeError
            No step has been recorded.
        """
        return self.recorded.clipping(max_norm, window=window)

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Gradient flow over steps: one line per layer, coloured input (dark) -> output (light).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Where to draw; a new figure's axes by default.
        log : bool, default True
            Logarithmic norm axis.

        Returns
        -------
        matplotlib.axes.Axes
        """
        return self.recorded.plot(ax, log=log)

    # -- lifetime ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (no more steps; the history stays readable)."""
        return self._closed

    @property
    def num_hooks(self) -> int:
        """Hooks this monitor holds (0 after :meth:`close`)."""
        return len(self._handles)

    def close(self) -> None:
        """Remove every hook; recorded history stays readable.  Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._flush()
        self._closed = True

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.num_hooks} hooks"
        layers = len(self.layer_names)
        return f"GradientMonitor({layers} layers, {self.steps} steps, every={self.every}, {state})"


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of ``dtype`` values is accumulated in: float64 stays, all else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _register_hook(param: nn.Parameter, hook: Any) -> Any:
    """A post-accumulate-grad hook on ``param``, frozen or not.

    PyTorch refuses the hook on a tensor with ``requires_grad=False``; it
    lives on the tensor, though, so registering it while ``requires_grad``
    is briefly on keeps it in place for when the parameter is unfrozen.
    """
    if param.requires_grad:
        return param.register_post_accumulate_grad_hook(hook)
    param.requires_grad_(True)
    try:
        return param.register_post_accumulate_grad_hook(hook)
    finally:
        param.requires_grad_(False)
