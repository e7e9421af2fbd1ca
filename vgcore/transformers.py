"""Hugging Face integration: per-block gradient norms and findings of a ``transformers.Trainer`` run.

Install with ``pip install vgcore[transformers]``.  ``import vgcore`` never
imports transformers; importing this module does.

>>> from vgcore.transformers import GradientMonitorCallback           # doctest: +SKIP
>>> callback = GradientMonitorCallback()
>>> trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback])
>>> trainer.train()
>>> trainer.state.log_history[-2]["grad_norm/bert.encoder.layer.0"]
>>> callback.monitor.check(window=100)

Layer-wise learning-rate decay goes through the Trainer's ``optimizers``
argument: ``Trainer(..., optimizers=(torch.optim.AdamW(
vgcore.torch.llrd_param_groups(model, base_lr=2e-5, decay=0.8)), None))``;
the Trainer's learning-rate schedule then scales every group's rate alike.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as error:  # exercised in a subprocess by the tests
    raise ImportError(
        "vgcore.transformers needs Hugging Face transformers, which is not installed: "
        "pip install vgcore[transformers]"
    ) from error

from vgcore._findings import Finding, check_optional_max_norm, check_positive_int
from vgcore.torch import GradientMonitor

__all__ = ["GradientMonitorCallback"]

logger = logging.getLogger("vgcore.transformers")

#: The kinds of finding counted in the metrics logged after each epoch.
FINDING_KINDS = ("vanishing", "exploding", "dead", "frozen", "clipping")


class GradientMonitorCallback(TrainerCallback):
    """A ``transformers`` TrainerCallback recording the per-block gradient norms of every optimizer step.

    When training begins, a :class:`vgcore.torch.GradientMonitor` is attached
    to the Trainer's model; its layers default to the blocks of the model's
    largest ``nn.ModuleList`` (``encoder.layer.k`` of BERT-like models,
    ``model.layers.k`` of decoder-only ones), named by their module names
    (``bert.encoder.layer.0``, ...).  The monitor measures each block's
    gradient at the end of every backward pass, before the Trainer clips
    (``max_grad_norm``) and steps, so the recorded norms are pre-clip; with
    ``gradient_accumulation_steps``, those of the gradient accumulated over
    the step's micro-batches; with fp16 mixed precision, unscaled (the
    loss scaler of Accelerate's optimizer wrapper is divided out).  One row
    per optimizer step.

    Whenever the Trainer logs training metrics (every ``logging_steps``),
    the latest step's per-block norms and their total join them as
    ``{prefix}{block}`` and ``{prefix}total``: in ``trainer.state.log_history``
    and in what the Trainer reports to (``report_to``: the callback places
    itself before the reporting integrations when training begins, so that
    they receive the norms too).  ``every`` makes the Trainer log every
    ``every`` steps as well.  At the end of each epoch the monitor's findings
    over the epoch's steps are written to the ``"vgcore.transformers"``
    logger (a warning each) and kept in :attr:`findings`; counts of each kind
    (``grad_findings/vanishing``, ...) and the epoch's
    ``grad_profile/imbalance`` and ``grad_profile/chi`` join the next log
    (after the last epoch, the Trainer's end-of-training summary).

    Parameters
    ----------
    layers : None, sequence or mapping, optional
        The blocks; see :func:`vgcore.torch.resolve_layers`.
    every : int, optional
        Also log every ``every`` optimizer steps (default: only when the
        Trainer logs anyway).
    max_norm : float, optional
        The clipping threshold for the monitor's ``clipping()`` and its
        ``"clipping"`` finding; default the Trainer's ``max_grad_norm``
        (when positive).  The total compared with it is over the watched
        blocks.
    prefix : str, default "grad_norm/"
        Prefix of the logged per-block metric names.

    Attributes
    ----------
    monitor : vgcore.torch.GradientMonitor or None
        The monitor, once training has begun.
    findings : dict of int to list of Finding
        Each finished epoch's findings (epochs counted from 0).

    Raises
    ------
    TypeError, ValueError
        ``every`` not a positive integer, ``max_norm`` not positive and
        finite, ``prefix`` not a string.
    """

    def __init__(
        self,
        layers: Any = None,
        every: int | None = None,
        max_norm: float | None = None,
        *,
        prefix: str = "grad_norm/",
    ) -> None:
        self.every = None if every is None else check_positive_int(every, "every")
        self.max_norm = check_optional_max_norm(max_norm)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        self.layers = layers
        self.prefix = prefix
        self.monitor: GradientMonitor | None = None
        self.findings: dict[int, list[Finding]] = {}
        self._logged_rows = 0
        self._epoch_first_row = 0
        self._epochs = 0
        self._pending_metrics: dict[str, float] = {}

    # -- lifetime -----------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        _move_before_reporters(self, sys._getframe(1))
        if model is None:
            raise RuntimeError("GradientMonitorCallback: the Trainer passed no model to on_train_begin")
        if self.monitor is not None and self.monitor.model is model and not self.monitor.closed:
            return
        if self.monitor is not None:
            self.monitor.close()  # a new train() call after the last one ended: a fresh history
        max_norm = self.max_norm
        if max_norm is None and args.max_grad_norm is not None and args.max_grad_norm > 0:
            max_norm = float(args.max_grad_norm)
        # Accelerate's optimizer wrapper holds the fp16 loss scaler (None otherwise)
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        self.monitor = GradientMonitor(
            model, self.layers, max_norm=max_norm, scaler=scaler, step_on_backward=False,
            every=self.every or max(1, int(getattr(args, "logging_steps", 1) or 1)),
        )

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self._epoch_first_row = len(self.monitor.recorded)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()  # hooks off; the history stays

    # -- steps --------------------------------------------------------------

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.monitor is None:
            return None
        # after the optimizer step and zero_grad: the hooks measured at the end of the backward passes
        self.monitor.step()
        if self.every is not None and state.global_step % self.every == 0:
            control.should_log = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        recorded = self.monitor.recorded
        rows = len(recorded) - self._epoch_first_row
        epoch = self._epochs
        self._epochs += 1
        if rows <= 0:
            return
        findings = recorded.check(window=rows)
        self.findings[epoch] = findings
        for finding in findings:
            logger.warning("epoch %d: %s", epoch, finding)
        if not findings:
            logger.info("epoch %d: no gradient findings over %d steps", epoch, rows)
        profile = recorded.profile(window=rows)
        self._pending_metrics.update(
            {f"grad_findings/{kind}": float(sum(f.kind == kind for f in findings)) for kind in FINDING_KINDS}
        )
        for key in ("imbalance", "chi"):
            if math.isfinite(profile[key]):
                self._pending_metrics[f"grad_profile/{key}"] = float(profile[key])

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.monitor is None or logs is None:
            return
        # the epoch's findings join whichever log comes next (the end-of-training summary included);
        # the norms only logs of training steps
        metrics = dict(self._pending_metrics)
        self._pending_metrics.clear()
        recorded = self.monitor.recorded
        if _is_training_log(logs) and len(recorded) > self._logged_rows:
            self._logged_rows = len(recorded)
            row = recorded.last()
            metrics.update(
                {f"{self.prefix}{name}": float(value) for name, value in row.items() if not math.isnan(value)}
            )
        if not metrics:
            return
        # the reporters after this callback (all of them, once it has moved) read `logs`;
        # log_history holds a copy made before the callbacks ran
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def _is_training_log(logs: dict) -> bool:
    """A log of training steps' metrics (not evaluation's, nor the end-of-training summary)."""
    return "loss" in logs or "grad_norm" in logs


def _move_before_reporters(callback: GradientMonitorCallback, caller: Any) -> None:
    """Put ``callback`` before the Trainer's reporting integrations (TensorBoard, W&B, ...).

    The Trainer runs user callbacks after the reporting ones, so metrics a
    user callback adds to the logs in ``on_log`` would reach no reporter.
    The handler calling this event is the caller's ``self``; a new list
    (not the one being iterated) takes the callback ahead of the first
    callback that is not one of the Trainer's own flow and printing
    callbacks.  Where the handler cannot be found, nothing moves and the
    norms reach ``log_history`` only.
    """
    handler = caller.f_locals.get("self") if caller is not None else None
    callbacks = getattr(handler, "callbacks", None)
    if not isinstance(handler, transformers.trainer_callback.CallbackHandler) or not isinstance(
        callbacks, list
    ):
        return
    own = (
        transformers.trainer_callback.DefaultFlowCallback,
        transformers.trainer_callback.ProgressCallback,
        transformers.trainer_callback.PrinterCallback,
    )
    others = [c for c in callbacks if c is not callback]
    position = next((i for i, c in enumerate(others) if not isinstance(c, own)), len(others))
    handler.callbacks = [*others[:position], callback, *others[position:]]
