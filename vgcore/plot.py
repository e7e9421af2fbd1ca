"""Figures of a sweep (matplotlib, extra ``plot``): gradient flow, phase diagram, spectrum.

Every function takes a :class:`vgcore.sweep.SweepResult` (from ``vg.sweep``
or :func:`vgcore.sweep.load` of a store) and returns a matplotlib Figure
drawn on the Agg canvas; :func:`save` writes a PNG of an exact pixel size.
Figures never touch pyplot's global state, so they work in scripts, servers
and notebooks alike; matplotlib is imported only when a figure is made.

Kinds
-----
flow
    Mean log gradient norm ``m_l`` against layer ``l`` (0 = input), one line
    per config (mean over seeds), coloured by the grid key that varies most.
phase
    Measured chi over sigma_w (x) x sigma_b (y) as a heat map (log colour
    scale, white at chi = 1, blue ordered / vanishing, red chaotic /
    exploding), mean over seeds; the measured chi = 1 contour dashed and
    mean-field theory's critical line ``sigma_w = critical_sigma_w(activation,
    sigma_b)`` solid over it (plain stacks only: theory does not cover
    residual or norm).  One panel per combination of the other varying keys.
spectrum
    A histogram.  Where ``vgcore.singular_values`` exists: the log10 singular
    values of the input-output Jacobian of up to 8 configs, recomputed on the
    fly from their seeds (the store holds no singular values).  Otherwise:
    the per-layer log ratios of squared gradient norms
    ``2 (m_l - m_{l+1})``, whose mean over layers is about ln chi, pooled
    over seeds and grouped by the most varying key.  The figure's title
    says which one it shows.
time
    Recurrent rows (cell rnn, lstm, gru): the mean log gradient norm
    relative to the output's, ``log10 ||dL/ds_t|| / ||dL/ds_T||``, against
    the time lag ``T - t``, one line per config, coloured by cell; the
    dotted line at 1e-3 marks the vanishing horizon.
chaos
    Vanilla RNN rows (cell rnn): the largest Lyapunov exponent per step
    against the gain sigma_w, recomputed on the fly from the rows' seeds
    (:func:`vgcore.lyapunov_exponents`, k = 1, the row's depth in steps after
    as many warm-up steps, up to 200), beside mean-field theory's curve
    ``(1/2) ln chi_1`` (:func:`vgcore.theory.rnn_lyapunov_exponent`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vgcore.sweep import GRID_KEYS, SweepResult

KINDS = ("flow", "phase", "spectrum", "time", "chaos")
MAX_CHAOS_CONFIGS = 40
DEFAULT_SIZE = (1200, 900)
DEFAULT_DPI = 150
MAX_PANELS = 12
MAX_SPECTRUM_CONFIGS = 8


def _figure(width_px: int, height_px: int, dpi: float, panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    columns = math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, list(axes[:panels])


def _matches(column, value: Any):
    """Rows of ``column`` equal to ``value`` (strings from the command line welcome)."""
    if isinstance(value, str) and value.lower() == "none":
        return column.isna()
    if column.dtype.kind in "iuf" or str(column.dtype) in ("Int64", "Float64"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"where: {column.name} is numeric; got {value!r}") from None
        return np.isclose(column.astype("float64"), number, rtol=1e-9, atol=0.0)
    return column.astype(object) == str(value)


def select(result: SweepResult, where: dict[str, Any] | None = None):
    """The frame's rows with ``key == value`` for each item of ``where`` ("none": no residual / norm)."""
    frame = result.frame
    for key, value in (where or {}).items():
        if key not in (*GRID_KEYS, "seed"):
            raise ValueError(f"where: unknown key {key!r}; expected one of {(*GRID_KEYS, 'seed')}")
        frame = frame[_matches(frame[key], value)]
    if frame.empty:
        raise ValueError(f"where: no row of the sweep matches {where}" if where else "the sweep has no rows")
    return frame


def _varying(frame, keys=GRID_KEYS) -> list[str]:
    return [key for key in keys if frame[key].astype(object).fillna("none").nunique() > 1]


