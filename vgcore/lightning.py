"""Lightning integration: per-layer gradient norms and findings of a ``lightning.pytorch`` run.

Install with ``pip install vgcore[lightning]``.  ``import vgcore`` never
imports Lightning; importing this module does (``lightning.pytorch``, or the
standalone ``pytorch_lightning`` where only that is installed).

>>> from vgcore.lightning import GradientMonitorCallback      # doctest: +SKIP
>>> callback = GradientMonitorCallback(every=10)
>>> trainer = lightning.pytorch.Trainer(callbacks=[callback], gradient_clip_val=1.0)
>>> trainer.fit(model)
>>> callback.monitor.history          # one row per optimizer step, one column per block, total
>>> callback.monitor.check(window=50)
"""

from __future__ import annotations

import logging
import math
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as error:  # exercised in a subprocess by the tests
        raise ImportError(
            "vgcore.lightning needs Lightning (lightning.pytorch), which is not installed: "
            "pip install vgcore[lightning]"
        ) from error

from vgcore._findings import Finding, check_optional_max_norm, check_positive_int
from vgcore.torch import GradientMonitor

__all__ = ["GradientMonitorCallback"]

logger = logging.getLogger("vgcore.lightning")

#: The kinds of finding counted in the metrics logged at the end of each epoch.
FINDING_KINDS = ("vanishing", "exploding", "dead", "frozen", "clipping")


class GradientMonitorCallback(pl.Callback):
    """A Lightning callback recording the per-layer gradient norms of every optimizer step.

    The gradients are measured in ``on_before_optimizer_step``, which
    Lightning calls once per optimizer step after the step's backward passes
    (with ``accumulate_grad_batches``, the gradient summed over the
    micro-batches), after mixed precision's loss scaler has unscaled them
    (``precision="16-mixed"``; ``"bf16-mixed"`` has no scaler) and before
    ``gradient_clip_val`` clips them: the recorded norms are those of the
    unscaled, accumulated, pre-clip gradients.  (An optimizer that unscales
    inside its own ``step()``, such as a fused one, hands over scaled
    gradients; the scale is then divided out here.)  With several
    optimizers (manual optimization), each one's parameters are measured at
    its own step, and a training batch in which any optimizer stepped makes
    one row.

    Every ``every`` recorded steps, the step's per-layer norms and their
    total are logged through each of the trainer's loggers as
    ``{prefix}{layer}`` and ``{prefix}total`` (frozen layers left out).  At
    the end of each training epoch the monitor's findings over the epoch's
    steps (``monitor.check(window=...)``) are written to the
    ``"vgcore.lightning"`` logger (a warning each), kept in
    :attr:`findings`, and summarised through the trainer's loggers as
    ``grad_findings/{kind}`` (how many findings of each kind: vanishing,
    exploding, dead, frozen, clipping) and ``grad_profile/imbalance`` /
    ``grad_profile/chi`` (see :meth:`vgcore.torch.GradientMonitor.profile`).

    Parameters
    ----------
    layers : None, sequence or mapping, optional
        How to group the LightningModule's parameters into layers; see
        :func:`vgcore.torch.resolve_layers` (default: the blocks of its
        largest ``nn.ModuleList``).
    every : int, default 1
        Log the per-layer norms every ``every`` recorded steps (the host
        waits for the device only then).
    max_norm : float, optional
        The clipping threshold for the monitor's ``clipping()`` and its
        ``"clipping"`` finding; default the trainer's ``gradient_clip_val``
        when it clips by norm.  The total compared with it is over the
        watched layers (all of the module's parameters only when the layers
        cover them all).
    prefix : str, default "grad_norm/"
        Prefix of the logged per-layer metric names.

    Attributes
    ----------
    monitor : vgcore.torch.GradientMonitor or None
        The monitor (created when fitting starts): ``.history``,
        ``.profile()``, ``.check()``, ``.clipping()``, ``.plot()``.
    findings : dict of int to list of Finding
        Each finished epoch's findings.

    Raises
    ------
    TypeError, ValueError
        ``every`` not a positive integer, ``max_norm`` not positive and
        finite, ``prefix`` not a string.
    """

    def __init__(
        self,
        layers: Any = None,
        every: int = 1,
        max_norm: float | None = None,
        *,
        prefix: str = "grad_norm/",
    ) -> None:
        super().__init__()
        self.every = check_positive_int(every, "every")
        self.max_norm = check_optional_max_norm(max_norm)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        self.layers = layers
        self.prefix = prefix
        self.monitor: GradientMonitor | None = None
        self.findings: dict[int, list[Finding]] = {}
        self._stepped = False
        self._epoch_first_row = 0

    # -- lifetime -----------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None and self.monitor.model is pl_module:
            return
        max_norm = self.max_norm
        clip = trainer.gradient_clip_val
        algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
        if max_norm is None and clip and algorithm.endswith("norm"):
            max_norm = float(clip)
        # no hooks: Lightning hands over the step's final gradients in on_before_optimizer_step
        self.monitor = GradientMonitor(pl_module, self.layers, self.every, max_norm=max_norm, hooks=False)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self._epoch_first_row = len(self.monitor.recorded)

    # -- measuring ----------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scale = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
        if scaler is not None and scaler.is_enabled() and unscales_itself:
            scale = scaler._scale  # Lightning left the unscaling to the optimizer's step
        self.monitor.measure(params, scale=scale)
        self._stepped = True

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped:
            self._end_step(trainer)

    def _end_step(self, trainer: Any) -> None:
        self._stepped = False
        monitor = self.monitor
        monitor.step()
        if monitor.steps % self.every == 0:
            recorded = monitor.recorded
            if len(recorded):
                row = recorded.last()
                metrics = {f"{self.prefix}{name}": float(value) for name, value in row.items()
                           if not math.isnan(value)}
                _log_metrics(trainer, metrics)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return
        if self._stepped:
            self._end_step(trainer)
        recorded = self.monitor.recorded
        rows = len(recorded) - self._epoch_first_row
        if rows <= 0:
            return
        epoch = trainer.current_epoch
        findings = recorded.check(window=rows)
        self.findings[epoch] = findings
        for finding in findings:
            logger.warning("epoch %d: %s", epoch, finding)
        if not findings:
            logger.info("epoch %d: no gradient findings over %d steps", epoch, rows)
        profile = recorded.profile(window=rows)
        metrics = {f"grad_findings/{kind}": float(sum(f.kind == kind for f in findings))
                   for kind in FINDING_KINDS}
        for key in ("imbalance", "chi"):
            if math.isfinite(profile[key]):
                metrics[f"grad_profile/{key}"] = float(profile[key])
        _log_metrics(trainer, metrics)


def _log_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Send metrics to every logger of the trainer, at its global step (rank zero only)."""
    if not metrics or not getattr(trainer, "is_global_zero", True):
        return
    for target in trainer.loggers:
        target.log_metrics(metrics, step=trainer.global_step)
