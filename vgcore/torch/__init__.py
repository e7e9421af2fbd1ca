"""PyTorch integration: per-layer gradient monitoring, alerts, layer-wise learning rates, freezing.

Install with ``pip install vgcore[torch]``.  ``import vgcore`` never imports
PyTorch; importing this package does.

- :class:`GradientMonitor` (:mod:`vgcore.torch.monitor`) records, at every
  training step, the gradient norm of each *layer* (a group of parameters:
  by default the blocks of the model's largest ``nn.ModuleList``, as in
  transformer encoders), and turns the per-layer curve into vgcore's
  statistics (:mod:`vgcore.stats`) and findings: vanishing, exploding,
  dead, frozen layers and clipped steps (:mod:`vgcore._findings`, shared
  with the Lightning, Hugging Face and JAX monitors).
- :func:`llrd_param_groups` (:mod:`vgcore.torch.llrd`) builds optimizer
  parameter groups for layer-wise learning-rate decay, with a decay that can
  be derived from a measured gradient profile (:func:`auto_decay`).
- :func:`freeze_layers` freezes the embeddings and the first blocks.
- :func:`resolve_layers` (:mod:`vgcore.torch.layers`) is the layer grouping
  all of these share.

Layers
------
A layer is a named group of parameters.  ``layers=None`` picks the blocks of
the model's largest ``nn.ModuleList`` (the one with the most children that
hold parameters; ties go to the one with more parameters): ``encoder.layer.0``
.. ``encoder.layer.11`` of a BERT, ``layers.0`` .. of an
``nn.TransformerEncoder``.  A model without a ``ModuleList`` of at least two
such children gets one layer per module that owns parameters directly (each
``nn.Linear``, ``nn.LayerNorm``, ...), in registration order.  Either way the
layers are assumed to be ordered input -> output, as PyTorch models register
them.  ``layers`` may also be a sequence of modules or qualified module names
(``"encoder.layer.3"``), or a mapping from layer names to modules, module
names or iterables of parameters.  A parameter listed in two layers counts in
the first.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as error:  # exercised in a subprocess by the tests
    raise ImportError(
        "vgcore.torch needs PyTorch, which is not installed: pip install vgcore[torch]"
    ) from error

from vgcore._findings import Clipping, Finding, GradientHistory
from vgcore.torch.layers import resolve_layers
from vgcore.torch.llrd import auto_decay, freeze_layers, llrd_param_groups
from vgcore.torch.monitor import GradientMonitor

__all__ = [
    "Clipping",
    "Finding",
    "GradientHistory",
    "GradientMonitor",
    "auto_decay",
    "freeze_layers",
    "llrd_param_groups",
    "resolve_layers",
]