def _label(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{key}=none"
    if isinstance(value, float):
        return f"{key}={value:g}"
    return f"{key}={value}"


def _groups(frame, keys: list[str]):
    """(label, sub-frame) per combination of ``keys`` (NaN-safe), in order of appearance."""
    if not keys:
        return [("", frame)]
    keyed = frame.assign(**{f"_{key}": frame[key].astype(object).fillna("none") for key in keys})
    groups = []
    for values, group in keyed.groupby([f"_{key}" for key in keys], sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        groups.append((", ".join(_label(k, v) for k, v in zip(keys, values, strict=True)), group))
    return groups


def _color_key(frame) -> str | None:
    varying = _varying(frame)
    for key in ("sigma_w", "sigma_b", "depth", "width", "residual", *GRID_KEYS):
        if key in varying:
            return key
    return None


#: Grid keys that only mean something for recurrent cells: left out of a dense sweep's title.
_RECURRENT_KEYS = ("cell", "forget_bias", "sigma_u", "input_width")


def _constants(frame) -> str:
    """The grid keys with one value in ``frame``, as title text wrapped to lines of at most 100 characters."""
    import textwrap

    dense_only = "cell" not in frame or set(frame["cell"].astype(object).unique()) <= {"dense"}
    parts = []
    for key in GRID_KEYS:
        if dense_only and key in _RECURRENT_KEYS:
            continue
        values = frame[key].astype(object).fillna("none").unique()
        if len(values) == 1 and not (key in ("residual", "norm") and values[0] == "none"):
            parts.append(_label(key, values[0]))
    return textwrap.fill(", ".join(parts), width=100)


# --------------------------------------------------------------------------
# flow


def flow(result: SweepResult, *, width_px: int = DEFAULT_SIZE[0], height_px: int = DEFAULT_SIZE[1],
         dpi: float = DEFAULT_DPI, where: dict | None = None):
    """Mean log gradient norm against layer, one line per config (see the module docstring)."""
    import matplotlib as mpl

    frame = select(result, where)
    figure, (axes,) = _figure(width_px, height_px, dpi)
    color_key = _color_key(frame)
    configs = _groups(frame, _varying(frame))
    numeric = color_key is not None and frame[color_key].dtype.kind in "iuf"
    if numeric:
        values = frame[color_key].astype(float)
        norm = mpl.colors.Normalize(values.min(), values.max())
        cmap = mpl.colormaps["viridis"]
    categories = list(dict.fromkeys(frame[color_key].astype(object).fillna("none"))) if color_key else []
    for _, group in configs:
        curves = [np.asarray(curve, dtype=float) for curve in group["log_grad_norm"]]
        mean = np.mean(np.stack(curves), axis=0)
        value = group[color_key].iloc[0] if color_key else None
        if numeric:
            color = cmap(norm(float(value)))
        elif color_key:
            color = mpl.colormaps["tab10"](categories.index("none" if value is None else value) % 10)
        else:
            color = "C0"
        axes.plot(np.arange(mean.size), mean, color=color, lw=1.2, alpha=0.85)
    if numeric:
        figure.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=color_key)
    elif color_key:
        handles = [mpl.lines.Line2D([], [], color=mpl.colormaps["tab10"](i % 10), label=_label(color_key, c))
                   for i, c in enumerate(categories[:10])]
        axes.legend(handles=handles, fontsize="small")
    axes.set_xlabel("layer l (0 = input)")
    axes.set_ylabel("mean log gradient norm  ln ||dL/dx_l||")
    axes.set_title(f"Gradient flow, {len(configs)} configs\n{_constants(frame)}", fontsize="medium")
    axes.grid(alpha=0.3)
    return figure


# --------------------------------------------------------------------------
# phase


def critical_line(activation: str, sigma_b: np.ndarray) -> np.ndarray:
    """Theory's critical sigma_w at each sigma_b (NaN where there is none).

    Uses ``vgcore.theory.critical_sigma_w``; where that is not available,
    the root of ``chi1(activation, sigma_w, sigma_b) = 1`` in sigma_w.
    """
    from vgcore import theory

    critical = getattr(theory, "critical_sigma_w", None)
    line = np.full(len(sigma_b), np.nan)
    for index, bias in enumerate(np.asarray(sigma_b, dtype=float)):
        try:
            if critical is not None:
                line[index] = float(critical(activation, float(bias)))
            else:
                from scipy.optimize import brentq

                line[index] = brentq(lambda w, b=float(bias): theory.chi1(activation, w, b) - 1.0,
                                     1e-3, 50.0, xtol=1e-10)
        except (ValueError, ArithmeticError):  # no critical point at this sigma_b
            continue
    return line


def phase(result: SweepResult, *, width_px: int = DEFAULT_SIZE[0], height_px: int = DEFAULT_SIZE[1],
          dpi: float = DEFAULT_DPI, where: dict | None = None):
    """Phase diagram of measured chi over sigma_w x sigma_b with theory's critical line."""
    import matplotlib as mpl

    frame = select(result, where)
    for key in ("sigma_w", "sigma_b"):
        if frame[key].nunique() < 2:
            raise ValueError(f"phase: needs at least two values of {key} in the sweep "
                             f"(got {sorted(frame[key].unique())})")
    panel_keys = [key for key in _varying(frame) if key not in ("sigma_w", "sigma_b")]
    panels = _groups(frame, panel_keys)
    if len(panels) > MAX_PANELS:
        raise ValueError(f"phase: {len(panels)} panels (one per {', '.join(panel_keys)}); "
                         f"select at most {MAX_PANELS}, e.g. with where={{'{panel_keys[0]}': ...}}")
    figure, axes_list = _figure(width_px, height_px, dpi, len(panels))
    log_chi = np.log(np.maximum(frame["chi"].to_numpy(dtype=float), 1e-300))
    finite = log_chi[np.isfinite(log_chi)]
    limit = float(np.clip(np.abs(finite).max() if finite.size else 1.0, 0.05, 3.0))
    norm = mpl.colors.TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)
    cmap = mpl.colormaps["RdBu_r"]
    for axes, (label, group) in zip(axes_list, panels, strict=True):
        table = (group.assign(log_chi=np.log(np.maximum(group["chi"].astype(float), 1e-300)))
                 .pivot_table(index="sigma_b", columns="sigma_w", values="log_chi", aggfunc="mean"))
        sigma_w = table.columns.to_numpy(dtype=float)
        sigma_b = table.index.to_numpy(dtype=float)
        values = np.clip(table.to_numpy(dtype=float), -limit, limit)
        axes.pcolormesh(sigma_w, sigma_b, values, cmap=cmap, norm=norm, shading="nearest")
        handles = []
        if len(sigma_w) > 1 and len(sigma_b) > 1 and np.nanmin(values) < 0 < np.nanmax(values):
            axes.contour(sigma_w, sigma_b, values, levels=[0.0], colors="k", linestyles="--", linewidths=1.2)
            handles.append(mpl.lines.Line2D([], [], color="k", ls="--", label="measured chi = 1"))
        plain = group["residual"].isna().all() and group["norm"].isna().all()
        activations = group["activation"].unique()
        if plain and len(activations) == 1:
            fine = np.linspace(sigma_b.min(), sigma_b.max(), 101)
            line = critical_line(str(activations[0]), fine)
            axes.plot(line, fine, color="lime", lw=2.4, path_effects=_outline())
            handles.append(mpl.lines.Line2D([], [], color="lime", lw=2.4, label="theory: chi_1 = 1"))
        axes.set_xlim(sigma_w.min() - _half_step(sigma_w), sigma_w.max() + _half_step(sigma_w))
        axes.set_ylim(sigma_b.min() - _half_step(sigma_b), sigma_b.max() + _half_step(sigma_b))
        axes.set_xlabel("sigma_w")
        axes.set_ylabel("sigma_b")
        if label:
            axes.set_title(label, fontsize="small")
        if handles:
            axes.legend(handles=handles, loc="upper left", fontsize="small", framealpha=0.8)
    colorbar = figure.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes_list,
                               label="measured chi (log scale; < 1 ordered, > 1 chaotic)")
    ticks = [c for c in (0.05, 0.1, 0.2, 0.5, 0.8, 1, 1.25, 2, 5, 10, 20) if abs(math.log(c)) <= limit]
    colorbar.set_ticks([math.log(c) for c in ticks], labels=[f"{c:g}" for c in ticks])
    figure.suptitle(f"Phase diagram: measured chi per layer\n{_constants(frame)}", fontsize="medium")
    return figure


