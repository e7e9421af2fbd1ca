"""What a model kind gives the dispatcher, and the validated arguments of one call.

A *model kind* is a class of models that vgcore computes on: the dense
:class:`vgcore.Stack` ("stack"; "batchnorm" when its layers batch-normalise)
and, as the project grows, recurrent cells.  The public computations
(vgcore._api) never test which kind they hold: they ask the model to
validate the call (:meth:`ModelKind.bind`), which returns a :class:`Problem`,
and hand that problem to the implementation that the backend registry
(vgcore.backends) names for the model's kind and the chosen backend.

Adding a kind therefore means: a class satisfying :class:`ModelKind`, one
implementation module per backend (each satisfying
:class:`vgcore.backends.Backend`), and lines in the registry.  The checklist is
in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Problem:
    """The validated arguments of one computation on one model.

    Attributes
    ----------
    model : ModelKind
        The model (a Stack, ...).
    x : array, shape (B, model.state_width)
        Inputs (a stack's x_0, a recurrent cell's initial state s_0): C-contiguous,
        in the model's dtype, on the model's device.
    depth : int
        Number of maps applied: a stack's layers L, a recurrent model's counted steps T.
    inputs : array, optional
        Per-step inputs of a recurrent model, (B, T + warmup, m); None otherwise.
    warmup : int
        Steps advanced before the counted ones (Lyapunov exponents of recurrent models).
    """

    model: Any
    x: Any
    depth: int
    inputs: Any = None
    warmup: int = 0

    @property
    def batch(self) -> int:
        """Number of samples B."""
        return int(self.x.shape[0])


class ModelKind(Protocol):
    """What the validator, the dispatcher and the backends need of a model.

    Attributes
    ----------
    kind : str
        The registry key of the model's implementations ("stack", "batchnorm", ...).
    dtype : numpy.dtype
        float32 or float64; every array of a call is cast to it.
    device : {"cpu", "cuda"}
        Where the parameters live; "auto" dispatch follows it.
    state_width : int
        Width of the inputs x (and of the output of ``forward``).
    parameters : tuple of arrays
        Every parameter array (same-device and output-overlap checks).
    seed : int or None
        The seed the parameters were drawn from, if any.
    chi_theory : float
        Mean-field theory's per-layer (per-step) gradient ratio; NaN where none applies.
        A profile carries ``chi_theory_at(problem)``, which may depend on the call.
    """

    kind: str
    dtype: np.dtype
    device: str
    state_width: int
    parameters: tuple
    seed: int | None
    chi_theory: float

    def config(self) -> dict:
        """What produced the model (for Profile.config and sweep rows)."""
        ...

    def bind(self, x: Any, *, name: str = "x", **call: Any) -> Problem:
        """Validate ``x`` and the call's keywords (``steps``, ``inputs``, ``warmup``) into a Problem."""
        ...

    def chi_theory_at(self, problem: Problem) -> float:
        """Theory's chi for one call (batch norm's depends on the batch size); usually chi_theory."""
        ...


def check_model(model: Any, name: str = "stack") -> ModelKind:
    """``model`` itself when it is a model kind, else TypeError naming the argument."""
    # The members are looked up on the class: an instance check would evaluate properties such as chi_theory.
    if not all(hasattr(type(model), member) for member in ("kind", "bind", "state_width", "parameters")):
        raise TypeError(f"{name}: expected a vgcore.Stack (or another vgcore model), "
                        f"got {type(model).__name__}")
    return model


def refuse_call_keywords(kind: str, call: Mapping[str, Any]) -> None:
    """TypeError naming the first call keyword (steps, inputs, warmup) that a kind does not take."""
    for keyword, value in call.items():
        if value is not None:
            raise TypeError(f"{keyword}: a {kind} model takes no {keyword!r} (it is for recurrent models)")
