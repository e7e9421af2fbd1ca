"""Reading the parameters of PyTorch modules for Recurrent.from_torch and Stack.from_torch.

torch is imported only when one of these functions is called (with a torch
module in hand).  Parameters are copied to NumPy exactly: float32 stays
float32 and float64 float64; other dtypes are refused rather than rounded.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vgcore._activations import LEAKY_SLOPE

#: torch.nn.RNN's nonlinearity -> vgcore activation.
_RNN_NONLINEARITIES = {"tanh": "tanh", "relu": "relu"}


def _torch():
    import torch

    return torch


def _array(tensor: Any, name: str) -> np.ndarray:
    """An exact host copy of a parameter tensor (float32 / float64 only)."""
    torch = _torch()
    if tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"module: parameter {name} has dtype {tensor.dtype}; vgcore loads float32 or "
                        "float64 parameters exactly (convert the module with .float() or .double())")
    return tensor.detach().cpu().numpy().copy()


def _device(tensor: Any) -> str:
    return "cuda" if tensor.device.type == "cuda" else "cpu"


def recurrent_parameters(module: Any) -> tuple[list, str, str, str]:
    """([weight_hh, weight_ih, bias_hh, bias_ih], cell, activation, device) of an nn.RNN / LSTM / GRU.

    Raises
    ------
    TypeError
        Not one of these modules, or parameters of another dtype.
    ValueError
        num_layers != 1, bidirectional, LSTM proj_size != 0 (naming the option).
    """
    try:
        torch = _torch()
    except ImportError as error:  # pragma: no cover - a torch module implies torch
        raise TypeError(f"module: expected a torch.nn.RNN, LSTM or GRU ({error})") from error
    nn = torch.nn
    if isinstance(module, nn.LSTM):
        cell, activation = "lstm", "tanh"
        if module.proj_size != 0:
            raise ValueError(f"module: LSTM proj_size={module.proj_size} (a projected hidden state) is not "
                             "supported; use proj_size=0")
    elif isinstance(module, nn.GRU):
        cell, activation = "gru", "tanh"
    elif isinstance(module, nn.RNN):
        cell = "rnn"
        activation = _RNN_NONLINEARITIES.get(module.nonlinearity)
        if activation is None:  # pragma: no cover - torch allows only tanh and relu
            raise ValueError(f"module: nonlinearity {module.nonlinearity!r} is not supported")
    else:
        raise TypeError(f"module: expected a torch.nn.RNN, LSTM or GRU, got {type(module).__name__}")
    if module.num_layers != 1:
        raise ValueError(f"module: num_layers={module.num_layers}; vgcore.Recurrent is one layer (load "
                         "each layer of a stacked module separately)")
    if module.bidirectional:
        raise ValueError("module: bidirectional=True is not supported (one direction of time)")
    weight_hh = _array(module.weight_hh_l0, "weight_hh_l0")
    weight_ih = _array(module.weight_ih_l0, "weight_ih_l0")
    if module.bias:
        bias_hh = _array(module.bias_hh_l0, "bias_hh_l0")
        bias_ih = _array(module.bias_ih_l0, "bias_ih_l0")
    else:
        bias_hh = bias_ih = None
    if weight_ih.shape[1] == 0:
        weight_ih = None
    return [weight_hh, weight_ih, bias_hh, bias_ih], cell, activation, _device(module.weight_hh_l0)


def _activation_of(module: Any) -> str | None:
    """The vgcore activation a torch activation module computes, or None if there is none."""
    nn = _torch().nn
    simple = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.SELU: "selu", nn.SiLU: "silu"}
    for kind, name in simple.items():
        if type(module) is kind:
            return name
    if type(module) is nn.LeakyReLU and module.negative_slope == LEAKY_SLOPE:
        return "leaky_relu"
    if type(module) is nn.ELU and module.alpha == 1.0:
        return "elu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is nn.Softplus and module.beta == 1.0:
        # torch switches to the identity above `threshold` (20 by default), where the exact
        # log(1 + e^h) of vgcore differs from h by less than e^-20 relative
        return "softplus"
    return None


def _flatten(module: Any) -> list[Any]:
    nn = _torch().nn
    modules = []
    for child in module:
        if isinstance(child, nn.Sequential):
            modules.extend(_flatten(child))
        elif type(child) is not nn.Identity:
            modules.append(child)
    return modules


def stack_parameters(module: Any) -> tuple[np.ndarray, np.ndarray, str, str | None, str]:
    """(weights (L, n, n), biases (L, n), activation, norm, device) of an nn.Sequential.

    The Sequential (nested Sequentials flattened, nn.Identity skipped) must
    be L repetitions of one block: ``Linear(n, n)`` followed by one supported
    activation module (the same for every block; none at all for a linear
    stack), optionally with ``LayerNorm(n, elementwise_affine=False,
    eps=1e-5)`` before the Linear (norm "pre") or after the activation
    (norm "post").

    Raises
    ------
    TypeError
        Not an nn.Sequential, or parameters of another dtype.
    ValueError
        Any other module or arrangement, naming the module and its position.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: expected a torch.nn.Sequential of Linear / activation / LayerNorm "
                        f"blocks, got {type(module).__name__}")
    modules = _flatten(module)
    if not modules:
        raise ValueError("module: the Sequential holds no layers")
    letters, activations = [], set()
    width = None
    for position, child in enumerate(modules):
        where = f"module: layer {position} ({child!r})"
        if type(child) is nn.Linear:
            rows, cols = child.weight.shape
            if rows != cols:
                raise ValueError(f"{where}: vgcore stacks are square; got {cols} -> {rows} features")
            if width is not None and rows != width:
                raise ValueError(f"{where}: width {rows} differs from the first Linear's {width}")
            width = rows
            letters.append("L")
        elif type(child) is nn.LayerNorm:
            if child.elementwise_affine or len(child.normalized_shape) != 1 or child.eps != 1e-5:
                raise ValueError(f"{where}: only LayerNorm(n, elementwise_affine=False, eps=1e-5) over "
                                 "the features is supported")
            letters.append("N")
        else:
            name = _activation_of(child)
            if name is None:
                raise ValueError(f"{where}: not a supported module (Linear, LayerNorm without affine, "
                                 "Tanh, Sigmoid, ReLU, LeakyReLU(0.01), ELU(1), SELU, GELU('none'), "
                                 "SiLU, Softplus(beta=1))")
            activations.add(name)
            letters.append("A")
    if len(activations) > 1:
        raise ValueError(f"module: every block must use one activation; found {sorted(activations)}")
    for position, child in enumerate(modules):
        if letters[position] == "N" and width is not None and child.normalized_shape[0] != width:
            raise ValueError(f"module: layer {position} ({child!r}) normalises {child.normalized_shape[0]} "
                             f"features, the Linear layers have {width}")
    pattern = "".join(letters)
    block = "L" if not activations else "LA"
    norms = {None: f"({block})+", "pre": f"(N{block})+", "post": f"({block}N)+"}
    norm = next((key for key, regex in norms.items() if re.fullmatch(regex, pattern)), "?")
    if norm == "?":
        raise ValueError(f"module: layers {pattern} (L Linear, A activation, N LayerNorm) do not repeat one "
                         f"block {block}, N{block} or {block}N")
    linears = [child for child in modules if type(child) is nn.Linear]
    weights = [_array(layer.weight, f"{position}.weight") for position, layer in enumerate(linears)]
    biases = [_array(layer.bias, f"{position}.bias") if layer.bias is not None
              else np.zeros(width, dtype=weights[position].dtype) for position, layer in enumerate(linears)]
    dtypes = {array.dtype.name for array in weights + biases}
    if len(dtypes) > 1:
        raise TypeError(f"module: parameters of several dtypes {sorted(dtypes)}; vgcore loads them "
                        "exactly into one dtype (convert the module with .float() or .double())")
    activation = activations.pop() if activations else "linear"
    return np.stack(weights), np.stack(biases), activation, norm, _device(linears[0].weight)