def _half_step(values: np.ndarray) -> float:
    return float(np.min(np.diff(values))) / 2 if len(values) > 1 else 0.5


def _outline():
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=4, foreground="k"), patheffects.Normal()]


# --------------------------------------------------------------------------
# spectrum


def spectrum(result: SweepResult, *, width_px: int = DEFAULT_SIZE[0], height_px: int = DEFAULT_SIZE[1],
             dpi: float = DEFAULT_DPI, where: dict | None = None):
    """A histogram: Jacobian singular values where vgcore can compute them, else per-layer decrements."""
    import vgcore

    frame = select(result, where)
    figure, (axes,) = _figure(width_px, height_px, dpi)
    if hasattr(vgcore, "singular_values"):
        _singular_value_histogram(axes, frame, result.batch, vgcore.singular_values)
    else:
        _decrement_histogram(axes, frame)
    axes.grid(alpha=0.3)
    return figure


def _singular_value_histogram(axes, frame, batch: int, singular_values) -> None:
    from vgcore.sweep import _stack_and_inputs

    configs = _groups(frame, _varying(frame))
    picks = np.unique(np.linspace(0, len(configs) - 1, min(len(configs), MAX_SPECTRUM_CONFIGS)).round())
    for index in picks.astype(int):
        label, group = configs[index]
        row = group.iloc[0]
        config = {key: (None if _missing(row[key]) else row[key]) for key in GRID_KEYS}
        config["depth"], config["width"] = int(config["depth"]), int(config["width"])
        built = _stack_and_inputs(config, int(row["seed"]), batch)  # (model, x[, call keywords])
        values = np.asarray(singular_values(*built[:2], **(built[2] if len(built) > 2 else {})),
                            dtype=float).ravel()
        values = np.log10(values[values > 0])
        axes.hist(values, bins=40, histtype="step", lw=1.4, label=label or f"seed {int(row['seed'])}")
    axes.set_xlabel("log10 singular value of the input-output Jacobian")
    axes.set_ylabel("count (all samples)")
    axes.set_title(f"Jacobian singular values (seed {int(frame['seed'].iloc[0])}, computed on the fly)\n"
                   f"{_constants(frame)}", fontsize="medium")
    axes.legend(fontsize="x-small")


