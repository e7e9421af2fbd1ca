"""Recurrent models: one recurrent cell unrolled over time (docs/ARCHITECTURE.md, "Recurrent models").

Time plays the role of depth.  The parameters are those of a single-layer
torch.nn.RNN / LSTM / GRU, in torch's layout and gate order, G gate blocks
of n rows each (G = 1 rnn, 4 lstm: i, f, g, o; 3 gru: r, z, n)::

    weight_hh (G n, n)   weight_ih (G n, m)   bias_hh (G n,)   bias_ih (G n,)

One step maps the state s = h (rnn, gru) or [h | c] (lstm) and an input u_t::

    rnn:  h' = phi(W_ih u_t + b_ih + W_hh h + b_hh)
    lstm: i, f, g, o = sig, sig, tanh, sig of (W_ih u_t + b_ih + W_hh h + b_hh)
          c' = f * c + i * g;  h' = o * tanh(c')
    gru:  r, z = sig of the first two blocks of (W_ih u_t + b_ih + W_hh h + b_hh)
          n = tanh(W_in u_t + b_in + r * (W_hn h + b_hn));  h' = (1 - z) * n + z * h

A model without input weights (m = 0) runs autonomously.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vgcore import _validation as check
from vgcore._model import Problem

#: Cell names and their number of gate blocks G.
CELLS: dict[str, int] = {"rnn": 1, "lstm": 4, "gru": 3}
#: Integer codes of the cells in the compiled kernels (csrc/vg_gates.h).
CELL_CODES: dict[str, int] = {"rnn": 0, "lstm": 1, "gru": 2}
INITS = ("gaussian", "orthogonal", "uniform")
#: The gate block that keeps the old state, which ``forget_bias`` shifts: lstm f, gru z.
KEEP_GATE: dict[str, int] = {"lstm": 1, "gru": 1}

#: Most time steps, counted plus warm-up (``steps + warmup``), that one call runs.  1000 times the
#: longest sequences whose log norms the tests check exactly (1e5 steps); about 10 s of the compiled
#: forward pass of a tiny cell (0.1 us a step on one core) and a minute of its Lyapunov exponents.  A
#: warm-up keeps no memory, so only a bound like this one stops it: the compiled kernels do not see
#: Ctrl-C.
MAX_STEPS = 10**8
#: Most multiply-adds of the cell's matrix products one call runs: (steps + warmup) B G n (n + m) for
#: B samples, G gate blocks, width n and m inputs (a Jacobian product with k directions does about
#: k + 1 times that).  About a day of a 16-core CPU (1e10 to 1e11 multiply-adds a second measured on
#: the compiled kernels), minutes to hours of a GPU; a longer call would hold the process, beyond
#: Ctrl-C, for days.  Beyond it, split the batch (its samples are independent) or use fewer steps.
MAX_WORK = 10**16


def step_work(steps: int, batch: int, cell: str, width: int, input_width: int) -> int:
    """Multiply-adds of ``steps`` steps of ``batch`` samples through a cell: steps B G n (n + m)."""
    return steps * batch * CELLS[cell] * width * (width + input_width)


def check_steps(steps: int, warmup: int, *, steps_name: str = "steps", warmup_name: str = "warmup") -> None:
    """ValueError naming steps (or warmup, when steps alone is within it) when steps + warmup > MAX_STEPS."""
    if steps + warmup <= MAX_STEPS:
        return
    why = (f"above the {MAX_STEPS:,} one call may run (vgcore._recurrent.MAX_STEPS: 1000 times the "
           "longest sequences checked exactly; the compiled kernels cannot be interrupted)")
    if steps > MAX_STEPS or not warmup:
        raise ValueError(f"{steps_name}: {steps:,} time steps{f' (+ {warmup:,} warm-up)' if warmup else ''} "
                         f"is {why}; use fewer steps")
    raise ValueError(f"{warmup_name}: steps + warmup = {steps:,} + {warmup:,} time steps is {why}; "
                     "use fewer warm-up steps")


def check_work(steps: int, warmup: int, batch: int, cell: str, width: int, input_width: int, *,
               steps_name: str = "steps", warmup_name: str = "warmup") -> None:
    """ValueError naming steps (or warmup, when steps alone is within it) when the call's
    multiply-adds, :func:`step_work` of steps + warmup, exceed MAX_WORK."""
    work = step_work(steps + warmup, batch, cell, width, input_width)
    if work <= MAX_WORK:
        return
    blame_warmup = warmup and step_work(steps, batch, cell, width, input_width) <= MAX_WORK
    what = f"steps + warmup = {steps:,} + {warmup:,}" if warmup else f"{steps:,}"
    inputs = f" and {input_width} inputs" if input_width else ""
    samples = f"{batch:,} sample{'s' if batch != 1 else ''}"
    raise ValueError(f"{warmup_name if blame_warmup else steps_name}: {what} time steps of {samples} "
                     f"through the {cell} cell of width {width}{inputs} is about {_exponent(work)} "
                     f"multiply-adds, above the {_exponent(MAX_WORK)} one call may run "
                     "(vgcore._recurrent.MAX_WORK: about a day of a 16-core CPU; the compiled kernels "
                     f"cannot be interrupted); use fewer {'warm-up ' if blame_warmup else ''}steps or split "
                     "the batch")


def _exponent(number: int) -> str:
    """``number`` to two digits, e.g. 2.7e16."""
    return f"{float(number):.2g}".replace("e+", "e")


def check_cell(cell: Any) -> str:
    """``cell`` itself when it names a cell, else TypeError / ValueError naming ``cell``."""
    if not isinstance(cell, str):
        raise TypeError(f"cell: expected a string, got {type(cell).__name__}")
    if cell not in CELLS:
        raise ValueError(f"cell: unknown cell {cell!r}; expected one of {tuple(CELLS)}")
    return cell


def _check_cell_activation(cell: str, activation: Any) -> str:
    activation = check.check_activation(activation)
    if cell != "rnn" and activation != "tanh":
        raise ValueError(f"activation: the {cell} cell's nonlinearities are fixed (sigmoid gates, tanh "
                         f"candidate); activation must be 'tanh', got {activation!r}")
    return activation


class Recurrent:
    """A recurrent cell (vanilla RNN, LSTM or GRU) in torch's single-layer parameter layout.

    Parameters
    ----------
    weight_hh : array-like, shape (G n, n)
        Recurrent weights, G gate blocks of n rows in torch's order
        (rnn: 1; lstm: i, f, g, o; gru: r, z, n).  float32 or float64.
    weight_ih : array-like, shape (G n, m), optional
        Input weights; None for a model without inputs (m = 0, autonomous).
    bias_hh, bias_ih : array-like, shape (G n,), optional
        Biases; zeros when omitted.  The gru's ``b_hn`` (last block of
        bias_hh) sits inside ``r * (W_hn h + b_hn)`` as in torch.
    cell : {"rnn", "lstm", "gru"}
    activation : str
        The rnn's nonlinearity phi, one of :data:`vgcore.ACTIVATIONS`; the
        lstm and gru have torch's fixed sigmoid / tanh and accept only "tanh".

    Notes
    -----
    Parameters are kept as read-only views (copied only when a dtype or
    layout conversion needs it).  The state s has ``state_width`` columns:
    n (rnn, gru) or 2 n (lstm, ``[h | c]``).

    Raises
    ------
    TypeError
        Non-floating arrays, arrays on different devices, wrong argument types.
    ValueError
        Shapes that are not G gate blocks (naming the array), n < 1, NaN /
        inf, unknown cell or activation.
    """

    kind = "recurrent"

    def __init__(self, weight_hh: Any, weight_ih: Any = None, bias_hh: Any = None, bias_ih: Any = None,
                 *, cell: str = "rnn", activation: str = "tanh") -> None:
        self._cell = check_cell(cell)
        self._activation = _check_cell_activation(self._cell, activation)
        gates = CELLS[self._cell]
        weight_hh = check.as_float_array(weight_hh, "weight_hh", ndim=2)
        rows, width = (int(v) for v in weight_hh.shape)
        if width < 1 or rows != gates * width:
            raise ValueError(f"weight_hh: a {self._cell} cell has {gates} gate block(s) of n rows, so "
                             f"weight_hh must be ({gates} n, n) with n >= 1; got shape {(rows, width)}")
        dtype = weight_hh.dtype
        xp = check.array_namespace(weight_hh)

        def same_device(array, name):
            if check.array_namespace(array) is not xp:
                raise TypeError(f"{name}: must live on the same device as weight_hh")
            return array

        if weight_ih is None:
            weight_ih = xp.zeros((rows, 0), dtype=dtype)
        else:
            weight_ih = same_device(check.as_float_array(weight_ih, "weight_ih", ndim=2, dtype=dtype),
                                    "weight_ih")
            if weight_ih.shape[0] != rows:
                raise ValueError(f"weight_ih: a {self._cell} cell of width {width} needs "
                                 f"({rows}, m) input weights ({gates} gate block(s) of {width} rows); "
                                 f"got shape {tuple(weight_ih.shape)}")
        biases = []
        for name, bias in (("bias_hh", bias_hh), ("bias_ih", bias_ih)):
            if bias is None:
                bias = xp.zeros(rows, dtype=dtype)
            else:
                bias = same_device(check.as_float_array(bias, name, ndim=1, dtype=dtype), name)
                if bias.shape[0] != rows:
                    raise ValueError(f"{name}: expected shape ({rows},) ({gates} gate block(s) of "
                                     f"{width}), got {tuple(bias.shape)}")
            biases.append(bias)
        self._weight_hh = _read_only(check.contiguous(weight_hh))
        self._weight_ih = _read_only(check.contiguous(weight_ih))
        self._bias_hh = _read_only(check.contiguous(biases[0]))
        self._bias_ih = _read_only(check.contiguous(biases[1]))
        self._init: str | None = None
        self._sigma_w: float | None = None
        self._sigma_u: float | None = None
        self._sigma_b: float | None = None
        self._forget_bias: float | None = None
        self._seed: int | None = None
        self._chi_theory: float | None = None
        self._lyapunov_theory: float | None = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def random(cls, width: int, *, cell: str = "rnn", activation: str = "tanh", input_width: int = 0,
               init: str = "gaussian", sigma_w: float = 1.0, sigma_u: float = 1.0, sigma_b: float = 0.0,
               forget_bias: float = 0.0, dtype: Any = "float64", seed: int | None = None,
               device: str = "cpu") -> Recurrent:
        """A cell with random parameters, reproducible from ``seed``.

        Parameters
        ----------
        width : int
            Hidden width n >= 1.
        cell : {"rnn", "lstm", "gru"}
        activation : str
            The rnn's phi (any of :data:`vgcore.ACTIVATIONS`); "tanh" for lstm / gru.
        input_width : int
            m >= 0 input features; 0 gives an autonomous model (no weight_ih).
        init : {"gaussian", "orthogonal", "uniform"}
            Each gate block of weight_hh is N(0, sigma_w^2 / n), sigma_w times
            a Haar-random orthogonal matrix, or uniform with the same variance.
        sigma_w : float
            Recurrent gain g >= 0 (0: no recurrent weights).
        sigma_u : float
            Input weights N(0, sigma_u^2 / m), >= 0.
        sigma_b : float
            Bias scale >= 0: bias_ih and bias_hh are each N(0, sigma_b^2 / 2), so
            that their sum, the bias of a pre-activation, is N(0, sigma_b^2) as
            in mean-field theory.
        forget_bias : float
            Added to bias_hh of the gate that keeps the old state: the lstm's
            forget gate f, the gru's update gate z.  Must be 0 for the rnn.
        dtype : {"float64", "float32"}
            Drawn in float64 and rounded.
        seed : int, optional
            Seed of NumPy's default generator (None draws one, kept in ``.seed``).
            The unit variates are drawn in a fixed order (weight_hh, weight_ih,
            bias_hh, bias_ih), so configs sharing a seed, width, input width and
            init share them, scaled by sigma_w, sigma_u and sigma_b.
        device : {"cpu", "cuda"}

        Returns
        -------
        Recurrent

        Raises
        ------
        TypeError, ValueError
            Naming the offending argument.
        """
        width = check.check_int(width, "width")
        cell = check_cell(cell)
        activation = _check_cell_activation(cell, activation)
        input_width = check.check_int(input_width, "input_width", minimum=0)
        if not isinstance(init, str):
            raise TypeError(f"init: expected a string, got {type(init).__name__}")
        if init not in INITS:
            raise ValueError(f"init: unknown init {init!r}; expected one of {INITS}")
        sigma_w = check.check_real(sigma_w, "sigma_w", minimum=0.0)
        sigma_u = check.check_real(sigma_u, "sigma_u", minimum=0.0)
        sigma_b = check.check_real(sigma_b, "sigma_b", minimum=0.0)
        forget_bias = check.check_real(forget_bias, "forget_bias")
        if cell == "rnn" and forget_bias != 0.0:
            raise ValueError(f"forget_bias: the rnn cell has no gate to shift; must be 0, got {forget_bias}")
        dtype = check.check_dtype(dtype)
        if not isinstance(device, str) or device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        else:
            seed = check.check_int(seed, "seed", minimum=0)
            if seed >= 2**63:
                raise ValueError(f"seed: must be < 2**63, got {seed}")

        gates = CELLS[cell]
        # the draws and their scaled copies hold about 4 float64 values per parameter (issue 17 hook)
        check.check_memory(32 * gates * width * (width + input_width + 2), "width, input_width",
                           f"a {cell} cell of width {width} with {input_width} inputs")
        rng = np.random.default_rng(seed)
        if init == "uniform":
            unit_hh = rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), size=(gates, width, width))
        else:
            unit_hh = rng.standard_normal((gates, width, width))
        if init == "orthogonal":
            # Haar measure: QR of a Gaussian matrix with R's diagonal made positive; scaled by
            # sqrt(n) so that the sigma_w / sqrt(n) below gives sigma_w times the orthogonal matrix
            q, r = np.linalg.qr(unit_hh)
            signs = np.sign(np.diagonal(r, axis1=1, axis2=2))
            signs[signs == 0] = 1.0
            unit_hh = q * signs[:, None, :] * math.sqrt(width)
        unit_ih = rng.standard_normal((gates * width, input_width))
        unit_bias_hh = rng.standard_normal(gates * width)
        unit_bias_ih = rng.standard_normal(gates * width)
        weight_hh = unit_hh.reshape(gates * width, width) * (sigma_w / math.sqrt(width))
        weight_ih = unit_ih * (sigma_u / math.sqrt(input_width)) if input_width else None
        bias_hh = unit_bias_hh * (sigma_b / math.sqrt(2.0))
        bias_ih = unit_bias_ih * (sigma_b / math.sqrt(2.0))
        if cell in KEEP_GATE:
            block = KEEP_GATE[cell]
            bias_hh[block * width:(block + 1) * width] += forget_bias
        drawn = (weight_hh, weight_ih, bias_hh, bias_ih)
        with np.errstate(over="ignore", invalid="ignore"):
            arrays = [None if a is None else a.astype(dtype) for a in drawn]
        # parameters beyond the dtype name the scale that put them there (issue 17 hook)
        scales = ("sigma_w", "sigma_u", "sigma_b, forget_bias", "sigma_b")
        for array, names in zip(arrays, scales, strict=True):
            if array is not None and not np.isfinite(array).all():
                raise ValueError(f"{names}: the drawn parameters exceed the largest {dtype.name} "
                                 f"({np.finfo(dtype).max:.3g}); use a smaller scale")
        if device == "cuda":
            arrays = _to_device(arrays)
        model = cls(*arrays, cell=cell, activation=activation)
        model._init = init
        model._sigma_w = sigma_w
        model._sigma_u = sigma_u if input_width else None
        model._sigma_b = sigma_b
        model._forget_bias = forget_bias
        model._seed = seed
        return model

    @classmethod
    def from_torch(cls, module: Any, *, device: str | None = None) -> Recurrent:
        """The parameters of a torch.nn.RNN, LSTM or GRU, loaded without changing a number.

        Parameters
        ----------
        module : torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU
            One layer, unidirectional, no projection (LSTM proj_size 0),
            float32 or float64 parameters; ``bias=False`` gives zero biases;
            batch_first either way (vgcore's inputs are always (B, T, m):
            transpose a batch_first=False module's (T, B, m) inputs).
            nn.RNN's nonlinearity ("tanh" or "relu") becomes the activation.
        device : {"cpu", "cuda"}, optional
            Where the parameters go; default where the module's live.

        Returns
        -------
        Recurrent

        Raises
        ------
        TypeError
            Not one of these modules, or parameters of another dtype.
        ValueError
            More than one layer, bidirectional, a projection, naming the option.
        """
        from vgcore._from_torch import recurrent_parameters

        arrays, cell, activation, module_device = recurrent_parameters(module)
        device = module_device if device is None else device
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            arrays = _to_device(arrays)
        return cls(*arrays, cell=cell, activation=activation)

    # -- properties --------------------------------------------------------------------------------
    @property
    def cell(self) -> str:
        """"rnn", "lstm" or "gru"."""
        return self._cell

    @property
    def activation(self) -> str:
        """The rnn's phi; "tanh" for the gated cells."""
        return self._activation

    @property
    def gates(self) -> int:
        """Number of gate blocks G: 1 (rnn), 4 (lstm), 3 (gru)."""
        return CELLS[self._cell]

    @property
    def weight_hh(self):
        """Recurrent weights (G n, n), read-only."""
        return self._weight_hh

    @property
    def weight_ih(self):
        """Input weights (G n, m), read-only; m = 0 for an autonomous model."""
        return self._weight_ih

    @property
    def bias_hh(self):
        """(G n,), read-only."""
        return self._bias_hh

    @property
    def bias_ih(self):
        """(G n,), read-only."""
        return self._bias_ih

    @property
    def hidden_width(self) -> int:
        """Hidden width n."""
        return int(self._weight_hh.shape[1])

    @property
    def width(self) -> int:
        """Hidden width n (as a stack's width)."""
        return self.hidden_width

    @property
    def input_width(self) -> int:
        """Input features m (0: no inputs)."""
        return int(self._weight_ih.shape[1])

    @property
    def state_width(self) -> int:
        """Width of the state s: n (rnn, gru) or 2 n (lstm, [h | c])."""
        return 2 * self.hidden_width if self._cell == "lstm" else self.hidden_width

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._weight_hh.dtype)

    @property
    def device(self) -> str:
        """"cuda" when the parameters are CuPy arrays, else "cpu"."""
        return "cuda" if check.is_cupy_array(self._weight_hh) else "cpu"

    @property
    def parameters(self) -> tuple:
        """(weight_hh, weight_ih, bias_hh, bias_ih)."""
        return (self._weight_hh, self._weight_ih, self._bias_hh, self._bias_ih)

    @property
    def init(self) -> str | None:
        return self._init

    @property
    def sigma_w(self) -> float | None:
        """Recurrent gain g of a random model; None for explicit parameters."""
        return self._sigma_w

    @property
    def sigma_u(self) -> float | None:
        """Input weight scale of a random model with inputs; None otherwise."""
        return self._sigma_u

    @property
    def sigma_b(self) -> float | None:
        return self._sigma_b

    @property
    def forget_bias(self) -> float | None:
        return self._forget_bias

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def chi_theory(self) -> float:
        """Theory's per-step ratio of squared gradient norms (step t over step t + 1); NaN where none applies.

        rnn (random parameters): mean-field chi_1 = g^2 E[phi'(sqrt(q*) z)^2] of
        the autonomous network, or, with inputs, of the network driven by
        i.i.d. standard normal inputs (the bias variance gains sigma_u^2):
        :func:`vgcore.theory.rnn_chi1`.  lstm / gru: exact where the gates
        are constant in time (sigma_w = 0, sigma_b = 0, no inputs or sigma_u = 0):
        the kept state decays by the keep gate sigmoid(forget_bias) per step,
        so chi = sigmoid(forget_bias)^2 (:func:`vgcore.theory.gated_log_decay`).
        """
        if self._chi_theory is None:
            from vgcore.theory import recurrent as recurrent_theory

            self._chi_theory = recurrent_theory.model_chi(self)
        return self._chi_theory

    def chi_theory_at(self, problem: Problem) -> float:
        """Theory's chi for one call: :attr:`chi_theory` (it does not depend on the batch)."""
        return self.chi_theory

    @property
    def lyapunov_theory(self) -> float:
        """Theory's largest Lyapunov exponent per step; NaN where none applies.

        rnn: (1/2) ln chi_1 (mean field); lstm / gru with constant gates (as
        for :attr:`chi_theory`): ln sigmoid(forget_bias).
        """
        if self._lyapunov_theory is None:
            chi = self.chi_theory
            self._lyapunov_theory = 0.5 * math.log(chi) if chi > 0 else (
                -math.inf if chi == 0 else float("nan"))
        return self._lyapunov_theory

    def config(self) -> dict:
        """What produced the model: cell, widths, activation, init, gains, seed, dtype."""
        return {
            "cell": self._cell,
            "width": self.hidden_width,
            "input_width": self.input_width,
            "activation": self._activation,
            "init": self._init,
            "sigma_w": self._sigma_w,
            "sigma_u": self._sigma_u,
            "sigma_b": self._sigma_b,
            "forget_bias": self._forget_bias,
            "dtype": self.dtype.name,
            "seed": self._seed,
        }

    # -- the model-kind interface (vgcore._model.ModelKind) ----------------------------------------
    def bind(self, x: Any, *, name: str = "x", steps: Any = None, inputs: Any = None,
             warmup: Any = None) -> Problem:
        """Validate an initial state and the call's keywords into a Problem.

        Parameters
        ----------
        x : array, shape (B, state_width)
            Initial states s_0 (any real floating dtype, cast to the model's).
        name : str
            The state's argument name in messages.
        steps : int
            Counted time steps T >= 1.  May be omitted when ``inputs`` is
            given: T is then its time length less ``warmup``.  ``steps +
            warmup`` is at most :data:`MAX_STEPS` (1e8), and the call's
            multiply-adds, (steps + warmup) B G n (n + m), at most
            :data:`MAX_WORK` (1e16).
        inputs : array, shape (B, T + warmup, m), optional
            Per-step inputs; required when the model has input weights
            (m >= 1), refused when it has none.
        warmup : int, optional
            Steps advanced before the counted ones (Lyapunov exponents); >= 0;
            counted in the bounds above.

        Returns
        -------
        Problem

        Raises
        ------
        TypeError, ValueError
            Naming the offending argument, before any work; ValueError naming
            steps (warmup where steps alone is within them, inputs where T
            comes from them) beyond :data:`MAX_STEPS` or :data:`MAX_WORK`.
        """
        warmup = 0 if warmup is None else check.check_int(warmup, "warmup", minimum=0)
        m = self.input_width
        if inputs is not None and m == 0:
            raise ValueError("inputs: this model has no input weights (input_width 0), so it takes no "
                             "inputs; build it with weight_ih (or input_width=m) to drive it")
        if inputs is None and m > 0:
            raise ValueError(f"inputs: this model has input weights (input_width {m}) and needs "
                             f"inputs of shape (B, T, {m})")
        if inputs is not None:
            inputs = check.as_float_array(inputs, "inputs", ndim=3, dtype=self.dtype)
            if check.array_namespace(inputs) is not check.array_namespace(self._weight_hh):
                raise TypeError(f"inputs: must live on the same device as the model ({self.device})")
        derived = steps is None  # T from the inputs' length
        if steps is None:
            if inputs is None:
                raise TypeError("steps: a recurrent model needs steps=T, the number of time steps")
            steps = int(inputs.shape[1]) - warmup
            if steps < 1:
                raise ValueError(f"inputs: {inputs.shape[1]} time steps leave none to count after "
                                 f"warmup={warmup}")
        else:
            steps = check.check_int(steps, "steps")
        # bounded before any work: a warm-up keeps no memory, and nothing else would stop it
        names = {"steps_name": "inputs", "warmup_name": "inputs"} if derived else {}
        check_steps(steps, warmup, **names)
        x = _batch_array(x, name, self)
        check_work(steps, warmup, int(x.shape[0]), self._cell, self.hidden_width, m, **names)
        if inputs is not None:
            expected = (x.shape[0], steps + warmup, m)
            if tuple(inputs.shape) != expected:
                what = f"steps + warmup = {steps} + {warmup}" if warmup else f"steps = {steps}"
                raise ValueError(f"inputs: expected shape (B, T, m) = {expected} (B from {name}, "
                                 f"{what}, m = input_width), got {tuple(inputs.shape)}")
            inputs = check.contiguous(inputs)
        return Problem(self, x, steps, inputs, warmup)

    def __repr__(self) -> str:
        options = [f"cell={self._cell!r}", f"width={self.hidden_width}"]
        if self.input_width:
            options.append(f"input_width={self.input_width}")
        if self._cell == "rnn":
            options.append(f"activation={self._activation!r}")
        if self._init is not None:
            options += [f"init={self._init!r}", f"sigma_w={self._sigma_w:g}", f"sigma_b={self._sigma_b:g}"]
            if self._sigma_u is not None:
                options.append(f"sigma_u={self._sigma_u:g}")
            if self._cell != "rnn":
                options.append(f"forget_bias={self._forget_bias:g}")
        options += [f"dtype={self.dtype.name}", f"device={self.device!r}"]
        return f"Recurrent({', '.join(options)})"


