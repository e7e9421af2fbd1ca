"""PyTorch integration: per-layer gradient monitoring, alerts, layer-wise learning rates, freezing.

Install with ``pip install vgcore[torch]``.  ``import vgcore`` never imports
PyTorch; importing this module does.

- :class:`GradientMonitor` records, at every training step, the gradient
  norm of each *layer* (a group of parameters: by default the blocks of the
  model's largest ``nn.ModuleList``, as in transformer encoders), and turns
  the per-layer curve into vgcore's statistics (:mod:`vgcore.stats`) and
  findings: vanishing, exploding, dead and frozen layers.
- :func:`llrd_param_groups` builds optimizer parameter groups for layer-wise
  learning-rate decay, with a decay that can be derived from a measured
  gradient profile (:func:`auto_decay`).
- :func:`freeze_layers` freezes the embeddings and the first blocks.

Layers
------
A layer is a named group of parameters.  ``layers=None`` picks the blocks of
the model's largest ``nn.ModuleList`` (the one with the most children that
hold parameters; ties go to the one with more parameters): ``encoder.layer.0``
.. ``encoder.layer.11`` of a BERT, ``layers.0`` .. of an
``nn.TransformerEncoder``.  A model without a ``ModuleList`` of at least two
such children gets one layer per module that owns parameters directly (each
``nn.Linear``, ``nn.LayerNorm``, ...), in registration order.  Either way the
layers are assumed to be ordered input -> output, as PyTorch models register
them.  ``layers`` may also be a sequence of modules or qualified module names
(``"encoder.layer.3"``), or a mapping from layer names to modules, module
names or iterables of parameters.  A parameter listed in two layers counts in
the first.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "vgcore.torch needs PyTorch, which is not installed: pip install vgcore[torch]"
    ) from error

__all__ = [
    "Finding",
    "GradientMonitor",
    "auto_decay",
    "freeze_layers",
    "llrd_param_groups",
    "resolve_layers",
]

logger = logging.getLogger("vgcore.torch")

# The engine's end-of-backward callback queue: what DistributedDataParallel uses to run
# work once every gradient of a backward pass has been accumulated.
_ENGINE = torch.autograd.Variable._execution_engine


# --------------------------------------------------------------------------
# Validation helpers


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be at least 1, got {value}")
    return int(value)


def _check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name}: must be a positive finite number, got {value}")
    return value


# --------------------------------------------------------------------------
# Layer resolution


def _direct_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        with_params = [child for child in module if any(True for _ in child.parameters())]
        size = sum(p.numel() for p in module.parameters())
        if len(with_params) < 2:
            continue
        # strictly larger wins, so the outermost (first registered) of equal lists is kept
        if best is None or (len(with_params), size) > (best[0], best[1]):
            best = (len(with_params), size, name, module)
    return None if best is None else (best[2], best[3])


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _resolve_module(model: nn.Module, item: Any, name: str) -> tuple[str | None, nn.Module]:
    if isinstance(item, str):
        try:
            return item, model.get_submodule(item)
        except AttributeError:
            raise ValueError(f"{name}: model has no submodule {item!r}") from None
    if isinstance(item, nn.Module):
        return _module_name(model, item), item
    raise TypeError(f"{name}: expected an nn.Module or a module name, got {type(item).__name__}")


def resolve_layers(model: nn.Module, layers: Any = None) -> dict[str, list[nn.Parameter]]:
    """Group a model's parameters into named layers, ordered input -> output.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : None, sequence or mapping, optional
        ``None``: the blocks of the largest ``nn.ModuleList``, or else every
        module owning parameters directly (see the module docstring).  A
        sequence of ``nn.Module`` or qualified module names; a mapping from
        layer names to a module, a module name or an iterable of parameters.

    Returns
    -------
    dict of str to list of torch.nn.Parameter
        Layer name -> its parameters (each parameter in one layer only), in
        layer order.  Parameters with ``requires_grad=False`` are included.

    Raises
    ------
    TypeError
        ``model`` is not a module, or ``layers`` or one of its items has the
        wrong type.
    ValueError
        A module name does not exist, a layer holds no parameter, a
        parameter is not one of the model's, or the model has none.
    """
    _check_model(model)
    model_params = {id(p) for p in model.parameters()}
    if not model_params:
        raise ValueError("model: has no parameters")
    groups: list[tuple[str, list[nn.Parameter]]] = []
    if layers is None:
        found = _largest_module_list(model)
        if found is not None:
            prefix, blocks = found
            for index, block in enumerate(blocks):
                params = list(block.parameters())
                if params:
                    groups.append((f"{prefix}.{index}" if prefix else str(index), params))
        else:
            for name, module in model.named_modules():
                params = _direct_params(module)
                if params:
                    groups.append((name or type(module).__name__, params))
    elif isinstance(layers, Mapping):
        if not layers:
            raise ValueError("layers: the mapping is empty")
        for key, value in layers.items():
            if not isinstance(key, str):
                raise TypeError(f"layers: keys must be layer names (str), got {type(key).__name__}")
            if isinstance(value, (str, nn.Module)):
                params = list(_resolve_module(model, value, f"layers[{key!r}]")[1].parameters())
            elif isinstance(value, Iterable):
                params = list(value)
                for p in params:
                    if not isinstance(p, torch.Tensor):
                        raise TypeError(
                            f"layers[{key!r}]: expected parameters, got an item of type {type(p).__name__}"
                        )
            else:
                raise TypeError(
                    f"layers[{key!r}]: expected a module, a module name or parameters, "
                    f"got {type(value).__name__}"
                )
            groups.append((key, params))
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
        if not layers:
            raise ValueError("layers: the sequence is empty")
        for index, item in enumerate(layers):
            module_name, module = _resolve_module(model, item, f"layers[{index}]")
            groups.append((module_name or f"layer{index}", list(module.parameters())))
    else:
        raise TypeError(
            f"layers: expected None, a sequence of modules or a mapping of names, got {type(layers).__name__}"
        )

    seen: set[int] = set()
    result: dict[str, list[nn.Parameter]] = {}
    for name, params in groups:
        if name in result:
            raise ValueError(f"layers: duplicate layer name {name!r}")
        unique = []
        for p in params:
            if id(p) not in model_params:
                raise ValueError(f"layers[{name!r}]: holds a tensor that is not a parameter of model")
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError(f"layers[{name!r}]: holds no parameter (or only parameters of earlier layers)")
        result[name] = unique
    return result


def _split_outside(
    model: nn.Module, blocks: dict[str, list[nn.Parameter]]
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(embeddings, head): named parameters outside the blocks, before / after the first block's."""
    in_blocks = {id(p) for params in blocks.values() for p in params}
    before: list[tuple[str, nn.Parameter]] = []
    after: list[tuple[str, nn.Parameter]] = []
    reached = False
    for name, p in model.named_parameters():
        if id(p) in in_blocks:
            reached = True
        elif reached:
            after.append((name, p))
        else:
            before.append((name, p))
    return before, after


