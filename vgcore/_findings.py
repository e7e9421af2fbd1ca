"""Per-layer gradient-norm histories and their verdicts, free of any training framework.

A training run watched layer by layer gives a *step x layer* array of
gradient norms (layers ordered input -> output).  :class:`GradientHistory`
holds such an array and turns it into vgcore's statistics
(:mod:`vgcore.stats`) and findings: vanishing, exploding, dead, frozen and
clipped gradients.  The PyTorch monitor (:class:`vgcore.torch.GradientMonitor`),
the Lightning and Hugging Face callbacks and the JAX/optax monitor
(:func:`vgcore.jax.history`) all file their measurements here, so every
framework gets the same history, profile and findings.

A norm is NaN where the layer was *frozen* at that step (no trainable
parameter), 0 where it was trainable but got no gradient (*dead*), and
inf/NaN of a non-frozen layer where the gradients were non-finite.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Clipping", "Finding", "GradientHistory"]

#: The history column holding each step's total norm over the watched layers.
TOTAL = "total"


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be at least 1, got {value}")
    return int(value)


def check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name}: must be a positive finite number, got {value}")
    return value


def check_optional_max_norm(value: Any, name: str = "max_norm") -> float | None:
    return None if value is None else check_positive_float(value, name)


def names_list(names: Iterable[Any]) -> str:
    """Layer names for a message, shortened to the first four and last three beyond eight."""
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= 8 else ", ".join([*names[:4], "...", *names[-3:]])


@dataclass(frozen=True)
class Finding:
    """One verdict of ``check()``.

    Attributes
    ----------
    kind : str
        ``"vanishing"``, ``"exploding"``, ``"dead"``, ``"frozen"`` or
        ``"clipping"``.
    layers : tuple of str
        The layers concerned, in layer order.
    value : float
        The number behind the verdict: the imbalance (vanishing, exploding
        through depth), the total norm (exploding past ``max_norm``), the
        growth factor of the total norm over the window (exploding over
        time), inf (non-finite), 0 (dead), NaN (frozen), the fraction of
        steps clipped (clipping).
    message : str
        A sentence for a human.
    """

    kind: str
    layers: tuple[str, ...]
    value: float
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class Clipping(NamedTuple):
    """What clipping by total norm did over the recorded steps (:meth:`GradientHistory.clipping`).

    Attributes
    ----------
    fraction : float
        Fraction of the recorded steps whose total norm exceeds ``max_norm``
        (those a clip to ``max_norm`` scales down); NaN with no step.
    mean_coefficient : float
        Mean over those steps of the factor ``max_norm / total`` the clip
        multiplies their gradients by; NaN when no step is clipped.
    """

    fraction: float
    mean_coefficient: float


class GradientHistory:
    """Per-layer gradient norms over training steps, their statistics and findings.

    Parameters
    ----------
    layer_names : sequence of str
        The layers, ordered input -> output: the columns of :attr:`history`.
        ``"total"`` is reserved for the total-norm column.
    max_norm : float, optional
        The gradient-clipping threshold of the run (clip by total norm).
        Enables the ``"clipping"`` finding of :meth:`check` and is the
        default of :meth:`clipping`.
    logger : logging.Logger, optional
        Where ``check(log=True)`` writes (default: the ``"vgcore"`` logger).
    empty_hint : str or callable, optional
        Appended to the RuntimeError raised when nothing is recorded yet; a
        callable is called (no argument) at that moment for the text, so a
        monitor can say what has happened so far.

    Raises
    ------
    TypeError
        A layer name is not a string; ``max_norm`` not a real number.
    ValueError
        No layer, a duplicate name, a layer named ``"total"``, ``max_norm``
        not positive and finite.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        *,
        max_norm: float | None = None,
        logger: logging.Logger | None = None,
        empty_hint: str | Callable[[], str] = "",
    ) -> None:
        names = list(layer_names)
        if not names:
            raise ValueError("layers: no layer to watch")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"layers: layer names must be str, got {type(name).__name__}")
        if len(set(names)) != len(names):
            raise ValueError("layers: duplicate layer names")
        if TOTAL in names:
            raise ValueError(f"layers: the name {TOTAL!r} is reserved for the total-norm column")
        self.layer_names: list[str] = names
        self.max_norm = check_optional_max_norm(max_norm)
        self._logger = logger if logger is not None else logging.getLogger("vgcore")
        self._empty_hint = empty_hint
        self._rows: list[np.ndarray] = []
        self._frozen_rows: list[np.ndarray] = []
        self._steps: list[int] = []
        self._frame: Any = None

    # -- recording ----------------------------------------------------------

    def append(self, step: int, norms: Any, frozen: Any = None) -> None:
        """Record one step's per-layer norms.

        Parameters
        ----------
        step : int
            The step's index (the history's index; increasing).
        norms : array-like, shape (L,)
            Per-layer gradient norms, input -> output.
        frozen : array-like of bool, shape (L,), optional
            Layers frozen at this step (their norm is stored as NaN).
        """
        row = np.array(norms, dtype=np.float64).reshape(-1)
        if row.shape != (len(self.layer_names),):
            raise ValueError(
                f"norms: expected {len(self.layer_names)} per-layer norms, got shape {row.shape}"
            )
        mask = np.zeros(row.shape, dtype=bool) if frozen is None else np.asarray(frozen, dtype=bool).copy()
        row[mask] = np.nan
        self._rows.append(row)
        self._frozen_rows.append(mask)
        self._steps.append(int(step))
        self._frame = None

    def merge_last(self, count: int, step: int) -> None:
        """Replace the last ``count`` rows by the last one alone, filed as step ``step``.

        For a monitor that learns, after the fact, that several recorded
        backward passes were the micro-batches of one step (the last one
        holds their accumulated gradient).
        """
        if not 1 <= count <= len(self._rows):
            raise ValueError(f"count: must lie in 1 .. {len(self._rows)}, got {count}")
        keep = len(self._rows) - count
        last = (self._rows[-1], self._frozen_rows[-1])
        del self._rows[keep:], self._frozen_rows[keep:], self._steps[keep:]
        self._rows.append(last[0])
        self._frozen_rows.append(last[1])
        self._steps.append(int(step))
        self._frame = None

    def last(self) -> dict[str, float]:
        """The last recorded step as ``{layer: norm, ..., "total": norm}`` (cheap: no DataFrame).

        Raises
        ------
        RuntimeError
            No step has been recorded.
        """
        self._require_rows()
        row = self._rows[-1]
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.sqrt(np.square(row[~self._frozen_rows[-1]]).sum()))
        return {**dict(zip(self.layer_names, row.tolist(), strict=True)), TOTAL: total}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def norms(self) -> np.ndarray:
        """The recorded per-layer norms, shape (steps, L) (a copy)."""
        if not self._rows:
            return np.empty((0, len(self.layer_names)))
        return np.array(self._rows)

    @property
    def totals(self) -> np.ndarray:
        """Each recorded step's total norm over the layers not frozen, shape (steps,).

        ``sqrt(sum_l norm_l^2)``: the norm of all the watched gradients
        together, what clipping by total norm compares with ``max_norm``
        (inf or NaN when a layer's norm is).
        """
        if not self._rows:
            return np.empty(0)
        rows = np.array(self._rows)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.sqrt(np.where(np.array(self._frozen_rows), 0.0, np.square(rows)).sum(axis=1))

    @property
    def history(self) -> Any:
        """Recorded per-layer gradient norms: a pandas DataFrame.

        One row per recorded step (index ``step``), one column per layer in
        layer order (NaN where frozen), then ``total``: the step's total norm
        over the watched layers (see :attr:`totals`).
        """
        import pandas as pd

        if self._frame is None:
            data = np.column_stack([self.norms, self.totals]) if self._rows else np.empty((0, 0))
            self._frame = pd.DataFrame(
                data.reshape(len(self._rows), len(self.layer_names) + 1),
                index=pd.Index(self._steps, name="step", dtype="int64"),
                columns=[*self.layer_names, TOTAL],
            )
        return self._frame.copy()

    # -- statistics ---------------------------------------------------------

    def _require_rows(self) -> None:
        if not self._rows:
            hint = self._empty_hint() if callable(self._empty_hint) else self._empty_hint
            raise RuntimeError("no step recorded yet" + (f"; {hint}" if hint else ""))

    def _window(self, window: Any) -> tuple[int, np.ndarray, np.ndarray]:
        """(last step, per-layer geometric-mean norms over the window, frozen mask)."""
        window = check_positive_int(window, "window")
        self._require_rows()
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
        return self._steps[-1], norms, frozen

    def profile(self, window: int = 1) -> dict[str, Any]:
        """The last recorded steps' per-layer curve as vgcore statistics.

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
            layers not frozen; inf or NaN if one of them is),
            ``log_global_norm`` (its log), ``layers`` (the active layers'
            names), ``grad_norm`` (layer name -> norm, every layer, NaN when
            frozen) and ``frozen`` (frozen layers' names).

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
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            total = float(np.sqrt(np.sum(np.square(watched))))
            log_total = float(np.log(total)) if not math.isnan(total) else math.nan
        result.update(
            imbalance_k=k,
            step=step,
            total_norm=total,
            log_global_norm=log_total,
            layers=names,
            grad_norm=dict(zip(self.layer_names, norms.tolist(), strict=True)),
            frozen=[n for n, f in zip(self.layer_names, frozen, strict=True) if f],
        )
        return result

    def clipping(self, max_norm: float | None = None, *, window: int | None = None) -> Clipping:
        """How often clipping by total norm to ``max_norm`` scales the gradients down, and by how much.

        A step is clipped when its total norm (:attr:`totals`) exceeds
        ``max_norm``; clipping multiplies its gradients by ``max_norm /
        total`` (``torch.nn.utils.clip_grad_norm_``, ``optax.clip_by_global_norm``).
        A step with a non-finite total counts as clipped with coefficient 0.

        Parameters
        ----------
        max_norm : float, optional
            The threshold; default: the ``max_norm`` given at construction.
        window : int, optional
            Only the last ``window`` recorded steps (default: all).

        Returns
        -------
        Clipping
            ``(fraction, mean_coefficient)``: the fraction of the steps that
            are clipped, and the mean factor over those steps (NaN if none).

        Raises
        ------
        ValueError
            No ``max_norm`` here nor at construction, or not positive and
            finite; ``window`` not a positive integer.
        RuntimeError
            No step has been recorded.
        """
        if max_norm is None:
            if self.max_norm is None:
                raise ValueError("max_norm: give the clipping threshold (none was set at construction)")
            max_norm = self.max_norm
        max_norm = check_positive_float(max_norm, "max_norm")
        count = None if window is None else check_positive_int(window, "window")
        self._require_rows()
        totals = self.totals if count is None else self.totals[-count:]
        # NaN compares False: count non-finite totals as clipped explicitly
        clipped = ~(totals <= max_norm)
        with np.errstate(divide="ignore", invalid="ignore"):
            coefficients = np.where(np.isfinite(totals), max_norm / totals, 0.0)[clipped]
        fraction = float(clipped.mean())
        mean = float(coefficients.mean()) if coefficients.size else math.nan
        return Clipping(fraction, mean)

    # -- verdicts -----------------------------------------------------------

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

        - ``frozen``: layers whose parameters are all frozen (never counted
          as vanishing or dead);
        - ``dead``: trainable layers whose gradient is exactly zero;
        - ``exploding``: layers with a non-finite norm; a total norm (over all
          layers) above ``max_norm``; a total norm that grows exponentially
          over the window (the least-squares line of its log against the
          step, over at least 3 steps, rises by more than a factor
          ``growth_threshold`` across the window with R^2 >= 0.8); or
          gradients that *grow* towards the input, imbalance below
          ``1 / imbalance_threshold``;
        - ``vanishing``: imbalance (of the active layers, see :meth:`profile`)
          above ``imbalance_threshold``; the finding names the layers whose
          norm is more than ``imbalance_threshold`` times below the top
          layers' geometric mean;
        - ``clipping``: with a clipping threshold set at construction, most
          (more than half) of the window's steps have a total norm above it.

        Parameters
        ----------
        imbalance_threshold : float, default 10
            Ratio of top to bottom gradient norms above which gradients are
            called vanishing (and below whose inverse, exploding).
        max_norm : float, default 1e3
            Total gradient norm above which gradients are called exploding
            (not the clipping threshold, which is set at construction).
        window : int, default 1
            Judge the geometric mean over the last ``window`` recorded steps,
            and the total norm's trend and clipping over them.
        growth_threshold : float, default 10
            Growth of the total norm across the window called exploding.
        log : bool or logging.Logger, default False
            Also emit each finding as a warning through this logger (True:
            the history's logger).

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
        imbalance_threshold = check_positive_float(imbalance_threshold, "imbalance_threshold")
        max_norm = check_positive_float(max_norm, "max_norm")
        growth_threshold = check_positive_float(growth_threshold, "growth_threshold")
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
                f"{int(frozen.sum())} layer(s) frozen (requires_grad=False): {names_list(names[frozen])}; "
                "not counted as vanishing",
            )
        nonfinite = ~np.isfinite(norms) & ~frozen
        if nonfinite.any():
            add(
                "exploding",
                nonfinite,
                math.inf,
                f"non-finite gradient norm at step {step} in {names_list(names[nonfinite])}",
            )
        dead = (norms == 0) & ~frozen
        if dead.any():
            add("dead", dead, 0.0, f"zero gradient at step {step} in {names_list(names[dead])}")
        total = stats["total_norm"]
        watched = names[~frozen].tolist()
        if math.isfinite(total) and total > max_norm:
            add(
                "exploding",
                watched,
                total,
                f"total gradient norm {total:.3g} at step {step} exceeds max_norm={max_norm:g}",
            )
        growth = self._growth(window)
        if growth is not None and growth > growth_threshold:
            add(
                "exploding",
                watched,
                growth,
                f"total gradient norm grows exponentially: x{growth:.3g} over the last {window} steps "
                f"(fitted, up to step {step}), more than x{growth_threshold:g}",
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
                    f"{imbalance_threshold:g}; {names_list(weak or active[:k])} get over "
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
        if self.max_norm is not None:
            fraction, coefficient = self.clipping(window=window)
            if fraction > 0.5:
                shown = "n/a" if math.isnan(coefficient) else f"{coefficient:.3g}"
                add(
                    "clipping",
                    watched,
                    fraction,
                    f"{fraction:.0%} of the last {min(window, len(self))} steps clipped at "
                    f"max_norm={self.max_norm:g} (mean coefficient {shown}): the learning rate is "
                    "effectively scaled down",
                )
        if log:
            target = log if isinstance(log, logging.Logger) else self._logger
            for finding in findings:
                target.warning("%s", finding)
        return findings

    def _growth(self, window: int) -> float | None:
        """The total norm's fitted growth factor across the window, if its log rises on a steady line."""
        steps = np.array(self._steps[-window:], dtype=np.float64)
        totals = self.totals[-window:]
        keep = np.isfinite(totals) & (totals > 0)
        if keep.sum() < 3:
            return None
        x, y = steps[keep], np.log(totals[keep])
        x_centred = x - x.mean()
        y_centred = y - y.mean()
        slope = float(x_centred @ y_centred / (x_centred @ x_centred))
        if slope <= 0.0:
            return None
        residuals = y_centred - slope * x_centred
        ss_total = float(y_centred @ y_centred)
        r2 = 1.0 if ss_total == 0.0 else 1.0 - float(residuals @ residuals) / ss_total
        if r2 < 0.8:
            return None
        with np.errstate(over="ignore"):
            return float(np.exp(slope * (x[-1] - x[0])))

    # -- picture ------------------------------------------------------------

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

    def __repr__(self) -> str:
        return f"GradientHistory({len(self.layer_names)} layers, {len(self)} steps)"
