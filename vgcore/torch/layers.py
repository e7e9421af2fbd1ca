"""Layer grouping: a model's parameters as named layers, ordered input -> output.

See :mod:`vgcore.torch` for the rules :func:`resolve_layers` follows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_layers"]


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


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
    check_model(model)
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


def split_outside(
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
