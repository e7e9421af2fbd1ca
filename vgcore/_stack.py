"""The deep stack: parameters plus the options of docs/ARCHITECTURE.md's layer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vgcore import _validation as check
from vgcore._model import Problem, refuse_call_keywords

#: sigma_w given by name: the scheme's weight scale for a square layer.
SIGMA_W_SCHEMES = {"xavier": 1.0, "lecun": 1.0, "he": math.sqrt(2.0)}
INITS = ("gaussian", "orthogonal", "uniform")
#: Stack.random draws this many float64 values at a time (8 MiB): its scratch beyond the weights.
_DRAW_BLOCK_VALUES = 2**20


class Stack:
    """A deep stack of L dense layers of width n (docs/ARCHITECTURE.md, "The model").

    Layer l maps x (B, n) to x' (B, n)::

        u  = LN(x)              if norm == "pre"  else x
        h  = u @ W_l.T + b_l                      (W_l is (out, in), as torch.nn.Linear)
        f  = phi(h)
        y  = x + residual * f   if residual is not None else f
        x' = LN(y)              if norm == "post" else y

    Parameters
    ----------
    weights : array-like, shape (L, n, n)
        Weight matrices in (out, in) layout; float32 or float64.  NumPy, CuPy
        or any DLPack-capable array.  Not copied when already C-contiguous:
        the stack keeps a read-only view.
    biases : array-like, shape (L, n), optional
        Biases; zeros when omitted.  Cast to the weights' dtype.
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    residual : float, optional
        Scale of the residual branch; None for a plain stack.
    norm : {None, "pre", "post"}
        Where a layer norm (no affine parameters, eps 1e-5) sits.

    Raises
    ------
    TypeError
        Non-floating arrays, wrong argument types.
    ValueError
        Wrong shapes, depth or width < 1, NaN / inf, unknown activation or norm.
    """

    def __init__(self, weights: Any, biases: Any = None, *, activation: str,
                 residual: float | None = None, norm: str | None = None) -> None:
        self._activation = check.check_activation(activation)
        self._residual = check.check_residual(residual)
        self._norm = check.check_norm(norm)
        weights = check.as_float_array(weights, "weights", ndim=3)
        depth, rows, cols = weights.shape
        if depth < 1:
            raise ValueError("weights: depth (first axis) must be >= 1, got 0")
        if rows < 1 or rows != cols:
            raise ValueError(f"weights: expected square (L, n, n) matrices with n >= 1, got shape "
                             f"{tuple(weights.shape)}")
        xp = check.array_namespace(weights)
        if biases is None:
            biases = xp.zeros((depth, rows), dtype=weights.dtype)
        else:
            biases = check.as_float_array(biases, "biases", ndim=2, dtype=weights.dtype)
            if check.array_namespace(biases) is not xp:
                raise TypeError("biases: must live on the same device as weights")
            if tuple(biases.shape) != (depth, rows):
                raise ValueError(f"biases: expected shape {(depth, rows)}, got {tuple(biases.shape)}")
        self._weights = _read_only(check.contiguous(weights))
        self._biases = _read_only(check.contiguous(biases))
        self._init: str | None = None
        self._sigma_w: float | None = None
        self._sigma_b: float | None = None
        self._seed: int | None = None
        self._chi_theory: float | None = None

    @classmethod
    def from_torch(cls, module: Any) -> Stack:
        """The parameters of a torch nn.Sequential of square Linear + activation (+ LayerNorm) blocks.

        See :func:`vgcore._from_torch.stack_parameters` for what loads (exactly, float32 / float64);
        anything else raises ValueError naming the module, TypeError for a non-Sequential.
        """
        from vgcore._from_torch import stack_parameters

        weights, biases, activation, norm, device = stack_parameters(module)
        if device == "cuda":
            from vgcore._recurrent import _to_device

            weights, biases = _to_device([weights, biases])
        return cls(weights, biases, activation=activation, norm=norm)

    @classmethod
    def random(cls, depth: int, width: int, *, activation: str = "tanh", init: str = "gaussian",
               sigma_w: float | str = 1.0, sigma_b: float = 0.0, residual: float | None = None,
               norm: str | None = None, dtype: Any = "float64", seed: int | None = None,
               device: str = "cpu") -> Stack:
        """A stack with random weights, reproducible from ``seed``.

        Parameters
        ----------
        depth, width : int
            L >= 1 layers of n >= 1 units.
        activation : str
            One of :data:`vgcore.ACTIVATIONS`.
        init : {"gaussian", "orthogonal", "uniform"}
            W ~ N(0, sigma_w^2 / n); sigma_w times a Haar-random orthogonal
            matrix; or uniform on [-a, a] with the same variance (a = sigma_w sqrt(3 / n)).
        sigma_w : float or {"xavier", "lecun", "he", "critical"}
            Weight scale, or a scheme: xavier and lecun give 1 (square layers),
            he sqrt 2, critical the sigma_w at which mean-field chi_1 = 1 for
            this activation and sigma_b (:func:`vgcore.theory.critical_sigma_w`).
        sigma_b : float
            Bias standard deviation, b ~ N(0, sigma_b^2).
        residual, norm
            As for :class:`Stack`.
        dtype : {"float64", "float32"}
            Parameters' dtype.  Weights are drawn in float64 and rounded, so
            both dtypes hold the same weights up to rounding.
        seed : int, optional
            Seed of NumPy's default generator; the same seed gives the same
            weights on CPU and GPU.  None draws a fresh seed (kept in ``.seed``).
        device : {"cpu", "cuda"}
            Where the parameters live.

        Returns
        -------
        Stack

        Raises
        ------
        TypeError, ValueError
            Naming the offending argument; also sigma_w (sigma_b) where the
            weights (biases) would exceed the dtype's largest value, and
            "depth, width" with the expected memory where the parameters
            cannot fit in the memory available (peak: the parameters plus
            one 8 MiB block of draws).
        """
        depth = check.check_int(depth, "depth")
        width = check.check_int(width, "width")
        activation = check.check_activation(activation)
        if not isinstance(init, str):
            raise TypeError(f"init: expected a string, got {type(init).__name__}")
        if init not in INITS:
            raise ValueError(f"init: unknown init {init!r}; expected one of {INITS}")
        sigma_b = check.check_real(sigma_b, "sigma_b", minimum=0.0)
        sigma_w_value = _resolve_sigma_w(sigma_w, activation, sigma_b)
        dtype = check.check_dtype(dtype)
        if not isinstance(device, str) or device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        else:
            seed = check.check_int(seed, "seed", minimum=0)
        check.check_residual(residual)
        check.check_norm(norm)

        # The weights are filled block by block of layers, straight into the dtype wanted: the
        # peak is the weights themselves plus one block in float64 (a whole-array draw followed by
        # astype held twice the weights).  Consecutive draws continue one stream, so the values
        # are those of a single (L, n, n) draw.
        itemsize = dtype.itemsize
        # QR holds about three blocks at once (input, Q, R): a quarter of the block for it
        block = max(1, (_DRAW_BLOCK_VALUES // (4 if init == "orthogonal" else 1)) // (width * width))
        check.check_memory(depth * width * (width + 1) * itemsize + min(block, depth) * width * width * 32,
                           "depth, width", f"a {depth} x {width} x {width} {dtype.name} stack's parameters")
        rng = np.random.default_rng(seed)
        weights = np.empty((depth, width, width), dtype)
        scale = sigma_w_value / math.sqrt(width)
        bound = sigma_w_value * math.sqrt(3.0 / width)
        for start in range(0, depth, block):
            count = min(block, depth - start)
            with np.errstate(over="ignore", invalid="ignore"):
                if init == "gaussian":
                    drawn = rng.standard_normal((count, width, width))
                    drawn *= scale
                elif init == "uniform":
                    if math.isfinite(2.0 * bound):
                        drawn = rng.uniform(-bound, bound, size=(count, width, width))
                    else:  # high - low overflows: halve, then double (both exact, same values)
                        drawn = rng.uniform(-0.5 * bound, 0.5 * bound, size=(count, width, width))
                        drawn *= 2.0
                else:
                    # Haar measure: QR of a Gaussian matrix with R's diagonal made positive
                    # (in place: multiplying by the signs +-1 first changes no value)
                    q, r = np.linalg.qr(rng.standard_normal((count, width, width)))
                    signs = np.sign(np.diagonal(r, axis1=1, axis2=2))
                    del r
                    signs[signs == 0] = 1.0
                    q *= signs[:, None, :]
                    q *= sigma_w_value
                    drawn = q
                    del q
                weights[start:start + count] = drawn
                del drawn  # else the next block is drawn while this one is still held
            if not np.isfinite(weights[start:start + count]).all():
                raise ValueError(f"sigma_w: {sigma_w_value!r} gives weights beyond the largest "
                                 f"{dtype.name} ({np.finfo(dtype).max:.3g}); use a smaller sigma_w")
        with np.errstate(over="ignore", invalid="ignore"):
            biases = (sigma_b * rng.standard_normal((depth, width))).astype(dtype)
        if not np.isfinite(biases).all():
            raise ValueError(f"sigma_b: {sigma_b!r} gives biases beyond the largest {dtype.name} "
                             f"({np.finfo(dtype).max:.3g}); use a smaller sigma_b")
        if device == "cuda":
            try:
                from vgcore.backends.cuda_stack import to_device
            except ImportError as error:
                raise ValueError(f"device: 'cuda' is not available here ({error})") from error
            weights, biases = to_device(weights), to_device(biases)
        stack = cls(weights, biases, activation=activation, residual=residual, norm=norm)
        stack._init = init
        stack._sigma_w = sigma_w_value
        stack._sigma_b = sigma_b
        stack._seed = seed
        return stack

    # -- properties ---------------------------------------------------------
    @property
    def weights(self):
        """Weight matrices, (L, n, n), (out, in) layout, read-only."""
        return self._weights

    @property
    def biases(self):
        """Biases, (L, n), read-only."""
        return self._biases

    @property
    def depth(self) -> int:
        """Number of layers L."""
        return int(self._weights.shape[0])

    @property
    def width(self) -> int:
        """Number of units n of every layer."""
        return int(self._weights.shape[1])

    @property
    def dtype(self) -> np.dtype:
        """float32 or float64."""
        return np.dtype(self._weights.dtype)

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def residual(self) -> float | None:
        return self._residual

    @property
    def norm(self) -> str | None:
        return self._norm

    @property
    def device(self) -> str:
        """"cuda" when the parameters are CuPy arrays, else "cpu"."""
        return "cuda" if check.is_cupy_array(self._weights) else "cpu"

    @property
    def init(self) -> str | None:
        """The init scheme of a random stack; None for explicit weights."""
        return self._init

    @property
    def sigma_w(self) -> float | None:
        """The weight scale of a random stack (schemes resolved); None for explicit weights."""
        return self._sigma_w

    @property
    def sigma_b(self) -> float | None:
        """The bias scale of a random stack; None for explicit weights."""
        return self._sigma_b

    @property
    def seed(self) -> int | None:
        """The seed of a random stack; None for explicit weights."""
        return self._seed

    @property
    def chi_theory(self) -> float:
        """Mean-field chi_1 of this stack; NaN where theory here does not apply.

        Defined for random stacks without residual connections or layer norm.
        For norm="batch" it is the large-batch limit of
        :func:`vgcore.theory.batchnorm_chi`; a profile carries the value at its
        batch size (:meth:`chi_theory_at`).
        """
        if self._chi_theory is None:
            self._chi_theory = float("nan")
            if self._norm == "batch":
                self._chi_theory = self._batchnorm_chi(math.inf)
            elif self._sigma_w is not None and self._residual is None and self._norm is None:
                from vgcore import theory

                low, high = theory.SIGMA_W_RANGE  # beyond it sigma**2 leaves the floats: no theory
                if low <= self._sigma_w <= high and self._sigma_b <= theory.SIGMA_B_MAX:
                    self._chi_theory = float(theory.chi1(self._activation, self._sigma_w, self._sigma_b))
        return self._chi_theory

    def _batchnorm_chi(self, batch: float) -> float:
        """Mean-field chi of a random batch-norm stack without residual at this batch size; else NaN."""
        if self._sigma_w is None or self._residual is not None:
            return float("nan")
        from vgcore import theory

        return float(theory.batchnorm_chi(self._activation, batch))

    def chi_theory_at(self, problem: Problem) -> float:
        """Theory's chi for one call: :attr:`chi_theory`, at the call's batch size for norm="batch"."""
        if self._norm == "batch":
            return self._batchnorm_chi(problem.batch)
        return self.chi_theory

    # -- the model-kind interface (vgcore._model.ModelKind) --------------------
    @property
    def kind(self) -> str:
        """Registry key of this stack's implementations: "batchnorm" for norm="batch", else "stack"."""
        return "batchnorm" if self._norm == "batch" else "stack"

    @property
    def state_width(self) -> int:
        """Width of the inputs x and outputs x_L: the stack's width n."""
        return self.width

    @property
    def parameters(self) -> tuple:
        """(weights, biases)."""
        return (self._weights, self._biases)

    def bind(self, x: Any, *, name: str = "x", **call: Any) -> Problem:
        """Validate inputs ``x`` (B, n) for a computation on this stack.

        Parameters
        ----------
        x : array, shape (B, n)
            Inputs x_0, any real floating dtype (cast to the stack's), on the stack's device.
        name : str
            The argument's name in error messages.
        **call
            ``steps``, ``inputs``, ``warmup``: recurrent models' keywords; a stack refuses them.

        Returns
        -------
        Problem

        Raises
        ------
        TypeError, ValueError
            Naming the offending argument.
        """
        refuse_call_keywords("stack", call)
        x = check.batch_array(x, name, width=self.width, dtype=self.dtype, like=self._weights,
                              device=self.device)
        if self._norm == "batch" and x.shape[0] < 2:
            raise ValueError(f"{name}: norm='batch' couples the samples of a batch and needs B >= 2, "
                             f"got B = {x.shape[0]}")
        return Problem(self, x, self.depth)

    def config(self) -> dict:
        """The stack's options as a dict (activation, residual, norm, init, sigma_w, sigma_b, seed, ...)."""
        return {
            "depth": self.depth,
            "width": self.width,
            "activation": self._activation,
            "init": self._init,
            "sigma_w": self._sigma_w,
            "sigma_b": self._sigma_b,
            "residual": self._residual,
            "norm": self._norm,
            "dtype": self.dtype.name,
            "seed": self._seed,
        }

    def __repr__(self) -> str:
        options = [f"depth={self.depth}", f"width={self.width}", f"activation={self._activation!r}"]
        if self._init is not None:
            options += [f"init={self._init!r}", f"sigma_w={self._sigma_w:g}", f"sigma_b={self._sigma_b:g}"]
        if self._residual is not None:
            options.append(f"residual={self._residual:g}")
        if self._norm is not None:
            options.append(f"norm={self._norm!r}")
        options += [f"dtype={self.dtype.name}", f"device={self.device!r}"]
        return f"Stack({', '.join(options)})"


def _resolve_sigma_w(sigma_w: Any, activation: str, sigma_b: float) -> float:
    if isinstance(sigma_w, str):
        if sigma_w == "critical":
            from vgcore import theory

            return float(theory.critical_sigma_w(activation, sigma_b))
        if sigma_w not in SIGMA_W_SCHEMES:
            raise ValueError(f"sigma_w: unknown scheme {sigma_w!r}; expected a number or one of "
                             f"{(*SIGMA_W_SCHEMES, 'critical')}")
        return SIGMA_W_SCHEMES[sigma_w]
    return check.check_real(sigma_w, "sigma_w", positive=True)


def _read_only(array):
    """A read-only view for NumPy arrays (the caller's array keeps its flags)."""
    if isinstance(array, np.ndarray):
        array = array.view()
        array.flags.writeable = False
    return array
