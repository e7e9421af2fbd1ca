"""The backend interface, the registry of implementations, and the one dispatcher.

Three backends implement every computation of vgcore:

- "cpu":   the compiled kernels (vgcore._ext), driven by ``cpu_<kind>`` modules;
- "numpy": the plain NumPy reference, ``reference_<kind>`` modules (what the tests trust);
- "cuda":  the CuPy mirror on an NVIDIA GPU, ``cuda_<kind>`` modules (CuPy imported lazily);

and "auto" picks "cuda" for a model whose parameters live on a GPU, else "cpu".

An implementation is a *module* with the functions of :class:`Backend`, for one
model kind (vgcore._model): :data:`IMPLEMENTATIONS` maps (kind, backend) to the
module's import path, and :func:`implementation` is the only place a backend
is chosen — the public API (vgcore._api), the spectra and the sweeps all call
it.  Inputs reaching an implementation are validated: C-contiguous, in the
model's dtype, on the model's device, and ``out`` (when given) of the right
shape and dtype, overlapping nothing.  See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

from vgcore import _validation as check
from vgcore._model import Problem

__all__ = ["BACKENDS", "IMPLEMENTATIONS", "Backend", "implementation", "resolve"]

#: Backend names a caller may pass ("auto" resolves to one of the others).
BACKENDS = check.BACKENDS

#: (model kind, backend) -> module implementing :class:`Backend` for that kind.
IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("stack", "cpu"): "vgcore.backends.cpu_stack",
    ("stack", "numpy"): "vgcore.backends.reference_stack",
    ("stack", "cuda"): "vgcore.backends.cuda_stack",
    ("recurrent", "cpu"): "vgcore.backends.cpu_recurrent",
    ("recurrent", "cuda"): "vgcore.backends.cuda_recurrent",
    ("recurrent", "numpy"): "vgcore.backends.reference_recurrent",
    ("batchnorm", "cpu"): "vgcore.backends.cpu_batchnorm",
    ("batchnorm", "numpy"): "vgcore.backends.reference_batchnorm",
    ("batchnorm", "cuda"): "vgcore.backends.cuda_batchnorm",
}


class Backend(Protocol):
    """The computations every (kind, backend) implementation provides, with these signatures.

    ``problem`` is a validated :class:`vgcore._model.Problem`; ``out`` a
    validated output array or None (then the implementation allocates).
    Arrays come back on the device of the model's parameters.
    """

    def forward(self, problem: Problem, out: Any) -> Any:
        """The model's output for inputs ``problem.x``: (B, state_width)."""
        ...

    def gradient_profile(self, problem: Problem, grad_output: Any, segment: int | None) -> dict:
        """``log_grad_norm`` (B, depth+1), ``log_weight_grad_norm``, ``saturation``, ``dead`` (depth,).

        ``segment``: keep activations every ``segment`` layers and recompute the
        rest (a memory mode; implementations without one ignore it).
        """
        ...

    def gradient_profiles(self, problems: Sequence[Problem], grad_outputs: Sequence[Any]) -> list[dict]:
        """:meth:`gradient_profile` of many problems at once (the sweeps' chunk runner)."""
        ...

    def jvp(self, problem: Problem, tangents: Any, out: Any) -> Any:
        """J(x_b) v for tangents (B, k, n) or (k, n): (B, k, n)."""
        ...

    def vjp(self, problem: Problem, cotangents: Any, out: Any) -> Any:
        """J(x_b)^T u for cotangents (B, k, n) or (k, n): (B, k, n)."""
        ...

    def jacobian(self, problem: Problem, out: Any) -> Any:
        """d output / d x per sample: (B, n, n)."""
        ...

    def singular_values(self, problem: Problem) -> Any:
        """Singular values of each sample's Jacobian: (B, n), descending."""
        ...

    def lyapunov_log_growth(self, problem: Problem, k: int) -> Any:
        """Unsorted sums over the counted depth of log|R_ii| of k renormalised directions: (B, k) float64."""
        ...


#: The functions of :class:`Backend`, for tests that walk the interface.
COMPUTATIONS: tuple[str, ...] = (
    "forward", "gradient_profile", "gradient_profiles", "jvp", "vjp", "jacobian", "singular_values",
    "lyapunov_log_growth",
)


def resolve(backend: Any, model: Any) -> str:
    """The concrete backend ("cpu", "numpy" or "cuda") for ``backend`` and the model's device.

    Raises
    ------
    TypeError, ValueError
        Naming ``backend``: not a string, unknown, or a host backend for a model on the GPU.
    """
    name = check.check_backend(backend)
    on_gpu = model.device == "cuda"
    if name == "auto":
        return "cuda" if on_gpu else "cpu"
    if on_gpu and name != "cuda":
        raise ValueError(f"backend: {name!r} runs on host arrays but the model lives on the GPU; "
                         "use backend='cuda' or 'auto'")
    return name


def implementation(model: Any, backend: Any = "auto") -> ModuleType:
    """The module implementing :class:`Backend` for ``model``'s kind on ``backend``.

    Raises
    ------
    ValueError
        Naming ``backend``: unknown, not available here (no CuPy / GPU, with the
        reason), or not implemented for this kind of model.
    """
    name = resolve(backend, model)
    path = IMPLEMENTATIONS.get((model.kind, name))
    if path is None:
        raise ValueError(f"backend: {name!r} does not implement {model.kind} models; available: "
                         f"{sorted(b for k, b in IMPLEMENTATIONS if k == model.kind)}")
    try:
        return importlib.import_module(path)
    except ImportError as error:
        if name == "cuda":
            raise ValueError(f"backend: 'cuda' is not available here ({error})") from error
        raise