# --------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Finding:
    """One verdict of :meth:`GradientMonitor.check`.

    Attributes
    ----------
    kind : str
        ``"vanishing"``, ``"exploding"``, ``"dead"`` or ``"frozen"``.
    layers : tuple of str
        The layers concerned, in layer order.
    value : float
        The number behind the verdict: the imbalance (vanishing, exploding
        through depth), the total norm (exploding), 0 (dead), NaN (frozen).
    message : str
        A sentence for a human.
    """

    kind: str
    layers: tuple[str, ...]
    value: float
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# --------------------------------------------------------------------------
# The monitor


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

    A *step* ends when :meth:`step` is called, once per optimizer step, after
    the step's backward pass(es) and before the next step's first one (the
    usual place: right after ``optimizer.step()``); or automatically after
    every ``optimizer.step()`` when ``optimizer`` is given.  A step's norm of
    a parameter is that of its ``.grad`` at the end of the step's last
    backward pass: with gradient accumulation (several backward passes per
    step), the norm of the summed gradient.  Gradients zeroed or clipped
    after the backward passes do not change it.

    The step's per-layer norms are kept on the device and copied to the host
    in one transfer every ``every`` steps (and whenever :attr:`history`,
    :meth:`profile`, :meth:`check` or :meth:`plot` is used).  Every step is
    recorded; ``every`` only sets how often the host waits for the device.

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
        How to group parameters into layers; see :func:`resolve_layers`.
    every : int, default 1
        Copy the recorded norms to the host every ``every`` steps.
    optimizer : torch.optim.Optimizer, optional
        If given, :meth:`step` runs automatically after each
        ``optimizer.step()`` (an optimizer step post-hook).
    scaler : torch.amp.GradScaler, optional
        The loss scaler of mixed-precision training, whose scale is divided
        out of the norms.

    Attributes
    ----------
    layer_names : list of str
        The layers, input -> output; the columns of :attr:`history`.
    steps : int
        Steps ended so far (recorded or not).

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
    ) -> None:
        _check_model(model)
        self.every = _check_positive_int(every, "every")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
        grouped = resolve_layers(model, layers)
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
        # Trigger hooks on the first and last parameter of each layer only: the callback they
        # queue measures every parameter, and a Python call per parameter and backward pass
        # costs about 1% of a small CPU training step (bench/bench_monitor.py).
        triggers = sorted({i for indices in self._layer_params for i in (indices[0], indices[-1])})
        self._handles: list[Any] = [_register_hook(self._params[i], self._on_grad) for i in triggers]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.step()))
        self.steps = 0
        self._closed = False
        # per backward pass
        self._callback_queued = False
        # per step (device tensors are created on first use, on the gradients' device)
        self._param_sq: torch.Tensor | None = None
        self._reached: set[int] = set()
        self._gather_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._layer_index: torch.Tensor | None = None
        # recorded, not yet on the host: (step, layer norms on device, frozen layer indices)
        self._pending: list[tuple[int, torch.Tensor, tuple[int, ...]]] = []
        self._rows: list[np.ndarray] = []
        self._frozen_rows: list[np.ndarray] = []
        self._row_steps: list[int] = []
        self._frame: Any = None

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
        with torch.no_grad():
            measured: list[int] = []
            grads: list[torch.Tensor] = []
            sparse: dict[int, torch.Tensor] = {}
            for i, p in enumerate(self._params):
                grad = p.grad
                if grad is None or not p.requires_grad:
                    continue
                if grad.is_sparse:
                    sparse[i] = torch.linalg.vector_norm(grad.coalesce().values(), dtype=_wide(grad.dtype))
                else:
                    measured.append(i)
                    grads.append(grad)
            if not grads and not sparse:
                return
            if grads:
                norms = self._norms(grads)
                if sparse:
                    extra = torch.stack(list(sparse.values())).to(norms.device, norms.dtype)
                    norms = torch.cat([norms, extra])
            else:
                norms = torch.stack(list(sparse.values()))
            measured.extend(sparse)
            if self._scaler is not None and self._scaler.is_enabled():
                scale = getattr(self._scaler, "_scale", None)
                norms = norms / (
                    scale.to(norms.device)
                    if isinstance(scale, torch.Tensor)
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

    # -- steps ------------------------------------------------------------

    def step(self) -> None:
        """End the current step and record its per-layer norms.

        Call once per optimizer step, after its backward pass(es) (or pass
        ``optimizer`` to the constructor to have it called for you).  A step
        in which no backward pass reached any watched parameter is counted
        but not recorded.

        Raises
        ------
        RuntimeError
            The monitor is closed.
        """
        if self._closed:
            raise RuntimeError("GradientMonitor.step: the monitor is closed")
        step = self.steps
        self.steps += 1
        if not self._reached or self._param_sq is None:
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

    def _flush(self) -> None:
        if not self._pending:
            return
        host = torch.stack([norms for _, norms, _ in self._pending]).cpu().numpy().astype(np.float64)
        for row, (step, _, frozen) in zip(host, self._pending, strict=True):
            mask = np.zeros(len(self.layer_names), dtype=bool)
            mask[list(frozen)] = True
            row[mask] = np.nan
            self._rows.append(row)
            self._frozen_rows.append(mask)
            self._row_steps.append(step)
        self._pending = []
        self._frame = None

    # -- results ----------------------------------------------------------

    @property
    def history(self) -> Any:
        """Recorded per-layer gradient norms: a pandas DataFrame.

        One row per recorded step (index ``step``, counting from 0), one
        column per layer in layer order; values are Euclidean norms of the
        (unscaled) gradients, NaN for frozen layers.
        """
        import pandas as pd

        self._flush()
        if self._frame is None:
            data = np.array(self._rows) if self._rows else np.empty((0, len(self.layer_names)))
            self._frame = pd.DataFrame(
                data, index=pd.Index(self._row_steps, name="step", dtype="int64"), columns=self.layer_names
            )
        return self._frame.copy()

    def _window(self, window: Any) -> tuple[int, np.ndarray, np.ndarray]:
        """(last step, per-layer norms over the window, frozen mask)."""
        window = _check_positive_int(window, "window")
        self._flush()
        if not self._rows:
            raise RuntimeError(
                "GradientMonitor: no step recorded yet; call monitor.step() after each optimizer step "
                "(or pass optimizer= to the constructor)"
            )
        rows = np.array(self._rows[-window:])
        frozen_rows = np.array(self._frozen_rows[-window:])
        # geometric mean over the steps where the layer was not frozen; a zero makes it 0,
        # inf makes it inf, NaN (non-finite gradients) makes it NaN
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(frozen_rows, 0.0, np.log(rows))
            counts = (~frozen_rows).sum(axis=0)
            norms = np.exp(logs.sum(axis=0) / counts)
        frozen = counts == 0
        norms[frozen] = np.nan
        return self._row_steps[-1], norms, frozen

    def profile(self, window: int = 1) -> dict[str, Any]:
        """The last recorded step's per-layer curve as vgcore statistics.

        The statistics of :func:`vgcore.stats.summary` on the natural log of
        the per-layer norms of the *active* layers (finite, nonzero norm:
        neither frozen nor dead), ordered input -> output.  ``imbalance`` is
        taken with ``k = max(1, n // 4)`` for ``n`` active layers (the
        geometric-mean norm of the last k layers over that of the first k),
        so that 12 blocks compare blocks 10-12 with blocks 1-3.  With fewer
        than two active layers the statistics are NaN (``vanishing_depth``
        None).

        Parameters
        ----------
        window : int, default 1
            Use the geometric mean of each layer's norm over the last
            ``window`` recorded steps (those where it was not frozen), which
            steadies noisy small-batch curves.

        Returns
        -------
        dict
            ``chi``, ``depth_scale``, ``vanishing_depth`` (counted in active
            layers back from the top one), ``imbalance``, ``r2`` and the
            other keys of :func:`vgcore.stats.summary`, plus ``imbalance_k``,
            ``step`` (the last recorded step), ``total_norm`` (over the
            layers not frozen; inf or NaN if one of them is), ``layers``
            (the active layers' names), ``grad_norm`` (layer name -> norm,
            every layer, NaN when frozen) and ``frozen`` (frozen layers'
            names).

        Raises
        ------
        RuntimeError
            No step has been recorded.
        TypeError, ValueError
            ``window`` is not a positive integer.
        """
        step, norms, frozen = self._window(window)
        return self._statistics(step, norms, frozen)

    def _statistics(self, step: int, norms: np.ndarray, frozen: np.ndarray) -> dict[str, Any]:
        from vgcore import stats

        active = np.isfinite(norms) & (norms > 0)
        names = [n for n, a in zip(self.layer_names, active, strict=True) if a]
        k = max(1, len(names) // 4)
        if len(names) >= 2:
            log_norm = np.log(norms[active])
            result = dict(stats.summary(log_norm))
            # per-sample saturation and dead fractions are not measured here
            result.pop("mean_saturation", None)
            result.pop("mean_dead", None)
            result["imbalance"] = float(stats.imbalance(log_norm, k=k))
        else:
            result = {
                "chi": math.nan,
                "depth_scale": math.nan,
                "vanishing_depth": None,
                "imbalance": math.nan,
                "r2": math.nan,
                "chi_theory": math.nan,
            }
        watched = norms[~frozen]
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.sqrt(np.sum(np.square(watched))))
        result.update(
            imbalance_k=k,
            step=step,
            total_norm=total,
            layers=names,
            grad_norm=dict(zip(self.layer_names, norms.tolist(), strict=True)),
            frozen=[n for n, f in zip(self.layer_names, frozen, strict=True) if f],
        )
        return result

    def check(
        self,
        *,
        imbalance_threshold: float = 10.0,
        max_norm: float = 1e3,
        window: int = 1,
        log: bool | logging.Logger = False,
    ) -> list[Finding]:
        """Verdicts on the last recorded step, naming the layers concerned.

        - ``frozen``: layers whose parameters all have ``requires_grad=False``
          (never counted as vanishing or dead);
        - ``dead``: trainable layers whose gradient is exactly zero (or that
          the backward pass did not reach);
        - ``exploding``: layers with a non-finite norm; a total norm (over all
          layers) above ``max_norm``; or gradients that *grow* towards the
          input, imbalance below ``1 / imbalance_threshold``;
        - ``vanishing``: imbalance (of the active layers, see :meth:`profile`)
          above ``imbalance_threshold``; the finding names the layers whose
          norm is more than ``imbalance_threshold`` times below the top
          layers' geometric mean.

        Parameters
        ----------
        imbalance_threshold : float, default 10
            Ratio of top to bottom gradient norms above which gradients are
            called vanishing (and below whose inverse, exploding).
        max_norm : float, default 1e3
            Total gradient norm above which gradients are called exploding.
        window : int, default 1
            Judge the geometric mean over the last ``window`` recorded steps.
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
        imbalance_threshold = _check_positive_float(imbalance_threshold, "imbalance_threshold")
        max_norm = _check_positive_float(max_norm, "max_norm")
        if not isinstance(log, (bool, logging.Logger)):
            raise TypeError(f"log: expected a bool or a logging.Logger, got {type(log).__name__}")
        step, norms, frozen = self._window(window)
        stats = self._statistics(step, norms, frozen)
        names = np.array(self.layer_names, dtype=object)
        findings: list[Finding] = []

        def add(kind: str, mask_or_names: Any, value: float, message: str) -> None:
            layers = tuple(names[mask_or_names]) if isinstance(mask_or_names, np.ndarray) else mask_or_names
            findings.append(Finding(kind, tuple(str(n) for n in layers), float(value), message))

        if frozen.any():
            add(
                "frozen",
                frozen,
                math.nan,
                f"{int(frozen.sum())} layer(s) frozen (requires_grad=False): {_names(names[frozen])}; "
                "not counted as vanishing",
            )
        nonfinite = ~np.isfinite(norms) & ~frozen
        if nonfinite.any():
            add(
                "exploding",
                nonfinite,
                math.inf,
                f"non-finite gradient norm at step {step} in {_names(names[nonfinite])}",
            )
        dead = (norms == 0) & ~frozen
        if dead.any():
            add("dead", dead, 0.0, f"zero gradient at step {step} in {_names(names[dead])}")
        total = stats["total_norm"]
        if math.isfinite(total) and total > max_norm:
            add(
                "exploding",
                names[~frozen].tolist(),
                total,
                f"total gradient norm {total:.3g} at step {step} exceeds max_norm={max_norm:g}",
            )
        imbalance = stats["imbalance"]
        k = stats["imbalance_k"]
        active = stats["layers"]
        if math.isfinite(imbalance) or imbalance == math.inf:
            if imbalance > imbalance_threshold:
                active_norms = np.array([stats["grad_norm"][n] for n in active])
                top = math.exp(float(np.log(active_norms[-k:]).mean()))
                weak = [n for n, v in zip(active, active_norms, strict=True) if v < top / imbalance_threshold]
                add(
                    "vanishing",
                    weak or active[:k],
                    imbalance,
                    f"gradient imbalance {imbalance:.3g} (last {k} over first {k} active layers) exceeds "
                    f"{imbalance_threshold:g}; {_names(weak or active[:k])} get over "
                    f"{imbalance_threshold:g}x smaller gradients than the top layers",
                )
            elif imbalance < 1.0 / imbalance_threshold:
                add(
                    "exploding",
                    active[:k],
                    imbalance,
                    f"gradients grow towards the input: imbalance {imbalance:.3g} (last {k} over first {k} "
                    f"active layers) is below 1/{imbalance_threshold:g}",
                )
        if log:
            target = log if isinstance(log, logging.Logger) else logger
            for finding in findings:
                target.warning("%s", finding)
        return findings

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
        import matplotlib.pyplot as plt

        frame = self.history
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(self.layer_names))))
        for colour, name in zip(colours, self.layer_names, strict=True):
            ax.plot(frame.index, frame[name], color=colour, label=name, linewidth=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm")
        ax.set_title("gradient flow per layer")
        if len(self.layer_names) <= 16:
            ax.legend(fontsize="x-small", ncol=2)
        return ax

    # -- lifetime ---------------------------------------------------------

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


def _names(names: Iterable[Any]) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 8 else ", ".join([*names[:4], "...", *names[-3:]])


# --------------------------------------------------------------------------
# Layer-wise learning-rate decay and freezing


def _profile_log_norms(profile: Any) -> np.ndarray | Any:
    """Per-layer mean log norms (1-D, input -> output) from a monitor, DataFrame or norms; or a Profile."""
    from vgcore import Profile

    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, GradientMonitor):
        frame = profile.history
        if frame.shape[0] == 0:
            raise ValueError("profile: the monitor has recorded no step yet")
        values = frame.to_numpy()
    elif hasattr(profile, "to_numpy") and getattr(profile, "ndim", 1) == 2:
        values = profile.to_numpy(dtype=np.float64)
    else:
        values = profile.detach().cpu().numpy() if isinstance(profile, torch.Tensor) else profile
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"profile: expected a GradientMonitor, a DataFrame, a vgcore.Profile or a 1-D array of "
                f"per-layer gradient norms, got {type(profile).__name__}"
            ) from None
        if values.ndim != 1:
            raise ValueError(f"profile: expected a 1-D array of per-layer norms, got shape {values.shape}")
        values = values[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(values)
    # per layer, the mean log norm over the recorded steps where it is finite and nonzero;
    # layers with none (frozen, dead) drop out
    finite = np.isfinite(logs)
    counts = finite.sum(axis=0)
    keep = counts > 0
    if keep.sum() < 2:
        raise ValueError("profile: needs finite, nonzero gradient norms for at least 2 layers")
    sums = np.where(finite, logs, 0.0).sum(axis=0)
    return sums[keep] / counts[keep]


def auto_decay(profile: Any, bounds: tuple[float, float] = (0.1, 1.0)) -> float:
    """The LLRD decay that scales each block's learning rate with its measured gradient size.

    With the per-layer norms ``g_l`` (input -> output), vgcore's ``chi`` is
    the per-layer ratio of squared norms ``g_l^2 / g_{l+1}^2`` of the
    least-squares line through ``log g_l``, so ``sqrt(chi)`` is the typical
    ratio of one block's gradient norm to the next one up.  The decay is

        decay = clip(sqrt(chi), *bounds)

    and ``lr_l = base_lr * decay^(L - 1 - l)`` then makes ``lr_l / lr_top``
    follow ``g_l / g_top``: under Adam-type optimizers, whose step size does
    not shrink with the gradient, each block's update stays in proportion to
    its gradient, as it would under plain SGD, instead of blocks with 30x
    smaller (noisier) gradients moving as far as the top ones.  Gradients
    growing towards the input (chi > 1) give decay 1 (uniform).

    Parameters
    ----------
    profile : GradientMonitor, pandas.DataFrame, vgcore.Profile or 1-D array-like
        A monitor (its whole history: per layer, the geometric mean over the
        recorded steps where the layer's norm is finite and nonzero), a
        history DataFrame, a vgcore Profile, or per-layer gradient norms
        (plain norms, not logs) ordered input -> output.  Frozen and dead
        layers are left out of the fit.
    bounds : (float, float), default (0.1, 1.0)
        Smallest and largest decay returned.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        ``profile`` or ``bounds`` has the wrong type.
    ValueError
        Fewer than two layers with finite, nonzero norms; bad bounds.
    """
    from vgcore import stats

    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds: expected a (low, high) pair, got {bounds!r}")
    low = _check_positive_float(bounds[0], "bounds[0]")
    high = _check_positive_float(bounds[1], "bounds[1]")
    if low > high:
        raise ValueError(f"bounds: low {low} exceeds high {high}")
    chi = float(stats.chi(_profile_log_norms(profile)))
    return min(max(math.sqrt(chi), low), high)


def llrd_param_groups(
    model: nn.Module,
    base_lr: float,
    decay: float | str = 0.5,
    layers: Any = None,
    *,
    profile: Any = None,
    decay_bounds: tuple[float, float] = (0.1, 1.0),
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for layer-wise learning-rate decay (LLRD).

    With blocks ``0 .. L-1`` (input -> output; see :func:`resolve_layers`):

    - block ``l`` gets ``lr = base_lr * decay ** (L - 1 - l)`` (its distance
      from the top block), so the top block gets ``base_lr``;
    - the *head*, parameters registered after the first block's and outside
      every block (pooler, classifier), gets ``base_lr``;
    - the *embeddings*, parameters registered before the first block's,
      get the bottom block's lr times decay: ``base_lr * decay ** L``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    base_lr : float
        Learning rate of the top block and the head.
    decay : float or "auto", default 0.5
        Per-block factor, positive.  ``"auto"``: :func:`auto_decay` of
        ``profile`` (``clip(sqrt(chi), *decay_bounds)`` of the measured
        gradient profile).
    layers : None, sequence or mapping, optional
        The blocks; see :func:`resolve_layers`.
    profile : GradientMonitor, DataFrame, vgcore.Profile or 1-D array-like, optional
        The measured gradient profile, required for ``decay="auto"``.
    decay_bounds : (float, float), default (0.1, 1.0)
        Bounds of the automatic decay.
    trainable_only : bool, default True
        Leave out parameters with ``requires_grad=False`` (groups left empty
        are dropped).

    Returns
    -------
    list of dict
        ``{"params": [...], "lr": float, "name": str}`` per group: the
        embeddings (name ``"embeddings"``), each block (its layer name), the
        head (``"head"``), input -> output.  Pass it to any
        ``torch.optim`` optimizer.

    Raises
    ------
    TypeError
        ``model``, ``base_lr``, ``decay``, ``layers`` or ``profile`` has the
        wrong type.
    ValueError
        ``base_lr`` or ``decay`` not positive and finite, ``decay="auto"``
        without ``profile``, or a bad layer specification.
    """
    _check_model(model)
    base_lr = _check_positive_float(base_lr, "base_lr")
    if isinstance(decay, str):
        if decay != "auto":
            raise ValueError(f"decay: expected a positive number or 'auto', got {decay!r}")
        if profile is None:
            raise ValueError("profile: decay='auto' needs a measured profile (a GradientMonitor or norms)")
        decay = auto_decay(profile, decay_bounds)
    else:
        decay = _check_positive_float(decay, "decay")
        if profile is not None:
            raise ValueError("profile: only used with decay='auto'")
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only: expected a bool, got {type(trainable_only).__name__}")
    blocks = resolve_layers(model, layers)
    embeddings, head = _split_outside(model, blocks)
    depth = len(blocks)

    def keep(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad or not trainable_only]

    groups = [{"params": keep(p for _, p in embeddings), "lr": base_lr * decay**depth, "name": "embeddings"}]
    for index, (name, params) in enumerate(blocks.items()):
        groups.append({"params": keep(params), "lr": base_lr * decay ** (depth - 1 - index), "name": name})
    groups.append({"params": keep(p for _, p in head), "lr": base_lr, "name": "head"})
    return [g for g in groups if g["params"]]


def freeze_layers(model: nn.Module, first: int, *, layers: Any = None, embeddings: bool = True) -> list[str]:
    """Freeze the first ``first`` blocks (and the embeddings) of a model.

    Sets ``requires_grad=False`` on every parameter of blocks ``0 ..
    first - 1`` (see :func:`resolve_layers`) and, when ``embeddings`` and
    ``first >= 1``, on the parameters registered before the first block's.
    Build the optimizer (or its parameter groups) afterwards, or the frozen
    parameters stay in it (harmless: they get no gradient).

    Parameters
    ----------
    model : torch.nn.Module
        The model, modified in place.
    first : int
        How many blocks to freeze, ``0 .. L``.
    layers : None, sequence or mapping, optional
        The blocks; see :func:`resolve_layers`.
    embeddings : bool, default True
        Also freeze the embeddings.

    Returns
    -------
    list of str
        The frozen blocks' names, with ``"embeddings"`` first when frozen.

    Raises
    ------
    TypeError
        ``model``, ``first`` or ``embeddings`` has the wrong type.
    ValueError
        ``first`` is negative or exceeds the number of blocks.
    """
    _check_model(model)
    if isinstance(first, bool) or not isinstance(first, numbers.Integral):
        raise TypeError(f"first: expected an integer, got {type(first).__name__}")
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings: expected a bool, got {type(embeddings).__name__}")
    blocks = resolve_layers(model, layers)
    if not 0 <= first <= len(blocks):
        raise ValueError(f"first: must lie in 0 .. {len(blocks)} (the number of blocks), got {first}")
    frozen: list[str] = []
    if first >= 1 and embeddings:
        outside, _ = _split_outside(model, blocks)
        for _, p in outside:
            p.requires_grad_(False)
        if outside:
            frozen.append("embeddings")
    for name, params in list(blocks.items())[: int(first)]:
        for p in params:
            p.requires_grad_(False)
        frozen.append(name)
    return frozen