def _decrement_histogram(axes, frame) -> None:
    key = _color_key(frame)
    groups = _groups(frame, [key] if key else [])
    if len(groups) > 6:  # too many to tell apart: bin the key's values into 6 ranges
        groups = _binned_groups(frame, key, 6)
    everything = np.concatenate([_decrements(group) for _, group in groups])
    finite = everything[np.isfinite(everything)]
    low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (-1.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 60)
    for label, group in groups:
        values = _decrements(group)
        axes.hist(np.clip(values[np.isfinite(values)], bins[0], bins[-1]), bins=bins, histtype="step",
                  lw=1.4, label=label or None)
    axes.axvline(0.0, color="k", lw=0.8)
    axes.set_xlabel("per-layer log ratio of squared gradient norms  2 (m_l - m_{l+1})   (mean about ln chi)")
    axes.set_ylabel("count (layers x configs)")
    axes.set_title("Per-layer gradient-norm decrements (no vgcore.singular_values here)\n"
                   f"{_constants(frame)}", fontsize="medium")
    if any(label for label, _ in groups):
        axes.legend(fontsize="small")


def _decrements(group) -> np.ndarray:
    parts = [2.0 * -np.diff(np.asarray(curve, dtype=float)) for curve in group["log_grad_norm"]]
    with np.errstate(invalid="ignore"):
        return np.concatenate(parts) if parts else np.empty(0)


def _binned_groups(frame, key: str, count: int):
    values = frame[key]
    if values.dtype.kind not in "iuf":
        return [("", frame)]
    edges = np.linspace(values.min(), values.max(), count + 1)
    positions = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, count - 1)
    return [(f"{key} in [{edges[i]:.3g}, {edges[i + 1]:.3g}]", frame[positions == i])
            for i in range(count) if (positions == i).any()]


# --------------------------------------------------------------------------
# time, chaos (recurrent rows)


def _recurrent_rows(result: SweepResult, where: dict | None, cells: tuple[str, ...]):
    frame = select(result, where)
    if "cell" in frame:
        frame = frame[frame["cell"].isin(cells)]
    if len(frame) == 0:
        raise ValueError(f"result: no rows of cell {' or '.join(cells)} to plot")
    return frame


def time_lag(result: SweepResult, *, width_px: int = DEFAULT_SIZE[0], height_px: int = DEFAULT_SIZE[1],
             dpi: float = DEFAULT_DPI, where: dict | None = None):
    """Gradient norm against time lag, one line per recurrent config, coloured by cell."""
    import matplotlib as mpl

    frame = _recurrent_rows(result, where, ("rnn", "lstm", "gru"))
    figure, (axes,) = _figure(width_px, height_px, dpi)
    cells = list(dict.fromkeys(frame["cell"]))
    configs = _groups(frame, _varying(frame))
    for _, group in configs:
        mean = np.mean(np.stack([np.asarray(curve, dtype=float) for curve in group["log_grad_norm"]]), axis=0)
        relative = (mean - mean[-1])[::-1] / math.log(10)  # index: lag T - t
        colour = mpl.colormaps["tab10"](cells.index(group["cell"].iloc[0]) % 10)
        axes.plot(np.arange(relative.size), relative, color=colour, lw=1.2, alpha=0.85)
    axes.axhline(-3, color="grey", lw=0.8, ls=":")
    handles = [mpl.lines.Line2D([], [], color=mpl.colormaps["tab10"](i % 10), label=cell)
               for i, cell in enumerate(cells)]
    axes.legend(handles=handles, fontsize="small")
    axes.set_xlabel("time lag T - t (steps)")
    axes.set_ylabel("log10 ||dL/ds_t|| / ||dL/ds_T||")
    axes.set_title(f"Gradients through time, {len(configs)} configs\n{_constants(frame)}", fontsize="medium")
    axes.grid(alpha=0.3)
    return figure