def _batch_array(value: Any, name: str, model: Recurrent):
    """(B, state_width), B >= 1, C-contiguous in the model's dtype, on its device."""
    array = check.as_float_array(value, name, ndim=2, dtype=model.dtype)
    if check.array_namespace(array) is not check.array_namespace(model.weight_hh):
        raise TypeError(f"{name}: must live on the same device as the model ({model.device})")
    if array.shape[0] < 1:
        raise ValueError(f"{name}: the batch (first axis) must hold at least one sample")
    if array.shape[1] != model.state_width:
        what = "[h | c], 2 n" if model.cell == "lstm" else "h, n"
        raise ValueError(f"{name}: expected shape (B, {model.state_width}) for a {model.cell} cell of "
                         f"width {model.hidden_width} (state {what}), got {tuple(array.shape)}")
    return check.contiguous(array)


def _to_device(arrays):
    try:
        from vgcore.backends.cuda_stack import to_device
    except ImportError as error:
        raise ValueError(f"device: 'cuda' is not available here ({error})") from error
    return [None if a is None else to_device(a) for a in arrays]


def _read_only(array):
    """A read-only view for NumPy arrays (the caller's array keeps its flags)."""
    if isinstance(array, np.ndarray):
        array = array.view()
        array.flags.writeable = False
    return array


def sweep_model(config: dict, seed: int, batch: int, input_seed: int, device: str = "cpu"):
    """(model, s0, call) of one recurrent sweep row (vgcore.sweep; docs/ARCHITECTURE.md "Sweeps").

    The grid's ``depth`` is the number of steps T and ``sigma_w`` the
    recurrent gain; ``forget_bias`` applies to the gated cells (an rnn row
    ignores it, as a dense row ignores every recurrent key).  The initial
    state and, with ``input_width`` m >= 1, the inputs (B, T, m) are standard
    normal, drawn in float64 from ``input_seed`` (state first).

    Returns
    -------
    model : Recurrent
    s0 : ndarray, shape (batch, state_width)
    call : dict
        ``steps`` and ``inputs`` for :meth:`Recurrent.bind`.
    """
    cell = config["cell"]
    model = Recurrent.random(
        config["width"], cell=cell, activation=config["activation"], input_width=config["input_width"],
        init=config["init"], sigma_w=config["sigma_w"], sigma_u=config["sigma_u"], sigma_b=config["sigma_b"],
        forget_bias=0.0 if cell == "rnn" else config["forget_bias"], dtype=config["dtype"], seed=seed,
        device=device)
    rng = np.random.default_rng(input_seed)
    arrays = [rng.standard_normal((batch, model.state_width)).astype(model.dtype)]
    if model.input_width:
        arrays.append(rng.standard_normal((batch, config["depth"], model.input_width)).astype(model.dtype))
    if device == "cuda":
        arrays = _to_device(arrays)
    inputs = arrays[1] if model.input_width else None
    return model, arrays[0], {"steps": config["depth"], "inputs": inputs}