def chaos(result: SweepResult, *, width_px: int = DEFAULT_SIZE[0], height_px: int = DEFAULT_SIZE[1],
          dpi: float = DEFAULT_DPI, where: dict | None = None):
    """Largest Lyapunov exponent of the vanilla RNN rows against sigma_w, beside mean-field theory."""
    import vgcore
    from vgcore.sweep import _stack_and_inputs

    frame = _recurrent_rows(result, where, ("rnn",))
    figure, (axes,) = _figure(width_px, height_px, dpi)
    configs = _groups(frame, _varying(frame))
    picks = np.unique(np.linspace(0, len(configs) - 1, min(len(configs), MAX_CHAOS_CONFIGS)).round())
    points: dict[tuple, list] = {}
    for index in picks.astype(int):
        row = configs[index][1].iloc[0]
        config = {key: (None if _missing(row[key]) else row[key]) for key in GRID_KEYS}
        config["depth"], config["width"] = int(config["depth"]), int(config["width"])
        config["input_width"] = int(config["input_width"])
        warmup = min(config["depth"], 200)
        config["depth"] += warmup  # the inputs cover the warm-up steps too
        model, s0, call = _stack_and_inputs(config, int(row["seed"]), min(result.batch, 4))
        exponents = vgcore.lyapunov_exponents(model, s0, 1, steps=config["depth"] - warmup,
                                              inputs=call["inputs"], warmup=warmup)
        key = (config["activation"], float(config["sigma_b"]),
               float(config["sigma_u"]) if config["input_width"] else 0.0)
        points.setdefault(key, []).append((float(row["sigma_w"]), float(np.mean(np.asarray(exponents)))))
    for number, ((activation, sigma_b, sigma_u), pairs) in enumerate(sorted(points.items())):
        gains, values = np.array(sorted(pairs)).T
        colour = f"C{number % 10}"
        fine = np.linspace(gains.min(), gains.max(), 200)
        theory = [vgcore.theory.rnn_lyapunov_exponent(activation, g, sigma_b, sigma_u) if g > 0 else np.nan
                  for g in fine]
        label = f"{activation}, sigma_b {sigma_b:g}" + (f", sigma_u {sigma_u:g}" if sigma_u else "")
        axes.plot(fine, theory, color=colour, lw=1.2, label=f"{label}: mean-field (1/2) ln chi_1")
        axes.plot(gains, values, "o", color=colour, ms=4, label=f"{label}: measured")
    axes.axhline(0, color="grey", lw=0.8)
    axes.set_xlabel("recurrent gain g (sigma_w)")
    axes.set_ylabel("largest Lyapunov exponent per step")
    axes.set_title(f"Vanilla RNN: order and chaos, {len(picks)} configs (computed on the fly)\n"
                   f"{_constants(frame)}", fontsize="medium")
    axes.legend(fontsize="x-small")
    axes.grid(alpha=0.3)
    return figure


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --------------------------------------------------------------------------


def figure(result: SweepResult, kind: str, **options):
    """The figure of ``kind`` (one of :data:`KINDS`) for ``result``."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return {"flow": flow, "phase": phase, "spectrum": spectrum, "time": time_lag,
            "chaos": chaos}[kind](result, **options)


def save(result: SweepResult, path, kind: str, *, width_px: int = DEFAULT_SIZE[0],
         height_px: int = DEFAULT_SIZE[1], dpi: float = DEFAULT_DPI, where: dict | None = None) -> str:
    """Write the figure of ``kind`` as a PNG of exactly ``width_px`` x ``height_px`` pixels."""
    for name, value in (("width_px", width_px), ("height_px", height_px)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 16 <= value <= 20000:
            raise ValueError(f"{name}: expected an integer number of pixels in 16..20000, got {value!r}")
    if not isinstance(dpi, (int, float)) or not 10 <= dpi <= 2000:
        raise ValueError(f"dpi: expected a number in 10..2000, got {dpi!r}")
    drawn = figure(result, kind, width_px=int(width_px), height_px=int(height_px), dpi=float(dpi),
                   where=where)
    drawn.savefig(path, dpi=float(dpi), format="png")
    return str(path)
